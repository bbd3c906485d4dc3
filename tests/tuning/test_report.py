"""What a sweep shows (moe_lab.tuning.report): the printed table with its n/a legend, the
router comparison plot, and every output written from rows. No Ray.
"""

import csv

from rich.console import Console

from moe_lab.jobs import load_job
from moe_lab.tuning import (
    BEST_JOB,
    RESULTS_CSV,
    ROUTER_PLOT,
    SweepResult,
    plot_router_comparison,
    print_results_table,
    write_outputs,
)

EC_NOTE = "load_balancing_loss_coef has no effect under expert_choice with drop_tokens=True: " \
          "its balancing loss is constant (1) with zero gradient"
PNG = b"\x89PNG\r\n\x1a\n"


def test_table_shows_na_and_the_legend_says_why(inert_sweep, tmp_path):
    spec, rows, fields = inert_sweep
    ordered = sorted(rows.values(), key=lambda r: r["eval_loss"])
    result = SweepResult(directory=tmp_path / "t", rows=ordered, best=ordered[0], metric="eval_loss", mode="min",
                         results_csv=tmp_path / "results.csv", best_job_path=None, plot_path=None,
                         elapsed_seconds=1.0, param_fields=fields)
    console = Console(record=True, width=400)
    print_results_table(result, console=console)
    text = console.export_text()
    ec_line = next(line for line in text.splitlines() if "expert_choice" in line and "t0" in line)
    assert "n/a" in ec_line
    assert "n/a: " + EC_NOTE in " ".join(text.split())
    assert "n/a: experts_per_token has no effect under switch" in text
    for r in ordered:
        assert r["trial_id"] in text
    assert "completed" in text and "loss" in text and "tokens_per_s" in text


def test_plot_groups_trials_by_router(inert_sweep, tmp_path):
    spec, rows, fields = inert_sweep
    path = plot_router_comparison(list(rows.values()), tmp_path / "plots" / ROUTER_PLOT, "eval_loss", title="t")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    empty = plot_router_comparison([], tmp_path / "empty.png", "eval_loss", title="no trials")
    assert empty.read_bytes()[:8] == PNG


def test_outputs_from_rows(inert_sweep, tmp_path, capsys):
    spec, rows, fields = inert_sweep
    ordered = sorted(rows.values(), key=lambda r: r["eval_loss"])
    result = write_outputs(spec, tmp_path, ordered, elapsed=2.0, verbose=1)
    assert result.results_csv == tmp_path / RESULTS_CSV and result.best_job_path == tmp_path / BEST_JOB
    assert result.plot_path == tmp_path / ROUTER_PLOT and result.plot_path.read_bytes()[:8] == PNG
    with open(result.results_csv, newline="") as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == [r["trial_id"] for r in ordered]
    assert result.best["trial_id"] == ordered[0]["trial_id"] and result.param_fields == fields
    assert load_job(result.best_job_path).model.router_type.value == ordered[0]["model.router_type"]
    assert result.interrupted  # 3 of the sweep's 9 trials
    assert "best first (eval_loss, min)" in capsys.readouterr().out  # verbose: the table
