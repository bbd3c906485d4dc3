"""GPU fast paths for training, applied to a built model (like parallelism).

On CUDA, ``apply_fast_paths`` compiles every decoder layer with ``torch.compile`` (the layers
share one graph), fuses the cross-entropy with the fp32 upcast of the logits (it returns a
compiled :func:`lm_loss_sum`), and enables TF32 for the few fp32 matmuls (the router; the
``torch.backends`` TF32 flags it sets are process-wide). The grouped expert matmul and SDPA
flash attention are used in eager mode too. On any other device nothing changes: it returns
the eager :func:`lm_loss_sum` and compiles nothing. :func:`chunked_head_loss` picks the LM
loss (``training.lm_loss``): on CUDA with fast paths, the chunked linear + cross-entropy that
never materialises the logits (with its per-chunk math compiled). Turn it off with
``training.fast_paths: false`` (``MoETrainer(fast_paths=False)``) to debug in eager mode.
``training.cuda_graphs: true`` also replays each layer's forward and backward as CUDA graphs
(a GPU option, off by default; see BENCHMARKS.md for its speed and loss parity).

Tests: tests/training/test_fast_paths.py checks :func:`lm_loss_sum` against a hand-computed
cross-entropy, that the CPU path compiles nothing, and (slow) the compiled loss against the
eager one on CPU; benchmarks/gpu_check.py checks the compiled layers + compiled loss against
eager on a GPU (loss and gradients of one training step).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX


def lm_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of ``logits[:, :-1]`` against ``labels[:, 1:]``."""
    return F.cross_entropy(
        logits_BSV[:, :-1].flatten(0, 1).float(), labels_BS[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def apply_fast_paths(model: nn.Module, device: torch.device,
                     cuda_graphs: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Compile the model's decoder layers on CUDA; returns the (compiled) loss function.

    ``cuda_graphs``: compile the layers in mode "reduce-overhead", so that each layer's
    forward and backward replay as CUDA graphs (torch's cudagraph trees). The step then
    keeps the gradients allocated (:func:`moe_lab.training.step.train_step` with
    ``StepSettings.cuda_graphs``): a backward graph's outputs live in the graphs' memory
    pool and are overwritten by its next replay, so they are added into persistent
    gradients instead of becoming them."""
    if device.type != "cuda":
        return lm_loss_sum
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mode = "reduce-overhead" if cuda_graphs else "default"
    for layer in getattr(model, "layers", []):
        layer.compile(dynamic=False, mode=mode)
    return torch.compile(lm_loss_sum, dynamic=False)


def chunked_head_loss(args: Any, device: torch.device) -> Optional[Callable[..., torch.Tensor]]:
    """The fused LM head + cross-entropy (:mod:`moe_lab.ops.linear_cross_entropy`) when
    ``args.lm_loss`` asks for it ("auto": on CUDA with fast paths), else None."""
    choice = getattr(args, "lm_loss", "auto")
    if choice == "logits" or (choice == "auto" and not (args.fast_paths and device.type == "cuda")):
        return None
    from ..ops import linear_cross_entropy as lce

    if device.type == "cuda" and args.fast_paths:
        lce.compile_chunks()
    return lce.shifted_linear_cross_entropy_sum
