"""The sweep spec: a base job, variants and a search space over its fields, search and scheduling; validated once.

    from moe_lab.tuning import load_sweep
    spec = load_sweep("jobs/sweep_routers.yaml", ["num_samples=1"])  # resolved: the base job inlined
    spec.dimensions, spec.num_trials, spec.job, spec.metric
    spec = load_sweep("jobs/sweep_balancing.yaml")
    spec.variants["global_batch"]     # {"model.load_balancing_scope": "global_batch", ...}

The YAML format is in :mod:`moe_lab.tuning`. :func:`load_sweep` checks everything before Ray
starts (or is imported): unknown fields, unknown distributions, empty choices, ``low > high``,
``loguniform`` bounds <= 0, values the base job rejects, and variants whose fields are
unknown or whose job is invalid raise :class:`~moe_lab.errors.ConfigError` naming the field
(and the variant). The Ray Tune search space is built from :attr:`SweepSpec.dimensions` and
:attr:`SweepSpec.variants` in :mod:`moe_lab.orchestration.tune`.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml
from pydantic import Field, PrivateAttr

from ..config import _StrictModel
from ..errors import ConfigError
from ..jobs import DEFAULT_JOB, JobSpec, _parse_value, apply_overrides, load_job, read_yaml_mapping
from ..training import metrics as M
from .trials import JOB_SECTIONS, REPORTED_METRICS, VARIANT, check_job_field, grid_points, trial_job

#: distribution names a search-space entry may use
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
#: what a variant name may look like (it is a CSV value, a table cell and a plot label)
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")
#: the extra reports a sweep can write (``report:`` in the spec), see moe_lab.tuning.report
REPORTS = ("balancing",)


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

    def is_grid(self, search: str) -> bool:
        """Every value runs (a grid), rather than one drawn per trial: ``grid`` entries with
        random/grid search, and ``choice`` entries too with ``search: grid``."""
        return search != "optuna" and (self.kind == "grid" or (search == "grid" and self.kind == "choice"))


class SchedulerSpec(_StrictModel):
    """Trial scheduling: ASHA on ``metric`` with the optimiser step as its time, or FIFO."""

    type: Literal["asha", "fifo"] = "asha"
    metric: str = M.EVAL_LOSS  #: also what picks the best trial; one of REPORTED_METRICS
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
    """A sweep: a base job, variants and a search space over its fields, search, scheduling and outputs.

    Construct it from YAML with :func:`load_sweep`. The search space and the variants' fields
    are checked when the spec is built (fields, distributions, bounds); values and each
    variant's job are checked against the base job by :meth:`resolve`, which
    :func:`load_sweep` calls.
    """

    name: Optional[str] = None  #: the sweep directory is ``output_dir/name`` (default: file stem + time)
    base_job: Union[str, Dict[str, Any]] = "default"  #: a job YAML path, "default", or an inline job mapping
    overrides: List[str] = Field(default_factory=list)  #: ``section.key=value`` applied to the base job
    #: ``name: {section.key: value, ...}``: recipes, each one grid point (times the search space's grid)
    variants: Dict[str, Any] = Field(default_factory=dict)
    search_space: Dict[str, Any] = Field(default_factory=dict)  #: ``section.key: {distribution: args}``
    report: Optional[Literal["balancing"]] = None  #: an extra study report (balancing: needs variants)
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
        self._dims = parse_search_space(self.search_space, allow_empty=True)
        self.variants = parse_variants(self.variants, [d.field for d in self._dims])
        if not self._dims and not self.variants:
            raise ConfigError(
                "sweep has nothing to compare: give a search_space (e.g. model.router_type: {choice: [...]}) "
                "or variants (e.g. global_batch: {model.load_balancing_scope: global_batch})"
            )
        if self.report == "balancing" and not self.variants:
            raise ConfigError("sweep report 'balancing' compares variants; add a variants: section (name: {field: value})")
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
        return self.scheduler.metric if self.scheduler else M.EVAL_LOSS

    @property
    def mode(self) -> str:
        return self.scheduler.mode if self.scheduler else "min"

    @property
    def num_trials(self) -> int:
        """Trials the sweep runs: with random/grid search, ``num_samples`` times the grid
        size, where the grid has no duplicates that differ only in an inert field
        (:func:`~moe_lab.tuning.grid_points`), summed over the variants (each runs its own
        grid); with optuna, ``num_samples``."""
        if self.search == "optuna":
            return self.num_samples
        names = list(self.variants) or [None]
        return self.num_samples * sum(math.prod(len(points) for points in grid_points(self, v).values())
                                      for v in names)

    @property
    def param_fields(self) -> List[str]:
        """The columns that tell trials apart in the results: ``variant`` (with variants),
        then each searched field."""
        return ([VARIANT] if self.variants else []) + [d.field for d in self._dims]

    @property
    def job(self) -> JobSpec:
        """The base job (overrides applied)."""
        return self._load_base_job()

    # ---- resolution -----------------------------------------------------------------
    def _load_base_job(self) -> JobSpec:
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
        for name in resolved.variants:
            try:
                trial_job(resolved, {VARIANT: name})
            except ConfigError as exc:
                raise ConfigError(
                    f"sweep variants[{name!r}]: its job is invalid: {str(exc).split(' is invalid: ', 1)[-1]}"
                ) from None
        for dim in resolved._dims:
            for variant in list(resolved.variants) or [None]:
                for value in dim.probe_values():
                    try:
                        trial_job(resolved, {VARIANT: variant, dim.field: value})
                    except ConfigError as exc:
                        job_name = "the base job" if variant is None else f"variant {variant!r}"
                        raise ConfigError(
                            f"sweep search_space[{dim.field!r}]: value {value!r} is invalid for {job_name}: "
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


# ---------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------


def parse_variants(variants: Any, searched: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Check a ``variants`` section: ``{name: {section.key: value}}`` with plain names and job
    fields (values are checked against the job by :meth:`SweepSpec.resolve`). A field may not
    be both set by a variant and ``searched``. Returns it with empty variants as ``{}`` (a
    variant without overrides runs the base job). Raises ConfigError naming the variant and
    the field."""
    if variants is None:
        return {}
    if not isinstance(variants, Mapping):
        raise ConfigError(
            f"sweep variants: expected a mapping of names to job overrides, e.g. "
            f"{{global_batch: {{model.load_balancing_scope: global_batch}}}}; got {type(variants).__name__}"
        )
    out: Dict[str, Dict[str, Any]] = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
            raise ConfigError(
                f"sweep variants: name {name!r} must be a plain name (letters, digits, '_', '-', '+'; "
                "starting with a letter or digit)"
            )
        where = f"sweep variants[{name!r}]"
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping of job fields to values, e.g. {{model.router_bias_update_rate: 0.001}}; "
                f"got {overrides!r}"
            )
        for field in overrides:
            check_job_field(field, f"{where}[{field!r}]")
            if field in searched:
                raise ConfigError(
                    f"{where}[{field!r}]: the field is also in search_space; set it in one place "
                    "(a variant fixes it, the search space varies it)"
                )
        out[name] = dict(overrides)
    return out


def parse_search_space(space: Mapping[str, Any], allow_empty: bool = False) -> List[SearchDim]:
    """Check a search space against the JobSpec fields and the distribution rules (an empty
    one is an error unless ``allow_empty``: a sweep of variants alone)."""
    if not space:
        if allow_empty:
            return []
        raise ConfigError(
            "sweep search_space is empty; expected at least one field, e.g. model.router_type: {choice: [...]}"
        )
    dims = []
    for name, dist in space.items():
        where = f"sweep search_space[{name!r}]"
        check_job_field(name, where)
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


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def apply_sweep_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``--set`` strings to a sweep dict (a copy).

    ``model.*``, ``training.*``, ``data.*``, ``scaling.*`` and ``job.*`` go to the base job's
    overrides; ``search_space.SECTION.KEY=...`` sets a search-space entry (a YAML/JSON
    mapping such as ``{choice: [1, 2]}``); ``variants.NAME.SECTION.KEY=value`` sets one field
    of a variant (``variants.NAME={...}`` the whole variant); anything else sets a sweep
    field (``num_samples=4``, ``scheduler.grace_period=50``).
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
        elif top == "variants" and key.count(".") >= 2:
            _, name, field = key.split(".", 2)
            variants = dict(data.get("variants") or {})
            variants[name] = {**(variants.get(name) or {}), field: _parse_value(raw)}
            data["variants"] = variants
        else:
            sweep_items.append(f"{key}={raw}")
    return apply_overrides(data, sweep_items)


def load_sweep(
    path_or_data: Union[SweepSpec, str, os.PathLike, Mapping[str, Any]], overrides: Sequence[str] = ()
) -> SweepSpec:
    """Load, override and validate a sweep; returns the resolved spec (base job inlined).

    ``path_or_data``: a sweep YAML file, a mapping, or a :class:`SweepSpec` (resolved again,
    with ``overrides`` applied). Relative ``base_job`` paths are looked up next to the sweep
    file, then in the working directory. Raises ConfigError naming the bad field; nothing
    touches Ray.
    """
    if isinstance(path_or_data, SweepSpec):
        spec = path_or_data
        if overrides:
            spec = SweepSpec.from_dict(apply_sweep_overrides(path_or_data.to_dict(), overrides))
            spec._base_dir = path_or_data._base_dir
        return spec.resolve()
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
