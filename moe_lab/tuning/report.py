"""What a sweep shows: the comparison plot, the printed table, the balancing study, and all outputs at once.

    from moe_lab.tuning import plot_router_comparison, print_results_table, write_outputs
    result = write_outputs(spec, directory, rows, elapsed_seconds)   # csv, best.yaml, plots, table
    print_results_table(result)                                      # rich table, best first
    plot_router_comparison(rows, directory / ROUTER_PLOT, spec.metric, title="...")
    plot_router_comparison(rows, path, spec.metric, title="...", group_by="variant", order=list(spec.variants))
    summary = write_balancing_study(spec, directory, rows)   # balancing_study.png + .csv (``report: balancing``)
    print_balancing_table(summary, title="...")                # one row per variant

A searched field that had no effect on a trial shows as ``n/a``; the table's legend
(:func:`inert_legend`) says why, and with variants the legend lists each variant's overrides.
``router_comparison.png`` groups the trials by router type, or by variant when the sweep has
variants.

The balancing study (a sweep spec with ``report: balancing`` and ``variants``) reads each
trial's ``train/metrics.jsonl`` (:func:`read_trial_curves`) and compares the variants
(:func:`balancing_summary`, :func:`plot_balancing_study`): final eval loss; load imbalance
(max/mean expert load, mean over MoE layers) against steps, in training (tokens processed,
after capacity dropping) and at the evaluations (no dropping there, so the router's own
preference); the dead-expert fraction of the last evaluation; the dropped fraction in
training. Its summary is ``balancing_study.csv``, one row per variant (the best trial of
each). Matplotlib draws on an Agg canvas (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..training import metrics as M
from .results import BEST_JOB, RESULTS_CSV, SweepResult, is_interrupted, pick_best, write_best_job, write_results_csv
from .spec import SweepSpec
from .trials import NOT_APPLICABLE, VARIANT, plain_value

ROUTER_PLOT = "router_comparison.png"
#: router order in tables and plots
ROUTER_ORDER = ("top_k", "switch", "expert_choice")
#: the row key the router comparison groups by without variants
ROUTER_FIELD = "model.router_type"
#: metric columns of the printed table, headed without the ``eval_`` prefix
TABLE_METRICS = (M.EVAL_LOSS, M.EVAL_PERPLEXITY, M.EVAL_LOAD_IMBALANCE, M.EVAL_DROPPED_FRACTION, M.TOKENS_PER_S)


def plot_router_comparison(rows: List[Dict[str, Any]], path: Path, metric: str, title: str,
                           default_router: str = "top_k", mode: str = "min", group_by: str = ROUTER_FIELD,
                           order: Sequence[str] = ROUTER_ORDER) -> Path:
    """Final ``metric`` of every trial, grouped by router type, or by another row key such
    as ``group_by="variant"`` (groups in ``order``, then the others sorted; PNG, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        fallback = default_router if group_by == ROUTER_FIELD else "?"
        groups.setdefault(str(r.get(group_by) or fallback), []).append(r)
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    group_label = "router type" if group_by == ROUTER_FIELD else group_by.split(".")[-1]
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
            if st != "completed" and r.get(M.STEP) is not None:  # where it stopped
                ax.annotate(f"step {r[M.STEP]}", (x, r[metric]), textcoords="offset points", xytext=(6, -3),
                            fontsize=7, color="0.35")
        done = [r[metric] for r in scored if r["status"] == "completed"]
        if done:
            best = min(done) if mode == "min" else max(done)
            ax.hlines(best, i - 0.3, i + 0.3, colors="C2", linewidth=1.5,
                      label=f"best completed (per {group_label})" if "best" not in seen else None)
            seen.add("best")
        failed = sum(1 for r in members if r["status"] == "error")
        labels.append(f"{name}\n{len(members)} trial{'s' if len(members) != 1 else ''}"
                      + (f", {failed} failed" if failed else ""))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(group_label)
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


def inert_legend(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The legend of the n/a cells: one line per reason, in order of first appearance."""
    notes = dict.fromkeys(note for r in rows for note in r.get("inert_notes", []))
    return [f"{NOT_APPLICABLE}: {note}" for note in notes]


def variant_legend(variants: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """One line per variant: its name and the job fields it sets."""
    return [f"{VARIANT} {name}: " + (", ".join(f"{f}={plain_value(v)}" for f, v in overrides.items())
                                     or "the base job")
            for name, overrides in variants.items()]


def print_results_table(result: SweepResult, console: Any = None) -> None:
    """The results as a rich table (best first), with the n/a legend as its caption."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for every column
            console = Console(width=max(console.width, 240))
    legend = variant_legend(result.variants) + inert_legend(result.rows)
    table = Table(title=f"sweep {result.directory.name}: {len(result.rows)} trials, "
                        f"best first ({result.metric}, {result.mode})",
                  caption="\n".join(legend) or None, caption_justify="left")
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    for f in result.param_fields:
        table.add_column(f.split(".", 1)[-1], justify="right")
    for col in TABLE_METRICS:
        table.add_column(col.replace("eval_", ""), justify="right")
    table.add_column("note")
    colors = {"completed": "green", "early stopped": "yellow", "routing collapse": "magenta", "error": "red"}
    for r in result.rows:
        note = r["error"] or r["adjustments"].split(" (")[0]
        style = "bold" if result.best is not None and r["trial_id"] == result.best["trial_id"] else None
        table.add_row(
            r["trial_id"],
            f"[{colors.get(r['status'], 'white')}]{r['status']}[/]",
            _fmt(r[M.STEP]),
            *[_fmt(r.get(f)) for f in result.param_fields],
            *[_fmt(r.get(c)) for c in TABLE_METRICS],
            (note[:70] + "...") if len(note) > 70 else note,
            style=style,
        )
    console.print(table)


def write_outputs(spec: SweepSpec, directory: Path, rows: List[Dict[str, Any]], elapsed: float,
                  verbose: int = 1) -> SweepResult:
    """results.csv, best.yaml, the comparison plot (by router, or by variant) and, with
    ``report: balancing``, the balancing study in ``directory`` from the rows of a finished
    (or interrupted) run (:func:`~moe_lab.tuning.collect_rows`); prints the table when ``verbose``."""
    fields = spec.param_fields
    csv_path = write_results_csv(rows, directory / RESULTS_CSV, fields)
    best = pick_best(rows, spec.metric)
    best_path = None
    if best is not None:
        best_path = write_best_job(spec, best, directory / BEST_JOB, best["config"])
    by_variant = dict(group_by=VARIANT, order=list(spec.variants)) if spec.variants else {}
    plot = plot_router_comparison(
        rows, directory / ROUTER_PLOT, spec.metric,
        title=f"{spec.name}: final {spec.metric} per trial",
        default_router=plain_value(spec.job.model.router_type), mode=spec.mode, **by_variant,
    )
    study: List[Dict[str, Any]] = []
    study_plot = None
    if spec.report == "balancing":
        study = [{k: v for k, v in s.items() if k != "curves"} for s in write_balancing_study(spec, directory, rows)]
        study_plot = directory / STUDY_PLOT
    result = SweepResult(
        directory=directory, rows=rows, best=best, metric=spec.metric, mode=spec.mode, results_csv=csv_path,
        best_job_path=best_path, plot_path=plot, elapsed_seconds=elapsed, interrupted=is_interrupted(spec, rows),
        param_fields=fields, variants=dict(spec.variants), study_plot_path=study_plot, study=study,
    )
    if verbose:
        print_results_table(result)
        if study:
            print_balancing_table(study, title=f"balancing study {directory.name}: one row per variant")
    return result


# ---------------------------------------------------------------------------------------
# the balancing study (report: balancing)
# ---------------------------------------------------------------------------------------

STUDY_PLOT = "balancing_study.png"
STUDY_CSV = "balancing_study.csv"
#: where a trial's trainer writes its records, under the trial directory
TRIAL_METRICS = Path("train") / "metrics.jsonl"
#: the training summaries average over this last share of the logged steps (the settled part)
STUDY_TAIL_FRACTION = 0.5
#: summary columns from training records (means over MoE layers, then over the tail of training)
TRAIN_LOAD_IMBALANCE = f"train_{M.HISTORY_LOAD_IMBALANCE}"
TRAIN_DROPPED_FRACTION = f"train_{M.HISTORY_DROPPED_FRACTION}"
#: the columns of balancing_study.csv after variant, trial_id, status and step
STUDY_COLUMNS = (M.EVAL_LOSS, M.EVAL_LOAD_IMBALANCE, TRAIN_LOAD_IMBALANCE, M.EVAL_DEAD_EXPERT_FRACTION,
                 TRAIN_DROPPED_FRACTION)


@dataclass
class TrialCurves:
    """A trial's routing health over training, from its ``metrics.jsonl`` (one value per
    logged step, or per evaluation; each a mean over MoE layers; a resumed trial's repeated
    steps keep their last record)."""

    steps: List[int] = field(default_factory=list)  #: train records
    load_imbalance: List[float] = field(default_factory=list)  #: max/mean tokens processed (after capacity)
    dropped_fraction: List[float] = field(default_factory=list)
    eval_steps: List[int] = field(default_factory=list)  #: eval records
    eval_loss: List[float] = field(default_factory=list)
    eval_load_imbalance: List[float] = field(default_factory=list)  #: nothing is dropped at evaluation
    eval_dead_expert_fraction: List[float] = field(default_factory=list)  #: max over layers of dead / E


def tail_mean(values: Sequence[float], fraction: float = STUDY_TAIL_FRACTION) -> float:
    """The mean of the last ``fraction`` of ``values`` (at least one value; nan if none)."""
    if not values:
        return math.nan
    tail = values[len(values) - max(1, math.ceil(fraction * len(values))):]
    return sum(tail) / len(tail)


def _layer_mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else math.nan


def read_trial_curves(metrics_path: Path) -> TrialCurves:
    """A trial's :class:`TrialCurves` from its ``metrics.jsonl`` (missing file or lines that
    are not records: nothing from them)."""
    train: Dict[int, Dict[str, Any]] = {}
    evals: Dict[int, Dict[str, Any]] = {}
    path = Path(metrics_path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or M.STEP not in rec:
                continue
            if M.is_eval_record(rec):
                evals[int(rec[M.STEP])] = rec
            elif rec.get(M.MOE_LAYERS):
                train[int(rec[M.STEP])] = rec
    curves = TrialCurves()
    for step in sorted(train):
        layers = train[step][M.MOE_LAYERS]
        curves.steps.append(step)
        curves.load_imbalance.append(_layer_mean([lay[M.LOAD_IMBALANCE] for lay in layers]))
        curves.dropped_fraction.append(_layer_mean([lay[M.DROPPED_FRACTION] for lay in layers]))
    for step in sorted(evals):
        rec = evals[step]
        curves.eval_steps.append(step)
        curves.eval_loss.append(float(rec[M.EVAL_LOSS]))
        curves.eval_load_imbalance.append(_layer_mean(rec.get(M.EVAL_LOAD_IMBALANCE) or []))
        curves.eval_dead_expert_fraction.append(float(rec.get(M.EVAL_DEAD_EXPERT_FRACTION, 0.0)))
    return curves


def _scored(row: Dict[str, Any], metric: str) -> bool:
    v = row.get(metric)
    return isinstance(v, (int, float)) and not math.isnan(v)


def best_rows_by_variant(rows: Sequence[Dict[str, Any]], order: Sequence[str], metric: str) -> Dict[str, Dict[str, Any]]:
    """The best row of each variant (rows come best first), in ``order``; a variant whose
    trials reported nothing keeps its first row (failed trials show as such)."""
    best: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        name = r.get(VARIANT)
        if name is None:
            continue
        if name not in best or (not _scored(best[name], metric) and _scored(r, metric)):
            best[name] = r
    names = [n for n in order if n in best] + [n for n in best if n not in order]
    return {n: best[n] for n in names}


def balancing_summary(rows: Sequence[Dict[str, Any]], order: Sequence[str], metric: str = M.EVAL_LOSS,
                      curves: Optional[Mapping[str, TrialCurves]] = None) -> List[Dict[str, Any]]:
    """One summary row per variant (its best trial): ``variant``, ``trial_id``, ``status``,
    ``step`` and :data:`STUDY_COLUMNS`: the final eval loss, eval load imbalance and
    dead-expert fraction (the trial's last report) and, from its training records, the load
    imbalance and the dropped fraction averaged over the last :data:`STUDY_TAIL_FRACTION` of
    training. ``curves`` (by variant) default to each trial's ``metrics.jsonl``."""
    out = []
    for name, r in best_rows_by_variant(rows, order, metric).items():
        c = (curves or {}).get(name)
        if c is None:
            c = read_trial_curves(Path(r["trial_dir"]) / TRIAL_METRICS) if r.get("trial_dir") else TrialCurves()
        out.append({
            VARIANT: name,
            "trial_id": r.get("trial_id"),
            "status": r.get("status"),
            M.STEP: r.get(M.STEP),
            M.EVAL_LOSS: r.get(M.EVAL_LOSS),
            M.EVAL_LOAD_IMBALANCE: r.get(M.EVAL_LOAD_IMBALANCE),
            TRAIN_LOAD_IMBALANCE: tail_mean(c.load_imbalance),
            M.EVAL_DEAD_EXPERT_FRACTION: r.get(M.EVAL_DEAD_EXPERT_FRACTION),
            TRAIN_DROPPED_FRACTION: tail_mean(c.dropped_fraction),
            "curves": c,  # not a CSV column
        })
    return out


def _value(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def plot_balancing_study(summary: Sequence[Dict[str, Any]], path: Path, title: str, dpi: int = 80) -> Path:
    """The balancing study's figure (PNG, Agg canvas) from :func:`balancing_summary`.

    Panels, one colour per variant: final eval loss; load imbalance against steps in
    training (after capacity) and at the evaluations (no dropping); eval loss against steps;
    the dead-expert fraction of the last evaluation; the dropped fraction in training (mean
    over the last :data:`STUDY_TAIL_FRACTION`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15.0, 8.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    names = [s[VARIANT] for s in summary]
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    ticks = list(range(len(names)))

    def per_variant(ax: Any, key: str, ylabel: str, panel_title: str, bars: bool, fmt: str) -> None:
        values = [_value(s.get(key)) for s in summary]
        for i, (n, v) in enumerate(zip(names, values)):
            if math.isnan(v):
                ax.text(i, 0.5, "no result", ha="center", va="center", rotation=90, fontsize=8, color="0.4",
                        transform=ax.get_xaxis_transform())
                continue
            if bars:
                ax.bar([i], [v], color=colors[n], width=0.6)
            else:
                ax.scatter([i], [v], s=70, color=colors[n], zorder=3)
            ax.annotate(format(v, fmt), (i, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
        ax.set_xticks(ticks)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(axis="y", alpha=0.3)
        if bars:
            top = max([v for v in values if not math.isnan(v)] + [0.0])
            ax.set_ylim(0.0, max(top * 1.25, 0.05))
        else:
            ok = [v for v in values if not math.isnan(v)]
            if ok:
                pad = max(0.02, 0.25 * (max(ok) - min(ok)))
                ax.set_ylim(min(ok) - pad, max(ok) + pad)

    def over_steps(ax: Any, xs_key: str, ys_key: str, ylabel: str, panel_title: str, marker: str = "") -> None:
        drawn = False
        for s in summary:
            c: TrialCurves = s["curves"]
            xs, ys = getattr(c, xs_key), getattr(c, ys_key)
            if xs and len(xs) == len(ys):
                ax.plot(xs, ys, marker or "-", color=colors[s[VARIANT]], label=s[VARIANT], lw=1.4, ms=4)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)

    per_variant(axes[0][0], M.EVAL_LOSS, "eval loss (nats/token)", "Final eval loss", bars=False, fmt=".4f")
    over_steps(axes[0][1], "steps", "load_imbalance", "max/mean expert load",
               "Load imbalance in training (after capacity)")
    axes[0][1].axhline(1.0, ls=":", color="gray")
    over_steps(axes[0][2], "eval_steps", "eval_load_imbalance", "max/mean expert load",
               "Load imbalance at evaluation (no dropping)", marker="o-")
    axes[0][2].axhline(1.0, ls=":", color="gray")
    over_steps(axes[1][0], "eval_steps", "eval_loss", "eval loss (nats/token)", "Eval loss", marker="o-")
    per_variant(axes[1][1], M.EVAL_DEAD_EXPERT_FRACTION, "dead experts / experts (worst layer)",
                "Dead experts (last evaluation)", bars=True, fmt=".3f")
    per_variant(axes[1][2], TRAIN_DROPPED_FRACTION, "share of token slots dropped",
                f"Dropped fraction in training (last {STUDY_TAIL_FRACTION:.0%} of steps)", bars=True, fmt=".4f")
    handles, labels = axes[0][1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=dpi, format="png")
    return path


def write_balancing_summary(summary: Sequence[Dict[str, Any]], path: Path) -> Path:
    """``balancing_study.csv``: one line per variant (:func:`balancing_summary`)."""
    columns = [VARIANT, "trial_id", "status", M.STEP, *STUDY_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for s in summary:
            writer.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in columns})
    return path


def print_balancing_table(summary: Sequence[Dict[str, Any]], title: str, console: Any = None) -> None:
    """The balancing study's summary (:func:`balancing_summary`) as a rich table, one row per variant."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))
    table = Table(title=title, caption=f"train_*: mean over the last {STUDY_TAIL_FRACTION:.0%} of training "
                                       "(after capacity); eval_*: the last evaluation (nothing dropped)",
                  caption_justify="left")
    table.add_column(VARIANT, no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    for col in STUDY_COLUMNS:
        table.add_column(col, justify="right")
    for s in summary:
        table.add_row(str(s[VARIANT]), str(s.get("status")), _fmt(s.get(M.STEP)), *[_fmt(s.get(c)) for c in STUDY_COLUMNS])
    console.print(table)


def write_balancing_study(spec: SweepSpec, directory: Path, rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``balancing_study.png`` and ``balancing_study.csv`` in ``directory``; returns the
    summary (:func:`balancing_summary`, one row per variant)."""
    summary = balancing_summary(rows, list(spec.variants), spec.metric)
    write_balancing_summary(summary, directory / STUDY_CSV)
    several = any(sum(1 for r in rows if r.get(VARIANT) == s[VARIANT]) > 1 for s in summary)
    title = f"{spec.name}: balancing recipes compared" + (" (best trial of each variant)" if several else "")
    plot_balancing_study(summary, directory / STUDY_PLOT, title)
    return summary
