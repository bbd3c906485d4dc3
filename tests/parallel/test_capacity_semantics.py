"""Capacity under data and expert parallelism: each rank's micro-batch is its own capacity
group (as in Megatron-Core). With dropping on, a rank's tokens get exactly what a
single-process forward of that rank's micro-batch alone gives them, which is not what a
forward of the whole global batch gives (the test checks both, so it can tell them apart)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config

from moe_lab import ExpertParallelism, MoEModel

WORLD = 2
ROUTERS = {
    "switch": dict(router_type="switch", experts_per_token=1, capacity_factor=0.75, router_jitter_noise=0.0),
    "top_k": dict(router_type="top_k", experts_per_token=2, capacity_factor=0.75),
    "expert_choice": dict(router_type="expert_choice", experts_per_token=1, capacity_factor=1.0),
}


def _worker(rank, init_file, cases, ids, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        per_rank = ids.shape[0] // WORLD
        for name, (cfg, expected) in cases.items():
            torch.manual_seed(0)
            model = ExpertParallelism.parallelize_experts(MoEModel.from_config(cfg), WORLD)
            assert ExpertParallelism.get_groups(model).expert_parallel_size == WORLD
            logits, info = model.train()(ids[rank * per_rank : (rank + 1) * per_rank], return_routing_info=True)
            assert float(info["dropped_fraction"].max()) > 0, name  # capacity really drops here
            torch.testing.assert_close(logits, expected[rank], rtol=1e-5, atol=1e-5, msg=name)
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_capacity_is_per_rank_micro_batch_under_ep(tmp_path):
    ids = torch.randint(0, 97, (4, 16))
    cases = {}
    for name, router in ROUTERS.items():
        cfg = tiny_config(**router).to_dict()
        torch.manual_seed(0)
        ref = MoEModel.from_config(cfg).train()
        with torch.no_grad():
            per_rank = [ref(ids[r * 2 : (r + 1) * 2]) for r in range(WORLD)]  # each micro-batch alone
            whole = ref(ids)
        # the semantics pinned here is observable: global-batch capacity would differ
        assert not torch.allclose(torch.cat(per_rank), whole, atol=1e-4), name
        cases[name] = (cfg, per_rank)
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(str(tmp_path / "init"), cases, ids, errors), nprocs=WORLD, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()
