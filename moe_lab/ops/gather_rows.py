"""Concatenate every rank's rows in rank order, autograd-aware.

    y_MD = gather_rows(x_ND, group)   # M = sum of every rank's N

Ranks may hold different numbers of rows (zero included). The backward sums each rank's
gradient for a slice and returns it to the rank that owns the slice.
Shape letters: N local rows, M rows of all ranks, D features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(size)]
        dist.all_gather(sizes, n, group=group)
        counts = [int(s.item()) for s in sizes]
        buf = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in range(size)]
        dist.all_gather(parts, buf.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's rows of ``x``, concatenated in rank order (see the module docstring)."""
    return _GatherRows.apply(x, group)
