"""Shared experts (and QK-norm) are exact under expert parallelism: 2 gloo ranks (EP 2) take
three optimizer steps with gradient accumulation and match one process on the same global
batches, step by step (loss, gradient norm) and in the final weights. The shared experts are
dense parameters: every rank holds all of them, and their gradients are summed over ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config

from moe_lab import MoEModel
from moe_lab.parallel.runtime import parallel_runtime
from moe_lab.training.step import StepSettings, train_step

WORLD = 2
CASES = {
    "glu gated, qk-norm, unnormalised top-k, a dense layer": dict(
        num_shared_experts=2, shared_expert_gate=True, qk_norm=True, normalize_router_weights=False, num_layers=3,
        moe_layer_frequency=2),
    "ffn ungated": dict(num_shared_experts=1, expert_type="ffn", activation="gelu", shared_expert_intermediate_size=24),
}


def _steps():
    """Three steps of two micro-batches of 4 rows, with padding."""
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(3):
        micro = []
        for _ in range(2):
            ids = torch.randint(0, 97, (4, 10), generator=g)
            mask = torch.ones_like(ids)
            mask[1, 6:] = 0
            mask[2, :3] = 0
            micro.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        steps.append(micro)
    return steps


def _train(model, steps, runtime=None, rank=0, world=1):
    """Train; returns [(loss share, grad norm)] per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trace = []
    for micro in steps:
        mine = [{k: v[rank * 4 // world : (rank + 1) * 4 // world] for k, v in b.items()} for b in micro]
        stats = train_step(model, opt, mine, runtime, settings=StepSettings(max_grad_norm=1.0))
        trace.append((stats.loss_share, stats.grad_norm))
    return trace


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _worker(rank, init_file, cases, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        for name, (cfg, expected, ref_trace) in cases.items():
            torch.manual_seed(0)
            model = MoEModel.from_config(cfg)
            runtime = parallel_runtime(model, WORLD)
            moe = model.moe_layers[0]
            assert moe.experts.w_in.shape[0] == cfg["num_experts"] // WORLD, name  # routed experts: sharded
            trace = _train(model, _steps(), runtime, rank, WORLD)
            for step, ((share, norm), (want_loss, want_norm)) in enumerate(zip(trace, ref_trace)):
                loss = torch.tensor(share, dtype=torch.float64)
                dist.all_reduce(loss)
                assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss), f"{name}: step {step} loss"
                assert abs(norm - want_norm) <= 1e-5 * want_norm, f"{name}: step {step} grad norm {norm} vs {want_norm}"
            # replicated: this rank's own copy of every shared weight is the single-process one
            local = model.state_dict()
            shared = [k for k in expected if "shared_expert" in k]
            assert shared, name
            for key in shared:
                assert local[key].shape == expected[key].shape, key
                assert _rel(local[key], expected[key]) <= 1e-5, f"{name}: rank {rank} {key}"
            full = runtime.full_state_dict(model)
            for key, want in expected.items():
                assert _rel(full[key], want) <= 1e-5, f"{name}: {key} relative error {_rel(full[key], want):.1e}"
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.slow
def test_shared_experts_are_exact_under_expert_parallelism(tmp_path):
    cases = {}
    for name, overrides in CASES.items():
        cfg = tiny_config(router_jitter_noise=0.0, **overrides).to_dict()
        torch.manual_seed(0)
        ref = MoEModel.from_config(cfg)
        before = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        trace = _train(ref, _steps())
        state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        for key in state:
            if "shared_expert" in key:  # the shared weights trained
                assert not torch.equal(state[key], before[key]), key
        cases[name] = (cfg, state, trace)
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(str(tmp_path / "init"), cases, errors), nprocs=WORLD, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()
