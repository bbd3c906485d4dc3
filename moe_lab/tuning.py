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

Fields without effect. Some fields do nothing under some routers; :data:`INERT_FIELDS`
declares them, once, as data (for example ``model.load_balancing_loss_coef`` under
``expert_choice`` with ``drop_tokens``: each expert picks exactly C tokens, so the balancing
loss is constant, 1, with zero gradient). No trial is spent on such a setting:

- grid values (``grid``, or every ``choice`` with ``search: grid``): :func:`grid_points`
  leaves the inert field out of the grid points it has no effect on and drops the
  duplicates that leaves (router_type x load_balancing_loss_coef runs one expert_choice
  trial per value of the other fields, not one per coefficient);
- drawn values (random search): a field that a rule may make inert
  (:func:`drawn_inert_rules`) is drawn per trial only when the rule does not apply to the
  trial's values; otherwise the trial gets the rule's value (``tune.sample_from``);
- ``search: optuna`` uses a define-by-run space that suggests the condition fields first
  and skips the inert ones.

Whatever the config, :func:`trial_job` runs an inert field with the base job's value (or
the rule's fixed value: a switch trial runs with ``experts_per_token=1``, recorded as an
adjustment when the base job has another). The results (``results.csv``, the printed
table, ``best.yaml``) show the field as ``n/a`` (:data:`NOT_APPLICABLE`) for those trials,
with the reason (the ``inert`` column, the table's legend, a ``best.yaml`` comment). Any
other sampled combination the job rejects makes that trial fail fast; its error is in the
table and the sweep goes on.

This module imports Ray only inside functions; the Ray Tune code is
:mod:`moe_lab.orchestration.tune`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
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

    def is_grid(self, search: str) -> bool:
        """Every value runs (a grid), rather than one drawn per trial: ``grid`` entries with
        random/grid search, and ``choice`` entries too with ``search: grid``."""
        return search != "optuna" and (self.kind == "grid" or (search == "grid" and self.kind == "choice"))


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
        """Trials the sweep runs: with random/grid search, ``num_samples`` times the grid
        size, where the grid has no duplicates that differ only in an inert field
        (:func:`grid_points`); with optuna, ``num_samples``."""
        if self.search == "optuna":
            return self.num_samples
        return self.num_samples * math.prod(len(points) for points in grid_points(self).values())

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
# fields without effect
# ---------------------------------------------------------------------------------------

#: what the results show for a searched field that had no effect on a trial
NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class InertRule:
    """``field`` has no effect on a trial whose job matches every ``(field, values)`` of
    ``when``; such a trial runs with ``runs_with`` (None: the base job's value)."""

    field: str
    when: Tuple[Tuple[str, Tuple[Any, ...]], ...]
    reason: str
    runs_with: Any = None

    def applies(self, values: Mapping[str, Any]) -> Optional[bool]:
        """True when ``values`` (flat ``section.key``, the trial's job) match ``when``; None
        when a condition field is missing (its value is drawn per trial), else False."""
        return self.decide({name: (values[name],) for name, _ in self.when if name in values})

    def decide(self, options: Mapping[str, Sequence[Any]]) -> Optional[bool]:
        """Whether the rule applies when each condition field takes one of ``options[field]``:
        True if it does for all of them, False if for none, None if that depends on the value
        drawn (or a condition field has no options listed)."""
        undecided = False
        for name, allowed in self.when:
            if name not in options:
                undecided = True
                continue
            matches = [_plain(v) in allowed for v in options[name]]
            if not any(matches):
                return False
            undecided = undecided or not all(matches)
        return None if undecided else True

    @property
    def note(self) -> str:
        """The legend line: which field, under what, and why."""
        parts = []
        for name, allowed in self.when:
            key = name.split(".", 1)[1]
            shown = " or ".join(str(v) for v in allowed)
            parts.append(shown if key == "router_type" else f"{key}={shown}")
        return f"{self.field.split('.', 1)[1]} has no effect under {' with '.join(parts)}: {self.reason}"


#: Job fields that have no effect under some router settings (see moe_lab.model.routers).
#: Searched values of such a field are not sampled for those trials; the results show n/a.
INERT_FIELDS: Tuple[InertRule, ...] = (
    InertRule(
        "model.load_balancing_loss_coef",
        when=(("model.router_type", ("expert_choice",)), ("model.drop_tokens", (True,))),
        reason="its balancing loss is constant (1) with zero gradient (every expert picks exactly C tokens)",
    ),
    InertRule(
        "model.experts_per_token",
        when=(("model.router_type", ("switch",)),),
        reason="switch routes each token to one expert",
        runs_with=1,
    ),
    InertRule(
        "model.capacity_factor",
        when=(("model.router_type", ("top_k", "switch")), ("model.drop_tokens", (False,))),
        reason="tokens over capacity are kept, so the capacity limits nothing",
    ),
    InertRule(
        "model.normalize_router_weights",
        when=(("model.router_type", ("switch", "expert_choice")),),
        reason="only top_k renormalises its weights",
    ),
    InertRule(
        "model.expert_choice_eval_routing",
        when=(("model.router_type", ("top_k", "switch")),),
        reason="only expert_choice reads it",
    ),
)


def check_inert_rules(rules: Sequence[InertRule]) -> None:
    """Each rule names job fields, and no inert field is a condition of a rule (so rules
    apply in any order). Raises ConfigError naming the rule."""
    conditions = {name for r in rules for name, _ in r.when}
    for r in rules:
        where = f"inert rule for {r.field!r}"
        for name in (r.field, *(n for n, _ in r.when)):
            _check_field(name, where)
        if r.field in conditions:
            raise ConfigError(f"{where}: {r.field!r} is also a condition of a rule; rules would depend on their order")
        if not r.when or any(not allowed for _, allowed in r.when):
            raise ConfigError(f"{where}: expected at least one condition, each with at least one value; got {r.when!r}")


def _plain(value: Any) -> Any:
    """An enum's value (``RouterType.SWITCH`` -> ``"switch"``), anything else as it is."""
    return getattr(value, "value", value)


def inert_rules(values: Mapping[str, Any], fields: Optional[Sequence[str]] = None) -> List[InertRule]:
    """The rules that apply to a trial whose job has these flat ``section.key`` values
    (only rules about ``fields``, when given)."""
    return [r for r in INERT_FIELDS if (fields is None or r.field in fields) and r.applies(values)]


def job_values(job: Union[JobSpec, Mapping[str, Any]]) -> Dict[str, Any]:
    """A job's fields as flat ``section.key`` plain values (a JobSpec, or a job dict with
    defaults for what it leaves out)."""
    if isinstance(job, JobSpec):
        return flatten_params(job.to_dict())
    values = dict(_default_job_values())
    values.update({k: _plain(v) for k, v in flatten_params(job).items()})
    return values


@functools.lru_cache(maxsize=1)
def _default_job_values() -> Dict[str, Any]:
    return flatten_params(JobSpec().to_dict())


def _options(spec: "SweepSpec") -> Dict[str, Tuple[Any, ...]]:
    """The values each job field can take in the sweep: the base job's value, or the
    choices/grid of a searched field (a searched range has no entry)."""
    searched = {d.field for d in spec.dimensions}
    options: Dict[str, Tuple[Any, ...]] = {f: (v,) for f, v in job_values(spec.job).items() if f not in searched}
    options.update({d.field: d.values for d in spec.dimensions if d.kind in ("choice", "grid")})
    return options


def grid_points(spec: "SweepSpec") -> Dict[str, List[Dict[str, Any]]]:
    """The grid of a random/grid sweep per job section: its points (``section.key`` ->
    value, grid fields only), one trial each (``num_samples`` times; sections combine as a
    product). A section without grid fields has one empty point.

    The grid collapse: a grid field is left out of the points it is inert in
    (:data:`INERT_FIELDS`) where the point and the sweep decide that (the rule's conditions
    are fixed there, or all their choices agree), and points that become equal are kept
    once, so no two trials differ only in a field without effect. Where a condition is
    drawn per trial, the point keeps the value; :func:`trial_job` replaces it.
    """
    options = _options(spec)
    sections: Dict[str, List[SearchDim]] = {}
    for d in spec.dimensions:
        sections.setdefault(d.section, [])
        if d.is_grid(spec.search):
            sections[d.section].append(d)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for section, grid in sections.items():
        points: List[Dict[str, Any]] = []
        for combo in itertools.product(*(d.values for d in grid)):
            known = {**options, **{d.field: (v,) for d, v in zip(grid, combo)}}
            point = {d.field: v for d, v in zip(grid, combo)
                     if not any(r.decide(known) for r in INERT_FIELDS if r.field == d.field)}
            if point not in points:
                points.append(point)
        out[section] = points
    return out


def drawn_inert_rules(spec: "SweepSpec", dim: SearchDim) -> Tuple[InertRule, ...]:
    """The rules that may make a drawn (non-grid) field inert in some trial of the sweep:
    for those trials it is not drawn but runs with the rule's value."""
    options = _options(spec)
    return tuple(r for r in INERT_FIELDS if r.field == dim.field and r.decide(options) is not False)


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

    Returns ``(job, adjustments)``. A field that is inert for the trial (:data:`INERT_FIELDS`)
    runs with the base job's value or the rule's fixed value, whatever ``params`` says (a
    ``switch`` trial runs with ``model.experts_per_token=1``); where that changes the value,
    it is recorded in adjustments. Raises ConfigError when the combination is invalid.
    """
    if not isinstance(spec.base_job, dict):
        spec = spec.resolve()
    data = apply_overrides(spec.base_job, spec.overrides)
    base = job_values(data)
    flat = flatten_params(params)
    for name, value in flat.items():
        section, key = name.split(".", 1)
        data.setdefault(section, {})[key] = value
    values = job_values(data)
    adjustments = []
    for rule in inert_rules(values):
        section, key = rule.field.split(".", 1)
        runs_with = base[rule.field] if rule.runs_with is None else rule.runs_with
        if values[rule.field] != runs_with:
            adjustments.append(f"{rule.field} {values[rule.field]!r} -> {runs_with!r} ({rule.reason})")
        data.setdefault(section, {})[key] = runs_with
    try:
        job = JobSpec.from_dict(data)
    except ConfigError as exc:
        shown = ", ".join(f"{n}={v!r}" for n, v in flat.items())
        raise ConfigError(f"trial config ({shown}) is invalid: {_strip_config_prefix(str(exc))}") from None
    return job, adjustments


def describe_trial(spec: SweepSpec, config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str], List[str]]:
    """What the results show for one trial's sampled ``config``: ``(values, adjustments,
    notes)``. ``values`` holds each searched field as the trial ran it, or
    :data:`NOT_APPLICABLE` where the field was inert; ``notes`` say why (one per such field).
    A config the job rejects shows its sampled values."""
    fields = [d.field for d in spec.dimensions]
    try:
        job, adjustments = trial_job(spec, config)
        ran = job_values(job)
    except ConfigError:
        adjustments = []
        ran = {**job_values(spec.job), **flatten_params(config)}
    rules = inert_rules(ran, fields)
    inert = {r.field for r in rules}
    values = {f: NOT_APPLICABLE if f in inert else _plain(ran.get(f)) for f in fields}
    return values, adjustments, [r.note for r in rules]


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
    #: one per trial, best first: the results.csv columns, ``config`` (sampled) and ``inert_notes``
    rows: List[Dict[str, Any]]
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
    "INERT_FIELDS",
    "NOT_APPLICABLE",
    "REPORTED_METRICS",
    "InertRule",
    "RoutingCollapseSpec",
    "SchedulerSpec",
    "SearchDim",
    "SweepResult",
    "SweepSpec",
    "TrialResources",
    "apply_sweep_overrides",
    "check_inert_rules",
    "check_search_available",
    "describe_trial",
    "drawn_inert_rules",
    "flatten_params",
    "grid_points",
    "inert_rules",
    "job_values",
    "load_sweep",
    "parse_search_space",
    "resume_sweep",
    "run_sweep",
    "trial_job",
]

check_inert_rules(INERT_FIELDS)
