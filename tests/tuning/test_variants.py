"""Sweep variants (named bundles of job overrides) and the balancing study: validation at the
boundary, the trials they make, the rows, table, best.yaml and the study's numbers, CSV and
plot from real metrics.jsonl files. No Ray."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from moe_lab.errors import ConfigError
from moe_lab.jobs import load_job
from moe_lab.tuning import (
    STUDY_CSV,
    STUDY_PLOT,
    VARIANT,
    SweepResult,
    apply_sweep_overrides,
    balancing_summary,
    collect_rows,
    grid_points,
    load_sweep,
    print_balancing_table,
    print_results_table,
    read_trial_curves,
    trial_job,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[2]
BALANCING = ROOT / "jobs" / "sweep_balancing.yaml"
PNG = b"\x89PNG\r\n\x1a\n"

RECIPES = {
    "micro": {},
    "global": {"model.load_balancing_scope": "global_batch"},
    "bias": {"model.load_balancing_loss_coef": 0.0, "model.router_bias_update_rate": 0.001},
}


def _variants(sweep_data, variants, search_space=None, **fields):
    return sweep_data(search_space or {}, variants=variants, **fields)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

BAD_VARIANTS = [
    ({"v": {"model.routr_type": "top_k"}}, None, r"variants\['v'\]\['model\.routr_type'\].*unknown field 'routr_type'"),
    ({"v": {"modle.hidden_size": 8}}, None, r"variants\['v'\]\['modle\.hidden_size'\].*unknown section 'modle'"),
    ({"v": ["model.num_experts=4"]}, None, r"variants\['v'\]: expected a mapping of job fields to values"),
    ({"bad name": {}}, None, r"variants: name 'bad name' must be a plain name"),
    ({"v": {"model.router_score_function": "cosine"}}, None, r"variants\['v'\]: its job is invalid.*router_score_function"),
    ({"v": {"model.router_type": "switch", "model.router_bias_update_rate": 0.001}}, None,
     r"variants\['v'\]: its job is invalid.*router_bias_update_rate needs router_type 'top_k'"),
    ({"v": {"training.output_dir": "x"}}, None, r"variants\['v'\]\['training\.output_dir'\].*cannot be searched"),
    ({"v": {"training.learning_rate": 0.01}}, {"training.learning_rate": {"choice": [0.001, 0.01]}},
     r"variants\['v'\]\['training\.learning_rate'\]: the field is also in search_space"),
    # a searched value that one variant's job rejects names that variant
    ({"ok": {}, "sig": {"model.router_score_function": "sigmoid"}},
     {"model.router_type": {"choice": ["top_k", "switch"]}},
     r"search_space\['model\.router_type'\]: value 'switch' is invalid for variant 'sig'.*router_score_function"),
]


@pytest.mark.parametrize("variants,space,message", BAD_VARIANTS, ids=[m.split(".*")[0][:40] for *_, m in BAD_VARIANTS])
def test_invalid_variants_are_rejected_naming_the_variant_and_field(sweep_data, variants, space, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_variants(sweep_data, variants, space))


def test_a_sweep_needs_a_search_space_or_variants_and_the_study_needs_variants(sweep_data):
    with pytest.raises(ConfigError, match=r"nothing to compare: give a search_space .* or variants"):
        load_sweep(sweep_data({}))
    with pytest.raises(ConfigError, match=r"report 'balancing' compares variants"):
        load_sweep(sweep_data({"model.router_type": {"choice": ["top_k"]}}, report="balancing"))
    with pytest.raises(ConfigError, match=r"report = 'summary'"):
        load_sweep(_variants(sweep_data, RECIPES, report="summary"))


# ---------------------------------------------------------------------------------------
# the trials variants make
# ---------------------------------------------------------------------------------------


def test_variants_alone_run_once_each_with_their_overrides(sweep_data):
    spec = load_sweep(_variants(sweep_data, RECIPES, num_samples=2))
    assert list(spec.variants) == ["micro", "global", "bias"]
    assert spec.param_fields == [VARIANT] and spec.num_trials == 2 * 3
    jobs = {name: trial_job(spec, {VARIANT: name})[0].model for name in spec.variants}
    assert jobs["micro"].load_balancing_scope == "micro_batch" and jobs["micro"].router_bias_update_rate is None
    assert jobs["global"].load_balancing_scope == "global_batch"
    assert jobs["bias"].load_balancing_loss_coef == 0.0 and jobs["bias"].router_bias_update_rate == 0.001
    assert jobs["micro"].hidden_size == jobs["bias"].hidden_size == 32  # the base job underneath
    with pytest.raises(ConfigError, match=r"unknown variant 'nope'; the sweep's variants are \['micro', 'global', 'bias'\]"):
        trial_job(spec, {VARIANT: "nope"})


def test_variants_cross_the_grid_and_searched_values_go_on_top(sweep_data):
    space = {"training.learning_rate": {"grid": [0.001, 0.01]}}
    spec = load_sweep(_variants(sweep_data, RECIPES, space, search="grid"))
    assert spec.num_trials == 3 * 2 and spec.param_fields == [VARIANT, "training.learning_rate"]
    job, _ = trial_job(spec, {VARIANT: {"name": "bias", "training": {"learning_rate": 0.01}}})
    assert job.training.learning_rate == 0.01 and job.model.router_bias_update_rate == 0.001


def test_each_variant_collapses_its_own_grid(sweep_data):
    """A variant with expert_choice makes the balancing coefficient inert for its trials only."""
    variants = {"tk": {}, "ec": {"model.router_type": "expert_choice"}}
    space = {"model.load_balancing_loss_coef": {"grid": [0.001, 0.01, 0.1]}}
    spec = load_sweep(_variants(sweep_data, variants, space, search="grid"))
    assert len(grid_points(spec, "tk")["model"]) == 3
    assert grid_points(spec, "ec")["model"] == [{}]
    assert spec.num_trials == 3 + 1
    grid = [SimpleNamespace(config={VARIANT: {"name": v, "model": m}}, path=None, error=None,
                            metrics={"trial_id": f"t{i}", "step": 4, "max_steps": 4, "eval_loss": 3.0 + i})
            for i, (v, m) in enumerate([("tk", {"load_balancing_loss_coef": 0.01}), ("ec", {})])]
    rows = {r[VARIANT]: r for r in collect_rows(spec, grid, {})}
    assert rows["tk"]["model.load_balancing_loss_coef"] == 0.01
    assert rows["ec"]["model.load_balancing_loss_coef"] == "n/a"
    assert "expert_choice" in rows["ec"]["inert"]


def test_set_reaches_a_variants_field(sweep_data):
    data = apply_sweep_overrides(_variants(sweep_data, RECIPES),
                                 ["variants.bias.model.router_bias_update_rate=0.01",
                                  "variants.shared.model.num_shared_experts=1"])
    assert data["variants"]["bias"] == {"model.load_balancing_loss_coef": 0.0, "model.router_bias_update_rate": 0.01}
    assert data["variants"]["shared"] == {"model.num_shared_experts": 1}
    spec = load_sweep(data)
    assert trial_job(spec, {VARIANT: "shared"})[0].model.num_shared_experts == 1


def test_the_shipped_study_compares_every_recipe_of_the_issue():
    spec = load_sweep(BALANCING)
    assert spec.report == "balancing" and spec.num_trials == len(spec.variants) >= 5
    models = {name: trial_job(spec, {VARIANT: name})[0].model for name in spec.variants}
    assert models["aux_micro_batch"].load_balancing_scope == "micro_batch"
    assert models["aux_micro_batch"].load_balancing_loss_coef > 0
    assert models["aux_global_batch"].load_balancing_scope == "global_batch"
    assert models["aux_free_bias"].router_bias_update_rate and models["aux_free_bias"].load_balancing_loss_coef == 0
    assert models["sigmoid_bias"].router_score_function == "sigmoid" and models["sigmoid_bias"].router_bias_update_rate
    assert models["shared_expert"].num_shared_experts == 1 and models["shared_expert"].num_experts == 8
    assert models["no_balancing"].load_balancing_loss_coef == 0 and not models["no_balancing"].router_bias_update_rate
    job = spec.job
    assert job.data.dataset == "builtin" and job.training.gradient_accumulation_steps > 1  # global != micro
    assert job.model.capacity_factor is not None  # tokens can be dropped


# ---------------------------------------------------------------------------------------
# rows, table, best.yaml and the study from real metrics files
# ---------------------------------------------------------------------------------------


def _metrics_file(path: Path, imbalance, dropped, evals) -> None:
    """A trainer-shaped metrics.jsonl: train records (two MoE layers) and eval records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, (imb, drop) in enumerate(zip(imbalance, dropped), start=1):
        layers = [{"layer": i, "load_imbalance_max_mean": imb + d, "dropped_fraction": drop + d / 10,
                   "load_cv": 0.1, "expert_counts": [1, 1]} for i, d in enumerate((-0.1, 0.1))]
        lines.append({"step": 10 * step, "loss": 4.0, "lm_loss": 4.0, "moe_layers": layers})
    for step, loss, eval_imb, dead in evals:
        lines.append({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(loss),
                      "eval_load_imbalance": [eval_imb - 0.5, eval_imb + 0.5], "eval_dead_expert_fraction": dead})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n", encoding="utf-8")


@pytest.fixture
def study(sweep_data, tmp_path):
    """A 3-variant study sweep and its rows from fake Tune results whose trial directories hold
    real metrics.jsonl files: ``(spec, rows)``."""
    spec = load_sweep(_variants(sweep_data, RECIPES, report="balancing"))
    curves = {  # variant: (train imbalance per log, train dropped per log, evals, final eval loss)
        "micro": ([2.0, 1.6, 1.4, 1.2], [0.2, 0.1, 0.1, 0.05], [(20, 4.0, 2.0, 0.0), (40, 3.5, 1.5, 0.0)]),
        "global": ([2.0, 1.8, 1.3, 1.1], [0.2, 0.2, 0.04, 0.02], [(20, 4.1, 2.2, 0.25), (40, 3.4, 1.4, 0.0)]),
        "bias": ([2.5, 2.0, 1.9, 1.7], [0.3, 0.3, 0.2, 0.2], [(20, 4.2, 2.5, 0.5), (40, 3.6, 1.9, 0.25)]),
    }
    grid = []
    for i, (name, (imb, drop, evals)) in enumerate(curves.items()):
        trial_dir = tmp_path / f"trial_{i}"
        _metrics_file(trial_dir / "train" / "metrics.jsonl", imb, drop, evals)
        step, loss, eval_imb, dead = evals[-1]
        grid.append(SimpleNamespace(
            config={VARIANT: name}, path=str(trial_dir), error=None,
            metrics={"trial_id": f"t{i}", "step": 40, "max_steps": 40, "eval_loss": loss,
                     "eval_load_imbalance": eval_imb, "eval_dead_expert_fraction": dead,
                     "eval_dropped_fraction": 0.0}))
    return spec, collect_rows(spec, grid, {})


def test_rows_csv_table_and_best_job_name_the_variant(study, tmp_path):
    spec, rows = study
    out = tmp_path / "out"
    out.mkdir()
    result = write_outputs(spec, out, rows, elapsed=1.0, verbose=0)
    with open(result.results_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r[VARIANT] for r in csv_rows] == ["global", "micro", "bias"]  # best eval loss first
    console = Console(record=True, width=400)
    print_results_table(result, console=console)
    text = console.export_text()
    assert "variant global: model.load_balancing_scope=global_batch" in text
    assert "variant micro: the base job" in text
    best_text = result.best_job_path.read_text()
    assert "# Variant global: model.load_balancing_scope='global_batch'" in best_text
    assert load_job(result.best_job_path).model.load_balancing_scope == "global_batch"


def test_balancing_study_numbers_csv_and_plot(study, tmp_path):
    spec, rows = study
    c = read_trial_curves(Path(rows[0]["trial_dir"]) / "train" / "metrics.jsonl")  # global
    assert c.steps == [10, 20, 30, 40] and c.eval_steps == [20, 40]
    assert c.load_imbalance == pytest.approx([2.0, 1.8, 1.3, 1.1])  # the mean of the two layers
    assert c.dropped_fraction == pytest.approx([0.2, 0.2, 0.04, 0.02])
    assert c.eval_load_imbalance == pytest.approx([2.2, 1.4]) and c.eval_dead_expert_fraction == [0.25, 0.0]

    summary = {s[VARIANT]: s for s in balancing_summary(rows, list(spec.variants))}
    assert list(summary) == ["micro", "global", "bias"]  # the spec's order
    assert summary["micro"]["eval_loss"] == 3.5 and summary["bias"]["eval_dead_expert_fraction"] == 0.25
    # means over the last half of training: (1.4 + 1.2) / 2 and (0.1 + 0.05) / 2
    assert summary["micro"]["train_load_imbalance"] == pytest.approx(1.3)
    assert summary["micro"]["train_dropped_fraction"] == pytest.approx(0.075)
    assert summary["bias"]["train_load_imbalance"] == pytest.approx(1.8)

    out = tmp_path / "out"
    out.mkdir()
    result = write_outputs(spec, out, rows, elapsed=1.0, verbose=0)
    assert result.study_plot_path == out / STUDY_PLOT
    assert result.study_plot_path.read_bytes()[:8] == PNG and result.study_plot_path.stat().st_size > 20000
    with open(out / STUDY_CSV, newline="") as f:
        lines = {r[VARIANT]: r for r in csv.DictReader(f)}
    assert list(lines) == ["micro", "global", "bias"]
    assert float(lines["global"]["eval_loss"]) == 3.4
    assert float(lines["micro"]["train_dropped_fraction"]) == pytest.approx(0.075)
    assert float(lines["bias"]["eval_load_imbalance"]) == 1.9
    console = Console(record=True, width=300)
    print_balancing_table(result.study, title="study", console=console)
    text = console.export_text()
    for name in RECIPES:
        assert name in text
    assert "1.3" in text and "0.075" in text


def test_a_failed_variant_shows_in_the_study_without_numbers(study, tmp_path):
    spec, rows = study
    rows = [dict(r) for r in rows]
    failed = next(r for r in rows if r[VARIANT] == "bias")
    failed.update(status="error", eval_loss=None, eval_load_imbalance=None, trial_dir=str(tmp_path / "missing"))
    summary = {s[VARIANT]: s for s in balancing_summary(rows, list(spec.variants))}
    assert summary["bias"]["status"] == "error" and summary["bias"]["eval_loss"] is None
    assert math.isnan(summary["bias"]["train_load_imbalance"])
    out = tmp_path / "out"
    out.mkdir()
    result = write_outputs(spec, out, rows, elapsed=1.0, verbose=0)
    assert result.study_plot_path.read_bytes()[:8] == PNG
    assert [s[VARIANT] for s in result.study] == ["micro", "global", "bias"]


def test_without_the_report_there_is_no_study(sweep_data, tmp_path):
    spec = load_sweep(_variants(sweep_data, RECIPES))
    grid = [SimpleNamespace(config={VARIANT: "micro"}, path=None, error=None,
                            metrics={"trial_id": "t0", "step": 4, "max_steps": 4, "eval_loss": 3.0})]
    result = write_outputs(spec, tmp_path, collect_rows(spec, grid, {}), elapsed=1.0, verbose=0)
    assert result.study_plot_path is None and result.study == []
    assert not (tmp_path / STUDY_PLOT).exists() and not (tmp_path / STUDY_CSV).exists()
    assert isinstance(result, SweepResult) and result.plot_path.read_bytes()[:8] == PNG


def test_cli_rejects_a_bad_variant_with_exit_2_naming_it():
    from typer.testing import CliRunner

    from moe_lab.cli import app

    res = CliRunner().invoke(app, ["sweep", str(BALANCING), "--set", "variants.aux_free_bias.model.router_bias_update_rate=-1"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "variants['aux_free_bias']" in text and "router_bias_update_rate" in text and "Traceback" not in text
