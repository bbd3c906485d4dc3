"""Optimizer, scheduler and trainer state: saved by parameter name, restored at any layout.

    tensors, meta = optimizer_state_by_name(model, optimizer)    # what a save writes
    state = read_training_state("ckpt/")                          # TrainingState (nothing applied yet)
    state.apply(model, optimizer, scheduler, expert_slices=None)  # restore into live objects
    state.trainer_state["global_step"]

Files: ``optimizer.safetensors`` (tensors keyed ``"{param_name}::{key}"``, e.g.
``layers.0.mlp.experts.w_in::exp_avg``) + ``optimizer.json`` (param groups, scalars, the
optimizer class), ``scheduler.json`` (the LR scheduler's ``state_dict`` without its
lambdas) and ``trainer_state.json`` (step, epoch, data position, RNG states, metrics).
Keys by name make the state independent of the parameter order and of expert
parallelism: ``expert_slices`` picks the rows of a sharded parameter that a rank holds, and
the state of a DTensor parameter (FSDP2, TP) is cut to the rank's piece on load, so a
checkpoint saved at any layout resumes at any other.
A legacy ``optimizer.pt`` is read with ``torch.load(weights_only=True)``; a pickle that
needs more than tensors is refused, never executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from .files import LEGACY_OPTIMIZER, OPTIMIZER_META, OPTIMIZER_TENSORS, SCHEDULER_NAME, TRAINER_STATE, read_json_object
from .weights import LazyWeights


def optimizer_state_by_name(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensor_fn: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split the optimizer state into tensors keyed ``"{param_name}::{key}"`` and JSON metadata.

    ``tensor_fn(param_name, tensor)`` turns each state tensor into what is saved (default: a
    contiguous CPU copy; a distributed runtime passes one that gathers the full tensor, a
    collective, which is why parameters and keys are visited in sorted order on every rank)."""
    names = {id(p): n for n, p in model.named_parameters()}
    to_saved = tensor_fn or (lambda _name, t: t.detach().to("cpu").contiguous())
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        for key, val in sorted((optimizer.state.get(p) or {}).items()):
            if isinstance(val, torch.Tensor):
                tensors[f"{name}::{key}"] = to_saved(name, val)
            else:
                scalars.setdefault(name, {})[key] = val
    groups = []
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Dict[str, Any],
    expert_slices: Optional[Dict[str, slice]] = None,
) -> None:
    """Inverse of :func:`optimizer_state_by_name`. ``expert_slices`` maps a sharded parameter's
    name to the rows of the full tensor that this rank holds. The saved tensors are full; for
    a DTensor parameter (FSDP2, TP) each becomes a DTensor of the parameter's mesh and
    placements, this rank's piece cut locally (every rank holds the whole tensor: no
    communication), which is what the optimizer's update needs beside a DTensor parameter."""
    params = dict(model.named_parameters())
    saved_class = meta.get("class")
    if saved_class is not None and saved_class != type(optimizer).__name__:
        raise CheckpointError(
            f"the checkpoint holds {saved_class} state but the optimizer is {type(optimizer).__name__}; "
            f"pass an optimizer of the same class"
        )
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"optimizer has {len(optimizer.param_groups)} param groups, checkpoint has {len(meta['param_groups'])}"
        )
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if k == "betas" else v
    by_param: Dict[str, list] = {}
    for key in tensors:
        name, sep, _ = key.rpartition("::")
        if sep:
            by_param.setdefault(name, []).append(key)
    for name, p in params.items():
        state: Dict[str, Any] = dict(meta.get("scalars", {}).get(name, {}))
        prefix = f"{name}::"
        for key in by_param.get(name, []):
            t = tensors[key]
            if t.dim() > 0:
                if expert_slices and name in expert_slices and t.shape[0] != p.shape[0]:
                    t = t[expert_slices[name]]  # this rank's experts [E/ep, ...]
                t = _placed_like(key, t.to(p.device), p)
            state[key[len(prefix) :]] = t
        if state:
            optimizer.state[p] = state


def _placed_like(key: str, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (a full state tensor) laid out as the parameter ``p``: a DTensor with ``p``'s mesh
    and placements when ``p`` is one (each rank keeps its own piece), else ``t`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        return t
    if tuple(t.shape) != tuple(p.shape):
        raise CheckpointError(f"optimizer state {key} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
    return distribute_tensor(t.contiguous(), p.device_mesh, p.placements, src_data_rank=None)


def scheduler_state_json(scheduler: Any) -> Dict[str, Any]:
    """A scheduler's ``state_dict`` as JSON (its lambdas are code and are rebuilt, not saved)."""
    state = scheduler.state_dict()
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


@dataclass
class TrainingState:
    """What a checkpoint holds besides the weights (every part None/empty when absent)."""

    trainer_state: Dict[str, Any] = field(default_factory=dict)  #: trainer_state.json
    optimizer_tensors: Optional[Mapping[str, torch.Tensor]] = None  #: optimizer.safetensors (read lazily)
    optimizer_meta: Optional[Dict[str, Any]] = None  #: optimizer.json
    scheduler: Optional[Dict[str, Any]] = None  #: scheduler.json
    legacy_optimizer: Optional[Path] = None  #: an old optimizer.pt (tensors only)

    @property
    def has_optimizer(self) -> bool:
        return self.optimizer_tensors is not None or self.legacy_optimizer is not None

    def apply(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Any = None,
        expert_slices: Optional[Dict[str, slice]] = None,
    ) -> None:
        """Load the optimizer and scheduler state (when saved) into live objects."""
        if optimizer is not None and self.optimizer_tensors is not None:
            if self.optimizer_meta is None:
                raise CheckpointError(f"the checkpoint has {OPTIMIZER_TENSORS} but no {OPTIMIZER_META}")
            load_optimizer_state(model, optimizer, self.optimizer_tensors, self.optimizer_meta, expert_slices)
        elif optimizer is not None and self.legacy_optimizer is not None:
            try:
                state = torch.load(self.legacy_optimizer, map_location="cpu", weights_only=True)
            except Exception as exc:  # an unsafe or corrupt pickle: refused, never executed
                raise CheckpointError(f"cannot read {self.legacy_optimizer} as weights only: {exc}") from None
            optimizer.load_state_dict(state)
        if scheduler is not None and self.scheduler is not None:
            state = dict(self.scheduler)
            state["lr_lambdas"] = [None] * len(getattr(scheduler, "lr_lambdas", [None]))
            scheduler.load_state_dict(state)


def read_training_state(directory: str | os.PathLike) -> TrainingState:
    """The training state files of a checkpoint directory (headers checked, tensors not read)."""
    d = Path(directory)
    state = TrainingState()
    if (d / TRAINER_STATE).is_file():
        state.trainer_state = read_json_object(d / TRAINER_STATE)
    if (d / OPTIMIZER_TENSORS).is_file():
        state.optimizer_tensors = LazyWeights.from_files([d / OPTIMIZER_TENSORS])
        state.optimizer_meta = read_json_object(d / OPTIMIZER_META) if (d / OPTIMIZER_META).is_file() else None
    elif (d / LEGACY_OPTIMIZER).is_file():
        state.legacy_optimizer = d / LEGACY_OPTIMIZER
    if (d / SCHEDULER_NAME).is_file():
        state.scheduler = read_json_object(d / SCHEDULER_NAME)
    return state


def load_training_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    expert_slices: Optional[Dict[str, slice]] = None,
) -> Dict[str, Any]:
    """Load optimizer and scheduler state (if present) and return ``trainer_state.json`` ({} if absent)."""
    state = read_training_state(directory)
    state.apply(model, optimizer, scheduler, expert_slices)
    return state.trainer_state
