"""A trainer runtime over torch.distributed: data + expert parallelism.

    runtime = parallel_runtime(model, expert_parallel_size)      # parallelize + DistributedRuntime
    trainer = MoETrainer(model, runtime=runtime, ...)

Every rank is a data-parallel rank (the global batch is split over all of them); expert
parameters are sharded over the expert-parallel group. Losses are normalised by global
token counts, so gradients are summed (see :mod:`moe_lab.parallel.expert_parallel`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import optimizer_state_by_name
from ..training.runtime import Runtime
from .expert_parallel import ExpertParallelism, ParallelDims, ParallelGroups, ParameterPlan, parallelize


class DistributedRuntime(Runtime):
    def __init__(self, model: nn.Module, groups: ParallelGroups) -> None:
        self.groups = groups
        self.rank = groups.rank
        self.world_size = groups.world_size
        self.dp_rank = groups.rank
        self.dp_size = groups.world_size
        # NCCL reduces only CUDA tensors; gloo takes CPU tensors
        nccl = dist.get_backend() == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.plan = ParameterPlan.of(model)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.comm_device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def sync_gradients(self, model: nn.Module) -> None:
        ExpertParallelism.sync_gradients(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Global gradient norm: dense parameters counted once, sharded experts summed over EP."""
        dense_sq = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.comm_device)
        params = []
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            params.append(p)
            sq = p.grad.detach().double().square().sum().to(self.comm_device)
            if self.plan.is_expert(name) and self.groups.ep_group is not None:
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
        group = self.groups.ep_group
        if group is None:
            return optimizer_state_by_name(model, optimizer)
        # gather the expert shards' states on their device (NCCL needs CUDA tensors), then to CPU
        gathered: Dict[int, Dict[str, torch.Tensor]] = {}
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            st = optimizer.state.get(p)
            if not st or not self.plan.is_expert(name):
                continue
            full = {}
            for key in sorted(st):
                t = st[key]
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                    dist.all_gather(parts, t.contiguous(), group=group)
                    full[key] = torch.cat(parts, dim=0)
            gathered[id(p)] = full
        tensors, meta = optimizer_state_by_name(model, optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        for pid, full in gathered.items():
            for key, t in full.items():
                tensors[f"{names[pid]}::{key}"] = t.cpu()
        return tensors, meta

    def expert_slices(self, model: nn.Module) -> Optional[Dict[str, slice]]:
        if self.groups.ep_group is None:
            return None
        slices = {}
        for name, p in model.named_parameters():
            if self.plan.is_expert(name):
                n = p.shape[0]
                slices[name] = slice(self.groups.ep_rank * n, (self.groups.ep_rank + 1) * n)
        return slices


def parallel_runtime(model: nn.Module, expert_parallel_size: int, runtime_cls: type = DistributedRuntime) -> DistributedRuntime:
    """Shard ``model`` over new process groups (``parallelize``) and return its runtime.
    Every rank calls it, in the same order."""
    parallelize(model, ParallelDims(ep=expert_parallel_size))
    return runtime_cls(model, ExpertParallelism.get_groups(model))
