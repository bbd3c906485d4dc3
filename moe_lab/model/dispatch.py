"""Token dispatch: permute tokens into expert order, and combine expert outputs back.

A dispatcher holds no parameters. ``dispatch`` takes the router's ``[T, K]`` slots and
returns the token rows sorted by (local) expert plus the rows per expert; ``combine`` takes
the experts' output rows and returns ``[T, D]``, each token the weighted sum of its slots.
Empty slots (-1) are skipped. The metadata that ``combine`` needs travels in a frozen
dataclass.

:class:`LocalDispatcher` is the single-process dispatcher. :class:`AllToAllDispatcher`, the
expert-parallel one, has the same interface and adds an all-to-all between the two halves
(:func:`moe_lab.ops.all_to_all.all_to_all`). ``MoELayer.use_dispatcher`` installs one.

Shape letters: T tokens, D hidden, K slots per token, N routed rows, E experts, M rows
received from all ranks, P expert-parallel ranks, L experts per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..ops.all_to_all import all_to_all
from .routers import count_assignments


@dataclass(frozen=True)
class DispatchMetadata:
    """What ``combine`` needs to undo ``dispatch``."""

    token_indices: torch.Tensor  #: [N] source token of each sorted row
    weights: torch.Tensor  #: [N] fp32 combine weight of each sorted row
    tokens_per_expert: torch.Tensor  #: [E] rows per expert (global experts, before any all-to-all)
    num_tokens: int  #: T
    extra: Optional[Any] = None  #: dispatcher-specific state (the all-to-all splits)
    #: when every token fills all K slots (no padding, no dropping): the permutation that
    #: sorted the [T*K] slots, and the [T, K] weights; combine then gathers and reduces over
    #: K with one batched matmul instead of a scatter-add
    order: Optional[torch.Tensor] = None
    weights_TK: Optional[torch.Tensor] = None


def sort_by_expert(
    expert_indices_TK: torch.Tensor, combine_weights_TK: torch.Tensor, num_experts: int, all_valid: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten the slots, drop the empty ones and sort by expert (stable: token order kept).

    Returns ``(token_indices_N, weights_N, tokens_per_expert_E, order_N)``; ``order`` indexes
    the kept flat slots.
    """
    num_tokens, k = expert_indices_TK.shape
    flat_e = expert_indices_TK.reshape(-1)  # [T*K]
    flat_w = combine_weights_TK.reshape(-1)
    flat_t = torch.arange(num_tokens, device=flat_e.device).repeat_interleave(k)  # [T*K]
    if not all_valid:
        keep = (flat_e >= 0).nonzero().squeeze(-1)
        flat_e, flat_w, flat_t = flat_e[keep], flat_w[keep], flat_t[keep]
    order = torch.argsort(flat_e, stable=True)
    tokens_per_expert = count_assignments(flat_e, num_experts)
    return flat_t[order], flat_w[order], tokens_per_expert, order


def weighted_combine(
    y_ND: torch.Tensor, token_indices_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """``out[t] = sum over rows r of token t: weights[r] * y[r]``, accumulated in fp32; [T, D]."""
    contrib = y_ND.float() * weights_N.unsqueeze(-1)  # [N, D]
    out = contrib.new_zeros(num_tokens, y_ND.shape[-1])
    return out.index_add_(0, token_indices_N, contrib).to(y_ND.dtype)


def combine_rows(y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
    """Undo the sort and reduce each token's K rows with its weights: [T, D].

    With every slot filled (``meta.order`` set) this is a gather and a weighted sum over K
    (no atomics; under torch.compile one fused pass; a batched ``[T,1,K] @ [T,K,D]`` matmul
    ran as a poorly shaped GEMM in an H100 profile); otherwise a weighted scatter-add in fp32.
    """
    if meta.order is None:
        return weighted_combine(y_ND, meta.token_indices, meta.weights, meta.num_tokens)
    t, k = meta.weights_TK.shape
    inverse = torch.empty_like(meta.order)
    inverse[meta.order] = torch.arange(meta.order.numel(), device=meta.order.device)
    y_TKD = y_ND[inverse].view(t, k, y_ND.shape[-1])  # back to token-major slot order
    return (y_TKD * meta.weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(dim=1)  # [T, D]


class LocalDispatcher:
    """Single-process dispatch: a gather into expert order and a weighted scatter-add back."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_indices_TK: torch.Tensor,
        combine_weights_TK: torch.Tensor,
        all_valid: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, DispatchMetadata]:
        """Returns ``(x_ND sorted by expert, tokens_per_expert_E, metadata)``."""
        token_idx_N, weights_N, tokens_per_expert_E, order = sort_by_expert(
            expert_indices_TK, combine_weights_TK, self.num_experts, all_valid
        )
        meta = DispatchMetadata(
            token_idx_N, weights_N, tokens_per_expert_E, x_TD.shape[0],
            order=order if all_valid else None, weights_TK=combine_weights_TK if all_valid else None,
        )
        return x_TD[token_idx_N], tokens_per_expert_E, meta

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        """Weighted sum of each token's expert outputs: [T, D]."""
        return combine_rows(y_ND, meta)


@dataclass(frozen=True)
class _A2AState:
    in_splits: List[int]
    out_splits: List[int]
    local_perm_M: torch.Tensor  #: the order that sorts received rows by local expert


class AllToAllDispatcher:
    """Expert-parallel dispatch: sort by global expert, all-to-all to the expert's rank, sort by
    local expert; ``combine`` runs the reverse and the weighted sum. No parameters."""

    def __init__(self, num_experts: int, group: Any) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_indices_TK: torch.Tensor,
        combine_weights_TK: torch.Tensor,
        all_valid: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, DispatchMetadata]:
        """Returns ``(x_MD sorted by local expert, tokens_per_local_expert_L, metadata)``."""
        token_idx_N, weights_N, tokens_per_expert_E, order = sort_by_expert(
            expert_indices_TK, combine_weights_TK, self.num_experts, all_valid
        )
        p, l = self.ep_size, self.num_local_experts
        recv_counts_E = torch.empty_like(tokens_per_expert_E)  # [P * L]: rows for my experts from each rank
        dist.all_to_all_single(recv_counts_E, tokens_per_expert_E.contiguous(), group=self.group)
        counts = torch.stack([tokens_per_expert_E, recv_counts_E]).cpu()  # one host sync for both
        in_splits = counts[0].view(p, l).sum(1).tolist()
        out_splits = counts[1].view(p, l).sum(1).tolist()
        x_MD = all_to_all(x_TD[token_idx_N], out_splits, in_splits, self.group)  # by (source rank, expert)
        recv_PL = recv_counts_E.view(p, l)
        local_expert_of_row_M = torch.repeat_interleave(
            torch.arange(l, device=x_TD.device).repeat(p), recv_PL.reshape(-1)
        )
        local_perm_M = torch.argsort(local_expert_of_row_M, stable=True)
        meta = DispatchMetadata(
            token_idx_N, weights_N, tokens_per_expert_E, x_TD.shape[0], _A2AState(in_splits, out_splits, local_perm_M),
            order=order if all_valid else None, weights_TK=combine_weights_TK if all_valid else None,
        )
        return x_MD[local_perm_M], recv_PL.sum(0), meta

    def combine(self, y_MD: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        """Undo the local sort and the all-to-all, then the weighted sum: [T, D]."""
        state: _A2AState = meta.extra
        y_recv_MD = y_MD[torch.argsort(state.local_perm_M)]  # back to (source rank, expert) order
        y_ND = all_to_all(y_recv_MD, state.in_splits, state.out_splits, self.group)
        return combine_rows(y_ND, meta)
