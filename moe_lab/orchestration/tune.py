"""Ray Tune sweeps: the Tuner, the per-trial function and reporting to Tune.

    from moe_lab.orchestration.tune import run_sweep, resume_sweep   # or from moe_lab.tuning
    result = run_sweep("jobs/sweep_routers.yaml", ["num_samples=1"])
    resume_sweep(result.directory)                                   # after an interruption

Or ``moe-lab sweep``. The spec, the rows and files, the plot and the table need no Ray and
live in :mod:`moe_lab.tuning`; this module turns them into a Tune run. What happens:

1. :func:`run_sweep` validates the spec (:func:`moe_lab.tuning.load_sweep`) before Ray
   starts; the driver starts (or joins) Ray, tokenizes the base job's data once and ships
   it to the trials through the object store (``tune.with_parameters``); trials whose
   sampled config changes the ``data`` section prepare their own;
2. a ``Tuner`` runs :func:`_run_trial` per sampled config, with ``ASHAScheduler`` on the
   sweep metric (time attribute: the optimiser ``step``) and the search algorithm
   (``BasicVariantGenerator`` over :func:`param_space` for random/grid, ``OptunaSearch``
   with the define-by-run :class:`OptunaSpace` for optuna); neither samples a field for
   the trials it has no effect on (:data:`moe_lab.tuning.INERT_FIELDS`); a sweep's
   ``variants`` are one more grid (``config["variant"]``), each over its own job;
3. a 1-worker trial runs :class:`~moe_lab.training.MoETrainer` in the trial process and
   calls ``ray.tune.report``; a multi-worker trial (``scaling.num_workers > 1``) starts a
   ``TorchTrainer`` through :class:`~.train.DistributedMoETrainer`, whose workers call
   ``ray.train.report`` and whose ``RunConfig`` carries a ``TuneReportCallback`` that
   forwards those reports to Tune;
4. each trial reports once per evaluation (:class:`moe_lab.tuning.TrialResult`): the eval
   metrics and the latest training metrics together (every result then holds the sweep
   metric, as Tune's strict metric check and ``OptunaSearch`` require);
5. at the end the driver collects the rows and writes ``results.csv``, ``best.yaml``,
   ``router_comparison.png`` (``balancing_study.png``/``.csv`` too with ``report:
   balancing``) and prints a rich table (:func:`moe_lab.tuning.write_outputs`);
   a field without effect on a trial shows as ``n/a``, with the reason in the ``inert``
   column, the table's legend and a ``best.yaml`` comment.

Resources: each trial asks for what :func:`moe_lab.tuning.plan_trials` sizes to the machine
(a local one, or the cluster at ``address``): on a local machine 1-worker trials take 0.5
logical CPU and one torch thread, and as many run at once as there are cores.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.stopper import Stopper

from ..errors import ConfigError
from ..jobs import JobSpec
from ..training import metrics as M
from ..tuning import (
    INERT_FIELDS,
    SWEEP_FILE,
    VARIANT,
    InertRule,
    SearchDim,
    SweepResult,
    SweepSpec,
    TrialPlan,
    TrialResult,
    base_values,
    check_search_available,
    collect_rows,
    drawn_inert_rules,
    grid_points,
    inert_rules,
    load_sweep,
    new_sweep_directory,
    open_sweep_directory,
    plan_trials,
    routing_collapsed,
    trial_job,
    write_outputs,
)
from .cluster import init_ray, local_cpu_count

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------


class _TuneReporter(TrialResult):
    """MoETrainer callback of an in-process trial: ``ray.tune.report`` at each evaluation."""

    def __call__(self, record: Dict[str, Any]) -> None:
        result = self.merge(record)
        if result is not None:
            tune.report(result)


class _RayTrainReporter(TrialResult):
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
        if metrics and M.EVAL_LOSS in metrics[0]:
            super().after_report(run_context, metrics, None)


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
    from ..runner import job_task, prepare_data, run_task

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
    max_steps = _total_steps(job, data.train)
    task = job_task(job, data, out, resume=True)  # a resumed sweep continues each trial
    task.training = task.training.replace(progress_bar=False, tensorboard=False)  # trials report to Tune
    sc = job.scaling
    if sc.num_workers > 1:
        from .train import RayScaling, fit_on_ray

        task.callbacks = [_RayTrainReporter(max_steps)]
        fit_on_ray(task, RayScaling(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker} if sc.cpus_per_worker else None,
            storage_path=str(trial_dir / "ray"),
            max_failures=sc.max_failures,
            name="train",
            run_config_callbacks=[_EvalReportsToTune()],
        ))
    else:
        task.callbacks = [_TuneReporter(max_steps)]
        run_task(task)


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


def _inert_or_drawn(d: SearchDim, rules: Sequence[InertRule], base: Dict[str, Any], seed: Sequence[int],
                    under: Optional[str] = None) -> Any:
    """``tune.sample_from`` for a drawn field that ``rules`` may make inert: once the trial's
    condition fields are resolved, the rule's value where one applies, else a draw from the
    field's distribution (with a generator seeded by the sweep's seed). ``under``: the
    config key the trial's sections sit under (``variant``), None: at the top.

    A closure, not an object: Tune deep-copies the spec per trial, which would copy an
    object's generator (every trial drawing the same value); a function is not copied."""
    domain = _domain(d)
    rng = np.random.default_rng(seed)
    conditions = [name for rule in rules for name, _ in rule.when]

    def sample(spec: Any) -> Any:
        # Tune passes its experiment spec (the param space under "config"), through a guard
        config = getattr(spec, "config") if "config" in spec else spec
        if under is not None:
            config = getattr(config, under)
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


def _drawn(spec: SweepSpec, variant: Optional[str], under: Optional[str]) -> Dict[str, Any]:
    """The Tune distribution of each drawn field (``section.key``) in ``variant``'s trials."""
    base = base_values(spec, variant)
    index = list(spec.variants).index(variant) if variant is not None else 0
    drawn: Dict[str, Any] = {}
    for i, d in enumerate(spec.dimensions):
        if not d.is_grid(spec.search):
            rules = drawn_inert_rules(spec, d, variant)
            seed = [spec.seed % 2**32, i] + ([index] if variant is not None else [])
            drawn[d.field] = _inert_or_drawn(d, rules, base, seed, under) if rules else _domain(d)
    return drawn


def _variant_points(spec: SweepSpec, variant: str) -> List[Dict[str, Any]]:
    """Every grid point of ``variant``'s trials as one nested config, ``{"name": variant,
    "model": {...}, ...}``, its drawn fields in it (the sections' points combine as a product)."""
    drawn = _drawn(spec, variant, under=VARIANT)
    entries: List[Dict[str, Any]] = [{"name": variant}]
    for section, points in grid_points(spec, variant).items():
        section_drawn = {d.key: drawn[d.field] for d in spec.dimensions if d.section == section and d.field in drawn}
        entries = [{**entry, section: {**{f.split(".", 1)[1]: v for f, v in point.items()}, **section_drawn}}
                   for entry in entries for point in points]
    return entries


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

    With variants, the space is one ``tune.grid_search`` under ``variant`` over every
    variant's grid points (:func:`_variant_points`): each variant collapses its own grid
    and decides its own inert fields, under its own job.
    """
    if spec.search == "optuna":
        return {}
    if spec.variants:
        return {VARIANT: tune.grid_search([p for name in spec.variants for p in _variant_points(spec, name)])}
    drawn = _drawn(spec, None, under=None)
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
    then left out of the trial's config: Optuna models no parameter without effect). With
    variants, the variant is a categorical suggested before anything else (``variant``),
    and the fields it sets count as known.

    Grid entries are choices under Optuna. Parameters are named ``section/key`` (Ray's
    OptunaSearch nests them into ``{"section": {"key": ...}}``). A plain object, as
    OptunaSearch pickles its space with the searcher state.
    """

    def __init__(self, spec: SweepSpec) -> None:
        conditions = {name for rule in INERT_FIELDS for name, _ in rule.when}
        self.dims = sorted(spec.dimensions, key=lambda d: d.field not in conditions)  # stable
        searched = {d.field for d in spec.dimensions}
        self.variants = list(spec.variants)
        self.known = {name: {f: v for f, v in base_values(spec, name).items() if f not in searched}
                      for name in self.variants or [None]}

    def __call__(self, trial: Any) -> None:
        variant = trial.suggest_categorical(VARIANT, self.variants) if self.variants else None
        values = dict(self.known[variant])
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
    return ASHAScheduler(time_attr=M.STEP, max_t=max_t, grace_period=grace, reduction_factor=s.reduction_factor)


def _trainable(spec: SweepSpec, job: JobSpec, address: Optional[str], directory: Path) -> Tuple[Any, TrialPlan]:
    from ..runner import prepare_data

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


# ---------------------------------------------------------------------------------------
# running and resuming
# ---------------------------------------------------------------------------------------


def run_sweep(
    spec_or_path: Union[SweepSpec, str, os.PathLike, Mapping[str, Any]],
    overrides: Sequence[str] = (),
    *,
    address: Optional[str] = None,
    verbose: int = 1,
) -> SweepResult:
    """Run a sweep on Ray Tune and write its outputs; returns a :class:`~moe_lab.tuning.SweepResult`.

    Args:
        spec_or_path: a :class:`~moe_lab.tuning.SweepSpec`, a sweep YAML path or a mapping.
        overrides: ``--set`` style strings (see :func:`moe_lab.tuning.apply_sweep_overrides`).
        address: a Ray cluster to join ("auto", "ray://host:10001"); default: start a local one.
        verbose: 0 quiet, 1 Tune's progress and the final table, 2 more Tune output.

    Outputs in ``output_dir/name``: ``results.csv``, ``best.yaml``, ``router_comparison.png``,
    ``sweep.yaml`` (for ``--resume``) and Tune's trial directories. The spec is validated
    before Ray starts.
    """
    spec = load_sweep(spec_or_path, overrides)
    check_search_available(spec)
    directory = new_sweep_directory(spec)
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
    return _outputs(spec, directory, grid, t0, verbose)


def resume_sweep(
    directory: Union[str, os.PathLike],
    *,
    address: Optional[str] = None,
    retry_failed: bool = False,
    verbose: int = 1,
) -> SweepResult:
    """Resume an interrupted sweep from its directory (``Tuner.restore``).

    Finished trials are kept as they are; interrupted ones start again (from their latest
    training checkpoint when they saved one). Failed trials stay failed unless
    ``retry_failed``. Only resume sweep directories you trust: Tune's experiment state is
    pickled.
    """
    spec, directory = open_sweep_directory(directory)
    check_search_available(spec)
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
    return _outputs(spec, directory, grid, t0, verbose)


def _outputs(spec: SweepSpec, directory: Path, grid: Any, t0: float, verbose: int) -> SweepResult:
    """Rows from a finished (or interrupted) Tune run, and the files written from them."""
    rows = collect_rows(spec, grid, saved_trial_statuses(directory))
    return write_outputs(spec, directory, rows, time.perf_counter() - t0, verbose=verbose)


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
