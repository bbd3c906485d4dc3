"""One optimizer step, the same for every launcher: ``train_step``.

    settings = StepSettings(device=torch.device("cpu"), max_grad_norm=1.0)
    stats = train_step(model, optimizer, micro_batches, runtime, scheduler=scheduler, settings=settings)
    stats.loss_share, stats.grad_norm, stats.expert_counts_LE

What one step does:
1. count the label tokens and real tokens of all ``micro_batches`` (this rank's slices of
   the step's global micro-batches), summed over ranks;
2. per micro-batch: ``loss = CE_sum / labels_total + aux_share * real_mb / real_total`` under
   autocast, backward. ``aux_share`` is this rank's share of the micro-batch's global aux loss
   (:func:`moe_lab.training.losses.routing_losses`). The sum over micro-batches and ranks is
   the loss of the whole step, so accumulation and data parallelism are exact for the LM
   loss and the z-loss; the load-balancing loss uses each micro-batch's routing statistics,
   summed over ranks, as in Megatron-Core (with accumulation it is the token-weighted mean of
   the micro-batch values);
3. sync gradients (a no-op in one process), clip, step the optimizer and the LR schedule.

Statistics stay on the device during the step and come back to the host once, at the end,
so the GPU never waits for Python between micro-batches. Distributed runs differ only in the
``runtime`` (:class:`moe_lab.training.runtime.Runtime`) they hand in.

Shape letters: L MoE layers, E experts, A micro-batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..constants import IGNORE_INDEX
from .fast_paths import lm_loss_sum
from .losses import routing_losses
from .runtime import Runtime


@dataclass
class StepSettings:
    """How a step runs: device, precision, clipping and the (possibly compiled) loss."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None  #: autocast dtype; None: no autocast
    scaler: Optional[Any] = None  #: a GradScaler (fp16 autocast)
    max_grad_norm: Optional[float] = 1.0
    loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss_sum

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


@dataclass
class StepStats:
    """What one step measured (host values; summed over ranks where noted)."""

    loss_share: float  #: this rank's share of the step loss (sums over ranks to the loss)
    ce_sum: float  #: this rank's summed cross-entropy
    labels_total: float  #: label tokens of the step, all ranks
    real_total: float  #: real tokens of the step, all ranks
    grad_norm: float  #: global gradient norm before clipping
    #: [3, L]: this rank's shares of load-balancing loss, z-loss and dropped fraction
    layer_stats_3L: Optional[torch.Tensor] = None
    expert_counts_LE: Optional[torch.Tensor] = None  #: this rank's tokens per expert


def token_counts(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[labels, real tokens]`` of one micro-batch (float64, host)."""
    labels = batch["labels"][:, 1:]
    return torch.tensor(
        [float((labels != IGNORE_INDEX).sum()), float(batch["attention_mask"].sum())], dtype=torch.float64
    )


def forward_loss(
    model: nn.Module,
    batch: Dict[str, torch.Tensor],
    labels_total: float,
    aux_weight: float,
    settings: StepSettings,
    runtime: Optional[Runtime] = None,
) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    """This rank's share of the step loss for one micro-batch: ``(loss, routing_info, ce_sum)``.

    ``aux_weight`` is the micro-batch's share of the step's real tokens (over all ranks).
    ``routing_info`` gains ``aux_share``, ``lb_share_L`` and ``z_share_L``: this rank's shares
    of the micro-batch's global aux losses.
    """
    runtime = runtime or Runtime()
    dev = settings.device
    ids = batch["input_ids"].to(dev, non_blocking=True)
    mask = batch["attention_mask"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    with settings.autocast():
        logits, info = model(ids, attention_mask=mask, return_routing_info=True)
    ce_sum = settings.loss_sum_fn(logits, labels)
    aux, lb_L, z_L = routing_losses(info, model.config, runtime.all_reduce_sum)
    info["aux_share"], info["lb_share_L"], info["z_share_L"] = aux, lb_L, z_L
    loss = ce_sum / max(labels_total, 1.0) + aux * aux_weight
    return loss, info, ce_sum.detach()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: List[Dict[str, torch.Tensor]],
    runtime: Optional[Runtime] = None,
    *,
    scheduler: Any = None,
    settings: Optional[StepSettings] = None,
) -> StepStats:
    """Forward/backward over ``micro_batches``, sync, clip, step. See the module docstring."""
    runtime = runtime or Runtime()
    settings = settings or StepSettings()
    counts_A2 = torch.stack([token_counts(b) for b in micro_batches])  # labels, real tokens
    global_A2 = runtime.all_reduce_sum(counts_A2)
    labels_total = float(global_A2[:, 0].sum())
    real_total = float(global_A2[:, 1].sum())
    losses, ce_sums, layer_stats, expert_counts = [], [], [], []
    model.train()
    for a, batch in enumerate(micro_batches):
        w_global = float(global_A2[a, 1]) / max(real_total, 1.0)
        loss, info, ce_sum = forward_loss(model, batch, labels_total, w_global, settings, runtime)
        if settings.scaler is not None:
            settings.scaler.scale(loss).backward()
        else:
            loss.backward()
        losses.append(loss.detach().float())
        ce_sums.append(ce_sum.float())
        # per-layer health as this rank's share of the step value (summing over ranks gives it):
        # lb/z are already global shares of their micro-batch; dropped is a local fraction
        w_local = float(counts_A2[a, 1]) / max(real_total, 1.0)
        layer_stats.append(torch.stack([
            info["lb_share_L"].detach().float() * w_global,
            info["z_share_L"].detach().float() * w_global,
            info["dropped_fraction"].detach().float() * w_local,
        ]))
        expert_counts.append(info["expert_counts"].detach())
    runtime.sync_gradients(model)
    if settings.scaler is not None:
        settings.scaler.unscale_(optimizer)
    grad_norm = runtime.clip_grad_norm(model, settings.max_grad_norm)
    if settings.scaler is not None:
        settings.scaler.step(optimizer)
        settings.scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # one device-to-host copy for all the step's statistics
    scalars = torch.stack([torch.stack(losses).sum(), torch.stack(ce_sums).sum(), grad_norm.float().to(losses[0].device)])
    scalars = scalars.double().cpu()
    stats = StepStats(float(scalars[0]), float(scalars[1]), labels_total, real_total, float(scalars[2]))
    if expert_counts and expert_counts[0].numel():
        stats.layer_stats_3L = torch.stack(layer_stats).sum(0).cpu()
        stats.expert_counts_LE = torch.stack(expert_counts).sum(0).cpu()
    return stats
