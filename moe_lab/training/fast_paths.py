"""GPU fast paths for training, applied to a built model (like parallelism).

On CUDA, ``apply_fast_paths`` compiles every decoder layer with ``torch.compile`` (the layers
share one graph), fuses the cross-entropy with the fp32 upcast of the logits, and enables
TF32 for the few fp32 matmuls (the router). The grouped expert matmul and SDPA flash
attention are used in eager mode too. On CPU nothing changes. Turn it off with
``training.fast_paths: false`` (``MoETrainer(fast_paths=False)``) to debug in eager mode.
Every fast path is tested against the eager reference (tests/training/test_fast_paths.py,
and the GPU check in benchmarks/train_step.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX


def lm_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of ``logits[:, :-1]`` against ``labels[:, 1:]``."""
    return F.cross_entropy(
        logits_BSV[:, :-1].flatten(0, 1).float(), labels_BS[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def apply_fast_paths(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Compile the model's decoder layers on CUDA; returns the (compiled) loss function."""
    if device.type != "cuda":
        return lm_loss_sum
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for layer in getattr(model, "layers", []):
        layer.compile(dynamic=False)
    return torch.compile(lm_loss_sum, dynamic=False)
