"""From a sweep to its trials: job fields, fields without effect, the grid, each trial's job and what it reports.

    from moe_lab.tuning import INERT_FIELDS, TrialResult, grid_points, trial_job
    job, adjustments = trial_job(spec, {"model": {"router_type": "switch"}})  # runs experts_per_token=1
    job, _ = trial_job(spec, {"variant": "global_batch", "training.learning_rate": 0.003})  # a variant's trial
    grid_points(spec)["model"]      # grid points: none differs from another only in an inert field
    grid_points(spec, "global_batch")   # ... of one variant's trials
    TrialResult(max_steps=300).merge(record)  # a trainer record -> a Tune result (at evaluations), or None

Job fields are named flat, ``section.key`` (``model.router_type``); :func:`job_values` reads a
job that way. :data:`INERT_FIELDS` declares, as data, the fields that have no effect under
some router settings; :func:`grid_points` leaves them out of the grid points they are inert
in, :func:`drawn_inert_rules` says which drawn fields need a per-trial decision, and
:func:`trial_job` runs an inert field with the base job's (or the rule's) value. How a sweep
uses them: :mod:`moe_lab.tuning`. Metric names come from :mod:`moe_lab.training.metrics`.

Variants (``SweepSpec.variants``: name -> job overrides) are a grid of their own: a trial's
config names its variant under :data:`VARIANT`, and :func:`trial_job` applies that
variant's overrides to the base job first, then the trial's searched values, then the inert
rules. Everything that reads the base job's values (the grid collapse, the inert rules)
reads the variant's job instead: a grid field is left out of a variant's points when it is
inert under that variant.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError
from ..jobs import JobSpec, apply_overrides
from ..training import metrics as M

if TYPE_CHECKING:
    from .spec import SearchDim, SweepSpec

#: job sections a search-space field may live in (``section.key``)
JOB_SECTIONS = ("model", "training", "data", "scaling")
#: job fields a sweep sets per trial itself
_RESERVED_FIELDS = {"training.output_dir": "each trial writes into its own trial directory"}
#: what the results show for a searched field that had no effect on a trial
NOT_APPLICABLE = "n/a"
#: the key of a trial config, and the results column, that names the trial's variant
VARIANT = "variant"


# ---------------------------------------------------------------------------------------
# job fields, flat
# ---------------------------------------------------------------------------------------


def check_job_field(name: Any, where: str) -> None:
    """``name`` is a ``section.key`` job field a sweep may set. Raises ConfigError starting with ``where``."""
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


def plain_value(value: Any) -> Any:
    """An enum's value (``RouterType.SWITCH`` -> ``"switch"``), anything else as it is."""
    return getattr(value, "value", value)


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


def job_values(job: Union[JobSpec, Mapping[str, Any]]) -> Dict[str, Any]:
    """A job's fields as flat ``section.key`` plain values (a JobSpec, or a job dict with
    defaults for what it leaves out)."""
    if isinstance(job, JobSpec):
        return flatten_params(job.to_dict())
    values = dict(_default_job_values())
    values.update({k: plain_value(v) for k, v in flatten_params(job).items()})
    return values


@functools.lru_cache(maxsize=1)
def _default_job_values() -> Dict[str, Any]:
    return flatten_params(JobSpec().to_dict())


# ---------------------------------------------------------------------------------------
# fields without effect
# ---------------------------------------------------------------------------------------


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
            matches = [plain_value(v) in allowed for v in options[name]]
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
            check_job_field(name, where)
        if r.field in conditions:
            raise ConfigError(f"{where}: {r.field!r} is also a condition of a rule; rules would depend on their order")
        if not r.when or any(not allowed for _, allowed in r.when):
            raise ConfigError(f"{where}: expected at least one condition, each with at least one value; got {r.when!r}")


def inert_rules(values: Mapping[str, Any], fields: Optional[Sequence[str]] = None) -> List[InertRule]:
    """The rules that apply to a trial whose job has these flat ``section.key`` values
    (only rules about ``fields``, when given)."""
    return [r for r in INERT_FIELDS if (fields is None or r.field in fields) and r.applies(values)]


# ---------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------


def _options(spec: "SweepSpec", variant: Optional[str] = None) -> Dict[str, Tuple[Any, ...]]:
    """The values each job field can take in the sweep (in ``variant``'s trials, when
    given): the base job's value (the variant's, or with variants but none given, every
    variant's), or the choices/grid of a searched field (a searched range has no entry)."""
    searched = {d.field for d in spec.dimensions}
    names = [variant] if variant is not None else list(spec.variants) or [None]
    options: Dict[str, Tuple[Any, ...]] = {}
    for name in names:
        for f, v in base_values(spec, name).items():
            if f not in searched and v not in options.setdefault(f, ()):
                options[f] += (v,)
    options.update({d.field: d.values for d in spec.dimensions if d.kind in ("choice", "grid")})
    return options


def grid_points(spec: "SweepSpec", variant: Optional[str] = None) -> Dict[str, List[Dict[str, Any]]]:
    """The grid of a random/grid sweep per job section: its points (``section.key`` ->
    value, grid fields only), one trial each (``num_samples`` times; sections combine as a
    product). A section without grid fields has one empty point. With variants, the grid
    of ``variant``'s trials (each variant runs its own grid, collapsed under its job); with
    none given, the grid collapsed where every variant agrees.

    The grid collapse: a grid field is left out of the points it is inert in
    (:data:`INERT_FIELDS`) where the point and the sweep decide that (the rule's conditions
    are fixed there, or all their choices agree), and points that become equal are kept
    once, so no two trials differ only in a field without effect. Where a condition is
    drawn per trial, the point keeps the value; :func:`trial_job` replaces it.
    """
    options = _options(spec, variant)
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


def drawn_inert_rules(spec: "SweepSpec", dim: "SearchDim", variant: Optional[str] = None) -> Tuple[InertRule, ...]:
    """The rules that may make a drawn (non-grid) field inert in some trial of the sweep (of
    ``variant``'s trials, when given): for those trials it is not drawn but runs with the
    rule's value."""
    options = _options(spec, variant)
    return tuple(r for r in INERT_FIELDS if r.field == dim.field and r.decide(options) is not False)


# ---------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------


def split_variant(config: Mapping[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """A trial config's variant name (None: the sweep has no variants) and its other params.

    Tune configs name the variant as ``config["variant"] = name``; where the grid differs
    per variant the variant entry carries that variant's sections too, ``{"name": name,
    "model": {...}}`` (see :func:`moe_lab.orchestration.tune.param_space`), merged back here.
    """
    params = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items() if k != VARIANT}
    variant = config.get(VARIANT)
    if isinstance(variant, Mapping):
        inner = dict(variant)
        variant = inner.pop("name", None)
        for section, values in inner.items():
            params.setdefault(section, {}).update(values)
    return (None if variant is None else str(variant)), params


def variant_overrides(spec: "SweepSpec", variant: Optional[str]) -> Dict[str, Any]:
    """The job overrides (flat ``section.key`` -> value) of ``variant``; ``{}`` for None.
    Raises ConfigError for a name the sweep does not have."""
    if variant is None:
        return {}
    if variant not in spec.variants:
        raise ConfigError(f"unknown variant {variant!r}; the sweep's variants are {list(spec.variants)}")
    return dict(spec.variants[variant] or {})


def _job_data(spec: "SweepSpec", variant: Optional[str]) -> Dict[str, Any]:
    """The base job as a dict (overrides applied), with ``variant``'s overrides on top."""
    if not isinstance(spec.base_job, dict):
        spec = spec.resolve()
    data = apply_overrides(spec.base_job, spec.overrides)
    for name, value in variant_overrides(spec, variant).items():
        section, key = name.split(".", 1)
        data.setdefault(section, {})[key] = value
    return data


def base_values(spec: "SweepSpec", variant: Optional[str] = None) -> Dict[str, Any]:
    """The flat ``section.key`` values of the job a trial starts from: the base job, with
    ``variant``'s overrides (validated as a job when it can be, so defaults fill in)."""
    data = _job_data(spec, variant)
    try:
        return job_values(JobSpec.from_dict(data))
    except ConfigError:
        return job_values(data)


# ---------------------------------------------------------------------------------------
# one trial
# ---------------------------------------------------------------------------------------


def trial_job(spec: "SweepSpec", params: Mapping[str, Any]) -> Tuple[JobSpec, List[str]]:
    """The job one trial runs: the base job, the trial's variant (``params["variant"]``,
    when the sweep has variants), then ``params`` (flat or nested) applied.

    Returns ``(job, adjustments)``. A field that is inert for the trial (:data:`INERT_FIELDS`)
    runs with the value of the job it starts from (the base job's, or the variant's) or the
    rule's fixed value, whatever ``params`` says (a ``switch`` trial runs with
    ``model.experts_per_token=1``); where that changes the value, it is recorded in
    adjustments. Raises ConfigError when the combination is invalid.
    """
    variant, params = split_variant(params)
    data = _job_data(spec, variant)
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
        shown = ", ".join(([f"{VARIANT}={variant!r}"] if variant is not None else [])
                          + [f"{n}={v!r}" for n, v in flat.items()])
        raise ConfigError(f"trial config ({shown}) is invalid: {_strip_config_prefix(str(exc))}") from None
    return job, adjustments


def _strip_config_prefix(msg: str) -> str:
    """A ConfigError message on one line, without the "invalid configuration" header and
    without the whole-section dumps of cross-field errors (``JobSpec.model = {...}: why``)."""
    lines = msg.replace("invalid configuration:\n", "").splitlines()
    out = []
    for line in lines:
        line = re.sub(r"^(\S+) = \{.*\}: ", r"\1: ", line.strip())
        out.append(line.replace("JobSpec.", "job."))
    return "; ".join(x for x in out if x)


def describe_trial(spec: "SweepSpec", config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str], List[str]]:
    """What the results show for one trial's sampled ``config``: ``(values, adjustments,
    notes)``. ``values`` holds the trial's variant (with variants) and each searched field as
    the trial ran it, or :data:`NOT_APPLICABLE` where the field was inert; ``notes`` say why
    (one per such field, and one per field a variant sets without effect). A config the job
    rejects shows its sampled values."""
    fields = [d.field for d in spec.dimensions]
    variant, params = split_variant(config)
    known = variant if variant in spec.variants else None  # an unknown name fails in trial_job
    try:
        job, adjustments = trial_job(spec, config)
        ran = job_values(job)
    except ConfigError:
        adjustments = []
        ran = {**base_values(spec, known), **flatten_params(params)}
    variant_fields = [f for f in variant_overrides(spec, known) if f not in fields]
    rules = inert_rules(ran, fields + variant_fields)
    inert = {r.field for r in rules}
    values = {VARIANT: variant} if spec.variants else {}
    values.update({f: NOT_APPLICABLE if f in inert else plain_value(ran.get(f)) for f in fields})
    return values, adjustments, [r.note for r in rules]


# ---------------------------------------------------------------------------------------
# what a trial reports
# ---------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")


def train_metrics(record: Mapping[str, Any]) -> Dict[str, float]:
    """The training part of a trial's Tune result, from its latest train record (a
    ``metrics.jsonl`` line; ``{}`` before the first: all nan). Routing health is the mean
    over MoE layers of what the trainer recorded per layer."""
    layers = record.get(M.MOE_LAYERS) or []
    return {
        "train_loss": float(record.get(M.LOSS, math.nan)),  # M.LOSS (Tune results hold eval losses too)
        M.TOKENS_PER_S: float(record.get(M.TOKENS_PER_S, math.nan)),
        M.HISTORY_LOAD_IMBALANCE: _mean([lay[M.LOAD_IMBALANCE] for lay in layers]),
        M.HISTORY_DROPPED_FRACTION: _mean([lay[M.DROPPED_FRACTION] for lay in layers]),
    }


#: metrics every trial reports to Tune (one report per evaluation); the sweep metric is one
REPORTED_METRICS = (
    M.EVAL_LOSS,
    M.EVAL_PERPLEXITY,
    M.EVAL_LOAD_IMBALANCE,
    M.EVAL_DROPPED_FRACTION,
    M.EVAL_DEAD_EXPERT_FRACTION,
    *train_metrics({}),
)


class TrialResult:
    """Turns MoETrainer callback records into one flat Tune result per evaluation.

    Train records (:data:`~moe_lab.training.metrics.LOSS`, ``TOKENS_PER_S``, ``MOE_LAYERS``)
    are remembered; an eval record (``EVAL_LOSS``, ...) yields the result: its metrics
    (per-layer lists reduced to mean and max) plus the latest training metrics
    (:func:`train_metrics`) and the trial's ``max_steps``.
    """

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.train = train_metrics({})

    def merge(self, record: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The Tune result of an eval record; None (and the train metrics remembered) for a train record."""
        if M.EVAL_LOSS not in record:
            self.train = train_metrics(record)
            return None
        imbalance = list(record.get(M.EVAL_LOAD_IMBALANCE) or [])
        dead = list(record.get(M.EVAL_DEAD_EXPERTS) or [])
        result = {
            M.STEP: int(record[M.STEP]),
            "max_steps": int(self.max_steps),
            M.EVAL_LOSS: float(record[M.EVAL_LOSS]),
            M.EVAL_PERPLEXITY: float(record[M.EVAL_PERPLEXITY]),
            M.EVAL_LOAD_IMBALANCE: _mean(imbalance),
            "eval_load_imbalance_max": max(imbalance) if imbalance else math.nan,
            M.EVAL_DROPPED_FRACTION: _mean(record.get(M.EVAL_DROPPED_FRACTION) or []),
            M.EVAL_DEAD_EXPERT_FRACTION: float(record.get(M.EVAL_DEAD_EXPERT_FRACTION, 0.0)),
            "eval_dead_experts_max": int(max(dead)) if dead else 0,
        }
        result.update(self.train)
        return result


check_inert_rules(INERT_FIELDS)
