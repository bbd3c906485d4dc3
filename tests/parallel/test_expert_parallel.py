"""Expert parallelism on gloo, with plain torch.multiprocessing (no Ray): the sharded model's
logits and gradients equal the single-process model's on the same global batch; sharding
keeps each rank's slice of the experts; gathering rows over ranks is exact both ways."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_config

from moe_lab import DistributedError, ExpertParallelism, MoEModel
from moe_lab.model import AllToAllDispatcher
from moe_lab.parallel import validate_parallel_sizes
from moe_lab.training.losses import routing_losses


def _all_reduce_sum(t):
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def _global_loss_share(model, ids, num_label_tokens):
    """This rank's share of the global loss: the routers' statistics are summed over ranks
    outside the forward (moe_lab.training.losses), as the trainer does."""
    logits, info = model(ids, return_routing_info=True)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
    aux, _, _ = routing_losses(info, model.config, _all_reduce_sum)
    return ce / num_label_tokens + aux, logits


def _worker(rank, world, init_file, ep, cfg_dict, ids, ref_grads, ref_logits, ref_shapes, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg_dict)
        model = ExpertParallelism.parallelize_experts(model, ep)  # shards in place, returns the model
        groups = ExpertParallelism.get_groups(model)
        per_rank = ids.shape[0] // world
        local = ids[rank * per_rank : (rank + 1) * per_rank]
        loss, logits = _global_loss_share(model, local, ids.numel())
        loss.backward()
        ExpertParallelism.sync_gradients(model, groups)
        torch.testing.assert_close(logits, ref_logits[rank * per_rank : (rank + 1) * per_rank], rtol=1e-5, atol=1e-5)
        grads = {n: p.grad for n, p in model.named_parameters()}
        full = ExpertParallelism.full_state_dict(model)  # experts gathered back to [E, ...]
        assert {k: tuple(v.shape) for k, v in full.items()} == ref_shapes
        for name, g in grads.items():
            ref = ref_grads[name]
            if name in model.expert_parameter_names():
                local_e = g.shape[0]
                start = (rank % ep) * local_e if ep > 1 else 0
                ref = ref[start : start + local_e]
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=name)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # pragma: no cover - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise exc


@pytest.mark.parametrize("world, ep, router", [(2, 2, "top_k"), (2, 1, "top_k"), (2, 2, "switch")])
def test_expert_parallel_matches_single_process(tmp_path, world, ep, router):
    extra = dict(experts_per_token=1, drop_tokens=False, router_jitter_noise=0.0) if router == "switch" else {}
    cfg = tiny_config(router_type=router, **extra)
    torch.manual_seed(0)
    ref_model = MoEModel.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2 * world, 8))
    loss, ref_logits = _global_loss_share(ref_model, ids, ids.numel())
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    _run_ranks(_worker, world, tmp_path, ep, cfg.to_dict(), ids, ref_grads, ref_logits.detach(), ref_shapes)


def _run_ranks(target, world, tmp_path, *args):
    """Run ``target(rank, world, init_file, *args, errors)`` in ``world`` spawned processes;
    fail with every rank's traceback if one fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=target, args=(r, world, init_file, *args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():  # a hung collective: do not leave it behind
            p.kill()
            p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _rank_entry(rank, world, init_file, body, *args):
    """A spawned rank: set up gloo, run ``body(rank, world, *args)``, report a failure to the parent."""
    *args, errors = args
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        torch.manual_seed(0)
        body(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


# ---- gather_expert_outputs: values and gradients -----------------------------------------
def _rows_of(rank, counts):
    """Rank ``rank``'s rows: distinct values on every rank and row."""
    n = counts[rank]
    return torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100.0 * (rank + 1)


def _loss_weights(rank, total):
    """Each rank weights every gathered row differently, and differently from the other ranks."""
    return (rank + 1) * (torch.arange(total * 3, dtype=torch.float32).view(total, 3) + 1)


def _gather_body(rank, world, all_counts):
    group = dist.new_group(list(range(world)))
    for counts in all_counts:
        x = _rows_of(rank, counts).requires_grad_()
        out = ExpertParallelism.gather_expert_outputs(x, group)
        # every rank's rows, in rank order, without the padding used on the wire
        want = torch.cat([_rows_of(r, counts) for r in range(world)])
        assert out.shape == want.shape and torch.equal(out, want), (counts, out)
        total = sum(counts)
        (out * _loss_weights(rank, total)).sum().backward()
        # d(sum over ranks of the losses)/d(my rows): the sum over ranks of the weights of my rows
        start = sum(counts[:rank])
        grad = sum(_loss_weights(q, total) for q in range(world))[start : start + counts[rank]]
        assert torch.equal(x.grad, grad), (counts, x.grad, grad)


def test_gather_expert_outputs_values_and_gradients(tmp_path):
    # uneven rows per rank, and a rank with none
    _run_ranks(_rank_entry, 2, tmp_path, _gather_body, [[3, 1], [1, 4], [0, 2]])


def test_gather_expert_outputs_without_group_is_identity():
    x = torch.randn(3, 2)
    assert ExpertParallelism.gather_expert_outputs(x, None) is x
    with pytest.raises(DistributedError, match="ProcessGroup"):
        ExpertParallelism.gather_expert_outputs(x, "not a group")


# ---- MoEModel.set_expert_parallel_group: the positive path ------------------------------
def _shard_body(rank, world, cfg_dict):
    model = MoEModel.from_config(cfg_dict).eval()  # same seed on every rank: the same weights
    ref = copy.deepcopy(model)
    group = dist.new_group(list(range(world)))
    model.set_expert_parallel_group(group)
    assert model.expert_parallel_group is group
    num_experts = ref.config.num_experts
    local = num_experts // world
    mine = slice(rank * local, (rank + 1) * local)
    for moe, ref_moe in zip(model.moe_layers, ref.moe_layers):
        assert moe.experts.num_experts == local and moe.expert_offset == rank * local
        assert moe.experts.w_in.shape[0] == moe.experts.w_out.shape[0] == local
        assert torch.equal(moe.experts.w_in, ref_moe.experts.w_in[mine])
        assert torch.equal(moe.experts.w_out, ref_moe.experts.w_out[mine])
        assert isinstance(moe.dispatcher, AllToAllDispatcher) and moe.dispatcher.group is group
        assert moe.dispatcher.num_local_experts == local and moe.dispatcher.num_experts == num_experts
    params = dict(model.named_parameters())  # the slices are the model's parameters (what the optimizer sees)
    assert all(params[n].shape[0] == local for n in params if ".experts." in n)
    ref_state = ref.state_dict()
    for name, t in model.state_dict().items():
        if ".experts." not in name:
            assert torch.equal(t, ref_state[name]), name
    # a different batch on each rank (different sizes too): the same logits as the unsharded model
    shape = (2, 8) if rank == 0 else (1, 5)
    ids = torch.randint(0, ref.config.vocab_size, shape, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        logits, info = model(ids, return_routing_info=True)
        ref_logits, ref_info = ref(ids, return_routing_info=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    counts = info["expert_counts"]  # [layers, E]: this rank's tokens per global expert
    assert torch.equal(counts, ref_info["expert_counts"])
    assert counts[:, mine].sum() > 0 and counts.sum() > counts[:, mine].sum()  # tokens went to both ranks
    with pytest.raises(DistributedError, match="already sharded"):
        model.set_expert_parallel_group(None)
    with pytest.raises(DistributedError, match="already sharded"):
        model.set_expert_parallel_group(group)


def test_set_expert_parallel_group_shards_experts_and_keeps_logits(tmp_path):
    _run_ranks(_rank_entry, 2, tmp_path, _shard_body, tiny_config().to_dict())


def test_parallel_size_validation_names_numbers():
    with pytest.raises(DistributedError, match=r"num_experts \(6\) must be divisible by expert_parallel_size \(4\)"):
        validate_parallel_sizes(4, 6, 4)
    with pytest.raises(DistributedError, match=r"world_size \(3\) must be divisible by expert_parallel_size \(2\)"):
        validate_parallel_sizes(3, 4, 2)
    # model_parallel_size is tensor parallelism (the resolved layout comes back)
    assert validate_parallel_sizes(2, 4, 1, model_parallel_size=2).tp == 2
    assert validate_parallel_sizes(4, 4, 1, model_parallel_size=2, dp_shard=2).dp == 2  # FSDP 2 x TP 2
    assert validate_parallel_sizes(2, 4, 1, pipeline_parallel_size=2).pp == 2  # pipeline parallelism
    with pytest.raises(DistributedError, match="pipeline_parallel_size \\(2\\) > 1 with dp_shard \\(1\\) or model_parallel_size"):
        validate_parallel_sizes(4, 4, 1, model_parallel_size=2, pipeline_parallel_size=2)


def test_parallelize_without_process_group_fails():
    model = MoEModel.from_config(tiny_config())
    with pytest.raises(DistributedError, match="not initialised"):
        ExpertParallelism.parallelize_experts(model, 2)
