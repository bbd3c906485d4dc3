"""A trainer runtime over torch.distributed: data + expert parallelism.

    groups = ExpertParallelism.parallelize_experts(model, expert_parallel_size)
    trainer = MoETrainer(model, runtime=DistributedRuntime(model, groups), ...)

Every rank is a data-parallel rank (the global batch is split over all of them); expert
parameters are sharded over the expert-parallel group. Losses are normalised by global
token counts, so gradients are summed (see :mod:`moe_lab.parallel.expert_parallel`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..training.checkpoint import optimizer_state_by_name
from ..training.runtime import Runtime
from .expert_parallel import ExpertParallelism, ParallelGroups, is_expert_param


class DistributedRuntime(Runtime):
    def __init__(self, model: nn.Module, groups: ParallelGroups) -> None:
        self.groups = groups
        self.rank = groups.rank
        self.world_size = groups.world_size
        self.dp_rank = groups.rank
        self.dp_size = groups.world_size
        self._model = model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sync_gradients(self, model: nn.Module) -> None:
        ExpertParallelism.sync_gradients(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Global gradient norm: dense parameters counted once, sharded experts summed over EP."""
        dense_sq = torch.zeros((), dtype=torch.float64)
        expert_sq = torch.zeros((), dtype=torch.float64)
        params = []
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            params.append(p)
            sq = p.grad.detach().double().square().sum().cpu()
            if is_expert_param(name) and self.groups.ep_group is not None:
                expert_sq += sq
            else:
                dense_sq += sq
        if self.groups.ep_group is not None:
            dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.groups.ep_group)
        total = (dense_sq + expert_sq).sqrt().float()
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.detach().mul_(coef.to(p.grad.device))
        return total

    def barrier(self) -> None:
        dist.barrier()

    def full_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return ExpertParallelism.full_state_dict(model)

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        tensors, meta = optimizer_state_by_name(model, optimizer)
        group = self.groups.ep_group
        if group is None:
            return tensors, meta
        out = {}
        for key in sorted(tensors):
            t = tensors[key]
            name = key.split("::", 1)[0]
            if is_expert_param(name) and t.dim() > 0:
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, dim=0)
            out[key] = t
        return out, meta

    def expert_slices(self, model: nn.Module) -> Optional[Dict[str, slice]]:
        if self.groups.ep_group is None:
            return None
        slices = {}
        for name, p in model.named_parameters():
            if is_expert_param(name):
                n = p.shape[0]
                slices[name] = slice(self.groups.ep_rank * n, (self.groups.ep_rank + 1) * n)
        return slices
