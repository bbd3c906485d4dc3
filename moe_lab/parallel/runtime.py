"""A trainer runtime over torch.distributed: data, expert and fully sharded data parallelism.

    runtime = parallel_runtime(model, expert_parallel_size=2)                # data + expert parallelism
    runtime = parallel_runtime(model, dims=ParallelDims(dp_shard=2, ep=2))  # FSDP2 + EP
    trainer = MoETrainer(model, runtime=runtime, ...)

Every data-parallel rank sees its own slice of the global batch; losses are normalised by
global token counts, so gradients are *summed* over ranks (see
:mod:`moe_lab.parallel.expert_parallel`). What the runtime does per layout:

- gradient sync: FSDP2 reduce-scatters (and, for HSDP, all-reduces) the gradients itself in
  backward; without FSDP the dense gradients are all-reduced over the data-parallel ranks and
  the expert gradients over the ranks holding the same experts;
- clipping: the global norm over every parameter's distinct pieces: each rank squares its own
  shard (DTensor local shards, this rank's experts), and the sums go over exactly the mesh
  dimensions the piece is split along (see :func:`global_grad_norm`);
- loss and statistics: summed over the data-parallel ranks only;
- full state (checkpoints): DTensors gathered with ``full_tensor()``, then experts gathered
  over the EP group; every rank gets the full dict (a collective).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..training.runtime import Runtime
from .expert_parallel import ExpertParallelism, ParallelDims, ParallelGroups, ParameterPlan, _all_reduce_flat
from .layout import ParallelOptions, parallelize
from .tensor_parallel import vocab_parallel_loss_sum

#: mesh dimensions a parameter's pieces can be split along (each a group of the ParallelMesh)
_SPLIT_DIMS = ("dp_shard", "efsdp", "tp", "ep", "pp")


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _split_dims(t: torch.Tensor) -> List[str]:
    """The mesh dimensions along which a DTensor is sharded (its pieces are disjoint there).
    FSDP over TP shards a TP-sharded dim again with ``_StridedShard`` (not an ``is_shard()``)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    if not _is_dtensor(t):
        return []
    names = t.device_mesh.mesh_dim_names or ()
    return [names[i] for i, p in enumerate(t.placements) if p.is_shard() or isinstance(p, _StridedShard)]


class DistributedRuntime(Runtime):
    def __init__(self, model: nn.Module, groups: ParallelGroups) -> None:
        self.groups = groups
        # groups built without a mesh are data + expert parallelism over the whole world
        self.dims: ParallelDims = groups.dims or ParallelDims(ep=groups.expert_parallel_size).resolve(groups.world_size)
        self.rank = groups.rank
        self.world_size = groups.world_size
        self.dp_rank = groups.dp_rank
        self.dp_size = groups.dp_size
        # NCCL reduces only CUDA tensors; gloo takes CPU tensors
        nccl = dist.get_backend() == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.plan = ParameterPlan.of(model)
        #: pipeline parallelism: this rank's stages and schedule (None without pp)
        self.pipeline = getattr(model, "pipeline", None)

    @property
    def loss_sum_fn(self) -> Optional[Any]:
        """The LM loss this layout's logits need (``StepSettings.loss_sum_fn``): the
        vocab-parallel cross-entropy under TP (the logits are sharded over the vocabulary);
        None: the trainer's own."""
        return vocab_parallel_loss_sum if self.dims.tp > 1 else None

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks only (TP and PP ranks of one replica see the same data)."""
        if self.dp_size == 1:
            return t.detach().clone()
        pmesh = self.groups.mesh
        group = pmesh.group("dp") if pmesh is not None else self.groups.dp_group
        out = t.detach().to(self.comm_device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.to(t.device)

    def sync_gradients(self, model: nn.Module) -> None:
        _match_grad_placements(model)
        if self.dims.fsdp:
            return  # FSDP2 reduced every gradient in backward
        if self.dims.sharded:  # TP/PP: sum the local pieces; dense over DP, experts over EDP
            sync_local_gradients(model, self.plan, self.groups)
            return
        ExpertParallelism.sync_gradients(model, self.groups)

    def _group(self, name: str) -> Optional[Any]:
        """The process group of a split dimension (None when it is this rank alone)."""
        pmesh = self.groups.mesh
        if pmesh is not None:
            return pmesh.group(name)
        return self.groups.ep_group if name == "ep" else None

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Global gradient norm (see :func:`global_grad_norm`); clip every piece by it."""
        params = [p for p in model.parameters() if p.grad is not None]
        total = global_grad_norm(model, self.plan, self._group, self.comm_device)
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            with torch.no_grad():
                for p in params:
                    _local(p.grad).mul_(coef.to(p.grad.device))
        return total

    def barrier(self) -> None:
        dist.barrier()

    def _full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The full tensor of a parameter's (or state's) piece: DTensor gathered, experts over
        EP; on CPU, and always a new tensor (never the live one that the next step updates)."""
        live = t
        if _is_dtensor(t):
            t = t.full_tensor()
        group = self.groups.ep_group
        if group is not None and self.plan.is_expert(name) and t.dim() > 0:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=0)
        # a replicated DTensor's full_tensor() is its live local tensor: copy that one too
        shared = t is live or (_is_dtensor(live) and t.untyped_storage().data_ptr() == _local(live).untyped_storage().data_ptr())
        return t.detach().to("cpu", copy=shared)

    def full_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        if not self.dims.sharded:
            return ExpertParallelism.full_state_dict(model)
        state = {name: self._full(name, t) for name, t in model.state_dict().items()}
        if self.pipeline is not None:  # every stage's parameters, under their one-process names
            state = self.pipeline.gather(state)
        return state

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Optimizer state keyed by parameter name with full tensors (the checkpoint format of
        :func:`moe_lab.checkpoint.optimizer_state_by_name`); a collective."""
        from ..checkpoint import optimizer_state_by_name

        def full(name: str, val: torch.Tensor) -> torch.Tensor:
            # a copy of a scalar (AdamW's step), never the live tensor the next step increments
            return self._full(name, val) if val.dim() > 0 else _local(val).detach().to("cpu", copy=True)

        tensors, meta = optimizer_state_by_name(model, optimizer, full)
        if self.pipeline is not None:  # every stage's state
            tensors = dict(sorted(self.pipeline.gather(tensors).items()))  # one process's (sorted) order
            meta = self.pipeline.gather_optimizer_meta(meta)
        return tensors, meta

    def expert_slices(self, model: nn.Module) -> Optional[Dict[str, slice]]:
        """Rows of the full expert tensors held here; ``{}`` when the parameters are sharded
        without EP (weights then load before sharding, see :func:`moe_lab.runner.build_task_model`)."""
        if self.groups.ep_group is None:
            return {} if self.dims.sharded else None
        slices = {}
        for name, p in model.named_parameters():
            if self.plan.is_expert(name):
                n = p.shape[0]
                slices[name] = slice(self.groups.ep_rank * n, (self.groups.ep_rank + 1) * n)
        return slices


def _match_grad_placements(model: nn.Module) -> None:
    """Give every DTensor gradient its parameter's placements. Under sequence parallelism a
    replicated weight (a norm's) gets a ``Partial`` gradient, each rank's share of the sum
    over its sequence chunk (this all-reduces it), and the vocab-parallel embedding gets a
    ``Replicate`` one, the whole table (this keeps the rank's rows); norms, clipping and the
    optimizer then see each rank's own piece of the whole gradient."""
    for p in model.parameters():
        g = p.grad
        if g is not None and _is_dtensor(g) and _is_dtensor(p) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def sync_local_gradients(model: nn.Module, plan: ParameterPlan, groups: ParallelGroups) -> None:
    """Sum every gradient's local piece (a DTensor's local shard) over the data-parallel
    ranks: dense parameters over all of them, expert parameters over the ranks holding the
    same experts (``edp``). Missing gradients count as zeros."""
    if groups.dp_size == 1:
        return
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if plan.is_expert(name) and groups.expert_parallel_size > 1 else dense).append(_local(p.grad))
    dp_group = groups.mesh.group("dp") if groups.mesh is not None else groups.dp_group
    _all_reduce_flat(dense, dp_group)
    edp = groups.mesh.group("edp") if groups.mesh is not None else groups.edp_group
    if expert and edp is not None:
        _all_reduce_flat(expert, edp)


def global_grad_norm(model: nn.Module, plan: ParameterPlan, group_of: Any, device: torch.device) -> torch.Tensor:
    """The L2 norm of every gradient of the (possibly sharded) model, the same on every rank.

    Each rank squares the pieces it holds. A piece's square goes into the bucket of the mesh
    dimensions it is split along (a DTensor's Shard placements; ``ep`` too for expert
    parameters under expert parallelism; ``pp`` for every piece of a pipeline stage), and each
    bucket is summed over exactly those dimensions: replicated pieces count once. Every rank
    holds every bucket (zeros where it has nothing), so the collectives match.
    ``group_of(name)`` gives a dimension's process group (None: this rank alone).
    """
    dims = [d for d in _SPLIT_DIMS if group_of(d) is not None]
    buckets = [frozenset(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    index = {b: i for i, b in enumerate(buckets)}
    sq = torch.zeros(len(buckets), dtype=torch.float64, device=device)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        split = set(_split_dims(p.grad)) & set(dims)
        if plan.is_expert(name) and "ep" in dims:
            split.add("ep")
        if "pp" in dims:
            split.add("pp")
        sq[index[frozenset(split)]] += _local(p.grad).detach().double().square().sum().to(device)
    for d in dims:  # sum each bucket over the dimensions it is split along, one dimension at a time
        idx = torch.tensor([i for i, b in enumerate(buckets) if d in b], device=device)
        part = sq[idx]
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group_of(d))
        sq[idx] = part
    return sq.sum().sqrt().float()


def parallel_runtime(
    model: nn.Module,
    expert_parallel_size: int = 1,
    runtime_cls: type = DistributedRuntime,
    *,
    dims: Optional[ParallelDims] = None,
    options: Optional[ParallelOptions] = None,
) -> DistributedRuntime:
    """Parallelize ``model`` (``parallelize``: mesh, EP, FSDP2) and return its runtime.
    ``dims`` defaults to data + expert parallelism with ``expert_parallel_size``. Every rank
    calls it, in the same order."""
    parallelize(model, dims or ParallelDims(ep=expert_parallel_size), options)
    return runtime_cls(model, ExpertParallelism.get_groups(model))
