"""Optimizer and learning-rate schedule: the defaults, and how a user's choice is built.

    opt = default_optimizer(model, lr=3e-4, weight_decay=0.01)           # AdamW, no decay on norms
    sched = LambdaLR(opt, warmup_cosine(warmup_steps=100, total_steps=1000, min_lr_ratio=0.1))

:class:`~moe_lab.MoETrainer` (and :class:`~moe_lab.DistributedMoETrainer`) take an optimizer
as any of:

- ``None``: :func:`default_optimizer` with the trainer's ``learning_rate``, ``weight_decay``
  and Adam settings;
- an instance, built on the model's parameters (used as is);
- a class, e.g. ``torch.optim.SGD``: built as ``cls(param_groups, lr=learning_rate)`` with the
  default groups (:func:`default_param_groups`: no weight decay on norms, biases, embeddings);
- a factory: any other callable, called as ``factory(model.parameters())``, for example
  ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``.

and a scheduler as ``None`` (linear warmup, then cosine decay to ``min_lr_ratio``), an
instance built on that optimizer, or a class/factory called as ``factory(optimizer)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from ..errors import ConfigError

OptimizerSpec = Any  #: None | Optimizer | type[Optimizer] | Callable[[Iterable[Parameter]], Optimizer]
SchedulerSpec = Any  #: None | LRScheduler | Callable[[Optimizer], LRScheduler]


def default_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two groups: weight decay on matrices, none on norms, biases and embeddings."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or "embed_tokens" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over :func:`default_param_groups` (fused on CUDA)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        default_param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=on_cuda or None
    )


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _is_optimizer_class(spec: Any) -> bool:
    return isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer)


def check_optimizer_spec(spec: OptimizerSpec) -> None:
    """ConfigError unless ``spec`` is None, an Optimizer, an Optimizer class or a callable."""
    if spec is None or isinstance(spec, torch.optim.Optimizer) or callable(spec):
        return
    raise ConfigError(
        f"optimizer must be a torch.optim.Optimizer, an Optimizer class or a factory "
        f"callable(params) -> Optimizer; got {type(spec).__name__}"
    )


def check_scheduler_spec(spec: SchedulerSpec, optimizer: OptimizerSpec = None) -> None:
    """ConfigError unless ``spec`` is None, an LRScheduler (on ``optimizer`` when that is an
    instance) or a callable ``factory(optimizer)``."""
    if spec is None:
        return
    if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
        if isinstance(optimizer, torch.optim.Optimizer) and spec.optimizer is not optimizer:
            raise ConfigError("scheduler was built on a different optimizer than the one passed as optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                "a scheduler instance needs its optimizer instance: pass optimizer=scheduler.optimizer, "
                "or pass the scheduler as a factory (callable(optimizer) -> scheduler)"
            )
        return
    if callable(spec) and not isinstance(spec, torch.optim.Optimizer):
        return
    raise ConfigError(
        f"scheduler must be an LRScheduler or a factory callable(optimizer) -> LRScheduler; got {type(spec).__name__}"
    )


def build_optimizer(
    spec: OptimizerSpec,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer a spec asks for (see the module docstring)."""
    check_optimizer_spec(spec)
    if spec is None:
        return default_optimizer(model, lr, weight_decay, betas, eps)
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if _is_optimizer_class(spec):
        return spec(default_param_groups(model, weight_decay), lr=lr)
    opt = spec(model.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"the optimizer factory returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def build_scheduler(
    spec: SchedulerSpec, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> Any:
    """The LR scheduler a spec asks for (see the module docstring)."""
    if spec is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))
    if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
        return spec
    sched = spec(optimizer)
    if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
        raise ConfigError(f"the scheduler factory returned a {type(sched).__name__}, not an LR scheduler")
    return sched
