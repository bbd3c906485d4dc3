"""All-to-all with variable splits along dim 0, autograd-aware.

    y_MD = all_to_all(x_ND, out_splits, in_splits, group)   # send in_splits[r] rows to rank r

The backward runs the reverse all-to-all. Works on gloo (CPU) and NCCL (CUDA).
Shape letters: N rows sent, M rows received, D features.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: List[int], in_splits: List[int], group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group: Any) -> torch.Tensor:
    """Send ``in_splits[r]`` rows of ``x`` to rank ``r``; receive ``out_splits[r]`` rows from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
