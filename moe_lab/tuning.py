"""Hyper-parameter sweeps over job fields (router type, loss coefficients, ...) on Ray Tune.

    from moe_lab.tuning import load_sweep, run_sweep, resume_sweep
    result = run_sweep("jobs/sweep_routers.yaml", ["num_samples=1", "training.max_steps=100"])
    result.best["eval_loss"], result.best_job_path          # best.yaml: `moe-lab train best.yaml`
    resume_sweep("outputs/sweeps/sweep_routers-20250101-120000")   # after an interruption

Command line: ``moe-lab sweep SWEEP.yaml [--set key=value ...]`` and
``moe-lab sweep --resume DIR``.

A sweep spec (YAML) names a base job and a search space over any job field::

    base_job: default.yaml            # relative to the sweep file, then the CWD; or "default"
    overrides: [training.max_steps=300, model.hidden_size=64]      # applied to the base job
    search_space:
      model.router_type: {grid: [top_k, switch, expert_choice]}
      model.load_balancing_loss_coef: {loguniform: [0.001, 0.1]}
      model.experts_per_token: {choice: [1, 2]}     # also: uniform [lo, hi], randint [lo, hi]
    num_samples: 2                    # random/grid: repeats of the grid; optuna: trials
    search: random                    # random | grid | optuna (pip install moe-lab[optuna])
    scheduler: {type: asha, metric: eval_loss, grace_period: 100, reduction_factor: 2}
    stop_on_routing_collapse: {dead_expert_fraction: 0.5, after_step: 100}

The spec is validated once, before Ray starts: unknown fields, unknown distributions, empty
choices, ``low > high``, ``loguniform`` bounds <= 0 and values the base job rejects raise
:class:`~moe_lab.errors.ConfigError` naming the field.

Constraints between fields are resolved per trial by :func:`trial_job`: a ``switch`` router
routes each token to one expert, so a switch trial always runs with ``experts_per_token=1``
(the results table shows the value the trial ran with, and the adjustment). Any other
sampled combination the job rejects makes that trial fail fast; its error is in the table
and the sweep goes on.

This module imports Ray only inside functions; the Ray Tune code is
:mod:`moe_lab.orchestration.tune`.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml
from pydantic import Field, PrivateAttr

from .config import _StrictModel
from .errors import ConfigError
from .jobs import DEFAULT_JOB, JobSpec, _parse_value, apply_overrides, read_yaml_mapping

#: distribution names a search-space entry may use
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
#: job sections a search-space field may live in (``section.key``)
JOB_SECTIONS = ("model", "training", "data", "scaling")
#: job fields a sweep sets per trial itself
_RESERVED_FIELDS = {"training.output_dir": "each trial writes into its own trial directory"}
#: metrics every trial reports to Tune (one report per evaluation)
REPORTED_METRICS = (
    "eval_loss",
    "eval_perplexity",
    "eval_load_imbalance",
    "eval_dropped_fraction",
    "eval_dead_expert_fraction",
    "train_loss",
    "tokens_per_s",
    "load_imbalance",
    "dropped_fraction",
)
#: the sweep's file inside its directory (what ``--resume`` reads)
SWEEP_FILE = "sweep.yaml"
RESULTS_CSV = "results.csv"
BEST_JOB = "best.yaml"
ROUTER_PLOT = "router_comparison.png"


# ---------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchDim:
    """One validated search-space entry: ``field`` (``section.key``) and its distribution."""

    field: str
    kind: str  #: one of DISTRIBUTIONS
    values: Tuple[Any, ...] = ()  #: choice / grid
    low: Optional[float] = None  #: uniform / loguniform / randint (randint: inclusive)
    high: Optional[float] = None

    @property
    def section(self) -> str:
        return self.field.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.field.split(".", 1)[1]

    def probe_values(self) -> Tuple[Any, ...]:
        """Values checked against the base job before the sweep starts (all choices, or the bounds)."""
        return self.values if self.kind in ("choice", "grid") else (self.low, self.high)


class SchedulerSpec(_StrictModel):
    """Trial scheduling: ASHA on ``metric`` with the optimiser step as its time, or FIFO."""

    type: Literal["asha", "fifo"] = "asha"
    metric: str = "eval_loss"  #: also what picks the best trial
    mode: Literal["min", "max"] = "min"
    grace_period: Optional[int] = Field(None, ge=1)  #: steps before a trial can be stopped (default: training.eval_steps)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: Optional[int] = Field(None, ge=1)  #: steps (default: training.max_steps of the base job)


class TrialResources(_StrictModel):
    """What one trial asks Ray for. Unset values are sized to the machine (see the README)."""

    cpu: Optional[float] = Field(None, gt=0)  #: logical CPUs of the trial (multi-worker trials: of its driver)
    gpu: float = Field(0.0, ge=0)  #: GPUs of a 1-worker trial (multi-worker trials: scaling.use_gpu)
    torch_threads: Optional[int] = Field(None, ge=1)  #: torch threads of a 1-worker trial


class RoutingCollapseSpec(_StrictModel):
    """Stop a trial whose routing collapsed: too many experts get no eval token."""

    dead_expert_fraction: float = Field(0.5, gt=0, lt=1)  #: stop when some layer has MORE dead experts than this
    after_step: int = Field(0, ge=0)  #: warm-up: no stop before this optimiser step


class SweepSpec(_StrictModel):
    """A sweep: a base job, a search space over its fields, search, scheduling and outputs.

    Construct it from YAML with :func:`load_sweep`. The search space is checked when the spec
    is built (fields, distributions, bounds); values are checked against the base job by
    :meth:`resolve`, which :func:`run_sweep` calls before Ray starts.
    """

    name: Optional[str] = None  #: the sweep directory is ``output_dir/name`` (default: file stem + time)
    base_job: Union[str, Dict[str, Any]] = "default"  #: a job YAML path, "default", or an inline job mapping
    overrides: List[str] = Field(default_factory=list)  #: ``section.key=value`` applied to the base job
    search_space: Dict[str, Any]  #: ``section.key: {distribution: args}``, checked by parse_search_space
    num_samples: int = Field(1, ge=1)
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Optional[SchedulerSpec] = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  #: default: sized to the machine
    trial_resources: TrialResources = Field(default_factory=TrialResources)
    stop_on_routing_collapse: Optional[RoutingCollapseSpec] = None
    output_dir: str = "outputs/sweeps"
    seed: int = 0  #: seeds the search algorithm (trials keep the job's training.seed)

    _dims: List[SearchDim] = PrivateAttr(default_factory=list)
    _base_dir: Optional[str] = PrivateAttr(default=None)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if self.name is not None and (not self.name.strip() or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"sweep name {self.name!r} must be a plain directory name (no '/')")
        if self.scheduler is None:
            self.scheduler = SchedulerSpec(type="fifo")
        if self.scheduler.metric not in REPORTED_METRICS:
            raise ConfigError(
                f"sweep scheduler.metric {self.scheduler.metric!r} is not a reported metric; "
                f"expected one of {list(REPORTED_METRICS)}"
            )
        self._dims = parse_search_space(self.search_space)
        if self.search == "grid":
            ranged = [d.field for d in self._dims if d.kind not in ("choice", "grid")]
            if ranged:
                raise ConfigError(
                    f"sweep search 'grid' needs a choice or grid for every field; {ranged} "
                    "are ranges (use search: random or optuna, or list the values)"
                )

    # ---- derived values -------------------------------------------------------------
    @property
    def dimensions(self) -> List[SearchDim]:
        return list(self._dims)

    @property
    def metric(self) -> str:
        return self.scheduler.metric if self.scheduler else "eval_loss"

    @property
    def mode(self) -> str:
        return self.scheduler.mode if self.scheduler else "min"

    @property
    def num_trials(self) -> int:
        """Trials the sweep runs: with random/grid search, ``num_samples`` times the grid size."""
        if self.search == "optuna":
            return self.num_samples
        grid = 1
        for d in self._dims:
            if d.kind == "grid" or (self.search == "grid" and d.kind == "choice"):
                grid *= len(d.values)
        return self.num_samples * grid

    @property
    def job(self) -> JobSpec:
        """The base job (overrides applied)."""
        return self._load_base_job()

    # ---- resolution -----------------------------------------------------------------
    def _load_base_job(self) -> JobSpec:
        from .jobs import load_job

        base = self.base_job
        if isinstance(base, dict):
            data = apply_overrides(base, self.overrides)
            try:
                return JobSpec.from_dict(data)
            except ConfigError as exc:
                raise ConfigError(f"sweep base_job (inline): {exc}") from None
        if base == "default":
            data = apply_overrides(copy.deepcopy(DEFAULT_JOB), self.overrides)
            try:
                return JobSpec.from_dict(data)
            except ConfigError as exc:
                raise ConfigError(f"sweep overrides on the default job: {exc}") from None
        candidates = []
        p = Path(base).expanduser()
        if p.is_absolute():
            candidates.append(p)
        else:
            if self._base_dir:
                candidates.append(Path(self._base_dir) / p)
            candidates.append(Path.cwd() / p)
        for cand in candidates:
            if cand.is_file():
                try:
                    return load_job(cand, self.overrides)
                except ConfigError as exc:
                    raise ConfigError(f"sweep base_job {str(cand)!r}: {exc}") from None
        raise ConfigError(
            f"sweep base_job {base!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
            "expected a job YAML path relative to the sweep file or the working directory, or 'default'"
        )

    def resolve(self) -> "SweepSpec":
        """A copy whose ``base_job`` is the full job (overrides applied), with every
        search-space value checked against it. Raises ConfigError naming the field."""
        job = self._load_base_job()
        if job.data.streaming:
            raise ConfigError("sweep base job: data.streaming is not supported in sweeps (set data.streaming=false)")
        data = self.to_dict()
        data.update(base_job=_absolute_data_paths(job.to_dict()), overrides=[])
        if data.get("name") is None:
            data["name"] = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        resolved = SweepSpec.from_dict(data)
        for dim in resolved._dims:
            for value in dim.probe_values():
                try:
                    trial_job(resolved, {dim.field: value})
                except ConfigError as exc:
                    raise ConfigError(
                        f"sweep search_space[{dim.field!r}]: value {value!r} is invalid for the base job: "
                        f"{str(exc).split(' is invalid: ', 1)[-1]}"
                    ) from None
        sched = resolved.scheduler
        if sched is not None and sched.type == "asha":
            max_t = sched.max_t or job.training.max_steps
            if max_t is None:
                raise ConfigError(
                    "sweep scheduler.max_t: set it (in optimiser steps) or set training.max_steps in the base job"
                )
            grace = sched.grace_period or min(job.training.eval_steps, max_t)
            if grace > max_t:
                raise ConfigError(f"sweep scheduler.grace_period ({grace}) must be <= max_t ({max_t})")
        return resolved

    def to_yaml(self, path: Optional[str | os.PathLike] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _absolute_data_paths(job: Dict[str, Any]) -> Dict[str, Any]:
    """Local data/tokenizer paths made absolute (trials run in their own directories)."""
    d = job.get("data", {})
    for key in ("dataset", "eval_dataset", "tokenizer"):
        value = d.get(key)
        if isinstance(value, str) and value not in ("builtin", "byte", "bpe") and Path(value).expanduser().exists():
            d[key] = str(Path(value).expanduser().resolve())
    return job


def _strip_config_prefix(msg: str) -> str:
    """A ConfigError message on one line, without the "invalid configuration" header and
    without the whole-section dumps of cross-field errors (``JobSpec.model = {...}: why``)."""
    lines = msg.replace("invalid configuration:\n", "").splitlines()
    out = []
    for line in lines:
        line = re.sub(r"^(\S+) = \{.*\}: ", r"\1: ", line.strip())
        out.append(line.replace("JobSpec.", "job."))
    return "; ".join(x for x in out if x)


def parse_search_space(space: Mapping[str, Any]) -> List[SearchDim]:
    """Check a search space against the JobSpec fields and the distribution rules."""
    if not space:
        raise ConfigError(
            "sweep search_space is empty; expected at least one field, e.g. model.router_type: {choice: [...]}"
        )
    dims = []
    for name, dist in space.items():
        where = f"sweep search_space[{name!r}]"
        _check_field(name, where)
        if not isinstance(dist, Mapping) or len(dist) != 1:
            raise ConfigError(
                f"{where}: expected one distribution as a mapping, e.g. {{choice: [...]}}, one of {list(DISTRIBUTIONS)}; "
                f"got {dist!r}"
            )
        kind, arg = next(iter(dist.items()))
        if kind not in DISTRIBUTIONS:
            hint = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            raise ConfigError(
                f"{where}: unknown distribution {kind!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; expected one of {list(DISTRIBUTIONS)}"
            )
        if kind in ("choice", "grid"):
            if not isinstance(arg, (list, tuple)) or len(arg) == 0:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
            dims.append(SearchDim(name, kind, values=tuple(arg)))
            continue
        if not isinstance(arg, (list, tuple)) or len(arg) != 2:
            raise ConfigError(f"{where}: {kind} needs [low, high], got {arg!r}")
        low, high = arg
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if kind == "randint":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
                raise ConfigError(f"{where}: randint needs integer [low, high] (both inclusive), got {arg!r}")
            if low > high:
                raise ConfigError(f"{where}: randint low ({low}) > high ({high})")
        else:
            if not numeric or not all(math.isfinite(v) for v in (low, high)):
                raise ConfigError(f"{where}: {kind} needs numbers [low, high], got {arg!r}")
            if low >= high:
                raise ConfigError(f"{where}: {kind} low ({low}) must be < high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs 0 < low < high, got low={low}")
            if _is_int_field(name):
                raise ConfigError(f"{where}: is an integer field; use randint [low, high] or a choice, not {kind}")
        dims.append(SearchDim(name, kind, low=low, high=high))
    return dims


def _is_int_field(name: str) -> bool:
    section, key = name.split(".")
    annotation = JobSpec.model_fields[section].annotation.model_fields[key].annotation  # type: ignore[union-attr]
    return annotation in (int, Optional[int])


def _check_field(name: Any, where: str) -> None:
    if not isinstance(name, str) or name.count(".") != 1:
        raise ConfigError(f"{where}: expected a job field as section.key with section one of {list(JOB_SECTIONS)}")
    section, key = name.split(".")
    if section not in JOB_SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; expected one of {list(JOB_SECTIONS)}")
    model = JobSpec.model_fields[section].annotation
    fields = list(model.model_fields)  # type: ignore[union-attr]
    if key not in fields:
        hint = difflib.get_close_matches(key, fields, n=1)
        raise ConfigError(
            f"{where}: unknown field {key!r} of {section}"
            + (f" (did you mean {section}.{hint[0]}?)" if hint else f"; expected one of {fields}")
        )
    if name in _RESERVED_FIELDS:
        raise ConfigError(f"{where}: cannot be searched: {_RESERVED_FIELDS[name]}")


# ---------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------


def flatten_params(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"model": {"router_type": "switch"}}`` (a Tune trial config) -> ``{"model.router_type": "switch"}``."""
    flat: Dict[str, Any] = {}
    for section, value in config.items():
        if isinstance(value, Mapping):
            for key, v in value.items():
                flat[f"{section}.{key}"] = v
        else:
            flat[str(section)] = value
    return flat


def trial_job(spec: SweepSpec, params: Mapping[str, Any]) -> Tuple[JobSpec, List[str]]:
    """The job one trial runs: the base job with ``params`` (flat or nested) applied.

    Returns ``(job, adjustments)``. The one derived rule: a ``switch`` router routes each
    token to one expert, so ``model.experts_per_token`` becomes 1 (recorded in adjustments).
    Raises ConfigError when the combination is invalid.
    """
    if not isinstance(spec.base_job, dict):
        spec = spec.resolve()
    data = apply_overrides(spec.base_job, spec.overrides)
    flat = flatten_params(params)
    for name, value in flat.items():
        section, key = name.split(".", 1)
        data.setdefault(section, {})[key] = value
    adjustments = []
    model = data.setdefault("model", {})
    k = model.get("experts_per_token", JobSpec().model.experts_per_token)
    if model.get("router_type") == "switch" and k != 1:
        model["experts_per_token"] = 1
        adjustments.append(f"model.experts_per_token {k} -> 1 (switch routes each token to one expert)")
    try:
        job = JobSpec.from_dict(data)
    except ConfigError as exc:
        shown = ", ".join(f"{n}={v!r}" for n, v in flat.items())
        raise ConfigError(f"trial config ({shown}) is invalid: {_strip_config_prefix(str(exc))}") from None
    return job, adjustments


# ---------------------------------------------------------------------------------------
# loading and running
# ---------------------------------------------------------------------------------------


def apply_sweep_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``--set`` strings to a sweep dict (a copy).

    ``model.*``, ``training.*``, ``data.*``, ``scaling.*`` and ``job.*`` go to the base job's
    overrides; ``search_space.SECTION.KEY=...`` sets a search-space entry (a YAML/JSON
    mapping such as ``{choice: [1, 2]}``); anything else sets a sweep field
    (``num_samples=4``, ``scheduler.grace_period=50``).
    """
    data = copy.deepcopy(data)
    sweep_items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        top = key.split(".", 1)[0]
        if top in JOB_SECTIONS:
            data["overrides"] = list(data.get("overrides") or []) + [f"{key}={raw}"]
        elif top == "job" and "." in key:
            data["overrides"] = list(data.get("overrides") or []) + [f"{key.split('.', 1)[1]}={raw}"]
        elif top == "search_space" and "." in key:
            space = dict(data.get("search_space") or {})
            space[key.split(".", 1)[1]] = _parse_value(raw)
            data["search_space"] = space
        else:
            sweep_items.append(f"{key}={raw}")
    return apply_overrides(data, sweep_items)


def load_sweep(path_or_data: Union[str, os.PathLike, Mapping[str, Any]], overrides: Sequence[str] = ()) -> SweepSpec:
    """Load, override and validate a sweep; returns the resolved spec (base job inlined).

    ``path_or_data``: a sweep YAML file or a mapping. Relative ``base_job`` paths are looked
    up next to the sweep file, then in the working directory. Raises ConfigError naming the
    bad field; nothing touches Ray.
    """
    base_dir = None
    stem = "sweep"
    if isinstance(path_or_data, Mapping):
        data = dict(path_or_data)
    else:
        p = Path(path_or_data)
        data = read_yaml_mapping(p, "sweep", "base_job, search_space, ...")
        base_dir = str(p.resolve().parent)
        stem = p.stem
    data = apply_sweep_overrides(data, overrides)
    if data.get("name") is None:
        data["name"] = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        spec = SweepSpec.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("SweepSpec.", "sweep: ")) from None
    spec._base_dir = base_dir
    return spec.resolve()


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns; the same files are in ``directory``."""

    directory: Path  #: the sweep directory (Tune experiment); ``moe-lab sweep --resume`` takes it
    rows: List[Dict[str, Any]]  #: one per trial, best first: the results.csv columns and ``config`` (sampled)
    best: Optional[Dict[str, Any]]  #: the best row (None when no trial reported the metric)
    metric: str
    mode: str
    results_csv: Path
    best_job_path: Optional[Path]
    plot_path: Optional[Path]
    elapsed_seconds: float
    interrupted: bool = False  #: the run stopped before every trial finished (resume it)
    param_fields: List[str] = field(default_factory=list)

    @property
    def num_errors(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "error")

    def best_job(self) -> JobSpec:
        """The best configuration as a job (the content of best.yaml)."""
        from .jobs import load_job

        if self.best_job_path is None:
            raise ConfigError("the sweep has no best trial (no trial reported its metric)")
        return load_job(self.best_job_path)


def check_search_available(spec: SweepSpec) -> None:
    """Optuna search needs the optional ``optuna`` package (the ``moe-lab[optuna]`` extra)."""
    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "sweep search 'optuna' needs the optuna package: pip install 'moe-lab[optuna]' "
                "(or use search: random / grid)"
            ) from None


def _as_spec(spec_or_path: Union[SweepSpec, str, os.PathLike, Mapping[str, Any]], overrides: Sequence[str]) -> SweepSpec:
    if isinstance(spec_or_path, SweepSpec):
        if overrides:
            data = apply_sweep_overrides(spec_or_path.to_dict(), overrides)
            spec = SweepSpec.from_dict(data)
            spec._base_dir = spec_or_path._base_dir
            return spec.resolve()
        return spec_or_path.resolve()
    return load_sweep(spec_or_path, overrides)


def run_sweep(
    spec_or_path: Union[SweepSpec, str, os.PathLike, Mapping[str, Any]],
    overrides: Sequence[str] = (),
    *,
    address: Optional[str] = None,
    verbose: int = 1,
) -> SweepResult:
    """Run a sweep on Ray Tune and write its outputs; returns a :class:`SweepResult`.

    Args:
        spec_or_path: a :class:`SweepSpec`, a sweep YAML path or a mapping.
        overrides: ``--set`` style strings (see :func:`apply_sweep_overrides`).
        address: a Ray cluster to join ("auto", "ray://host:10001"); default: start a local one.
        verbose: 0 quiet, 1 Tune's progress and the final table, 2 more Tune output.

    Outputs in ``output_dir/name``: ``results.csv``, ``best.yaml``, ``router_comparison.png``,
    ``sweep.yaml`` (for ``--resume``) and Tune's trial directories. The spec is validated
    before Ray starts.
    """
    spec = _as_spec(spec_or_path, overrides)
    check_search_available(spec)
    directory = Path(spec.output_dir).expanduser().resolve() / str(spec.name)
    if (directory / SWEEP_FILE).exists() or (directory / "tuner.pkl").exists():
        raise ConfigError(
            f"{directory} already holds a sweep; resume it with `moe-lab sweep --resume {directory}` "
            "or choose another name (--set name=...) or output_dir"
        )
    from .orchestration.tune import run_sweep_ray

    return run_sweep_ray(spec, directory, address=address, verbose=verbose)


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
    d = Path(directory).expanduser().resolve()
    if not (d / SWEEP_FILE).is_file():
        raise ConfigError(f"{d} is not a sweep directory (no {SWEEP_FILE}); expected the directory a sweep wrote")
    spec = load_sweep(d / SWEEP_FILE)
    spec = SweepSpec.from_dict({**spec.to_dict(), "name": d.name, "output_dir": str(d.parent)})
    check_search_available(spec)
    from .orchestration.tune import resume_sweep_ray

    return resume_sweep_ray(spec, d, address=address, retry_failed=retry_failed, verbose=verbose)


__all__ = [
    "DISTRIBUTIONS",
    "REPORTED_METRICS",
    "RoutingCollapseSpec",
    "SchedulerSpec",
    "SearchDim",
    "SweepResult",
    "SweepSpec",
    "TrialResources",
    "apply_sweep_overrides",
    "check_search_available",
    "flatten_params",
    "load_sweep",
    "parse_search_space",
    "resume_sweep",
    "run_sweep",
    "trial_job",
]
