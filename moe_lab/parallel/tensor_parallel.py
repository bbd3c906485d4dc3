"""Tensor and sequence parallelism with DTensor (``parallelize_module``) over the ``tp`` mesh.

    plan = tp_plan(model.config)           # {module pattern: ParallelStyle}: data, not model code
    apply_tp(model, pmesh.tp_mesh, plan)

The plan (Megatron-style, as torchtitan writes it for Llama):

- ``embed_tokens``: vocab-parallel embedding (rows of the table split over TP; the partial
  sums are reduce-scattered along the sequence);
- norms (``input_norm``, ``post_attn_norm``, ``norm``): sequence parallel; between them the
  residual stream is a DTensor sharded along the sequence (``Shard(1)``);
- attention: the input is all-gathered, ``q/k/v_proj`` column-parallel (each rank computes
  ``H / tp`` heads), ``o_proj`` row-parallel, reduce-scattered back along the sequence;
- dense MLP: ``up`` column-parallel, ``down`` row-parallel. A GLU's fused ``[gate; up]``
  output is gathered before it is split in two (the halves are not sharded alike), so only
  ``down`` runs on a local input there;
- MoE layers: the router and the experts run on the whole (gathered) sequence on every TP
  rank, replicated; expert parallelism shards the experts over the ``ep`` ranks;
- ``lm_head``: column-parallel with the logits left sharded over the vocabulary
  (``Shard(-1)``); :func:`vocab_parallel_loss_sum` computes the cross-entropy from the local
  shard without gathering the logits. In eval mode the logits are gathered (a plain tensor,
  as in one process), so evaluation needs nothing of TP.

Every TP rank of a data-parallel rank sees the same batch. Weights hold their global shapes
as DTensors, so the state dict keeps its names and ``full_tensor()`` gives the one-process
tensors.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist
from torch import nn

from ..constants import IGNORE_INDEX


def tp_plan(config: Any) -> Dict[str, Any]:
    """The tensor-parallel plan of an :class:`~moe_lab.MoEModel` with ``config``: module
    name patterns (``fnmatch``) to DTensor parallel styles."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    seq = Shard(1)  # the residual stream between the modules: sharded along the sequence
    plan: Dict[str, Any] = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq, use_local_output=False),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
        "layers.*.input_norm": SequenceParallel(),
        "layers.*.post_attn_norm": SequenceParallel(),
        # attention(x, cos, sin, attn_mask, kv_cache): gather x along the sequence
        "layers.*.attn": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None),
                                            use_local_output=True),
        "layers.*.attn.q_proj": ColwiseParallel(),
        "layers.*.attn.k_proj": ColwiseParallel(),
        "layers.*.attn.v_proj": ColwiseParallel(),
        "layers.*.attn.o_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
    }
    glu = getattr(config.expert_type, "value", config.expert_type) == "glu"
    for i in range(config.num_layers):
        if config.is_moe_layer(i):
            # moe(h, token_mask) -> (y, info): whole sequence in, sequence-sharded out
            plan[f"layers.{i}.mlp"] = PrepareModuleInputOutput(
                input_layouts=(seq, None), desired_input_layouts=(Replicate(), None), use_local_input=True,
                output_layouts=(Replicate(), None), desired_output_layouts=(seq, None), use_local_output=False,
            )
        else:
            # a GLU splits its fused output in two: keep it a DTensor (gathered by the split)
            plan[f"layers.{i}.mlp.up"] = ColwiseParallel(input_layouts=seq, use_local_output=not glu)
            plan[f"layers.{i}.mlp.down"] = RowwiseParallel(input_layouts=Replicate() if glu else Shard(-1),
                                                           output_layouts=seq, use_local_output=False)
    return plan


def apply_tp(model: nn.Module, tp_mesh: Any, plan: Dict[str, Any]) -> nn.Module:
    """Apply ``plan`` over ``tp_mesh`` to ``model`` in place (a collective). The attention
    modules' head counts become the local ones (``H / tp``): they view their projections as
    ``[B, S, H, Dh]``."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    for layer in getattr(model, "layers", []):
        layer.attn.num_heads //= tp
        layer.attn.num_kv_heads //= tp
    parallelize_module(model, tp_mesh, plan)
    head = getattr(model, "lm_head", None)
    if head is not None:
        head.register_forward_hook(_full_logits_in_eval)
    return model


def _full_logits_in_eval(module: nn.Module, args: Any, out: Any) -> Any:
    """In eval mode the LM head returns the whole logits (gathered over TP), as one process
    does, so evaluation and generation need no vocab-parallel code; in training they stay
    sharded over the vocabulary for :func:`vocab_parallel_loss_sum`."""
    from torch.distributed.tensor import DTensor

    if not module.training and isinstance(out, DTensor):
        return out.full_tensor()
    return out


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward; identity in backward: what follows is computed alike on
    every rank of ``group``, so each rank's gradient is already the whole one."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad, None


def vocab_parallel_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of ``logits[:, :-1]`` against ``labels[:, 1:]``,
    as :func:`moe_lab.training.fast_paths.lm_loss_sum`, for logits that are a DTensor sharded
    over the vocabulary (``Shard(-1)``): each rank works on its ``V / tp`` columns and three
    small all-reduces over the TP group combine them. Other logits go to ``lm_loss_sum``."""
    from torch.distributed.tensor import DTensor

    from ..training.fast_paths import lm_loss_sum

    if not (isinstance(logits_BSV, DTensor) and logits_BSV.placements[0].is_shard(logits_BSV.dim() - 1)):
        return lm_loss_sum(logits_BSV.full_tensor() if isinstance(logits_BSV, DTensor) else logits_BSV, labels_BS)
    group = logits_BSV.device_mesh.get_group()
    local_NV = logits_BSV.to_local()[:, :-1].flatten(0, 1).float()  # [N, V / tp]
    labels_N = labels_BS[:, 1:].flatten()
    v_local = local_NV.shape[-1]
    start = dist.get_rank(group) * v_local  # Shard(-1) of a V divisible by tp: equal slices
    # log-sum-exp over the whole vocabulary: a global max for stability, then the sum of exps
    max_N = local_NV.detach().amax(dim=-1)
    dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
    sum_exp_N = _SumOverGroup.apply((local_NV - max_N.unsqueeze(-1)).exp().sum(dim=-1), group)
    lse_N = sum_exp_N.log() + max_N
    # the target's logit lives on one rank; the others add 0
    valid_N = labels_N != IGNORE_INDEX
    mine_N = valid_N & (labels_N >= start) & (labels_N < start + v_local)
    idx_N = (labels_N - start).clamp(0, v_local - 1)
    target_N = local_NV.gather(1, idx_N.unsqueeze(1)).squeeze(1) * mine_N
    target_N = _SumOverGroup.apply(target_N, group)
    return ((lse_N - target_N) * valid_N).sum()
