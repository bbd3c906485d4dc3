"""Activation checkpointing: decoder layers keep only their inputs in the forward and run
again in the backward, trading compute for activation memory.

    apply_activation_checkpointing(model, "full")                  # every decoder layer
    apply_activation_checkpointing(model, "selective", every=2)    # layers 0, 2, 4, ...
    MoETrainer(model, activation_checkpointing="full")             # the same, from TrainingConfig
    parallelize(model, dims, ParallelOptions(activation_checkpointing="full"))  # any layout

In a job spec: ``training.activation_checkpointing: none | full | selective`` and
``training.activation_checkpointing_every`` (2), or ``--set training.activation_checkpointing=full``.
``selective`` checkpoints the layers whose index is a multiple of ``every`` (``every=1`` is
``full``); the others keep their activations.

How, and why it stays exact (the same losses, gradients and weights as without it):

- ``torch.utils.checkpoint`` non-reentrant (``use_reentrant=False``), as torchtitan. The
  layer returns ``(x, routing info)``; the aux losses in the routing info stay in the graph,
  so their gradients flow as without checkpointing.
- ``preserve_rng_state=True``: the recompute replays the CPU/CUDA RNG, so dropout and router
  jitter draw the same numbers and route the same tokens to the same experts.
- ``early_stop=False``: the recompute runs the whole layer, so every collective of its
  forward (the expert-parallel all-to-all, the nested expert FSDP unit's all-gather, TP's
  redistributions) runs again on every rank in the same order, whatever each rank saved.
- The aux-loss-free router bias moves after the optimizer step, never between a forward
  and its recompute, and routers keep no state in the forward.
- No wrapper module: the layer's own seam (:attr:`DecoderLayer.checkpoint_fn
  <moe_lab.model.transformer.DecoderLayer>`) runs its body through checkpoint, so parameter
  names and ``state_dict`` keys do not change (no ``_checkpoint_wrapped_module.``) and
  checkpoints load either way. FSDP's and TP's hooks sit on the same modules, so the order
  against them does not matter; ``parallelize`` applies it after TP and before FSDP, as
  torchtitan does. ``torch.compile`` of a layer traces the checkpoint call.
- Without gradients (evaluation, the no-grad routing pass of the ``global_batch`` scope)
  and with a KV cache, layers run plainly.
"""

from __future__ import annotations

from typing import Any, Callable, List

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..model.transformer import DecoderLayer

#: the settings of ``activation_checkpointing``
MODES = ("none", "full", "selective")


def checkpoint_layer(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing, replaying the RNG and
    recomputing the whole of ``fn`` (see the module docstring)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, early_stop=False)


def check_activation_checkpointing(mode: Any, every: Any = 2) -> None:
    """Raise ConfigError naming the value unless ``mode`` is one of :data:`MODES` and
    ``every`` an int >= 1."""
    if mode not in MODES:
        raise ConfigError(f"activation_checkpointing must be one of {list(MODES)}, got {mode!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"activation_checkpointing_every must be an int >= 1, got {every!r}")


def checkpointed_layer_indices(num_layers: int, mode: str, every: int = 2) -> List[int]:
    """The decoder layers ``mode`` checkpoints: all (``full``), every ``every``-th from layer 0
    (``selective``), or none."""
    check_activation_checkpointing(mode, every)
    if mode == "none":
        return []
    step = 1 if mode == "full" else every
    return list(range(0, num_layers, step))


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Set activation checkpointing on the decoder layers of ``model`` (in place; ``"none"``
    removes it). Works on a whole model or a pipeline stage holding some of its layers (the
    layer indices stay global), before or after FSDP/TP. Returns ``model``.

    Raises ConfigError naming the value for an unknown ``mode`` or a bad ``every``, and when
    ``mode`` is not ``"none"`` but ``model`` has no moe_lab decoder layers.
    """
    check_activation_checkpointing(mode, every)
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if mode != "none" and not layers:
        raise ConfigError(f"activation_checkpointing ({mode!r}) needs moe_lab decoder layers "
                          f"(an MoEModel); {type(model).__name__} has none")
    num_layers = getattr(getattr(model, "config", None), "num_layers", None)
    num_layers = num_layers or 1 + max((layer.layer_idx for layer in layers), default=-1)
    chosen = set(checkpointed_layer_indices(num_layers, mode, every))
    for layer in layers:
        layer.checkpoint_fn = checkpoint_layer if layer.layer_idx in chosen else None
    return model


def checkpointed_layers(model: nn.Module) -> List[int]:
    """Indices of the decoder layers of ``model`` that run under activation checkpointing."""
    return [m.layer_idx for m in model.modules() if isinstance(m, DecoderLayer) and m.checkpoint_fn is not None]
