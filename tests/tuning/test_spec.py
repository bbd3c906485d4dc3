"""The sweep spec (moe_lab.tuning.spec): validation with the field named, overrides, loading. No Ray."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_lab.errors import ConfigError
from moe_lab.tuning import SweepSpec, apply_sweep_overrides, check_search_available, load_sweep

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "sweep_smoke.yaml"
DEFAULT_JOB = ROOT / "jobs" / "default.yaml"
ROUTERS = ROOT / "jobs" / "sweep_routers.yaml"

BAD_SPACES = [
    ({"model.routr_type": {"choice": ["top_k"]}}, r"model\.routr_type.*unknown field 'routr_type'.*router_type"),
    ({"modle.hidden_size": {"choice": [32]}}, r"modle\.hidden_size.*unknown section 'modle'"),
    ({"model.router_type": {"choice": []}}, r"model\.router_type.*non-empty"),
    ({"model.router_type": {"choise": ["top_k"]}}, r"model\.router_type.*unknown distribution 'choise'.*'choice'"),
    ({"training.learning_rate": {"loguniform": [0.01, 0.001]}}, r"training\.learning_rate.*low \(0\.01\) must be < high"),
    ({"training.learning_rate": {"loguniform": [0.0, 0.001]}}, r"training\.learning_rate.*loguniform needs 0 < low"),
    ({"model.load_balancing_loss_coef": {"uniform": [0.1, 0.01]}}, r"load_balancing_loss_coef.*low \(0\.1\) must be < high"),
    ({"model.experts_per_token": {"randint": [3, 1]}}, r"model\.experts_per_token.*randint low \(3\) > high \(1\)"),
    ({"model.router_type": {"choice": ["top_k", "swich"]}}, r"model\.router_type.*value 'swich' is invalid"),
    ({"training.learning_rate": {"uniform": [-1.0, 0.01]}}, r"training\.learning_rate.*value -1\.0 is invalid"),
    ({"training.output_dir": {"choice": ["a"]}}, r"training\.output_dir.*cannot be searched"),
    ({"model.num_experts": {"uniform": [2, 8]}}, r"model\.num_experts.*integer field; use randint"),
    ({"model.router_type": ["top_k"]}, r"model\.router_type.*expected one distribution"),
]

BAD_FIELDS = [
    ({"num_sample": 3}, r"num_sample: unknown field"),
    ({"search": "bayes"}, r"search = 'bayes'"),
    ({"base_job": "nope.yaml"}, r"base_job 'nope.yaml' not found"),
    ({"scheduler": {"metric": "accuracy"}}, r"scheduler.metric 'accuracy' is not a reported metric"),
    ({"scheduler": {"grace_period": 50, "max_t": 4}}, r"grace_period \(50\) must be <= max_t \(4\)"),
    ({"search": "grid", "search_space": {"training.learning_rate": {"uniform": [0.001, 0.01]}}}, r"search 'grid' needs"),
    ({"overrides": ["model.hiden_size=3"]}, r"model.hiden_size: unknown field"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES, ids=[m.split(".*")[0] for _, m in BAD_SPACES])
def test_invalid_search_space_is_rejected_naming_the_field(tmp_path, sweep_data, space, message):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep_data(space))
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("fields,message", BAD_FIELDS, ids=[m.split(" ")[0] for _, m in BAD_FIELDS])
def test_invalid_sweep_fields_fail_fast(sweep_data, fields, message):
    data = sweep_data({"model.router_type": {"choice": ["top_k"]}})
    data.update(fields)
    with pytest.raises(ConfigError, match=message):
        load_sweep(data)


def test_optuna_search_without_optuna_names_the_extra(sweep_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    spec = load_sweep(sweep_data({"model.router_type": {"choice": ["top_k"]}}, search="optuna"))
    with pytest.raises(ConfigError, match=r"pip install 'moe-lab\[optuna\]'"):
        check_search_available(spec)


def test_loading_and_rejecting_a_sweep_never_imports_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base_job: {DEFAULT_JOB}\nsearch_space:\n  model.routr_type: {{choice: [top_k]}}\n")
    code = (
        "import sys\n"
        "from moe_lab.errors import ConfigError\n"
        "from moe_lab.tuning import load_sweep\n"
        f"spec = load_sweep({str(ROUTERS)!r})\n"
        "assert spec.num_trials == 9, spec.num_trials\n"
        "try:\n"
        f"    load_sweep({str(bad)!r})\n"
        "except ConfigError as exc:\n"
        "    print('rejected:', exc)\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rejected:" in out.stdout and "routr_type" in out.stdout


def test_set_routes_to_sweep_job_and_search_space():
    data = apply_sweep_overrides(
        {"base_job": "default", "search_space": {}},
        ["num_samples=4", "training.max_steps=10", "job.name=x", "scheduler.grace_period=5",
         "search_space.model.experts_per_token={choice: [1, 2]}"],
    )
    assert data["num_samples"] == 4 and data["scheduler"] == {"grace_period": 5}
    assert data["overrides"] == ["training.max_steps=10", "name=x"]
    assert data["search_space"] == {"model.experts_per_token": {"choice": [1, 2]}}


def test_a_loaded_spec_takes_more_overrides():
    spec = load_sweep(SMOKE, ["name=a"])
    again = load_sweep(spec, ["num_samples=3", "training.max_steps=6"])
    assert isinstance(again, SweepSpec) and again is not spec
    assert again.name == "a" and again.num_samples == 3 and again.job.training.max_steps == 6
    assert load_sweep(spec).to_dict() == spec.to_dict()  # no overrides: resolved again, unchanged


def test_default_sweep_covers_every_router_and_fits_the_budget():
    spec = load_sweep(ROUTERS)
    space = {d.field: d for d in spec.dimensions}
    assert space["model.router_type"].kind == "grid"
    assert set(space["model.router_type"].values) == {"top_k", "switch", "expert_choice"}
    for f in ("model.load_balancing_loss_coef", "model.router_z_loss_coef", "model.capacity_factor",
              "model.experts_per_token", "training.learning_rate"):
        assert f in space
    assert spec.num_trials >= 6
    job = spec.job
    assert job.training.max_steps <= 400 and job.model.hidden_size <= 128
    assert spec.scheduler.type == "asha" and spec.stop_on_routing_collapse is not None
