"""Tensor + sequence parallelism (DTensor ``parallelize_module``, the plan of ``tp_plan``) is
exact: TP 2 on 2 gloo ranks (GLU and FFN dense MLPs), and TP 2 x EP 2 on 4, train three AdamW
steps with the losses, gradient norms and final weights of one process (relative error <=
1e-5), with the logits sharded over the vocabulary and the loss computed from the shards; the
vocab-parallel loss and its gradient equal the plain ones; the plan is data."""

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, reference, run_ranks, steps, tp_step, train

from moe_lab import MoEModel
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.runtime import parallel_runtime
from moe_lab.parallel.tensor_parallel import tp_plan, vocab_parallel_loss_sum
from moe_lab.training.fast_paths import lm_loss_sum


def _cfg(**kw):
    # layer 0 dense (a GLU MLP), layer 1 MoE
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0, **kw).to_dict()


def _body(rank, world, cases):
    from torch.distributed.tensor import DTensor

    for name, (cfg, dims, ref) in cases.items():
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        runtime = parallel_runtime(model, dims=dims)
        model.runtime = runtime
        head = model.lm_head.weight  # [V, D], split over TP (and FSDP)
        assert isinstance(head, DTensor) and head.to_local().numel() * dims.tp * dims.dp_shard == head.numel(), name
        logits = model(steps()[0][0]["input_ids"])
        assert isinstance(logits, DTensor) and logits.to_local().shape[-1] == 96 // 2, name  # vocab-sharded
        losses = train(model, steps(), runtime, step_fn=tp_step)
        assert_matches(name, losses, runtime.full_state_dict(model), ref)


@pytest.mark.slow
def test_tp2_matches_one_process():
    cases = {}
    for name, kw in {"tp2 glu": {}, "tp2 ffn": dict(expert_type="ffn", activation="gelu")}.items():
        cfg = _cfg(**kw)
        cases[name] = (cfg, ParallelDims(tp=2), reference(cfg, steps()))
    run_ranks(_body, 2, cases)


def _loss_body(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 8, (3, 5), generator=g)
    labels[0, 2:] = -100
    want = lm_loss_sum(logits, labels)
    want.backward()
    cols = slice(rank * 4, (rank + 1) * 4)  # this rank's half of the vocabulary
    leaf = logits.detach()[..., cols].clone().requires_grad_(True)
    got = vocab_parallel_loss_sum(DTensor.from_local(leaf, mesh, [Shard(-1)]), labels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, logits.grad[..., cols], rtol=1e-6, atol=1e-7)
    dist.barrier()


def test_vocab_parallel_loss_equals_plain_loss_and_gradient():
    run_ranks(_loss_body, 2)


def test_tp_plan_is_data_naming_every_projection():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = tp_plan(tiny_config(moe_layer_frequency=2))
    assert isinstance(plan["layers.*.attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["layers.*.attn.o_proj"], RowwiseParallel)
    assert isinstance(plan["layers.*.input_norm"], SequenceParallel)
    assert isinstance(plan["layers.0.mlp.up"], ColwiseParallel) and "layers.1.mlp.up" not in plan  # layer 1 is MoE
    assert "layers.1.mlp" in plan and isinstance(plan["lm_head"], ColwiseParallel)


@pytest.mark.slow
def test_tp2_with_ep2_on_4_ranks_matches_one_process():
    cfg = _cfg()
    run_ranks(_body, 4, {"tp2xep2": (cfg, ParallelDims(tp=2, ep=2), reference(cfg, steps()))})
