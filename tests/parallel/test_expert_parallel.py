"""Expert parallelism on gloo, with plain torch.multiprocessing (no Ray): the sharded model's
logits and gradients equal the single-process model's on the same global batch."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_config

from moe_lab import DistributedError, ExpertParallelism, MoEModel
from moe_lab.parallel import validate_parallel_sizes


def _global_loss_share(model, ids, num_label_tokens):
    logits, info = model(ids, return_routing_info=True)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
    return ce / num_label_tokens + info["aux_loss"], logits


def _worker(rank, world, ep, init_file, cfg_dict, ids, ref_grads, ref_logits, ref_shapes, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg_dict)
        groups = ExpertParallelism.parallelize_experts(model, ep)
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
            if ".experts." in name:
                local_e = g.shape[0]
                start = (rank % ep) * local_e if ep > 1 else 0
                ref = ref[start : start + local_e]
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=name)
        # gather_expert_outputs concatenates every EP rank's rows in rank order
        if groups.ep_group is not None:
            rows = torch.full((rank + 1, 2), float(rank))
            gathered = ExpertParallelism.gather_expert_outputs(rows, groups.ep_group)
            assert gathered.shape[0] == sum(r % ep + 1 for r in range(ep))
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
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init_file = str(tmp_path / "init")
    procs = [
        ctx.Process(target=_worker, args=(r, world, ep, init_file, cfg.to_dict(), ids, ref_grads, ref_logits.detach(), ref_shapes, errors))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_parallel_size_validation_names_numbers():
    with pytest.raises(DistributedError, match=r"num_experts \(6\) must be divisible by expert_parallel_size \(4\)"):
        validate_parallel_sizes(4, 6, 4)
    with pytest.raises(DistributedError, match=r"world_size \(3\) must be divisible by expert_parallel_size \(2\)"):
        validate_parallel_sizes(3, 4, 2)
    with pytest.raises(DistributedError, match="model_parallel_size \\(2\\) > 1 is not supported yet"):
        validate_parallel_sizes(2, 4, 1, model_parallel_size=2)
    with pytest.raises(DistributedError, match="pipeline_parallel_size \\(2\\) > 1 is not supported yet"):
        validate_parallel_sizes(2, 4, 1, pipeline_parallel_size=2)


def test_parallelize_without_process_group_fails():
    model = MoEModel.from_config(tiny_config())
    with pytest.raises(DistributedError, match="not initialised"):
        ExpertParallelism.parallelize_experts(model, 2)
