"""Tensor + sequence parallelism (DTensor ``parallelize_module``, the plan of ``tp_plan``) is
exact: TP 2 on 2 gloo ranks (GLU and FFN dense MLPs), and TP 2 x EP 2 on 4, train three AdamW
steps with the losses, gradient norms and final weights of one process (relative error <=
1e-5), with the logits sharded over the vocabulary and the loss computed from the shards; the
vocab-parallel loss and its gradient equal the plain ones; the plan is data."""

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, make_optimizer, reference, run_ranks, steps, tp_step, train

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


#: FSDP over the dp_shard ranks of TP's DTensors (a 2-D mesh, torchtitan's FSDP x TP); with EP
#: the experts are sharded over the ep ranks borrowed from dp_shard
FSDP_TP = {"fsdp2xtp2": ParallelDims(dp_shard=2, tp=2), "fsdp2xtp2xep2": ParallelDims(dp_shard=2, tp=2, ep=2)}


def _fsdp_tp_body(rank, world, cfg, ref, root):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from moe_lab.checkpoint import load_optimizer_state, write_checkpoint
    from moe_lab.checkpoint.sharded import save_sharded

    for name, dims in FSDP_TP.items():
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        model.runtime = runtime = parallel_runtime(model, dims=dims)
        assert all(isinstance(layer, FSDPModule) for layer in model.layers), name
        q = model.layers[0].attn.q_proj.weight  # [H*Dh, D]: rows split over TP, then over FSDP
        assert isinstance(q, DTensor) and q.device_mesh.mesh_dim_names == ("dp_shard", "tp"), (name, q.device_mesh)
        assert q.to_local().numel() * 4 == q.numel(), name
        opt = make_optimizer(model)
        first = train(model, steps()[:2], runtime, opt, step_fn=tp_step)  # [loss1, loss2, norm1, norm2]
        weights, (opt_t, opt_m) = runtime.full_state_dict(model), runtime.full_optimizer_state(model, opt)
        last = train(model, steps()[2:], runtime, opt, step_fn=tp_step)
        state = runtime.full_state_dict(model)
        assert_matches(name, first[:2] + last[:1] + first[2:] + last[1:], state, ref)
        if rank == 0:  # the trainer's full format
            write_checkpoint(f"{root}/{name}-full", model.config, state)
        save_sharded(model, opt, f"{root}/{name}-sharded")  # DCP, every rank its pieces
        # resume at this layout from the full state after step 2 (the trainer's path): step 3 is exact
        torch.manual_seed(1)
        model = MoEModel.from_config(cfg)
        model.load_state_dict(weights)
        model.runtime = runtime = parallel_runtime(model, dims=dims)
        opt = make_optimizer(model)
        load_optimizer_state(model, opt, opt_t, opt_m, runtime.expert_slices(model))
        losses = train(model, steps()[2:], runtime, opt, step_fn=tp_step)
        step3 = {"losses": [ref["losses"][2], ref["losses"][5]], "state": ref["state"]}
        assert_matches(f"{name} resumed after step 2", losses, runtime.full_state_dict(model), step3)


@pytest.mark.slow
def test_fsdp2_x_tp2_on_4_ranks_matches_one_process_and_its_checkpoints_load_in_one(tmp_path):
    from moe_lab import load_pretrained_moe
    from moe_lab.checkpoint.sharded import load_sharded

    cfg = _cfg()
    ref = reference(cfg, steps())
    run_ranks(_fsdp_tp_body, 4, cfg, ref, str(tmp_path))
    for name in FSDP_TP:
        full = load_pretrained_moe(str(tmp_path / f"{name}-full")).state_dict()
        assert_matches(f"{name} full checkpoint", ref["losses"], full, ref)
        torch.manual_seed(1)  # other initial weights: the load must overwrite them all
        model = MoEModel.from_config(cfg)
        load_sharded(model, None, tmp_path / f"{name}-sharded")
        assert_matches(f"{name} sharded checkpoint", ref["losses"], model.state_dict(), ref)


def _rank_batches(rank):
    """Rank r's two micro-batches of 2 rows, rank 1's shorter (length 3 vs 5), with padding."""
    out = []
    for i in range(2):
        ids = torch.arange(2 * (5 - 2 * rank)).reshape(2, -1) + 100 * rank + 10 * i
        mask = torch.ones_like(ids)
        mask[1, -1] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


class _ListStream:
    def __init__(self, batches):
        self.batches = batches

    def iter_epoch(self, epoch):
        return iter(self.batches)


def _gather_body(rank, world):
    from moe_lab import DistributedError
    from moe_lab.parallel.tensor_parallel import TPSharedStream, gather_batch

    got = list(TPSharedStream(_ListStream(_rank_batches(rank)), pad_token_id=7).bind(dist.group.WORLD).iter_epoch(0))
    assert len(got) == 2
    for i, batch in enumerate(got):
        # rank 0's rows, then rank 1's right-padded from 3 to 5: ids with 7, mask 0, labels -100
        r0, r1 = _rank_batches(0)[i], _rank_batches(1)[i]
        pad = {"input_ids": 7, "attention_mask": 0, "labels": -100}
        for key, t in batch.items():
            want = torch.cat([r0[key], torch.nn.functional.pad(r1[key], (0, 2), value=pad[key])])
            assert torch.equal(t, want), (rank, i, key, t, want)
    with pytest.raises(DistributedError, match=r"same rows and columns; got \[rows, length, columns\] \[\[2, 5, 3\], \[1, 3, 3\]\]"):
        b = _rank_batches(rank)[0]
        gather_batch({k: v[: 2 - rank] for k, v in b.items()}, dist.group.WORLD)


def test_tp_ranks_share_one_batch_from_their_own_stream_shares():
    """Streaming under TP: each TP rank reads its own micro-batches, and every rank trains on
    all of them joined in rank order (padded to the longest), the same batch everywhere."""
    run_ranks(_gather_body, 2)
