"""Shared pieces of the layout exactness tests (FSDP, TP, PP, sharded checkpoints): the
global batches, a train loop over ``train_step``, the one-process reference, and spawned
gloo ranks on loopback.

Every layout trains the same tiny model for three optimizer steps (AdamW, two micro-batches
of 4 rows with padding, clipping on) and must end with the losses and weights of one
process to a relative error of 1e-5.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from moe_lab import MoEModel
from moe_lab.training.step import StepSettings, train_step

ROWS = 4  #: rows of a global micro-batch
TOL = 1e-5


def steps(num_steps: int = 3, seed: int = 3) -> List[List[Dict[str, torch.Tensor]]]:
    """``num_steps`` steps of two global micro-batches ``[4, 10]`` with padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        micro = []
        for _ in range(2):
            ids = torch.randint(0, 96, (ROWS, 10), generator=g)
            mask = torch.ones_like(ids)
            mask[0, 7:] = 0
            mask[3, 2:] = 0
            micro.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        out.append(micro)
    return out


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, batches, runtime=None, optimizer=None, step_fn: Optional[Callable] = None) -> List[float]:
    """Train on ``batches`` (this rank takes its data-parallel slice of every micro-batch);
    returns each step's global loss, then each step's global gradient norm (the same on every
    rank; the norms catch a wrongly scaled gradient, which Adam's update alone would hide)."""
    optimizer = optimizer or make_optimizer(model)
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime is not None else (0, 1)
    losses, norms = [], []
    for micro in batches:
        mine = [{k: v[dp_rank * ROWS // dp_size:(dp_rank + 1) * ROWS // dp_size] for k, v in b.items()} for b in micro]
        if step_fn is not None:
            stats = step_fn(model, optimizer, mine)
        else:
            stats = train_step(model, optimizer, mine, runtime, settings=StepSettings(max_grad_norm=1.0))
        share = torch.tensor([stats.loss_share], dtype=torch.float64)
        losses.append(float(runtime.all_reduce_sum(share)) if runtime is not None else float(share))
        norms.append(stats.grad_norm)
    return losses + norms


def tp_step(model, optimizer, micro):
    """``train_step`` with the loss computed from vocabulary-sharded logits (TP layouts);
    the runtime is ``model.runtime``."""
    from moe_lab.parallel.tensor_parallel import vocab_parallel_loss_sum

    settings = StepSettings(max_grad_norm=1.0, loss_sum_fn=vocab_parallel_loss_sum)
    return train_step(model, optimizer, micro, model.runtime, settings=settings)


def reference(cfg: Dict[str, Any], batches) -> Dict[str, Any]:
    """One process: the per-step losses and the final state dict."""
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    losses = train(model, batches)
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def assert_matches(name: str, losses: List[float], state: Dict[str, torch.Tensor], ref: Dict[str, Any]) -> None:
    """Losses and every tensor of ``state`` within :data:`TOL` of the reference."""
    want = torch.tensor(ref["losses"])
    assert len(losses) == len(ref["losses"]), (name, losses)
    err = rel_err(torch.tensor(losses), want)
    assert err <= TOL, f"{name}: losses {losses} vs {ref['losses']} (relative error {err:.1e})"
    assert set(state) == set(ref["state"]), f"{name}: keys differ: {set(state) ^ set(ref['state'])}"
    for key, w in ref["state"].items():
        assert tuple(state[key].shape) == tuple(w.shape), f"{name}: {key} shape {tuple(state[key].shape)} vs {tuple(w.shape)}"
        err = rel_err(state[key], w)
        assert err <= TOL, f"{name}: {key} relative error {err:.1e}"


def _entry(rank: int, world: int, port: int, body: Callable, args: tuple, errors: Any) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        body(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def run_ranks(body: Callable, world: int, *args: Any, timeout: float = 300) -> None:
    """Run ``body(rank, world, *args)`` in ``world`` spawned gloo ranks on 127.0.0.1; fail with
    every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, body, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():  # a hung collective: do not leave it behind
            p.kill()
            p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
