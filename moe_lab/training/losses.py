"""Training losses: next-token cross-entropy and the routers' balancing losses, over ranks.

    ce_sum = lm_loss_sum(logits_BSV, labels_BS)                  # summed, fp32
    aux, lb_L, z_L = routing_losses(info, model.config, runtime.all_reduce_sum)

The routers return local statistics (see :mod:`moe_lab.model.routers`). Here, outside the
model's forward, the selection counts and the real-token count are summed over the
data-parallel ranks in one collective, and each rank's share of the global balancing loss
is computed from them: summed over ranks, the shares are the loss of the whole global batch,
so an N-rank step equals the 1-process step on the same global batch. In one process
``all_reduce_sum`` is the identity and the result equals ``info["aux_loss"]``.

Shape letters: B batch, S sequence, V vocab, L MoE layers, E experts.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from ..model.routers import balancing_losses
from .fast_paths import lm_loss_sum

__all__ = ["lm_loss_sum", "routing_losses"]


def routing_losses(
    info: Any, config: Any, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(aux_loss, lb_L, z_L)``: this rank's share of the global weighted aux loss, and the
    unweighted per-layer shares, in the graph (``config`` gives the two coefficients)."""
    counts_LE = info["selection_counts"]
    if counts_LE.numel() == 0:  # no MoE layer
        zero = info["aux_loss"]
        return zero, zero.new_zeros(0), zero.new_zeros(0)
    num_layers, num_experts = counts_LE.shape
    local = torch.cat([counts_LE.detach().reshape(-1).double(), info["num_tokens"].detach().reshape(1).double()])
    total = all_reduce_sum(local).to(info["prob_sums"].device)  # one collective for every layer
    counts_global_LE = total[:-1].view(num_layers, num_experts)
    lb_L, z_L = balancing_losses(info["prob_sums"], counts_global_LE, info["z_sums"], total[-1])
    aux = config.load_balancing_loss_coef * lb_L.sum() + config.router_z_loss_coef * z_L.sum()
    return aux, lb_L, z_L
