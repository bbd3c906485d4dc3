"""Ray Tune sweeps (moe_lab.orchestration.tune) on one local Ray cluster.

First what needs Ray but no cluster: run_sweep and the CLI reject a bad spec before Ray starts,
the Tune search space (grid_search, sample_from, Optuna) and the stopper. Then tiny sweeps
(jobs/sweep_smoke.yaml: 1-layer model, a few steps) on the module's cluster. What needs no Ray
at all (the spec, trials, rows, files, plot, table) is tested in tests/tuning/.
"""

import csv
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from moe_lab.cli import app
from moe_lab.errors import ConfigError
from moe_lab.jobs import load_job
from moe_lab.orchestration.tune import resume_sweep, run_sweep
from moe_lab.tuning import load_sweep, trial_job

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "sweep_smoke.yaml"
DEFAULT_JOB = ROOT / "jobs" / "default.yaml"
ROUTERS = ROOT / "jobs" / "sweep_routers.yaml"
runner = CliRunner()


def _sweep(tmp_path, search_space, **fields):
    """The smoke sweep as a mapping, with another search space."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(base_job=str(DEFAULT_JOB), search_space=search_space, output_dir=str(tmp_path), name="t")
    data.update(fields)
    return data


def _rows(result_dir):
    with open(Path(result_dir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# validation: before Ray starts
# ---------------------------------------------------------------------------------------

#: a few bad specs (every message is checked in tests/tuning/test_spec.py): run_sweep
#: rejects them before Ray starts
BAD_SPECS = [
    ({"search_space": {"model.routr_type": {"choice": ["top_k"]}}}, r"model\.routr_type.*unknown field 'routr_type'"),
    ({"search_space": {"training.learning_rate": {"loguniform": [0.01, 0.001]}}}, r"low \(0\.01\) must be < high"),
    ({"search_space": {"model.router_type": {"choice": ["top_k", "swich"]}}}, r"value 'swich' is invalid"),
    ({"scheduler": {"metric": "accuracy"}}, r"scheduler.metric 'accuracy' is not a reported metric"),
    ({"base_job": "nope.yaml"}, r"base_job 'nope.yaml' not found"),
]


@pytest.mark.parametrize("fields,message", BAD_SPECS, ids=[m.split(" ")[0] for _, m in BAD_SPECS])
def test_invalid_spec_fails_before_ray_starts(tmp_path, fields, message):
    data = _sweep(tmp_path, {"model.router_type": {"choice": ["top_k"]}})
    data.update(fields)
    ray_was_up = ray.is_initialized()  # False unless an earlier test module left Ray running
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        run_sweep(data)
    assert time.perf_counter() - t0 < 10
    assert ray.is_initialized() == ray_was_up
    assert not (tmp_path / "t").exists()


def test_optuna_search_without_optuna_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    ray_was_up = ray.is_initialized()
    data = _sweep(tmp_path, {"model.router_type": {"choice": ["top_k"]}}, search="optuna")
    with pytest.raises(ConfigError, match=r"pip install 'moe-lab\[optuna\]'"):
        run_sweep(data)
    assert ray.is_initialized() == ray_was_up


def test_cli_bad_spec_exits_2_naming_the_field(tmp_path):
    ray_was_up = ray.is_initialized()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base_job: {DEFAULT_JOB}\nsearch_space:\n  training.learning_rate: {{loguniform: [0.1, 0.001]}}\n")
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2
    assert "training.learning_rate" in res.output and "must be < high" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["sweep", str(SMOKE), "--set", "search_space.model.routr_type={choice: [top_k]}"])
    assert res.exit_code == 2 and "routr_type" in res.output
    res = runner.invoke(app, ["sweep"])  # neither a file nor --resume
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])  # not a sweep directory
    assert res.exit_code == 2 and "not a sweep directory" in res.output
    assert ray.is_initialized() == ray_was_up


def test_routing_collapse_stopper_waits_for_warmup_and_needs_more_than_the_threshold():
    from moe_lab.orchestration.tune import RoutingCollapseStopper

    stop = RoutingCollapseStopper(dead_expert_fraction=0.5, after_step=100)
    assert not stop("t", {"step": 50, "eval_dead_expert_fraction": 0.75})  # warm-up
    assert not stop("t", {"step": 100, "eval_dead_expert_fraction": 0.5})  # half is not more than half
    assert stop("t", {"step": 100, "eval_dead_expert_fraction": 0.625})
    assert not stop("t", {"step": 200, "train_loss": 1.0})  # train-only results never stop
    assert not stop.stop_all()


def test_param_space_follows_the_spec():
    """The Tune search space (trial resources: tests/tuning/test_plan.py)."""
    from ray import tune

    from moe_lab.orchestration.tune import param_space

    spec = load_sweep(ROUTERS)
    space = param_space(spec)
    assert space["model"]["router_type"] == tune.grid_search(["top_k", "switch", "expert_choice"])
    assert type(space["model"]["capacity_factor"]).__name__ == "Categorical"
    # inert for some trials (switch; expert_choice): decided per trial once the router is known
    assert type(space["model"]["experts_per_token"]).__name__ == "Function"
    assert type(space["model"]["load_balancing_loss_coef"]).__name__ == "Function"
    grid = load_sweep(ROUTERS, ["search=grid", "search_space.training.learning_rate={choice: [0.001, 0.01]}",
                                "search_space.model.load_balancing_loss_coef={choice: [0.01]}",
                                "search_space.model.router_z_loss_coef={choice: [0.001]}"])
    # num_samples x (top_k: 3 capacity factors x 2 k; switch: 3 capacity factors, k n/a;
    # expert_choice: 3 x 2) x 2 learning rates
    assert grid.num_trials == 3 * (6 + 3 + 6) * 2
    grid_space = param_space(grid)
    assert len(grid_space["model"]["grid_search"]) == 15  # the collapsed grid: one dict per point
    assert grid_space["training"]["learning_rate"] == tune.grid_search([0.001, 0.01])
    randint = param_space(load_sweep(SMOKE, ["search_space.model.router_type={choice: [top_k]}",
                                             "search_space.model.experts_per_token={randint: [1, 2]}"]))
    assert randint["model"]["experts_per_token"].upper == 3  # bounds inclusive


# ---------------------------------------------------------------------------------------
# fields without effect (INERT_FIELDS) in what Tune samples: no Ray cluster
# ---------------------------------------------------------------------------------------

EC_NOTE = "load_balancing_loss_coef has no effect under expert_choice with drop_tokens=True: " \
          "its balancing loss is constant (1) with zero gradient"


def _tune_trial_configs(spec, storage, num_samples=None):
    """The trial configs Tune's BasicVariantGenerator makes of param_space(spec), as in a run
    (the same seed; no cluster needed)."""
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from moe_lab.orchestration.tune import param_space

    exp = Experiment("configs", run=lambda config: None, config=param_space(spec), storage_path=str(storage),
                     num_samples=num_samples or spec.num_samples)
    gen = BasicVariantGenerator(random_state=spec.seed)
    gen.add_configurations([exp])
    configs = []
    while not gen.is_finished():
        trial = gen.next_trial()
        if trial is None:
            break
        configs.append(trial.config)
    return configs


def _grid_over_routers_and_coef(tmp_path, **fields):
    data = _sweep(tmp_path, {"model.router_type": {"grid": ["top_k", "switch", "expert_choice"]},
                                    "model.load_balancing_loss_coef": {"grid": [0.001, 0.01, 0.1]},
                                    "training.learning_rate": {"grid": [0.001, 0.003]}}, **fields)
    return load_sweep(data)


def test_tune_runs_the_collapsed_grid_once_per_point(tmp_path):
    """What Tune runs of the collapsed grid (the grid points: tests/tuning/test_trials.py)."""
    spec = _grid_over_routers_and_coef(tmp_path, num_samples=2)
    assert spec.num_trials == 2 * 7 * 2  # num_samples x (3 + 3 + 1) x 2 learning rates
    # what Tune runs: every trial once, expert_choice without a coefficient, then the base job's
    assert len(_tune_trial_configs(spec, tmp_path / "all")) == spec.num_trials  # what "interrupted" counts on
    configs = _tune_trial_configs(spec, tmp_path / "one", num_samples=1)
    assert len(configs) == 7 * 2
    keys = [json.dumps(c, sort_keys=True) for c in configs]
    assert len(set(keys)) == len(keys)
    ec_configs = [c for c in configs if c["model"]["router_type"] == "expert_choice"]
    assert len(ec_configs) == 2 and all("load_balancing_loss_coef" not in c["model"] for c in ec_configs)
    for c in ec_configs:
        assert trial_job(spec, c)[0].model.load_balancing_loss_coef == spec.job.model.load_balancing_loss_coef


def test_random_and_optuna_search_draw_no_inert_value(tmp_path):
    import optuna
    import pickle

    from moe_lab.orchestration.tune import OptunaSpace

    base_coef = load_sweep(ROUTERS).job.model.load_balancing_loss_coef
    # router_type drawn per trial: the coefficient is decided once the router is drawn
    spec = load_sweep(ROUTERS, ["search_space.model.router_type={choice: [top_k, switch, expert_choice]}"])
    models = [c["model"] for c in _tune_trial_configs(spec, tmp_path / "a", num_samples=60)]
    ec = [m for m in models if m["router_type"] == "expert_choice"]
    others = [m["load_balancing_loss_coef"] for m in models if m["router_type"] != "expert_choice"]
    assert ec and all(m["load_balancing_loss_coef"] == base_coef for m in ec)
    assert len(set(others)) == len(others) and all(0.001 <= c <= 0.1 for c in others)  # drawn, not copied
    assert all(m["experts_per_token"] == 1 for m in models if m["router_type"] == "switch")
    assert {m["experts_per_token"] for m in models if m["router_type"] != "switch"} == {1, 2}
    # the sweep's seed makes it reproducible
    assert [c["model"] for c in _tune_trial_configs(spec, tmp_path / "b", num_samples=60)] == models
    # router_type a grid (the default sweep): the same, no draw for expert_choice
    models = [c["model"] for c in _tune_trial_configs(load_sweep(ROUTERS), tmp_path / "c", num_samples=20)]
    assert [m["router_type"] for m in models[:3]] == ["top_k", "switch", "expert_choice"] and len(models) == 60
    assert all(m["load_balancing_loss_coef"] == base_coef for m in models if m["router_type"] == "expert_choice")
    assert len({m["load_balancing_loss_coef"] for m in models if m["router_type"] != "expert_choice"}) == 40
    # optuna: define-by-run, the router first, no coefficient for expert_choice
    opt = load_sweep(ROUTERS, ["search=optuna"])
    space = pickle.loads(pickle.dumps(OptunaSpace(opt)))  # OptunaSearch pickles its space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = []
    for _ in range(12):
        trial = study.ask()
        space(trial)
        params.append(trial.params)
        study.tell(trial, 1.0)
    assert {p["model/router_type"] for p in params} == {"top_k", "switch", "expert_choice"}
    for p in params:
        assert ("model/load_balancing_loss_coef" in p) == (p["model/router_type"] != "expert_choice"), p
        assert ("model/experts_per_token" in p) == (p["model/router_type"] != "switch"), p


def _variant_sweep(tmp_path, **fields):
    """Three recipes (one per router) x a coefficient grid x drawn top-k and learning rate."""
    variants = {"tk": {}, "ec": {"model.router_type": "expert_choice"}, "sw": {"model.router_type": "switch"}}
    space = {"model.load_balancing_loss_coef": {"grid": [0.001, 0.01]},
             "model.experts_per_token": {"choice": [1, 2]},
             "training.learning_rate": {"loguniform": [0.001, 0.01]}}
    return load_sweep(_sweep(tmp_path, space, variants=variants, **fields))


def test_tune_runs_each_variants_own_grid_and_draws(tmp_path):
    """Each variant collapses its grid and decides its inert fields under its own job."""
    from moe_lab.tuning import VARIANT

    spec = _variant_sweep(tmp_path, num_samples=10)
    assert spec.num_trials == 10 * (2 + 1 + 2)  # expert_choice: the coefficient is inert
    configs = _tune_trial_configs(spec, tmp_path / "a")
    assert len(configs) == spec.num_trials
    jobs = {}
    for c in configs:
        job, _ = trial_job(spec, c)
        jobs.setdefault(c[VARIANT]["name"], []).append(job)
    assert {n: len(j) for n, j in jobs.items()} == {"tk": 20, "ec": 10, "sw": 20}
    assert {j.model.router_type.value for j in jobs["ec"]} == {"expert_choice"}
    assert all("load_balancing_loss_coef" not in c[VARIANT]["model"] for c in configs if c[VARIANT]["name"] == "ec")
    assert {j.model.load_balancing_loss_coef for j in jobs["tk"]} == {0.001, 0.01}
    assert {j.model.experts_per_token for j in jobs["sw"]} == {1}  # inert under switch: never drawn 2
    assert {j.model.experts_per_token for j in jobs["tk"]} == {1, 2}
    lrs = [j.training.learning_rate for js in jobs.values() for j in js]
    assert len(set(lrs)) == len(lrs) and all(0.001 <= lr <= 0.01 for lr in lrs)
    # the sweep's seed makes it reproducible
    assert _tune_trial_configs(spec, tmp_path / "b") == configs


def test_optuna_suggests_the_variant_first_and_nothing_inert_for_it(tmp_path):
    import optuna

    from moe_lab.orchestration.tune import OptunaSpace

    space = OptunaSpace(_variant_sweep(tmp_path, search="optuna"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = []
    for _ in range(15):
        trial = study.ask()
        space(trial)
        params.append(trial.params)
        study.tell(trial, 1.0)
    assert {p["variant"] for p in params} == {"tk", "ec", "sw"}
    for p in params:
        assert ("model/load_balancing_loss_coef" in p) == (p["variant"] != "ec"), p
        assert ("model/experts_per_token" in p) == (p["variant"] != "sw"), p


# ---------------------------------------------------------------------------------------
# sweeps on Ray
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from moe_lab.orchestration.cluster import init_ray, shutdown_ray

    init_ray(num_cpus=4, object_store_memory=300 * 1024**2, log_to_driver=False, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    shutdown_ray()


@pytest.fixture(scope="module")
def smoke_sweep(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    return run_sweep(SMOKE, [f"output_dir={out}", "name=smoke"], verbose=0)


def test_small_sweep_writes_table_best_job_and_plot(smoke_sweep):
    res = smoke_sweep
    rows = _rows(res.directory)
    assert len(rows) == len(res.rows) == 3
    assert {r["model.router_type"] for r in rows} == {"top_k", "switch", "expert_choice"}
    for r in rows:
        assert r["status"] == "completed" and int(r["step"]) == 4 and r["error"] == ""
        for col in ("eval_loss", "eval_perplexity", "eval_load_imbalance", "eval_dropped_fraction", "tokens_per_s"):
            assert math.isfinite(float(r[col])), (col, r)
        assert float(r["eval_perplexity"]) == pytest.approx(math.exp(float(r["eval_loss"])), rel=1e-6)
    switch = next(r for r in rows if r["model.router_type"] == "switch")
    assert "experts_per_token 2 -> 1" in switch["adjustments"]
    # expert choice drew no balancing coefficient (it has no effect there) and ran with the base job's
    ec = next(r for r in rows if r["model.router_type"] == "expert_choice")
    assert ec["model.load_balancing_loss_coef"] == "n/a" and ec["inert"].startswith(EC_NOTE)
    base_coef = load_sweep(SMOKE).job.model.load_balancing_loss_coef
    ec_config = next(r for r in res.rows if r["trial_id"] == ec["trial_id"])["config"]
    assert ec_config["model"]["load_balancing_loss_coef"] == base_coef
    assert load_job(Path(ec["trial_dir"]) / "job.yaml").model.load_balancing_loss_coef == base_coef
    assert all(0.001 <= float(r["model.load_balancing_loss_coef"]) <= 0.1 for r in rows if r is not ec)
    assert load_job(Path(switch["trial_dir"]) / "job.yaml").model.experts_per_token == 1
    # best first, and best.yaml is that trial's job
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses) and res.best["trial_id"] == rows[0]["trial_id"]
    best = load_job(res.best_job_path)
    assert best.model.router_type.value == rows[0]["model.router_type"]
    assert best.training.learning_rate == pytest.approx(float(rows[0]["training.learning_rate"]))
    assert best.training.output_dir.startswith("./outputs/")
    assert res.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.plot_path.stat().st_size > 5000
    assert not res.interrupted and res.num_errors == 0


def test_a_finished_sweep_directory_is_not_overwritten(smoke_sweep):
    with pytest.raises(ConfigError, match=r"already holds a sweep; resume it with `moe-lab sweep --resume"):
        run_sweep(SMOKE, [f"output_dir={smoke_sweep.directory.parent}", "name=smoke"], verbose=0)


def test_results_table_prints_every_trial(smoke_sweep):
    from rich.console import Console

    from moe_lab.tuning import print_results_table

    console = Console(record=True, width=250)
    print_results_table(smoke_sweep, console=console)
    text = console.export_text()
    for r in smoke_sweep.rows:
        assert r["trial_id"] in text
    assert "expert_choice" in text and "completed" in text


def test_best_job_trains(smoke_sweep, tmp_path):
    from moe_lab.runner import run_job_local

    job = load_job(smoke_sweep.best_job_path, ["training.max_steps=2", "training.progress_bar=false"])
    summary = run_job_local(job, output_dir=str(tmp_path / "best"))
    assert summary["global_step"] == 2 and math.isfinite(summary["eval_loss"])


def test_failing_trials_are_in_the_table_and_the_sweep_goes_on(ray_cluster, tmp_path):
    # experts_per_token=4 is valid alone (4 experts in the base job) but not with num_experts=2:
    # that trial fails fast; batch_size 100000 fails inside training (more than the data)
    res = run_sweep(SMOKE, [f"output_dir={tmp_path}", "name=fail", "search_space.model.router_type={choice: [top_k]}",
                            "search_space.model.num_experts={choice: [2]}",
                            "search_space.model.experts_per_token={grid: [1, 4]}",
                            "search_space.training.batch_size={grid: [4, 100000]}"], verbose=0)
    rows = {(int(r["model.experts_per_token"]), int(r["training.batch_size"])): r for r in _rows(res.directory)}
    assert len(rows) == 4
    assert rows[1, 4]["status"] == "completed" and math.isfinite(float(rows[1, 4]["eval_loss"]))
    assert rows[1, 100000]["status"] == "error"
    assert "InputError" in rows[1, 100000]["error"] and "fewer than one batch" in rows[1, 100000]["error"]
    for batch in (4, 100000):
        err = rows[4, batch]["error"]
        assert rows[4, batch]["status"] == "error" and "ConfigError" in err, err
        assert "experts_per_token (4) must be <= num_experts (2)" in err, err
    assert res.num_errors == 3 and res.best["trial_id"] == rows[1, 4]["trial_id"]


def test_asha_stops_the_bad_trial_early(ray_cluster, tmp_path):
    # one trial at a time: the good learning rate sets the bar at every rung (1, 2, 4 steps),
    # the 1e-6 trial is below it at its first evaluation and stops there
    res = run_sweep(SMOKE, [f"output_dir={tmp_path}", "name=asha", "max_concurrent_trials=1",
                            "search_space.model.router_type={choice: [top_k]}",
                            "search_space.model.load_balancing_loss_coef={choice: [0.01]}",
                            "search_space.training.learning_rate={grid: [0.01, 0.000001]}",
                            "training.eval_steps=1", "training.max_steps=4",
                            "scheduler={type: asha, grace_period: 1, reduction_factor: 2, max_t: 4}"], verbose=0)
    rows = {float(r["training.learning_rate"]): r for r in _rows(res.directory)}
    assert rows[0.01]["status"] == "completed" and int(rows[0.01]["step"]) == 4
    assert rows[1e-6]["status"] == "early stopped" and int(rows[1e-6]["step"]) == 1
    assert float(rows[1e-6]["eval_loss"]) > float(rows[0.01]["eval_loss"])


def test_optuna_search(ray_cluster, tmp_path):
    import optuna  # noqa: F401  (a test extra: `make test` installs it)
    res = run_sweep(SMOKE, [f"output_dir={tmp_path}", "name=optuna", "search=optuna", "num_samples=2",
                            "max_concurrent_trials=1"], verbose=0)
    rows = _rows(res.directory)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    lrs = [float(r["training.learning_rate"]) for r in rows]
    assert all(0.001 <= lr <= 0.01 for lr in lrs) and lrs[0] != lrs[1]


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_resume_after_interrupt_finishes_every_trial_once(ray_cluster, tmp_path):
    """Run `moe-lab sweep` in a subprocess (on this module's cluster), Ctrl-C it while a trial
    runs, then resume: every trial completes and finished trials are not run again."""
    sweep_dir = tmp_path / "resume"
    cmd = [sys.executable, "-m", "moe_lab", "sweep", str(SMOKE), "-q", "--address", ray_cluster,
           "--set", f"output_dir={tmp_path}", "--set", "name=resume", "--set", "max_concurrent_trials=1",
           "--set", "training.max_steps=60", "--set", "training.save_steps=10", "--set", "training.eval_steps=20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            finished = list(sweep_dir.glob("trial_*/train/model/training_result.json"))
            running = [d for d in sweep_dir.glob("trial_*")
                       if list(d.glob("train/checkpoints/step-*")) and not (d / "train" / "model").exists()]
            if finished and running:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "resume with `moe-lab sweep --resume" in output
    before = {r["trial_id"]: r for r in _rows(sweep_dir)}
    done_before = [t for t, r in before.items() if r["status"] == "completed"]
    cut = [t for t, r in before.items() if r["status"] == "interrupted"]
    assert done_before and cut, before
    digests = {t: _digest(sweep_dir / f"trial_{t}" / "train" / "metrics.jsonl") for t in done_before}
    results = {t: _digest(sweep_dir / f"trial_{t}" / "result.json") for t in done_before}

    res = resume_sweep(sweep_dir, verbose=0)
    rows = {r["trial_id"]: r for r in res.rows}
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows.values()), rows
    assert {r["model.router_type"] for r in rows.values()} == {"top_k", "switch", "expert_choice"}
    for t in done_before:  # finished trials were not run again
        assert _digest(sweep_dir / f"trial_{t}" / "train" / "metrics.jsonl") == digests[t]
        assert _digest(sweep_dir / f"trial_{t}" / "result.json") == results[t]
    for t in cut:  # the interrupted trial went on from its last training checkpoint (step >= 10)
        lines = (sweep_dir / f"trial_{t}" / "train" / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x)["step"] for x in lines if '"loss"' in x]
        assert steps.count(2) == 1 and steps[-1] == 60, steps
    assert not res.interrupted and res.best_job_path.exists()


@pytest.mark.slow
def test_multi_worker_trial_reports_through_ray_train(ray_cluster, tmp_path):
    """A 2-worker (data-parallel) trial reports through TuneReportCallback and computes what
    the 1-worker trial of the same config computes."""
    res = run_sweep(SMOKE, [f"output_dir={tmp_path}", "name=workers", "max_concurrent_trials=1",
                            "training.mixed_precision=false",
                            "search_space.model.router_type={choice: [top_k]}",
                            "search_space.model.load_balancing_loss_coef={choice: [0.01]}",
                            "search_space.training.learning_rate={choice: [0.005]}",
                            "search_space.scaling.num_workers={grid: [1, 2]}"], verbose=0)
    rows = {int(r["scaling.num_workers"]): r for r in _rows(res.directory)}
    assert rows[1]["status"] == rows[2]["status"] == "completed", rows
    assert int(rows[2]["step"]) == 4
    assert float(rows[2]["eval_loss"]) == pytest.approx(float(rows[1]["eval_loss"]), rel=1e-4)
    assert (Path(rows[2]["trial_dir"]) / "train" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_the_balancing_study_shrunk_runs_end_to_end(ray_cluster, tmp_path):
    """jobs/sweep_balancing.yaml with two of its recipes at smoke size: the study's CSV, plot
    and printed table hold each variant's numbers, and each trial ran its variant's job."""
    from rich.console import Console

    from moe_lab.tuning import STUDY_CSV, print_balancing_table

    data = yaml.safe_load((ROOT / "jobs" / "sweep_balancing.yaml").read_text())
    data["variants"] = {k: data["variants"][k] for k in ("aux_micro_batch", "aux_free_bias")}
    data.update(base_job=str(DEFAULT_JOB), output_dir=str(tmp_path), name="study")
    data["overrides"] += ["model.hidden_size=32", "model.num_layers=1", "model.expert_hidden_size=32",
                          "data.corpus_size_bytes=20000", "training.max_steps=4", "training.warmup_steps=0",
                          "training.eval_steps=2", "training.eval_samples=8", "training.logging_steps=1"]
    res = run_sweep(data, verbose=0)
    assert res.num_errors == 0 and not res.interrupted
    with open(res.directory / STUDY_CSV, newline="") as f:
        study = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(study) == ["aux_micro_batch", "aux_free_bias"]
    for r in study.values():
        assert r["status"] == "completed" and int(r["step"]) == 4
        for col in ("eval_loss", "eval_load_imbalance", "train_load_imbalance", "eval_dead_expert_fraction",
                    "train_dropped_fraction"):
            assert math.isfinite(float(r[col])), (col, r)
        assert float(r["train_load_imbalance"]) >= 1.0
    rows = {r["variant"]: r for r in res.rows}
    assert float(study["aux_free_bias"]["eval_loss"]) == pytest.approx(rows["aux_free_bias"]["eval_loss"])
    # each trial ran its recipe: only the bias trial logged a router bias
    logged = {name: (Path(r["trial_dir"]) / "train" / "metrics.jsonl").read_text() for name, r in rows.items()}
    assert '"router_bias"' in logged["aux_free_bias"] and '"router_bias"' not in logged["aux_micro_batch"]
    assert res.study_plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.study_plot_path.stat().st_size > 20000
    console = Console(record=True, width=250)
    print_balancing_table(res.study, title="study", console=console)
    text = console.export_text()
    for name, r in study.items():
        line = next(ln for ln in text.splitlines() if name in ln)
        assert f"{float(r['eval_loss']):.4g}" in line and f"{float(r['train_load_imbalance']):.4g}" in line
