"""Ray Tune sweeps: the Tuner, the per-trial function, reporting to Tune, and the outputs.

Use it through :func:`moe_lab.tuning.run_sweep` / :func:`moe_lab.tuning.resume_sweep` or
``moe-lab sweep``. What happens:

1. the driver starts (or joins) Ray, tokenizes the base job's data once and ships it to
   the trials through the object store (``tune.with_parameters``); trials whose sampled
   config changes the ``data`` section prepare their own;
2. a ``Tuner`` runs :func:`_run_trial` per sampled config, with ``ASHAScheduler`` on the
   sweep metric (time attribute: the optimiser ``step``) and the search algorithm
   (``BasicVariantGenerator`` over :func:`param_space` for random/grid, ``OptunaSearch``
   with the define-by-run :class:`OptunaSpace` for optuna); neither samples a field for
   the trials it has no effect on (:data:`moe_lab.tuning.INERT_FIELDS`);
3. a 1-worker trial runs :class:`~moe_lab.training.MoETrainer` in the trial process and
   calls ``ray.tune.report``; a multi-worker trial (``scaling.num_workers > 1``) starts a
   ``TorchTrainer`` through :class:`~.train.DistributedMoETrainer`, whose workers call
   ``ray.train.report`` and whose ``RunConfig`` carries a ``TuneReportCallback`` that
   forwards those reports to Tune;
4. each trial reports once per evaluation: the eval metrics and the latest training
   metrics together (every result then holds the sweep metric, as Tune's strict metric
   check and ``OptunaSearch`` require);
5. at the end the driver writes ``results.csv``, ``best.yaml``, ``router_comparison.png``
   and prints a rich table; a field without effect on a trial shows as ``n/a``, with the
   reason in the ``inert`` column, the table's legend and a ``best.yaml`` comment.

Resources on a local machine: 1-worker trials take 0.5 logical CPU and one torch thread,
and as many run at once as there are cores; a multi-worker trial's driver takes 0.25
CPU and ``cores // num_workers`` of them run at once. On a cluster (``address``) each
1-worker trial takes 1 CPU (``trial_resources`` changes it) and the cluster's CPUs bound
the concurrency.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.stopper import Stopper

from ..errors import ConfigError
from ..jobs import JobSpec
from ..tuning import (
    BEST_JOB,
    INERT_FIELDS,
    NOT_APPLICABLE,
    REPORTED_METRICS,
    RESULTS_CSV,
    ROUTER_PLOT,
    SWEEP_FILE,
    InertRule,
    SearchDim,
    SweepResult,
    SweepSpec,
    _plain,
    describe_trial,
    drawn_inert_rules,
    grid_points,
    inert_rules,
    job_values,
    trial_job,
)
from .cluster import init_ray, local_cpu_count

logger = logging.getLogger(__name__)

#: router order in tables and plots
ROUTER_ORDER = ("top_k", "switch", "expert_choice")
#: metric columns of the results table (after the sampled parameters)
METRIC_COLUMNS = tuple(m for m in REPORTED_METRICS if m not in ("load_imbalance", "dropped_fraction"))


# ---------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """How trials are placed: Tune resources per trial, concurrency, torch threads."""

    resources: Dict[str, float]
    max_concurrent_trials: int
    torch_threads: int
    num_workers: int  #: Ray Train workers of the largest trial (1: in-process trials)


def _max_workers(spec: SweepSpec, job: JobSpec) -> int:
    workers = job.scaling.num_workers
    for d in spec.dimensions:
        if d.field == "scaling.num_workers":
            values = d.values if d.values else (d.low, d.high)
            workers = max([workers] + [int(v) for v in values if isinstance(v, (int, float))])
    return workers


def plan_trials(spec: SweepSpec, job: JobSpec, local: bool, cluster_cpus: float, cluster_gpus: float = 0.0) -> TrialPlan:
    """Size trial resources and ``max_concurrent_trials`` to the machine (explicit values win)."""
    r = spec.trial_resources
    cores = os.cpu_count() or 1
    workers = _max_workers(spec, job)
    if workers > 1:
        cpu = r.cpu or 0.25  # the trial only drives the TorchTrainer; its workers ask for their own
        threads = 1
        if local:
            concurrent = max(1, cores // workers)
        else:
            per_worker = job.scaling.cpus_per_worker or 1.0
            concurrent = max(1, int(cluster_cpus // (workers * per_worker + cpu)))
        resources = {"CPU": cpu}
    else:
        threads = r.torch_threads or (1 if local else max(1, int(r.cpu or 1)))
        cpu = r.cpu or (0.5 if local else 1.0)
        concurrent = max(1, cores // threads) if local else max(1, int(cluster_cpus // cpu))
        resources = {"CPU": cpu}
        if r.gpu:
            resources["GPU"] = r.gpu
            if cluster_gpus:
                concurrent = min(concurrent, max(1, int(cluster_gpus // r.gpu)))
    concurrent = spec.max_concurrent_trials or min(concurrent, spec.num_trials)
    return TrialPlan(resources=resources, max_concurrent_trials=concurrent, torch_threads=threads, num_workers=workers)


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")


class _RecordMerger:
    """Turns MoETrainer callback records into one flat Tune result per evaluation.

    Train records (``loss``, ``tokens_per_s``, ``moe_layers``) are remembered; an eval
    record (``eval_loss``, ...) yields the result: its metrics (per-layer lists reduced to
    mean and max) plus the latest training metrics and the trial's ``max_steps``.
    """

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.train = {"train_loss": math.nan, "tokens_per_s": math.nan, "load_imbalance": math.nan,
                      "dropped_fraction": math.nan}

    def merge(self, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if "eval_loss" not in record:
            layers = record.get("moe_layers") or []
            self.train = {
                "train_loss": float(record.get("loss", math.nan)),
                "tokens_per_s": float(record.get("tokens_per_s", math.nan)),
                "load_imbalance": _mean([lay["load_imbalance_max_mean"] for lay in layers]),
                "dropped_fraction": _mean([lay["dropped_fraction"] for lay in layers]),
            }
            return None
        imbalance = list(record.get("eval_load_imbalance") or [])
        dead = list(record.get("eval_dead_experts") or [])
        result = {
            "step": int(record["step"]),
            "max_steps": int(self.max_steps),
            "eval_loss": float(record["eval_loss"]),
            "eval_perplexity": float(record["eval_perplexity"]),
            "eval_load_imbalance": _mean(imbalance),
            "eval_load_imbalance_max": max(imbalance) if imbalance else math.nan,
            "eval_dropped_fraction": _mean(record.get("eval_dropped_fraction") or []),
            "eval_dead_expert_fraction": float(record.get("eval_dead_expert_fraction", 0.0)),
            "eval_dead_experts_max": int(max(dead)) if dead else 0,
        }
        result.update(self.train)
        return result


class _TuneReporter(_RecordMerger):
    """MoETrainer callback of an in-process trial: ``ray.tune.report`` at each evaluation."""

    def __call__(self, record: Dict[str, Any]) -> None:
        result = self.merge(record)
        if result is not None:
            tune.report(result)


class _RayTrainReporter(_RecordMerger):
    """MoETrainer callback on every Ray Train worker: ``ray.train.report`` at each evaluation.

    Evaluations are collective, so every rank reports the same number of times (the
    report is a barrier); Ray Train keeps rank 0's metrics.
    """

    def __call__(self, record: Dict[str, Any]) -> None:
        result = self.merge(record)
        if result is not None:
            import ray.train

            ray.train.report(result)


class _EvalReportsToTune(TuneReportCallback):
    """Forwards the workers' evaluation reports to Tune (checkpoint-only reports stay in Train)."""

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "eval_loss" in metrics[0]:
            super().after_report(run_context, metrics, None)


def routing_collapsed(result: Dict[str, Any], dead_expert_fraction: float, after_step: int) -> bool:
    """More than ``dead_expert_fraction`` of some layer's experts got no eval token, after warm-up."""
    frac = result.get("eval_dead_expert_fraction")
    return frac is not None and int(result.get("step", 0)) >= after_step and float(frac) > dead_expert_fraction


class RoutingCollapseStopper(Stopper):
    """Tune stopper: ends a trial whose routing collapsed (see :func:`routing_collapsed`)."""

    def __init__(self, dead_expert_fraction: float = 0.5, after_step: int = 0) -> None:
        self.dead_expert_fraction = dead_expert_fraction
        self.after_step = after_step

    def __call__(self, trial_id: str, result: Dict[str, Any]) -> bool:
        return routing_collapsed(result, self.dead_expert_fraction, self.after_step)

    def stop_all(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------
# the trial
# ---------------------------------------------------------------------------------------


@dataclass
class _TrialContext:
    sweep: Dict[str, Any]  #: the resolved SweepSpec as a dict
    torch_threads: int
    directory: str  #: the sweep directory; trial outputs go to ``directory/trial_<id>/train``


def _total_steps(job: JobSpec, train: Any) -> int:
    t = job.training
    if t.max_steps is not None:
        return t.max_steps
    return max(1, len(train) // t.batch_size // t.gradient_accumulation_steps) * t.num_epochs


def _run_trial(config: Dict[str, Any], ctx: _TrialContext, shared: Any = None) -> None:
    """One trial: resolve its job, train it in-process or on Ray Train workers, report to Tune.

    ``ctx`` and ``shared`` (the driver's PreparedData, or None) come through
    ``tune.with_parameters``."""
    from ..pipeline import build_model, prepare_data, train_kwargs, trainer_kwargs

    logging.getLogger().setLevel(logging.WARNING)
    spec = SweepSpec.from_dict(ctx.sweep)
    job, adjustments = trial_job(spec, config)  # ConfigError: the trial fails with that message
    # write straight into the sweep directory (Tune's own trial dir is a staging area under
    # /tmp/ray that a resumed sweep would not find): checkpoints survive an interruption
    trial_dir = Path(ctx.directory) / _trial_dirname(tune.get_context())
    out = trial_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    ran = job.to_dict()
    ran["training"]["output_dir"] = str(out)
    JobSpec.from_dict(ran).to_yaml(trial_dir / "job.yaml")  # the job as this trial ran it
    if adjustments:
        (trial_dir / "adjustments.txt").write_text("\n".join(adjustments) + "\n", encoding="utf-8")
    torch.set_num_threads(ctx.torch_threads)
    same_data = shared is not None and job.data.to_dict() == spec.job.data.to_dict()
    data = shared if same_data else prepare_data(job)
    torch.manual_seed(job.training.seed)
    model = build_model(job, len(data.tokenizer))
    max_steps = _total_steps(job, data.train)
    kw = trainer_kwargs(job)
    kw["progress_bar"] = False
    tkw = train_kwargs(job, str(out))
    sc = job.scaling
    if sc.num_workers > 1:
        from .train import DistributedMoETrainer

        trainer = DistributedMoETrainer(
            model,
            world_size=sc.num_workers,
            expert_parallel_size=sc.expert_parallel_size,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker} if sc.cpus_per_worker else None,
            storage_path=str(trial_dir / "ray"),
            max_failures=sc.max_failures,
            name="train",
            tokenizer=data.tokenizer,
            tensorboard=False,
            run_config_callbacks=[_EvalReportsToTune()],
            **kw,
        )
        trainer.train(data.train, data.eval, resume_from="latest", callbacks=[_RayTrainReporter(max_steps)], **tkw)
    else:
        from ..training import MoETrainer

        trainer = MoETrainer(model, tokenizer=data.tokenizer, tensorboard=False, **kw)
        trainer.train(data.train, data.eval, resume_from="latest", callbacks=[_TuneReporter(max_steps)], **tkw)


def _trial_dirname(trial: Any) -> str:
    """``trial_<id>``: Tune's name and directory of a trial (also where its outputs go)."""
    trial_id = trial.get_trial_id() if hasattr(trial, "get_trial_id") else trial.trial_id
    return f"trial_{trial_id}"


# ---------------------------------------------------------------------------------------
# the Tuner
# ---------------------------------------------------------------------------------------


def _domain(d: SearchDim) -> Any:
    """The Tune distribution of one drawn field (``randint`` bounds are inclusive)."""
    if d.kind in ("choice", "grid"):
        return tune.choice(list(d.values))
    if d.kind == "uniform":
        return tune.uniform(float(d.low), float(d.high))
    if d.kind == "loguniform":
        return tune.loguniform(float(d.low), float(d.high))
    return tune.randint(int(d.low), int(d.high) + 1)


def _inert_or_drawn(d: SearchDim, rules: Sequence[InertRule], base: Dict[str, Any], seed: Sequence[int]) -> Any:
    """``tune.sample_from`` for a drawn field that ``rules`` may make inert: once the trial's
    condition fields are resolved, the rule's value where one applies, else a draw from the
    field's distribution (with a generator seeded by the sweep's seed).

    A closure, not an object: Tune deep-copies the spec per trial, which would copy an
    object's generator (every trial drawing the same value); a function is not copied."""
    domain = _domain(d)
    rng = np.random.default_rng(seed)
    conditions = [name for rule in rules for name, _ in rule.when]

    def sample(spec: Any) -> Any:
        # Tune passes its experiment spec (the param space under "config"), through a guard
        config = getattr(spec, "config") if "config" in spec else spec
        values = dict(base)
        for name in conditions:
            section, key = name.split(".", 1)
            if key in (dict.get(config, section) or {}):
                # attribute access through Tune's guard raises RecursiveDependencyError while
                # the condition is not resolved yet; Tune then resolves it first and comes back
                values[name] = getattr(getattr(config, section), key)
        for rule in rules:
            if rule.applies(values):
                return base[rule.field] if rule.runs_with is None else rule.runs_with
        return domain.sample(random_state=rng)

    return tune.sample_from(sample)


def param_space(spec: SweepSpec) -> Dict[str, Any]:
    """The Tune search space of a random/grid sweep, nested by job section
    (``{"model": {"router_type": ...}}``); with optuna, ``{}`` (see :class:`OptunaSpace`).

    Grid fields become ``tune.grid_search``, drawn fields Tune distributions (``randint``
    bounds inclusive); a drawn field that an inert rule may apply to becomes a
    ``tune.sample_from`` (:func:`_inert_or_drawn`). Where the grid collapses (a grid field
    is inert in some points, :func:`~moe_lab.tuning.grid_points`), per-field grids would
    make the duplicates back: that section becomes one ``tune.grid_search`` over its
    points, each a dict with the section's drawn fields too (Tune's status table then shows
    the section as one column; each trial's config box lists every field).
    """
    if spec.search == "optuna":
        return {}
    base = job_values(spec.job)
    drawn: Dict[str, Any] = {}  # section.key -> distribution
    for i, d in enumerate(spec.dimensions):
        if not d.is_grid(spec.search):
            rules = drawn_inert_rules(spec, d)
            drawn[d.field] = _inert_or_drawn(d, rules, base, seed=[spec.seed % 2**32, i]) if rules else _domain(d)
    space: Dict[str, Any] = {}
    for section, points in grid_points(spec).items():
        dims = [d for d in spec.dimensions if d.section == section]
        grid = [d for d in dims if d.is_grid(spec.search)]
        if any(len(point) < len(grid) for point in points):  # the grid collapsed
            section_drawn = {d.key: drawn[d.field] for d in dims if d.field in drawn}
            space[section] = tune.grid_search(
                [{**{f.split(".", 1)[1]: v for f, v in point.items()}, **section_drawn} for point in points]
            )
        else:
            space[section] = {d.key: drawn[d.field] if d.field in drawn else tune.grid_search(list(d.values))
                              for d in dims}
    return space


class OptunaSpace:
    """Optuna's define-by-run search space: suggests the fields that inert rules depend on
    first, then every other field unless it is inert for the values suggested so far (it is
    then left out of the trial's config: Optuna models no parameter without effect).

    Grid entries are choices under Optuna. Parameters are named ``section/key`` (Ray's
    OptunaSearch nests them into ``{"section": {"key": ...}}``). A plain object, as
    OptunaSearch pickles its space with the searcher state.
    """

    def __init__(self, spec: SweepSpec) -> None:
        conditions = {name for rule in INERT_FIELDS for name, _ in rule.when}
        self.dims = sorted(spec.dimensions, key=lambda d: d.field not in conditions)  # stable
        searched = {d.field for d in spec.dimensions}
        self.known = {f: v for f, v in job_values(spec.job).items() if f not in searched}

    def __call__(self, trial: Any) -> None:
        values = dict(self.known)
        for d in self.dims:
            if inert_rules(values, [d.field]):
                continue
            name = d.field.replace(".", "/")
            if d.kind in ("choice", "grid"):
                values[d.field] = trial.suggest_categorical(name, list(d.values))
            elif d.kind == "randint":
                values[d.field] = trial.suggest_int(name, int(d.low), int(d.high))  # inclusive
            else:
                values[d.field] = trial.suggest_float(name, float(d.low), float(d.high), log=d.kind == "loguniform")
        return None


def _search_alg(spec: SweepSpec, max_concurrent: int) -> Tuple[Any, Optional[int]]:
    """The search algorithm, and the ``max_concurrent_trials`` for TuneConfig (a
    ``BasicVariantGenerator`` limits concurrency itself; TuneConfig's limit wraps Searchers)."""
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=OptunaSpace(spec), metric=spec.metric, mode=spec.mode, seed=spec.seed), max_concurrent
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent), None


def _scheduler(spec: SweepSpec, job: JobSpec) -> Any:
    s = spec.scheduler
    if s is None or s.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or job.training.max_steps
    grace = s.grace_period or min(job.training.eval_steps, max_t)
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=s.reduction_factor)


def _trainable(spec: SweepSpec, job: JobSpec, address: Optional[str], directory: Path) -> Tuple[Any, TrialPlan]:
    from ..pipeline import prepare_data

    local = address is None and not os.environ.get("RAY_ADDRESS")
    res = ray.cluster_resources()
    plan = plan_trials(spec, job, local, float(res.get("CPU", local_cpu_count())), float(res.get("GPU", 0)))
    shared = None if any(d.section == "data" for d in spec.dimensions) else prepare_data(job)
    ctx = _TrialContext(sweep=spec.to_dict(), torch_threads=plan.torch_threads, directory=str(directory))
    fn = tune.with_parameters(_run_trial, ctx=ctx, shared=shared)
    return tune.with_resources(fn, plan.resources), plan


def _describe(spec: SweepSpec, plan: TrialPlan, directory: Path) -> str:
    return (
        f"sweep {spec.name}: {spec.num_trials} trials ({spec.search} search, "
        f"{spec.scheduler.type if spec.scheduler else 'fifo'} on {spec.metric}), "
        f"{plan.max_concurrent_trials} at a time with {plan.resources} each; outputs in {directory}"
    )


def run_sweep_ray(spec: SweepSpec, directory: Path, address: Optional[str] = None, verbose: int = 1) -> SweepResult:
    """Run a resolved sweep into ``directory`` (``output_dir/name``); see :func:`moe_lab.tuning.run_sweep`."""
    t0 = time.perf_counter()
    job = spec.job
    init_ray(address, log_to_driver=verbose > 0)
    trainable, plan = _trainable(spec, job, address, directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec.to_yaml(directory / SWEEP_FILE)
    if verbose:
        print(_describe(spec, plan, directory), flush=True)
    stopper = None
    if spec.stop_on_routing_collapse is not None:
        c = spec.stop_on_routing_collapse
        stopper = RoutingCollapseStopper(c.dead_expert_fraction, c.after_step)
    search_alg, max_concurrent = _search_alg(spec, plan.max_concurrent_trials)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=search_alg,
            scheduler=_scheduler(spec, job),
            num_samples=spec.num_samples,
            max_concurrent_trials=max_concurrent,
            reuse_actors=False,
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=directory.name,
            storage_path=str(directory.parent),
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
        ),
    )
    grid = tuner.fit()
    return write_outputs(spec, directory, grid, time.perf_counter() - t0, verbose=verbose)


def resume_sweep_ray(
    spec: SweepSpec, directory: Path, address: Optional[str] = None, retry_failed: bool = False, verbose: int = 1
) -> SweepResult:
    """Resume the sweep in ``directory`` with ``Tuner.restore``; see :func:`moe_lab.tuning.resume_sweep`."""
    t0 = time.perf_counter()
    job = spec.job
    init_ray(address, log_to_driver=verbose > 0)
    if not tune.Tuner.can_restore(str(directory)):
        raise ConfigError(
            f"{directory} holds no Tune experiment state to resume (the sweep stopped before its first trial "
            "started); start it again with `moe-lab sweep`"
        )
    trainable, plan = _trainable(spec, job, address, directory)
    if verbose:
        print("resuming " + _describe(spec, plan, directory), flush=True)
    tuner = tune.Tuner.restore(
        str(directory), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=retry_failed
    )
    grid = tuner.fit()
    return write_outputs(spec, directory, grid, time.perf_counter() - t0, verbose=verbose)


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------


def _error_text(err: Any) -> str:
    """One line for the table: the exception type and message, without Ray's traceback."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Traceback" in text and lines:  # a TuneError or RayTaskError carrying the remote traceback
        text = lines[-1]
    elif lines:
        text = f"{type(cause).__name__}: {' '.join(lines)}"
    return text[:500]


def _trials_of(grid: Any) -> List[Tuple[Any, Optional[Any]]]:
    """``(Result, Trial)`` pairs; the Trial (status, config of trials that never reported)
    comes from the grid's experiment analysis, where Ray keeps it."""
    trials = list(getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [])
    results = list(grid)
    if len(trials) != len(results):
        return [(r, None) for r in results]
    return list(zip(results, trials, strict=True))


def saved_trial_statuses(directory: Path) -> Dict[str, str]:
    """Trial statuses as Tune saved them last (``ExperimentAnalysis`` of the directory).

    Tune writes its experiment state once more when a run ends, before it stops the trials
    still running, so after a Ctrl-C these are RUNNING/PENDING where in-memory trials
    already read TERMINATED.
    """
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # trials that never reported have no result files: expected
    try:
        return {t.trial_id: str(t.status) for t in ExperimentAnalysis(str(directory)).trials}
    except Exception as exc:  # no state on disk: fall back to the in-memory statuses
        logger.warning("could not read the saved trial statuses in %s: %s", directory, exc)
        return {}
    finally:
        quiet.setLevel(level)


def _status(metrics: Dict[str, Any], error: str, tune_status: Optional[str], spec: SweepSpec) -> str:
    if error:
        return "error"
    if tune_status is not None and tune_status not in ("TERMINATED", "ERROR"):
        return "interrupted"  # running or waiting when the run stopped: a resume runs it
    step = metrics.get("step")
    if step is None:
        return "no result"
    if metrics.get("max_steps") is not None and step >= metrics["max_steps"]:
        return "completed"
    c = spec.stop_on_routing_collapse
    if c is not None and routing_collapsed(metrics, c.dead_expert_fraction, c.after_step):
        return "routing collapse"
    return "early stopped"


def collect_rows(spec: SweepSpec, grid: Any, statuses: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """One row per trial (the columns of results.csv), best first.

    ``statuses``: Tune trial statuses by trial id (default: those of the grid's trials)."""
    rows = []
    for res, trial in _trials_of(grid):
        metrics = dict(res.metrics or {})
        config = dict(getattr(trial, "config", None) or res.config or {})
        path = Path(res.path) if res.path else None
        trial_id = (getattr(trial, "trial_id", None) or metrics.get("trial_id")
                    or (path.name.replace("trial_", "", 1) if path else "?"))
        tune_status = (statuses or {}).get(trial_id) or (str(trial.status) if trial is not None else None)
        error = _error_text(res.error) if res.error is not None else ""
        params, adjustments, notes = describe_trial(spec, config)
        row: Dict[str, Any] = {
            "trial_id": trial_id,
            "status": _status(metrics, error, tune_status, spec),
            "step": metrics.get("step"),
            "max_steps": metrics.get("max_steps"),
            **params,
        }
        for col in METRIC_COLUMNS:
            v = metrics.get(col)
            row[col] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        row.update(adjustments="; ".join(adjustments), inert="; ".join(notes), error=error,
                   trial_dir=str(path) if path else "")
        row["config"] = config  # the sampled Tune config (not a CSV column)
        row["inert_notes"] = notes  # why a field is n/a (not a CSV column: the "inert" column joins them)
        rows.append(row)
    sign = 1.0 if spec.mode == "min" else -1.0

    def key(r: Dict[str, Any]) -> Tuple[int, float]:
        v = r.get(spec.metric)
        bad = v is None or (isinstance(v, float) and math.isnan(v))
        return (int(bad), sign * v if not bad else 0.0)

    rows.sort(key=key)
    return rows


def pick_best(rows: List[Dict[str, Any]], metric: str) -> Optional[Dict[str, Any]]:
    """The best row among trials that ran to the end (else among any that reported ``metric``)."""
    def ok(r: Dict[str, Any]) -> bool:
        v = r.get(metric)
        return v is not None and not math.isnan(v)

    for pool in ([r for r in rows if r["status"] == "completed"], rows):
        scored = [r for r in pool if ok(r)]
        if scored:
            return scored[0]  # rows are sorted best first
    return None


def write_results_csv(rows: List[Dict[str, Any]], path: Path, fields: Sequence[str]) -> Path:
    columns = ["trial_id", "status", "step", "max_steps", *fields, *METRIC_COLUMNS, "adjustments", "inert", "error",
               "trial_dir"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def _shown(value: Any) -> str:
    """A parameter value in a comment: ``repr``, but n/a as it is."""
    return NOT_APPLICABLE if value == NOT_APPLICABLE else repr(value)


def inert_legend(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The legend of the n/a cells: one line per reason, in order of first appearance."""
    notes = dict.fromkeys(note for r in rows for note in r.get("inert_notes", []))
    return [f"{NOT_APPLICABLE}: {note}" for note in notes]


def write_best_job(spec: SweepSpec, best: Dict[str, Any], path: Path, config: Dict[str, Any]) -> Path:
    """The best trial's job as a runnable job YAML (``moe-lab train best.yaml``)."""
    job, adjustments = trial_job(spec, config)
    data = job.to_dict()
    data["name"] = f"{spec.name}-best"
    data["training"]["output_dir"] = f"./outputs/{spec.name}-best"
    job = JobSpec.from_dict(data)
    value = best.get(spec.metric)
    header = [
        f"# Best trial of sweep {spec.name}: {best['trial_id']} ({best['status']}, step {best['step']}),",
        f"# {spec.metric} = {value:.4f}." if isinstance(value, float) else f"# {spec.metric} = {value}.",
        "# Ran with: " + ", ".join(f"{f}={_shown(best.get(f))}" for f in (d.field for d in spec.dimensions)),
    ]
    header += [f"# {NOT_APPLICABLE}: {note}" for note in best.get("inert_notes", [])]
    if adjustments:
        header.append("# Adjusted: " + "; ".join(adjustments))
    header.append(f"# Train it: moe-lab train {path.name}")
    path.write_text("\n".join(header) + "\n" + job.to_yaml(), encoding="utf-8")
    return path


def plot_router_comparison(rows: List[Dict[str, Any]], path: Path, metric: str, title: str,
                           default_router: str = "top_k", mode: str = "min") -> Path:
    """Final ``metric`` of every trial, grouped by router type (PNG, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("model.router_type") or default_router), []).append(r)
    names = [n for n in ROUTER_ORDER if n in groups] + sorted(n for n in groups if n not in ROUTER_ORDER)
    fig = Figure(figsize=(max(5.0, 1.8 * len(names) + 2), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {
        "completed": dict(marker="o", facecolors="C0", edgecolors="C0"),
        "early stopped": dict(marker="o", facecolors="none", edgecolors="C1"),
        "routing collapse": dict(marker="x", c="C3"),
        "interrupted": dict(marker="^", facecolors="none", edgecolors="C7"),
    }
    seen = set()
    labels = []
    for i, name in enumerate(names):
        members = groups[name]
        scored = [r for r in members if r.get(metric) is not None and not math.isnan(r[metric])]
        for j, r in enumerate(scored):
            x = i + (j - (len(scored) - 1) / 2) * min(0.12, 0.6 / max(len(scored), 1))
            st = r["status"] if r["status"] in styles else "completed"
            ax.scatter([x], [r[metric]], s=46, label=st if st not in seen else None, **styles[st])
            seen.add(st)
            if st != "completed" and r.get("step") is not None:  # where it stopped
                ax.annotate(f"step {r['step']}", (x, r[metric]), textcoords="offset points", xytext=(6, -3),
                            fontsize=7, color="0.35")
        done = [r[metric] for r in scored if r["status"] == "completed"]
        if done:
            best = min(done) if mode == "min" else max(done)
            ax.hlines(best, i - 0.3, i + 0.3, colors="C2", linewidth=1.5,
                      label="best completed (per router)" if "best" not in seen else None)
            seen.add("best")
        failed = sum(1 for r in members if r["status"] == "error")
        labels.append(f"{name}\n{len(members)} trial{'s' if len(members) != 1 else ''}"
                      + (f", {failed} failed" if failed else ""))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("router type")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if seen:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial reported a result", ha="center", va="center", transform=ax.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110, format="png")
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def print_results_table(result: SweepResult, console: Any = None) -> None:
    """The results as a rich table (best first)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for every column
            console = Console(width=max(console.width, 240))
    legend = inert_legend(result.rows)
    table = Table(title=f"sweep {result.directory.name}: {len(result.rows)} trials, "
                        f"best first ({result.metric}, {result.mode})",
                  caption="\n".join(legend) or None, caption_justify="left")
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    for f in result.param_fields:
        table.add_column(f.split(".", 1)[1], justify="right")
    shown = ("eval_loss", "eval_perplexity", "eval_load_imbalance", "eval_dropped_fraction", "tokens_per_s")
    for col in shown:
        table.add_column(col.replace("eval_", ""), justify="right")
    table.add_column("note")
    colors = {"completed": "green", "early stopped": "yellow", "routing collapse": "magenta", "error": "red"}
    for r in result.rows:
        note = r["error"] or r["adjustments"].split(" (")[0]
        style = "bold" if result.best is not None and r["trial_id"] == result.best["trial_id"] else None
        table.add_row(
            r["trial_id"],
            f"[{colors.get(r['status'], 'white')}]{r['status']}[/]",
            _fmt(r["step"]),
            *[_fmt(r.get(f)) for f in result.param_fields],
            *[_fmt(r.get(c)) for c in shown],
            (note[:70] + "...") if len(note) > 70 else note,
            style=style,
        )
    console.print(table)


def write_outputs(spec: SweepSpec, directory: Path, grid: Any, elapsed: float, verbose: int = 1) -> SweepResult:
    """results.csv, best.yaml and the router plot from a finished (or interrupted) Tune run."""
    rows = collect_rows(spec, grid, saved_trial_statuses(directory))
    fields = [d.field for d in spec.dimensions]
    interrupted = any(r["status"] == "interrupted" for r in rows) or len(rows) < spec.num_trials
    csv_path = write_results_csv(rows, directory / RESULTS_CSV, fields)
    best = pick_best(rows, spec.metric)
    best_path = None
    if best is not None:
        best_path = write_best_job(spec, best, directory / BEST_JOB, best["config"])
    plot = plot_router_comparison(
        rows, directory / ROUTER_PLOT, spec.metric,
        title=f"{spec.name}: final {spec.metric} per trial",
        default_router=_plain(spec.job.model.router_type), mode=spec.mode,
    )
    result = SweepResult(
        directory=directory, rows=rows, best=best, metric=spec.metric, mode=spec.mode, results_csv=csv_path,
        best_job_path=best_path, plot_path=plot, elapsed_seconds=elapsed, interrupted=interrupted, param_fields=fields,
    )
    if verbose:
        print_results_table(result)
    return result
