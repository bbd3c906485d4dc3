"""``parallelize(model, dims)``: every parallelism applied to a built model, in one order.

    model = parallelize(model, ParallelDims(dp_shard=2, ep=2), ParallelOptions(fsdp_mixed_precision=True))
    groups = ExpertParallelism.get_groups(model)          # its ParallelGroups (and ParallelMesh)

The order is torchtitan's: build the device mesh (:class:`~moe_lab.parallel.mesh.ParallelMesh`),
shard the experts by expert over the EP group (the model's seam), tensor parallelism with the
plan of :func:`~moe_lab.parallel.tensor_parallel.tp_plan` (:mod:`moe_lab.parallel.tensor_parallel`;
with ``dims.expert_tp`` the experts' FFNs are split over TP too),
activation checkpointing (:mod:`moe_lab.training.activation_checkpointing`), then FSDP2 per
decoder layer (:mod:`moe_lab.parallel.fsdp`), and last the pipeline cut
(:mod:`moe_lab.parallel.pipeline`: this rank's stages kept, the other layers pruned; with
``pp > 1``, ``model.pipeline`` runs the step). Every rank calls it with the same arguments (it
is a collective). The model is changed in place and returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from .fsdp import FSDPSettings, apply_fsdp
from .mesh import ParallelDims, ParallelGroups, ParallelMesh
from .tensor_parallel import apply_tp, tp_plan
from ..training.activation_checkpointing import apply_activation_checkpointing, check_activation_checkpointing


@dataclass(frozen=True)
class ParallelOptions:
    """How the parallelisms run (the sizes are :class:`ParallelDims`)."""

    fsdp_mixed_precision: bool = False  #: FSDP: bf16 parameters and compute, fp32 gradient reduction
    fsdp_reshard_after_forward: bool = True  #: FSDP: free gathered parameters after each layer's forward
    #: recompute decoder layers in backward: "none", "full" or "selective" (every
    #: ``activation_checkpointing_every``-th layer); see moe_lab.training.activation_checkpointing
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2

    def __post_init__(self) -> None:
        check_activation_checkpointing(self.activation_checkpointing, self.activation_checkpointing_every)

    def fsdp_settings(self) -> FSDPSettings:
        return FSDPSettings(self.fsdp_mixed_precision, self.fsdp_reshard_after_forward)


def device_type() -> str:
    """The mesh device of this process group: CUDA under NCCL, else CPU."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def parallelize(model: nn.Module, dims: Optional[ParallelDims] = None, options: Optional[ParallelOptions] = None) -> nn.Module:
    """Apply ``dims`` (and ``options``) to a built model, in place, on every rank (a collective:
    every rank calls it, in the same order). Returns ``model``;
    ``ExpertParallelism.get_groups(model)`` gives its :class:`ParallelGroups`.

    Raises DistributedError naming the values when the sizes do not fit the world or the model.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialised; call init_process_group first")
    options = options or ParallelOptions()
    dims = (dims or ParallelDims()).resolve(dist.get_world_size())
    if hasattr(model, "config"):
        dims.check_model(model.config)
    pmesh = ParallelMesh.build(dims, device_type())
    groups = ParallelGroups.from_mesh(pmesh)
    if groups.ep_group is not None:
        model.set_expert_parallel_group(groups.ep_group)
    if dims.tp > 1:
        apply_tp(model, pmesh.tp_mesh, tp_plan(model.config, expert_tp=dims.expert_tp))
    if options.activation_checkpointing != "none":
        apply_activation_checkpointing(model, options.activation_checkpointing, options.activation_checkpointing_every)
    if dims.fsdp:
        apply_fsdp(model, pmesh, options.fsdp_settings())
    if dims.pp > 1:
        from .pipeline import apply_pipeline

        dev = torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
        apply_pipeline(model, pmesh, dims.pp_schedule, dev)
    model.parallel_groups = groups
    return model
