"""Sweep results (moe_lab.tuning.results): rows from Tune's results, statuses, the best trial,
results.csv, best.yaml and the sweep directory. Fake Tune results; no Ray.
"""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_lab.errors import ConfigError
from moe_lab.jobs import load_job
from moe_lab.tuning import (
    NOT_APPLICABLE,
    SWEEP_FILE,
    SweepResult,
    collect_rows,
    load_sweep,
    new_sweep_directory,
    open_sweep_directory,
    pick_best,
    routing_collapsed,
    write_best_job,
    write_results_csv,
)

ROUTERS = Path(__file__).resolve().parents[2] / "jobs" / "sweep_routers.yaml"
EC_NOTE = "load_balancing_loss_coef has no effect under expert_choice with drop_tokens=True: " \
          "its balancing loss is constant (1) with zero gradient"


def test_rows_show_inert_fields_as_na_with_the_reason(inert_sweep):
    spec, rows, fields = inert_sweep
    assert rows["expert_choice"]["model.load_balancing_loss_coef"] == NOT_APPLICABLE
    assert rows["expert_choice"]["inert"].startswith(EC_NOTE)
    assert rows["top_k"]["model.load_balancing_loss_coef"] == 0.02 and rows["top_k"]["inert"] == ""
    assert rows["switch"]["model.experts_per_token"] == NOT_APPLICABLE
    assert "experts_per_token 2 -> 1" in rows["switch"]["adjustments"]
    assert rows["switch"]["model.load_balancing_loss_coef"] == 0.05


def test_results_csv_shows_na_with_the_reason(inert_sweep, tmp_path):
    spec, rows, fields = inert_sweep
    with open(write_results_csv(list(rows.values()), tmp_path / "results.csv", fields), newline="") as f:
        csv_rows = {r["model.router_type"]: r for r in csv.DictReader(f)}
    assert csv_rows["expert_choice"]["model.load_balancing_loss_coef"] == "n/a"
    assert csv_rows["expert_choice"]["inert"].startswith(EC_NOTE)
    assert float(csv_rows["top_k"]["model.load_balancing_loss_coef"]) == 0.02


def test_best_job_comments_na_and_runs_the_base_value(inert_sweep, tmp_path):
    """best.yaml of the expert_choice trial: n/a and why in its header, the base coefficient in the job."""
    spec, rows, fields = inert_sweep
    ordered = sorted(rows.values(), key=lambda r: r["eval_loss"])
    best = write_best_job(spec, ordered[0], tmp_path / "best.yaml", ordered[0]["config"])
    header = best.read_text().split("\nname:")[0]
    assert "model.load_balancing_loss_coef=n/a" in header and "# n/a: " + EC_NOTE in " ".join(header.split())
    assert load_job(best).model.load_balancing_loss_coef == spec.job.model.load_balancing_loss_coef


def _result(i, step=None, loss=None, dead=0.0, error=None):
    metrics = {"trial_id": f"t{i}"}
    if step is not None:
        metrics.update(step=step, max_steps=300, eval_loss=loss, eval_dead_expert_fraction=dead)
    config = {"model": {"router_type": "top_k", "load_balancing_loss_coef": 0.01, "experts_per_token": 2}}
    return SimpleNamespace(config=config, path=f"/x/trial_t{i}", error=error, metrics=metrics)


def test_statuses_order_and_best_trial(tmp_path):
    """Best first by the metric (unscored last); the best trial is the best completed one."""
    spec = load_sweep(ROUTERS, [f"output_dir={tmp_path}", "name=t"])  # collapse: > 0.5 dead after step 100
    grid = [
        _result(0, 300, 3.0),                                    # ran to max_steps
        _result(1, 100, 2.0),                                    # stopped by ASHA
        _result(2, 150, 2.5, dead=0.75),                         # stopped: routing collapse
        _result(3, 50, 1.0),                                     # still running when the run stopped
        _result(4, error=RuntimeError("x\nTraceback (most recent call last)\nValueError: bad value")),
        _result(5),                                              # never reported
    ]
    rows = collect_rows(spec, grid, {"t3": "RUNNING"})
    assert [(r["trial_id"], r["status"]) for r in rows] == [
        ("t3", "interrupted"), ("t1", "early stopped"), ("t2", "routing collapse"), ("t0", "completed"),
        ("t4", "error"), ("t5", "no result")]
    assert rows[4]["error"] == "ValueError: bad value" and rows[4]["trial_dir"] == "/x/trial_t4"
    assert pick_best(rows, "eval_loss")["trial_id"] == "t0"  # completed beats a lower early loss
    assert pick_best([r for r in rows if r["status"] != "completed"], "eval_loss")["trial_id"] == "t3"
    assert pick_best(rows[4:], "eval_loss") is None


def test_routing_collapse_waits_for_warmup_and_needs_more_than_the_threshold():
    assert not routing_collapsed({"step": 50, "eval_dead_expert_fraction": 0.75}, 0.5, 100)  # warm-up
    assert not routing_collapsed({"step": 100, "eval_dead_expert_fraction": 0.5}, 0.5, 100)  # not more than half
    assert routing_collapsed({"step": 100, "eval_dead_expert_fraction": 0.625}, 0.5, 100)
    assert not routing_collapsed({"step": 200, "train_loss": 1.0}, 0.5, 100)  # train-only results never stop


def test_sweep_directory_is_new_or_a_sweep_to_resume(tmp_path):
    spec = load_sweep(ROUTERS, [f"output_dir={tmp_path}", "name=s"])
    directory = new_sweep_directory(spec)
    assert directory == (tmp_path / "s").resolve() and not directory.exists()
    with pytest.raises(ConfigError, match=r"is not a sweep directory \(no sweep.yaml\)"):
        open_sweep_directory(tmp_path)
    directory.mkdir()
    spec.to_yaml(directory / SWEEP_FILE)
    with pytest.raises(ConfigError, match=r"already holds a sweep; resume it with `moe-lab sweep --resume"):
        new_sweep_directory(spec)
    moved = tmp_path / "moved"
    directory.rename(moved)
    again, d = open_sweep_directory(moved)
    assert d == moved.resolve() and again.name == "moved" and again.output_dir == str(tmp_path.resolve())
    assert again.search_space == spec.search_space


def test_a_sweep_without_a_best_trial_has_no_best_job(tmp_path):
    result = SweepResult(directory=tmp_path, rows=[], best=None, metric="eval_loss", mode="min",
                         results_csv=tmp_path / "results.csv", best_job_path=None, plot_path=None, elapsed_seconds=0.0)
    assert result.num_errors == 0
    with pytest.raises(ConfigError, match="no best trial"):
        result.best_job()
