"""What a sweep shows: the router comparison plot, the printed table, and all outputs at once.

    from moe_lab.tuning import plot_router_comparison, print_results_table, write_outputs
    result = write_outputs(spec, directory, rows, elapsed_seconds)   # csv, best.yaml, plot, table
    print_results_table(result)                                      # rich table, best first
    plot_router_comparison(rows, directory / ROUTER_PLOT, spec.metric, title="...")

A searched field that had no effect on a trial shows as ``n/a``; the table's legend
(:func:`inert_legend`) says why. Matplotlib draws on an Agg canvas (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..training import metrics as M
from .results import BEST_JOB, RESULTS_CSV, SweepResult, is_interrupted, pick_best, write_best_job, write_results_csv
from .spec import SweepSpec
from .trials import NOT_APPLICABLE, plain_value

ROUTER_PLOT = "router_comparison.png"
#: router order in tables and plots
ROUTER_ORDER = ("top_k", "switch", "expert_choice")
#: metric columns of the printed table, headed without the ``eval_`` prefix
TABLE_METRICS = (M.EVAL_LOSS, M.EVAL_PERPLEXITY, M.EVAL_LOAD_IMBALANCE, M.EVAL_DROPPED_FRACTION, M.TOKENS_PER_S)


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
            if st != "completed" and r.get(M.STEP) is not None:  # where it stopped
                ax.annotate(f"step {r[M.STEP]}", (x, r[metric]), textcoords="offset points", xytext=(6, -3),
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


def inert_legend(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The legend of the n/a cells: one line per reason, in order of first appearance."""
    notes = dict.fromkeys(note for r in rows for note in r.get("inert_notes", []))
    return [f"{NOT_APPLICABLE}: {note}" for note in notes]


def print_results_table(result: SweepResult, console: Any = None) -> None:
    """The results as a rich table (best first), with the n/a legend as its caption."""
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
    """results.csv, best.yaml and the router plot in ``directory`` from the rows of a finished
    (or interrupted) run (:func:`~moe_lab.tuning.collect_rows`); prints the table when ``verbose``."""
    fields = [d.field for d in spec.dimensions]
    csv_path = write_results_csv(rows, directory / RESULTS_CSV, fields)
    best = pick_best(rows, spec.metric)
    best_path = None
    if best is not None:
        best_path = write_best_job(spec, best, directory / BEST_JOB, best["config"])
    plot = plot_router_comparison(
        rows, directory / ROUTER_PLOT, spec.metric,
        title=f"{spec.name}: final {spec.metric} per trial",
        default_router=plain_value(spec.job.model.router_type), mode=spec.mode,
    )
    result = SweepResult(
        directory=directory, rows=rows, best=best, metric=spec.metric, mode=spec.mode, results_csv=csv_path,
        best_job_path=best_path, plot_path=plot, elapsed_seconds=elapsed, interrupted=is_interrupted(spec, rows),
        param_fields=fields,
    )
    if verbose:
        print_results_table(result)
    return result
