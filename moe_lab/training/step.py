"""One optimizer step, the same for every launcher: ``train_step``.

    settings = StepSettings(device=torch.device("cpu"), max_grad_norm=1.0)
    stats = train_step(model, optimizer, micro_batches, runtime, scheduler=scheduler, settings=settings)
    stats.loss_share, stats.grad_norm, stats.expert_counts_LE

What one step does:
1. count the label tokens, real tokens and sequences of all ``micro_batches`` (this rank's
   slices of the step's global micro-batches), summed over ranks; with the ``global_batch``
   balancing scope and more than one micro-batch, also route every micro-batch once without
   gradients to get the step's expert selections (the RNG is replayed, so the real forwards
   route the same way);
2. per micro-batch: ``loss = CE_sum / labels_total + aux_share`` under autocast, backward.
   ``aux_share`` is this rank's and micro-batch's share of the step's aux loss
   (:func:`moe_lab.training.losses.routing_losses`). The sum over micro-batches and ranks is
   the loss of the whole step, so accumulation and data parallelism are exact for the LM
   loss and the z-loss, and for the balancing loss in the ``sequence`` and ``global_batch``
   scopes (in the ``micro_batch`` scope, as in Megatron-Core, it is the token-weighted mean
   of the micro-batch values). Under pipeline parallelism the runtime's pipeline runs this
   through its schedule instead (``runtime.pipeline.forward_backward``, the same losses,
   see :mod:`moe_lab.parallel.pipeline`);
3. sync gradients (a no-op in one process), clip, step the optimizer and the LR schedule;
   then move the aux-loss-free router biases, if any, by the step's global expert load.

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
from .losses import StepTotals, routing_losses, update_router_biases
from .runtime import Runtime


@dataclass
class StepSettings:
    """How a step runs: device, precision, clipping and the (possibly compiled) loss."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None  #: autocast dtype; None: no autocast
    scaler: Optional[Any] = None  #: a GradScaler (fp16 autocast)
    max_grad_norm: Optional[float] = 1.0
    loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss_sum
    #: a loss that applies the LM head itself, ``fn(h_BSD, lm_head_weight_VD, labels_BS) -> CE sum``
    #: (the chunked linear + cross-entropy of the GPU fast path); None: logits + ``loss_sum_fn``
    head_loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    #: the layers replay as CUDA graphs (``apply_fast_paths(cuda_graphs=True)``): each
    #: micro-batch starts a cudagraph-trees step, and gradients stay allocated (zeroed in place)
    cuda_graphs: bool = False

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
    """``[labels, real tokens, sequences with a real token]`` of one micro-batch (float64, host)."""
    labels = batch["labels"][:, 1:]
    mask = batch["attention_mask"]
    return torch.tensor(
        [float((labels != IGNORE_INDEX).sum()), float(mask.sum()), float((mask.sum(dim=-1) > 0).sum())],
        dtype=torch.float64,
    )


def _inputs(batch: Dict[str, torch.Tensor], settings: StepSettings) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = settings.device
    return (batch["input_ids"].to(dev, non_blocking=True), batch["attention_mask"].to(dev, non_blocking=True),
            batch["labels"].to(dev, non_blocking=True))


def forward_loss(
    model: nn.Module,
    batch: Dict[str, torch.Tensor],
    labels_total: float,
    settings: StepSettings,
    runtime: Optional[Runtime] = None,
    totals: Optional[StepTotals] = None,
) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
    """This rank's share of the step loss for one micro-batch: ``(loss, routing_info, ce_sum)``.

    ``totals`` describes the step (None: a step of this one micro-batch). ``routing_info``
    gains ``aux_share``, ``lb_share_L`` and ``z_share_L``: this rank's and micro-batch's shares
    of the step's aux losses.
    """
    runtime = runtime or Runtime()
    ids, mask, labels = _inputs(batch, settings)
    with settings.autocast():
        if settings.head_loss_fn is not None:  # the LM head inside the loss: no logits tensor
            h_BSD, info = model(ids, attention_mask=mask, return_routing_info=True, return_hidden_states=True)
            ce_sum = settings.head_loss_fn(h_BSD, model.lm_head.weight, labels)
        else:
            logits, info = model(ids, attention_mask=mask, return_routing_info=True)
    if settings.head_loss_fn is None:
        ce_sum = settings.loss_sum_fn(logits, labels)
    aux, lb_L, z_L = routing_losses(info, model.config, runtime.all_reduce_sum, totals)
    info["aux_share"], info["lb_share_L"], info["z_share_L"] = aux, lb_L, z_L
    loss = ce_sum / max(labels_total, 1.0) + aux
    return loss, info, ce_sum.detach()


@torch.no_grad()
def step_selection_counts(
    model: nn.Module, micro_batches: List[Dict[str, torch.Tensor]], settings: StepSettings, runtime: Runtime
) -> torch.Tensor:
    """The step's expert selections ``[L, E]`` (before capacity; all micro-batches, all ranks),
    from forwards without gradients. The RNG state is restored afterwards, so that the real
    forwards draw the same jitter and dropout and route the same way."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    total = None
    for batch in micro_batches:
        ids, mask, _ = _inputs(batch, settings)
        with settings.autocast():
            _, info = model(ids, attention_mask=mask, return_routing_info=True)
        counts = info["selection_counts"].detach().double()
        total = counts if total is None else total + counts
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    return runtime.all_reduce_sum(total)


def _forward_backward(
    model: nn.Module,
    micro_batches: List[Dict[str, torch.Tensor]],
    counts_A3: torch.Tensor,
    labels_total: float,
    real_total: float,
    totals: StepTotals,
    settings: StepSettings,
    runtime: Runtime,
) -> Tuple[list, list, list, list, list]:
    """Forward and backward of every micro-batch in turn; per micro-batch: its loss, CE sum,
    ``[3, L]`` layer statistics (this rank's shares), ``[L, E]`` expert counts and selections."""
    losses, ce_sums, layer_stats, expert_counts, selections = [], [], [], [], []
    for a, batch in enumerate(micro_batches):
        if settings.cuda_graphs:  # the previous micro-batch's graph outputs are consumed: replay over them
            torch.compiler.cudagraph_mark_step_begin()
        loss, info, ce_sum = forward_loss(model, batch, labels_total, settings, runtime, totals)
        if settings.scaler is not None:
            settings.scaler.scale(loss).backward()
        else:
            loss.backward()
        losses.append(loss.detach().float())
        ce_sums.append(ce_sum.float())
        # per-layer health as this rank's share of the step value (summing over ranks gives it):
        # lb/z are already global shares of their micro-batch; dropped is a local fraction
        w_local = float(counts_A3[a, 1]) / max(real_total, 1.0)
        layer_stats.append(torch.stack([
            info["lb_share_L"].detach().float(),
            info["z_share_L"].detach().float(),
            info["dropped_fraction"].detach().float() * w_local,
        ]))
        expert_counts.append(info["expert_counts"].detach())
        selections.append(info["selection_counts"].detach())
    return losses, ce_sums, layer_stats, expert_counts, selections


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
    counts_A3 = torch.stack([token_counts(b) for b in micro_batches])  # labels, real tokens, sequences
    global_A3 = runtime.all_reduce_sum(counts_A3)
    labels_total = float(global_A3[:, 0].sum())
    real_total = float(global_A3[:, 1].sum())
    model.train()
    totals = StepTotals(real_tokens=real_total, sequences=float(global_A3[:, 2].sum()))
    scope = getattr(getattr(model, "config", None), "load_balancing_scope", "micro_batch")
    if scope == "global_batch" and len(micro_batches) > 1:
        totals.selection_counts_LE = step_selection_counts(model, micro_batches, settings, runtime)
    if settings.cuda_graphs:
        _allocate_grads(model)
    pipeline = getattr(runtime, "pipeline", None)
    if pipeline is not None:  # pipeline stages: the schedule runs the micro-batches
        parts = pipeline.forward_backward(model, micro_batches, labels_total, real_total, totals, settings, runtime)
    else:
        parts = _forward_backward(model, micro_batches, counts_A3, labels_total, real_total, totals, settings, runtime)
    losses, ce_sums, layer_stats, expert_counts, selections = parts
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
    optimizer.zero_grad(set_to_none=not settings.cuda_graphs)
    if selections and selections[0].numel() and _has_expert_bias(model):
        load_LE = totals.selection_counts_LE if totals.selection_counts_LE is not None else None
        if load_LE is None:
            load_LE = runtime.all_reduce_sum(torch.stack(selections).sum(0).double())
        update_router_biases(model, load_LE)
    # one device-to-host copy for all the step's statistics
    scalars = torch.stack([torch.stack(losses).sum(), torch.stack(ce_sums).sum(), grad_norm.float().to(losses[0].device)])
    scalars = scalars.double().cpu()
    stats = StepStats(float(scalars[0]), float(scalars[1]), labels_total, real_total, float(scalars[2]))
    if expert_counts and expert_counts[0].numel():
        stats.layer_stats_3L = torch.stack(layer_stats).sum(0).cpu()
        stats.expert_counts_LE = torch.stack(expert_counts).sum(0).cpu()
    return stats


def _allocate_grads(model: nn.Module) -> None:
    """Give every trainable parameter a zero gradient where it has none, so that backward adds
    into it in place. Under CUDA graphs a backward graph's output is memory the next replay
    overwrites; a parameter whose ``.grad`` were that output would lose the earlier
    micro-batches' gradients (and cudagraph trees raise when they are read)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _has_expert_bias(model: nn.Module) -> bool:
    return any(getattr(moe.router, "expert_bias", None) is not None for moe in getattr(model, "moe_layers", []))
