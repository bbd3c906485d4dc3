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
  rank, replicated; expert parallelism shards the experts over the ``ep`` ranks. With expert
  tensor parallelism (``tp_plan(config, expert_tp=True)``, ``ParallelDims(expert_tp=True)``)
  the stacked experts are split too, :class:`ExpertTensorParallel`: every expert's ``w_in``
  column-parallel and ``w_out`` row-parallel over the intermediate dim (DTensors), each rank
  computes its partial output and an all-reduce over TP sums them (Megatron's expert TP);
- ``lm_head``: column-parallel with the logits left sharded over the vocabulary
  (``Shard(-1)``); :func:`vocab_parallel_loss_sum` computes the cross-entropy from the local
  shard without gathering the logits. In eval mode the logits are gathered (a plain tensor,
  as in one process), so evaluation needs nothing of TP.

Every TP rank of a data-parallel rank sees the same batch; a stream that gives each worker
its own batches (Ray Data) goes through :class:`TPSharedStream`, which joins the TP ranks'
shares into that one batch (:func:`gather_batch`). Weights hold their global shapes
as DTensors, so the state dict keeps its names and ``full_tensor()`` gives the one-process
tensors.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from ..constants import IGNORE_INDEX


def tp_plan(config: Any, expert_tp: bool = False) -> Dict[str, Any]:
    """The tensor-parallel plan of an :class:`~moe_lab.MoEModel` with ``config``: module
    name patterns (``fnmatch``) to DTensor parallel styles. ``expert_tp``: split every
    MoE layer's experts over TP too (:class:`ExpertTensorParallel`)."""
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
            if expert_tp:
                plan[f"layers.{i}.mlp.experts"] = ExpertTensorParallel()
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


class _CopyToGroup(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) in backward: the input feeds every rank's piece
    of a split computation, so its gradient is the sum of the pieces' gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class ExpertTensorParallel(ParallelStyle):
    """Expert tensor parallelism for a :class:`~moe_lab.model.experts.GroupedExperts` (a plan
    style, as ``ColwiseParallel``): every expert's FFN is split over the TP ranks along the
    intermediate dim I.

    - ``w_in`` ``[E, I_in, D]`` is column-parallel: FFN ``Shard(1)``; a GLU's fused
      ``[gate; up]`` rows ``_StridedShard(1, split_factor=2)``, so rank r holds gate rows and
      up rows of the same slice of I (``[gate_r; up_r]``, which the module splits in two as
      the whole weight);
    - ``w_out`` ``[E, D, I]`` is row-parallel: ``Shard(2)``;
    - the module's input (every rank's whole dispatched rows ``[N, D]``) enters by an identity
      whose backward sums the input gradient over TP, and its partial output ``[N, D]`` is
      summed over TP (an all-reduce) before the combine; everything around stays replicated.

    The weights are DTensors with their global shapes, so the state dict, ``full_tensor()``,
    the gradient norm (buckets by split dims) and optimizer-state loading see them as every
    other TP weight; the module multiplies by the local pieces (``GroupedExperts.local_weights``).
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        glu = getattr(module.expert_type, "value", module.expert_type) == "glu"
        placements = {"w_in": _StridedShard(1, split_factor=2) if glu else Shard(1), "w_out": Shard(2)}
        for name, placement in placements.items():
            w = getattr(module, name)
            module.register_parameter(name, nn.Parameter(distribute_tensor(
                w.data, device_mesh, [placement], src_data_rank=getattr(self, "src_data_rank", 0))))
        group = device_mesh.get_group()
        module.register_forward_pre_hook(lambda m, args: (_CopyToGroup.apply(args[0], group), *args[1:]))
        module.register_forward_hook(lambda m, args, out: _SumOverGroup.apply(out, group))
        return module


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


#: what pads each column of a micro-batch (columns not named here pad with 0)
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def gather_batch(batch: Dict[str, torch.Tensor], group: Any, pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """The micro-batches of every rank of ``group`` joined along the rows, in rank order: the
    same batch on every rank (a collective over ``group``). Each rank's ``[B, S_r]`` tensors
    (``input_ids``, ``attention_mask``, ``labels``, ...) are right-padded to the longest
    ``S`` of the group first: ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0,
    ``labels`` with -100, so the padding is masked out of attention and loss. Every rank
    must pass the same columns with the same number of rows."""
    from ..errors import DistributedError

    keys = sorted(batch)
    rows, seq = batch[keys[0]].shape[0], batch[keys[0]].shape[-1]
    nccl = dist.get_backend(group) == "nccl"  # NCCL moves only CUDA tensors
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    shape = torch.tensor([rows, seq, len(keys)], device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(int(s[0]) != rows or int(s[2]) != len(keys) for s in shapes):
        raise DistributedError(f"the ranks of a group must share micro-batches of the same rows and columns; got "
                               f"[rows, length, columns] {[s.tolist() for s in shapes]}")
    longest = max(int(s[1]) for s in shapes)
    out = {}
    for key in keys:
        t_BS = batch[key]
        if t_BS.dim() != 2 or t_BS.shape != (rows, seq):
            raise DistributedError(f"micro-batch column {key!r} has shape {tuple(t_BS.shape)}, "
                                   f"expected [{rows}, {seq}]")
        pad = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        t_BS = torch.nn.functional.pad(t_BS, (0, longest - seq), value=pad).to(device).contiguous()
        parts = [torch.empty_like(t_BS) for _ in shapes]
        dist.all_gather(parts, t_BS, group=group)
        out[key] = torch.cat(parts, dim=0).to(batch[key].device)  # [B * group size, longest]
    return out


class TPSharedStream:
    """A :class:`~moe_lab.training.batches.BatchStream` for tensor parallelism over a stream that
    gives every worker its own batches (Ray Data): each TP rank reads ``1 / tp`` of its replica's
    micro-batch from ``stream`` and :func:`gather_batch` joins them, so the TP ranks of a
    replica train on the same batch and no worker's share of the stream is skipped.

    ``bind(group)`` gives it the TP group once the mesh exists (before the first epoch)."""

    def __init__(self, stream: Any, pad_token_id: int = 0) -> None:
        self.stream = stream
        self.pad_token_id = pad_token_id
        self.group: Any = None

    def bind(self, group: Any) -> "TPSharedStream":
        self.group = group
        return self

    def iter_epoch(self, epoch: int) -> Any:
        from ..errors import DistributedError

        if self.group is None:
            raise DistributedError("TPSharedStream needs its TP group: call bind(group) before training")
        for batch in self.stream.iter_epoch(epoch):
            yield gather_batch(batch, self.group, self.pad_token_id)
