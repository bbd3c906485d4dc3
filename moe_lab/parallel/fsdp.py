"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a built :class:`~moe_lab.MoEModel`.

    apply_fsdp(model, pmesh, FSDPSettings(mixed_precision=True, reshard_after_forward=True))

One FSDP unit per decoder layer, and inside each MoE layer a separate unit for the stacked
experts (as torchtitan): dense parameters shard over the dense data-parallel mesh
(``dp_shard``, HSDP with ``dp_replicate``), expert parameters over their own
expert-data-parallel mesh (``efsdp = dp_shard / ep``), after expert parallelism has already
split them by expert. The root unit holds the embedding, the final norm and the LM head.

With tensor parallelism too (``dp_shard > 1`` and ``tp > 1``, torchtitan's FSDP x TP), TP
has already made the parameters DTensors over the ``tp`` mesh; ``fully_shard`` over the
``dp_shard`` mesh (cut from the same world mesh) shards them again, so each becomes a DTensor
over the 2-D ``(dp_shard, tp)`` mesh (a dimension that TP split is split again as
``_StridedShard``). FSDP2 turns each gradient into its parameter's TP placements before the
reduce-scatter: the sequence-parallel norms' ``Partial`` gradients are summed over ``tp``, the
vocab-parallel embedding's ``Replicate`` one is cut to the rank's rows. The experts are not
TP-split (they run on the gathered sequence); they shard over their expert-FSDP mesh as above.

Gradients are *summed* (never averaged) over the ranks: each rank's loss is its share of the
global loss (see :mod:`moe_lab.training.step`), so FSDP's reduce-scatter must not divide.
Sum-only reductions also run on gloo, which has no PREMUL_SUM or AVG.

``mixed_precision``: parameters are all-gathered and computed in bf16, gradients reduced in
fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded master
weights and the optimizer state stay fp32. ``reshard_after_forward``: free the gathered
parameters of a layer after its forward (and gather them again in backward); False keeps them
(less communication, more memory). The root unit never reshards after forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .mesh import ParallelMesh


@dataclass(frozen=True)
class FSDPSettings:
    mixed_precision: bool = False  #: bf16 parameters and compute, fp32 gradient reduction
    reshard_after_forward: bool = True


def _policy(settings: FSDPSettings) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not settings.mixed_precision:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _expert_placement(efsdp: int):
    """Shard stacked expert weights ``[E_local, ...]`` by expert when the local experts split
    evenly over the expert-FSDP ranks, else along their rows (dim 1), as torchtitan does."""
    from torch.distributed.tensor import Shard

    def placement(p: nn.Parameter) -> Any:
        return Shard(0) if p.shape[0] % efsdp == 0 else Shard(1)

    return placement


def apply_fsdp(model: nn.Module, pmesh: ParallelMesh, settings: Optional[FSDPSettings] = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``pmesh`` (a collective). Returns ``model``."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    settings = settings or FSDPSettings()
    mp = _policy(settings)
    dense, expert = pmesh.dense_fsdp_mesh, pmesh.expert_fsdp_mesh
    reshard = settings.reshard_after_forward
    for layer in getattr(model, "layers", []):
        if getattr(layer, "is_moe", False):
            fully_shard(layer.mlp.experts, mesh=expert, mp_policy=mp, reshard_after_forward=reshard,
                        shard_placement_fn=_expert_placement(pmesh.dims.efsdp))
        fully_shard(layer, mesh=dense, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dense, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model
