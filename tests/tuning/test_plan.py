"""Trial placement (moe_lab.tuning.plan): resources per trial and concurrency, sized to the machine. No Ray."""

from pathlib import Path

from moe_lab.tuning import load_sweep, plan_trials

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "sweep_smoke.yaml"
ROUTERS = ROOT / "jobs" / "sweep_routers.yaml"


def test_resources_follow_the_spec():
    spec = load_sweep(ROUTERS)
    plan = plan_trials(spec, spec.job, local=True, cluster_cpus=4)
    assert 0 < plan.resources["CPU"] < 1 and plan.torch_threads == 1 and plan.num_workers == 1
    assert 1 <= plan.max_concurrent_trials <= spec.num_trials
    multi = load_sweep(SMOKE, ["scaling.num_workers=2"])
    plan = plan_trials(multi, multi.job, local=False, cluster_cpus=16)
    assert plan.num_workers == 2 and plan.max_concurrent_trials == 3  # 16 CPUs // (2 workers + driver), <= 3 trials
    assert plan_trials(load_sweep(SMOKE, ["max_concurrent_trials=1"]), spec.job, True, 4).max_concurrent_trials == 1


def test_cluster_trials_ask_for_what_the_spec_says():
    spec = load_sweep(SMOKE, ["trial_resources={cpu: 2, gpu: 0.5}"])
    plan = plan_trials(spec, spec.job, local=False, cluster_cpus=16, cluster_gpus=1)
    assert plan.resources == {"CPU": 2, "GPU": 0.5} and plan.torch_threads == 2
    assert plan.max_concurrent_trials == 2  # 1 GPU // 0.5, fewer than 16 // 2 CPUs
    assert plan_trials(spec, spec.job, local=False, cluster_cpus=3).max_concurrent_trials == 1  # 3 CPUs // 2


def test_a_variant_with_workers_sizes_the_plan():
    spec = load_sweep(SMOKE, ["variants.one.model.num_experts=4", "variants.two.scaling.num_workers=2"])
    plan = plan_trials(spec, spec.job, local=False, cluster_cpus=16)
    assert plan.num_workers == 2 and plan.resources == {"CPU": 0.25}
