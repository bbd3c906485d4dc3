"""Expert parallelism over torch.distributed: groups, all-to-all dispatch, gradient sync.

Pure PyTorch; it runs under torchrun, inside a Ray Train worker, or in any process where
``torch.distributed`` is initialised (gloo on CPU, NCCL on GPU).

Layout for world size W and expert-parallel size P (W % P == 0):
- expert-parallel (EP) groups: consecutive ranks ``[k*P, (k+1)*P)``; each holds all E experts,
  E/P per rank (rank ``r`` holds experts ``[(r % P) * E/P, (r % P + 1) * E/P)``).
- expert-data-parallel (EDP) groups: the ranks holding the same experts, ``{r, r+P, r+2P, ...}``.
- every rank is also data parallel for the dense parameters (the whole world).

    model = ExpertParallelism.parallelize_experts(model, expert_parallel_size=2)
    groups = ExpertParallelism.get_groups(model)      # the ParallelGroups of this rank
    loss.backward()
    ExpertParallelism.sync_gradients(model, groups)   # dense: sum over world; experts: over EDP

Loss convention: each rank's loss is its share of the global loss (normalised by global
token counts), so gradients are *summed* over ranks. The routers' aux-loss statistics are
summed over the world group for the same reason; see :mod:`moe_lab.model.routers`.

Shape letters: T tokens, D hidden, N routed rows, E experts, P expert-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from ..model.dispatch import DispatchMetadata, combine_rows, sort_by_expert


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups one rank belongs to."""

    world_size: int
    rank: int
    expert_parallel_size: int
    ep_rank: int
    ep_group: Optional[Any]  #: None when expert_parallel_size == 1
    edp_group: Optional[Any]  #: None when it would be the whole world
    dp_group: Optional[Any] = None  #: None means the default (world) group

    @property
    def expert_data_parallel_size(self) -> int:
        return self.world_size // self.expert_parallel_size


def validate_parallel_sizes(
    world_size: int,
    num_experts: int,
    expert_parallel_size: int = 1,
    model_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> None:
    """Raise DistributedError naming the numbers when the sizes cannot work together."""
    for name, v in (
        ("world_size", world_size),
        ("expert_parallel_size", expert_parallel_size),
        ("model_parallel_size", model_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DistributedError(f"{name} must be a positive int, got {v!r}")
    if model_parallel_size > 1:
        raise DistributedError(
            f"model_parallel_size ({model_parallel_size}) > 1 is not supported yet; use expert and data parallelism"
        )
    if pipeline_parallel_size > 1:
        raise DistributedError(
            f"pipeline_parallel_size ({pipeline_parallel_size}) > 1 is not supported yet; use expert and data parallelism"
        )
    if world_size % expert_parallel_size:
        raise DistributedError(
            f"world_size ({world_size}) must be divisible by expert_parallel_size ({expert_parallel_size})"
        )
    if num_experts % expert_parallel_size:
        raise DistributedError(
            f"num_experts ({num_experts}) must be divisible by expert_parallel_size ({expert_parallel_size})"
        )


class _AllToAll(torch.autograd.Function):
    """Autograd-aware ``all_to_all_single`` with variable splits along dim 0."""

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


@dataclass(frozen=True)
class _A2AState:
    in_splits: List[int]
    out_splits: List[int]
    local_perm: torch.Tensor  # [M] order that sorts received rows by local expert


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
        token_idx_N, weights_N, tokens_per_expert_E, order = sort_by_expert(
            expert_indices_TK, combine_weights_TK, self.num_experts, all_valid
        )
        p, l = self.ep_size, self.num_local_experts
        recv_counts = torch.empty_like(tokens_per_expert_E)  # [P * L]: rows for my experts from each rank
        dist.all_to_all_single(recv_counts, tokens_per_expert_E.contiguous(), group=self.group)
        counts = torch.stack([tokens_per_expert_E, recv_counts]).cpu()  # one host sync for both
        in_splits = counts[0].view(p, l).sum(1).tolist()
        out_splits = counts[1].view(p, l).sum(1).tolist()
        x_recv = all_to_all(x_TD[token_idx_N], out_splits, in_splits, self.group)  # [M, D], by (src, expert)
        recv_PL = recv_counts.view(p, l)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(l, device=x_TD.device).repeat(p), recv_PL.reshape(-1)
        )  # [M]
        local_perm = torch.argsort(local_expert_of_row, stable=True)
        meta = DispatchMetadata(
            token_idx_N, weights_N, tokens_per_expert_E, x_TD.shape[0], _A2AState(in_splits, out_splits, local_perm),
            order=order if all_valid else None, weights_TK=combine_weights_TK if all_valid else None,
        )
        return x_recv[local_perm], recv_PL.sum(0), meta

    def combine(self, y_MD: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        state: _A2AState = meta.extra
        y_recv = y_MD[torch.argsort(state.local_perm)]  # back to (src, expert) order
        y_N = all_to_all(y_recv, state.in_splits, state.out_splits, self.group)
        return combine_rows(y_N, meta)


def _is_process_group(group: Any) -> bool:
    return isinstance(group, dist.ProcessGroup)


def apply_expert_parallel_group(model: nn.Module, group: Any) -> None:
    """Keep this rank's slice of every MoE layer's experts and install all-to-all dispatch."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialised; call init_process_group first")
    if not _is_process_group(group):
        raise DistributedError(f"expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    if getattr(model, "expert_parallel_group", None) is not None:
        raise DistributedError("the experts are already sharded over an expert-parallel group")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    num_experts = model.config.num_experts
    if num_experts % size:
        raise DistributedError(
            f"num_experts ({num_experts}) must be divisible by the expert-parallel group size ({size})"
        )
    local = num_experts // size
    for moe in model.moe_layers:
        experts = moe.experts
        sl = slice(rank * local, (rank + 1) * local)
        experts.w_in = nn.Parameter(experts.w_in.data[sl].clone())
        experts.w_out = nn.Parameter(experts.w_out.data[sl].clone())
        experts.num_experts = local
        moe.expert_offset = rank * local
        moe.dispatcher = AllToAllDispatcher(num_experts, group)


def _new_groups(rank_lists: List[List[int]]) -> List[Any]:
    return [dist.new_group(ranks) for ranks in rank_lists]


def is_expert_param(name: str) -> bool:
    return ".experts." in name


class ExpertParallelism:
    """The public entry points of expert parallelism."""

    @staticmethod
    def create_groups(expert_parallel_size: int, num_experts: Optional[int] = None) -> ParallelGroups:
        """Create the EP and EDP groups. Every rank must call this, in the same order."""
        if not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; call init_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        validate_parallel_sizes(world, num_experts or expert_parallel_size, expert_parallel_size)
        p = expert_parallel_size
        ep_group = edp_group = None
        if p > 1:
            ep_groups = _new_groups([list(range(k * p, (k + 1) * p)) for k in range(world // p)])
            ep_group = ep_groups[rank // p]
        if 1 < p < world:  # p == 1: experts are replicated on the world; p == world: nothing to sync
            edp_groups = _new_groups([list(range(j, world, p)) for j in range(p)])
            edp_group = edp_groups[rank % p]
        return ParallelGroups(world, rank, p, rank % p, ep_group, edp_group)

    @staticmethod
    def parallelize_experts(model: nn.Module, expert_parallel_size: int) -> nn.Module:
        """Create the groups, shard ``model``'s experts over the EP group and point the routers'
        aux-loss statistics at the world group. Every rank must call it, in the same order.

        Returns ``model`` itself (sharded in place); :meth:`get_groups` gives its
        :class:`ParallelGroups` for gradient sync.
        """
        groups = ExpertParallelism.create_groups(expert_parallel_size, model.config.num_experts)
        if groups.ep_group is not None:
            model.set_expert_parallel_group(groups.ep_group)
        if groups.world_size > 1:
            for moe in model.moe_layers:
                moe.router.aux_group = dist.group.WORLD
        model.parallel_groups = groups
        return model

    @staticmethod
    def get_groups(model: nn.Module) -> ParallelGroups:
        """The :class:`ParallelGroups` that :meth:`parallelize_experts` set up for ``model``."""
        groups = getattr(model, "parallel_groups", None)
        if groups is None:
            raise DistributedError("the model is not parallelized; call ExpertParallelism.parallelize_experts first")
        return groups

    @staticmethod
    def gather_expert_outputs(expert_outputs: torch.Tensor, expert_parallel_group: Any) -> torch.Tensor:
        """Concatenate every EP rank's ``[n_r, ...]`` rows in rank order (autograd-aware).

        The backward sums each rank's gradient for a slice and returns it to the rank that
        owns the slice.
        """
        if expert_parallel_group is None:
            return expert_outputs
        if not _is_process_group(expert_parallel_group):
            raise DistributedError(
                f"expected a torch.distributed ProcessGroup, got {type(expert_parallel_group).__name__}"
            )
        return _GatherRows.apply(expert_outputs, expert_parallel_group)

    @staticmethod
    def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
        """Sum gradients: dense parameters over all ranks, expert parameters over their EDP group."""
        if groups.world_size == 1:
            return
        dense, expert = [], []
        for name, p in model.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (expert if is_expert_param(name) else dense).append(p.grad)
        _all_reduce_flat(dense, groups.dp_group)
        if groups.expert_parallel_size == 1:
            _all_reduce_flat(expert, groups.dp_group)
        elif groups.edp_group is not None:
            _all_reduce_flat(expert, groups.edp_group)

    @staticmethod
    def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
        """The unsharded state dict (experts gathered over the EP group), on CPU.

        Every EP rank must call it (it is a collective); all ranks get the full dict.
        """
        group = getattr(model, "expert_parallel_group", None)
        out: Dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            if group is not None and is_expert_param(name):
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, dim=0)
            out[name] = t.detach().cpu()
        return out


def _all_reduce_flat(grads: List[torch.Tensor], group: Optional[Any]) -> None:
    """One all-reduce (sum) over a flattened buffer per dtype."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(size)]
        dist.all_gather(sizes, n, group=group)
        counts = [int(s.item()) for s in sizes]
        pad = max(counts)
        buf = x.new_zeros((pad,) + tuple(x.shape[1:]))
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
