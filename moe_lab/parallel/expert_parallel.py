"""Expert parallelism over torch.distributed: groups, sharding, gradient sync, state gathering.

Pure PyTorch; it runs under torchrun, inside a Ray Train worker, or in any process where
``torch.distributed`` is initialised (gloo on CPU, NCCL on GPU).

Layout for world size W and expert-parallel size P (W % P == 0):
- expert-parallel (EP) groups: consecutive ranks ``[k*P, (k+1)*P)``; each holds all E experts,
  E/P per rank (rank ``r`` holds experts ``[(r % P) * E/P, (r % P + 1) * E/P)``).
- expert-data-parallel (EDP) groups: the ranks holding the same experts, ``{r, r+P, r+2P, ...}``.
- every rank is also data parallel for the dense parameters (the whole world).

    model = parallelize(model, ParallelDims(ep=2))     # or ExpertParallelism.parallelize_experts(model, 2)
    groups = ExpertParallelism.get_groups(model)
    loss.backward()
    ExpertParallelism.sync_gradients(model, groups)   # dense: sum over world; experts: over EDP

Sharding goes through seams the model owns (``MoEModel.set_expert_parallel_group`` calls
``MoELayer.shard``, which calls ``GroupedExperts.shard``). Which parameters are expert
parameters is declared once, by the model (:func:`moe_lab.model.expert_parameter_names`);
gradient sync, the gradient norm and state gathering read that :class:`ParameterPlan`.

Loss convention: each rank's loss is its share of the global loss (normalised by global
token counts), so gradients are *summed* over ranks. The routers return local statistics;
the trainer sums them over the ranks outside the forward (:mod:`moe_lab.training.losses`).

Shape letters: T tokens, D hidden, N routed rows, E experts, P expert-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from ..ops.gather_rows import gather_rows
from .layout import device_type, parallelize
from .mesh import ParallelDims, ParallelGroups, ParallelMesh, model_problems


@dataclass(frozen=True)
class ParameterPlan:
    """Which parameters are stacked over experts (sharded under expert parallelism)."""

    expert: FrozenSet[str]

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterPlan":
        names = model.expert_parameter_names() if hasattr(model, "expert_parameter_names") else []
        return cls(frozenset(names))

    def is_expert(self, name: str) -> bool:
        return name in self.expert


#: the API reference's names of the sizes (``DistributedMoETrainer``), for messages
REFERENCE_NAMES = {"ep": "expert_parallel_size", "tp": "model_parallel_size", "pp": "pipeline_parallel_size"}


def validate_parallel_sizes(
    world_size: int,
    num_experts: int,
    expert_parallel_size: int = 1,
    model_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    dp_shard: int = 1,
    config: Any = None,
    pp_schedule: str = "1f1b",
) -> ParallelDims:
    """The resolved :class:`ParallelDims` of the API reference's sizes (``model_parallel_size``
    is TP, ``pipeline_parallel_size`` PP run by ``pp_schedule``, ``dp_shard`` FSDP); DistributedError naming the
    numbers, by those names, when they cannot work together (or with ``config``, a MoEConfig)."""
    for name, v in (
        ("world_size", world_size),
        ("expert_parallel_size", expert_parallel_size),
        ("model_parallel_size", model_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
        ("dp_shard", dp_shard),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DistributedError(f"{name} must be a positive int, got {v!r}")
    dims = ParallelDims(dp_shard=dp_shard, tp=model_parallel_size, pp=pipeline_parallel_size, ep=expert_parallel_size,
                        pp_schedule=pp_schedule)
    if dp_shard * model_parallel_size * pipeline_parallel_size == 1 and world_size % expert_parallel_size:
        # data + expert parallelism only: the reference's own message
        problems = [f"world_size ({world_size}) must be divisible by expert_parallel_size ({expert_parallel_size})"]
    else:
        problems = dims.problems(world_size, REFERENCE_NAMES)
    if num_experts % expert_parallel_size:
        problems.append(f"num_experts ({num_experts}) must be divisible by expert_parallel_size ({expert_parallel_size})")
    if config is not None:
        problems += [p for p in model_problems(dims, config, dim_names=REFERENCE_NAMES) if not p.startswith("num_experts")]
    if problems:
        raise DistributedError("; ".join(problems))
    return dims.resolve(world_size)


class ExpertParallelism:
    """The public entry points of expert parallelism."""

    @staticmethod
    def create_groups(expert_parallel_size: int, num_experts: Optional[int] = None) -> ParallelGroups:
        """Create the EP and EDP groups. Every rank must call this, in the same order."""
        if not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; call init_process_group first")
        validate_parallel_sizes(dist.get_world_size(), num_experts or expert_parallel_size, expert_parallel_size)
        return ParallelGroups.from_mesh(ParallelMesh.build(ParallelDims(ep=expert_parallel_size), device_type()))

    @staticmethod
    def parallelize_experts(model: nn.Module, expert_parallel_size: int) -> nn.Module:
        """Create the groups and shard ``model``'s experts over the EP group. Every rank must
        call it, in the same order.

        Returns ``model`` itself (sharded in place); :meth:`get_groups` gives its
        :class:`ParallelGroups` for gradient sync.
        """
        return parallelize(model, ParallelDims(ep=expert_parallel_size))

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
        owns the slice (:func:`moe_lab.ops.gather_rows.gather_rows`).
        """
        if expert_parallel_group is None:
            return expert_outputs
        if not isinstance(expert_parallel_group, dist.ProcessGroup):
            raise DistributedError(
                f"expected a torch.distributed ProcessGroup, got {type(expert_parallel_group).__name__}"
            )
        return gather_rows(expert_outputs, expert_parallel_group)

    @staticmethod
    def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
        """Sum gradients: dense parameters over all ranks, expert parameters over their EDP group."""
        if groups.world_size == 1:
            return
        plan = ParameterPlan.of(model)
        dense, expert = [], []
        for name, p in model.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (expert if plan.is_expert(name) else dense).append(p.grad)
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
        plan = ParameterPlan.of(model)
        out: Dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            if group is not None and plan.is_expert(name):
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
