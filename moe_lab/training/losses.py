"""Training losses: next-token cross-entropy and the routers' balancing losses, over ranks.

    ce_sum = lm_loss_sum(logits_BSV, labels_BS)                    # summed, fp32
    aux, lb_L, z_L = routing_losses(info, model.config, runtime.all_reduce_sum, totals)

The routers return local statistics (see :mod:`moe_lab.model.routers`). Here, outside the
model's forward, the statistics are summed over the data-parallel ranks in one collective,
and each micro-batch gets its *share of the step's* aux loss: summed over the micro-batches
of a step and over the ranks, the shares are the aux loss of the whole step, so an N-rank
step equals the 1-process step on the same global batch. ``totals`` (:class:`StepTotals`)
says what the step holds; without it a call is a step of one micro-batch.

``config.load_balancing_scope`` says what one balancing-loss value averages over (the
Switch loss ``E * sum_i f_i * P_i``, with ``f`` the share of selections and ``P`` the mean
router probability of each expert):

- ``micro_batch`` (Switch, Megatron-Core): ``f`` and ``P`` of each micro-batch (over ranks);
  the step's loss is the token-weighted mean of the micro-batch values.
- ``sequence`` (DeepSeek-V3's sequence-wise loss): ``f`` and ``P`` of each sequence; the
  step's loss is the mean over all its sequences.
- ``global_batch`` (Qwen): ``f`` over every micro-batch and rank of the step, ``P`` over all
  its tokens. With gradient accumulation the selection counts of the whole step are needed
  before the first backward: the step runs a forward without gradients over its micro-batches
  first (:func:`moe_lab.training.step.train_step`; about a third more compute at A > 1).

With ``sequence`` and ``global_batch`` scopes, accumulation over A micro-batches equals one
batch A times larger for every loss; the z-loss (mean over tokens) is exact in every scope.
In one process ``all_reduce_sum`` is the identity and a single micro-batch's result equals
``info["aux_loss"]`` for the ``micro_batch`` scope.

Shape letters: B batch, S sequence, V vocab, L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ..model.routers import balancing_losses, update_expert_bias
from .fast_paths import lm_loss_sum

__all__ = ["StepTotals", "lm_loss_sum", "routing_losses", "update_router_biases"]


@dataclass
class StepTotals:
    """What an optimizer step holds, over its micro-batches and all ranks."""

    real_tokens: float  #: real (non-padding) tokens
    sequences: float  #: sequences with at least one real token
    #: [L, E] selections before capacity (``global_batch`` scope with accumulation: the pre-pass)
    selection_counts_LE: Optional[torch.Tensor] = None


def routing_losses(
    info: Any,
    config: Any,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    totals: Optional[StepTotals] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(aux_share, lb_share_L, z_share_L)``: this rank's and micro-batch's share of the step's
    weighted aux loss, and of each layer's unweighted losses, in the graph."""
    counts_LE = info["selection_counts"]
    if counts_LE.numel() == 0:  # no MoE layer
        zero = info["aux_loss"]
        return zero, zero.new_zeros(0), zero.new_zeros(0)
    num_layers, num_experts = counts_LE.shape
    scope = getattr(config, "load_balancing_scope", "micro_batch")
    dev = info["prob_sums"].device
    seq_tokens = info.get("seq_num_tokens")
    num_seqs = (seq_tokens > 0).sum() if seq_tokens is not None else torch.zeros((), device=dev)
    local = torch.cat([counts_LE.detach().reshape(-1).double(), info["num_tokens"].detach().reshape(1).double(),
                       num_seqs.detach().reshape(1).double().to(counts_LE.device)])
    total = all_reduce_sum(local).to(dev)  # one collective for every layer and statistic
    counts_mb_LE, tokens_mb, seqs_mb = total[:-2].view(num_layers, num_experts), total[-2], total[-1]
    tokens_step = torch.as_tensor(totals.real_tokens if totals else tokens_mb, dtype=torch.float64, device=dev)
    _, z_L = balancing_losses(info["prob_sums"], counts_mb_LE, info["z_sums"], tokens_step)  # z over the step's tokens
    if scope == "sequence":
        lb_L = _sequence_losses(info, seqs_mb if totals is None else totals.sequences)
    elif scope == "global_batch":
        counts = totals.selection_counts_LE if totals is not None and totals.selection_counts_LE is not None else counts_mb_LE
        lb_L, _ = balancing_losses(info["prob_sums"], counts.to(dev), info["z_sums"], tokens_step)
    else:  # micro_batch: the micro-batch's value, weighted by its share of the step's tokens
        lb_L, _ = balancing_losses(info["prob_sums"], counts_mb_LE, info["z_sums"], tokens_step)
    aux = config.load_balancing_loss_coef * lb_L.sum() + config.router_z_loss_coef * z_L.sum()
    return aux, lb_L, z_L


def _sequence_losses(info: Any, sequences_step: Any) -> torch.Tensor:
    """Sum over this micro-batch's sequences of each sequence's Switch loss, over the step's
    sequence count: [L]. A padding-only sequence counts for nothing."""
    probs_LBE = info["seq_prob_sums"]  # [L, B, E], in the graph
    counts_LBE = info["seq_selection_counts"].to(probs_LBE.dtype)
    n_B = info["seq_num_tokens"].to(probs_LBE.dtype)  # [B]
    f_LBE = counts_LBE / counts_LBE.sum(dim=-1, keepdim=True).clamp(min=1)
    p_LBE = probs_LBE / n_B.clamp(min=1).view(1, -1, 1)
    per_seq_LB = probs_LBE.shape[-1] * (f_LBE * p_LBE).sum(dim=-1)
    return per_seq_LB.sum(dim=-1) / torch.as_tensor(sequences_step, dtype=probs_LBE.dtype).clamp(min=1)


@torch.no_grad()
def update_router_biases(model: Any, selection_counts_LE: torch.Tensor) -> None:
    """After an optimizer step: move every aux-loss-free router bias towards balance, from the
    step's global expert load ``[L, E]`` (the same on every rank)."""
    for layer, moe in enumerate(getattr(model, "moe_layers", [])):
        update_expert_bias(moe.router, selection_counts_LE[layer])
