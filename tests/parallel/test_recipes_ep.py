"""Every routing recipe is exact under expert parallelism: 2 gloo ranks (EP 2) take three
optimizer steps with gradient accumulation and end with the weights, and aux-loss-free
biases, of one process on the same global batches."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config

from moe_lab import MoEModel
from moe_lab.parallel.runtime import parallel_runtime
from moe_lab.training.step import StepSettings, train_step

WORLD = 2
RECIPES = {
    "sigmoid+bias+groups": dict(router_score_function="sigmoid", router_bias_update_rate=0.05, router_num_groups=2,
                                router_topk_groups=1, router_scaling_factor=1.5),
    "sequence scope": dict(load_balancing_scope="sequence", load_balancing_loss_coef=0.5),
    "global-batch scope": dict(load_balancing_scope="global_batch", load_balancing_loss_coef=0.5),
}


def _steps():
    """Three steps of two micro-batches of 4 rows, with padding (an odd number: a sign-updated bias
    can return to 0 after two)."""
    g = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(3):
        micro = []
        for _ in range(2):
            ids = torch.randint(0, 97, (4, 10), generator=g)
            mask = torch.ones_like(ids)
            mask[0, 7:] = 0
            mask[3, 2:] = 0
            micro.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        steps.append(micro)
    return steps


def _train(model, steps, runtime=None, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for micro in steps:
        mine = [{k: v[rank * 4 // world : (rank + 1) * 4 // world] for k, v in b.items()} for b in micro]
        train_step(model, opt, mine, runtime, settings=StepSettings(max_grad_norm=1.0))
    return model


def _worker(rank, init_file, cases, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        for name, (cfg, expected) in cases.items():
            torch.manual_seed(0)
            model = MoEModel.from_config(cfg)
            runtime = parallel_runtime(model, WORLD)
            _train(model, _steps(), runtime, rank, WORLD)
            full = runtime.full_state_dict(model)
            for key, want in expected.items():
                rel = float((full[key].double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
                assert rel <= 1e-5, f"{name}: {key} relative error {rel:.1e}"
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_recipes_are_exact_under_expert_parallelism(tmp_path):
    cases = {}
    for name, recipe in RECIPES.items():
        cfg = tiny_config(router_jitter_noise=0.0, **recipe).to_dict()
        torch.manual_seed(0)
        ref = _train(MoEModel.from_config(cfg), _steps())
        state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        if "router_bias_update_rate" in recipe:
            assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith("expert_bias"))
        cases[name] = (cfg, state)
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(str(tmp_path / "init"), cases, errors), nprocs=WORLD, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()
