"""Sweep results: one row per trial, ``results.csv``, ``best.yaml`` and the sweep directory.

    from moe_lab.tuning import collect_rows, pick_best, write_best_job, write_results_csv
    rows = collect_rows(spec, grid)      # a Tune ResultGrid, or any list of results: best first
    write_results_csv(rows, directory / RESULTS_CSV, spec.param_fields)   # variant, searched fields
    best = pick_best(rows, spec.metric)  # the best completed trial
    write_best_job(spec, best, directory / BEST_JOB, best["config"])   # `moe-lab train best.yaml`

A row holds ``trial_id``, ``status`` (completed, early stopped, routing collapse, interrupted,
no result, error), ``step``, ``max_steps``, the trial's ``variant`` (when the sweep has
variants), each searched field as the trial ran it (``n/a`` where it had no effect), the
metric columns (:data:`METRIC_COLUMNS`), ``adjustments``, ``inert`` (why a field is n/a),
``error`` and ``trial_dir``, plus two keys that are not CSV columns: ``config`` (the sampled
Tune config) and ``inert_notes``.

A sweep directory holds ``sweep.yaml`` (what ``--resume`` reads), Tune's experiment state and
the outputs: :func:`new_sweep_directory` refuses one that already holds a sweep,
:func:`open_sweep_directory` reads one back. Nothing here imports Ray: ``collect_rows`` reads
Tune's results by attribute.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError
from ..jobs import JobSpec, load_job
from ..training import metrics as M
from .spec import SweepSpec, load_sweep
from .trials import NOT_APPLICABLE, REPORTED_METRICS, VARIANT, describe_trial, trial_job, variant_overrides

#: the sweep's file inside its directory (what ``--resume`` reads)
SWEEP_FILE = "sweep.yaml"
RESULTS_CSV = "results.csv"
BEST_JOB = "best.yaml"
#: metric columns of the results (after the searched fields): every reported metric but the
#: routing health of training (that of evaluation is a column)
METRIC_COLUMNS = tuple(m for m in REPORTED_METRICS if m not in (M.HISTORY_LOAD_IMBALANCE, M.HISTORY_DROPPED_FRACTION))


@dataclass
class SweepResult:
    """What :func:`~moe_lab.tuning.run_sweep` returns; the same files are in ``directory``."""

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
    param_fields: List[str] = field(default_factory=list)  #: ``variant`` (with variants), the searched fields
    variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)  #: the spec's variants: name -> overrides
    study_plot_path: Optional[Path] = None  #: the study report's plot (``report: balancing``), if any
    study: List[Dict[str, Any]] = field(default_factory=list)  #: the study's rows, one per variant (balancing_study.csv)

    @property
    def num_errors(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "error")

    def best_job(self) -> JobSpec:
        """The best configuration as a job (the content of best.yaml)."""
        if self.best_job_path is None:
            raise ConfigError("the sweep has no best trial (no trial reported its metric)")
        return load_job(self.best_job_path)


# ---------------------------------------------------------------------------------------
# the sweep directory
# ---------------------------------------------------------------------------------------


def new_sweep_directory(spec: SweepSpec) -> Path:
    """``output_dir/name`` of a new sweep (absolute). Raises ConfigError when it already
    holds a sweep (finished or not): that one is resumed, not overwritten."""
    directory = Path(spec.output_dir).expanduser().resolve() / str(spec.name)
    if (directory / SWEEP_FILE).exists() or (directory / "tuner.pkl").exists():
        raise ConfigError(
            f"{directory} already holds a sweep; resume it with `moe-lab sweep --resume {directory}` "
            "or choose another name (--set name=...) or output_dir"
        )
    return directory


def open_sweep_directory(directory: Union[str, os.PathLike]) -> Tuple[SweepSpec, Path]:
    """The spec of the sweep in ``directory`` (from its ``sweep.yaml``, named after the
    directory wherever it moved) and the absolute directory. Raises ConfigError when
    ``directory`` is not a sweep directory."""
    d = Path(directory).expanduser().resolve()
    if not (d / SWEEP_FILE).is_file():
        raise ConfigError(f"{d} is not a sweep directory (no {SWEEP_FILE}); expected the directory a sweep wrote")
    spec = load_sweep(d / SWEEP_FILE)
    spec = SweepSpec.from_dict({**spec.to_dict(), "name": d.name, "output_dir": str(d.parent)})
    return spec, d


# ---------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------


def routing_collapsed(result: Dict[str, Any], dead_expert_fraction: float, after_step: int) -> bool:
    """More than ``dead_expert_fraction`` of some layer's experts got no eval token, after warm-up."""
    frac = result.get(M.EVAL_DEAD_EXPERT_FRACTION)
    return frac is not None and int(result.get(M.STEP, 0)) >= after_step and float(frac) > dead_expert_fraction


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


def _status(metrics: Dict[str, Any], error: str, tune_status: Optional[str], spec: SweepSpec) -> str:
    if error:
        return "error"
    if tune_status is not None and tune_status not in ("TERMINATED", "ERROR"):
        return "interrupted"  # running or waiting when the run stopped: a resume runs it
    step = metrics.get(M.STEP)
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

    ``grid``: Tune's ``ResultGrid``, or any iterable of results with ``metrics``, ``config``,
    ``path`` and ``error``. ``statuses``: Tune trial statuses by trial id (default: those of
    the grid's trials)."""
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
            M.STEP: metrics.get(M.STEP),
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


def is_interrupted(spec: SweepSpec, rows: Sequence[Dict[str, Any]]) -> bool:
    """Some trial did not finish (or never started): resuming the sweep runs it."""
    return any(r["status"] == "interrupted" for r in rows) or len(rows) < spec.num_trials


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def write_results_csv(rows: List[Dict[str, Any]], path: Path, fields: Sequence[str]) -> Path:
    """``results.csv``: one line per row, ``fields`` (:attr:`SweepSpec.param_fields`: the
    variant and the searched fields) after the status columns."""
    columns = ["trial_id", "status", M.STEP, "max_steps", *fields, *METRIC_COLUMNS, "adjustments", "inert", "error",
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


def write_best_job(spec: SweepSpec, best: Dict[str, Any], path: Path, config: Dict[str, Any]) -> Path:
    """The best trial's job as a runnable job YAML (``moe-lab train best.yaml``)."""
    job, adjustments = trial_job(spec, config)
    data = job.to_dict()
    data["name"] = f"{spec.name}-best"
    data["training"]["output_dir"] = f"./outputs/{spec.name}-best"
    job = JobSpec.from_dict(data)
    value = best.get(spec.metric)
    header = [
        f"# Best trial of sweep {spec.name}: {best['trial_id']} ({best['status']}, step {best[M.STEP]}),",
        f"# {spec.metric} = {value:.4f}." if isinstance(value, float) else f"# {spec.metric} = {value}.",
        "# Ran with: " + ", ".join(f"{f}={_shown(best.get(f))}" for f in spec.param_fields),
    ]
    if best.get(VARIANT) in spec.variants:
        overrides = variant_overrides(spec, best[VARIANT])
        header.append(f"# Variant {best[VARIANT]}: "
                      + (", ".join(f"{f}={v!r}" for f, v in overrides.items()) or "the base job"))
    header += [f"# {NOT_APPLICABLE}: {note}" for note in best.get("inert_notes", [])]
    if adjustments:
        header.append("# Adjusted: " + "; ".join(adjustments))
    header.append(f"# Train it: moe-lab train {path.name}")
    path.write_text("\n".join(header) + "\n" + job.to_yaml(), encoding="utf-8")
    return path
