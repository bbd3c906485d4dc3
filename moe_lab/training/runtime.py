"""How the trainer talks to its process group(s).

The train step is the same everywhere; only the :class:`Runtime` differs. ``Runtime``
itself (the default) is one process. ``moe_lab.parallel.runtime.DistributedRuntime`` adds
torch.distributed reductions, gradient sync and expert gathering, and the Ray integration
subclasses that to report checkpoints to Ray Train. The core never imports Ray.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import optimizer_state_by_name


class Runtime:
    """Single-process runtime: every collective is the identity."""

    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    #: the layout's pipeline (:class:`moe_lab.parallel.pipeline.Pipeline`) when the model is cut
    #: into pipeline stages: ``train_step`` then runs the micro-batches through its schedule
    #: (``pipeline.forward_backward``) and evaluation through ``pipeline.forward``; None: the model itself
    pipeline: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the data-parallel ranks (returns a new tensor or ``t`` itself)."""
        return t

    def sync_gradients(self, model: nn.Module) -> None:
        """Make every rank's gradients those of the global loss."""

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is None:
            norms = [p.grad.detach().float().norm() for p in params]
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def barrier(self) -> None:
        """Wait for every rank."""

    def full_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The unsharded model state on CPU (a collective under expert parallelism)."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        return optimizer_state_by_name(model, optimizer)

    def expert_slices(self, model: nn.Module) -> Optional[Dict[str, slice]]:
        """For sharded experts: parameter name -> rows of the full tensor held here."""
        return None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        """Called on every rank after each checkpoint save (Ray Train reports here)."""

