"""Training: the MoETrainer loop, the public train step, metrics, optimizers, checkpoints, and
the runtime abstraction launchers plug into.

    from moe_lab.training import MoETrainer, train_step, StepSettings
    stats = train_step(model, optimizer, micro_batches, runtime, scheduler=sched, settings=StepSettings())
"""

from ..checkpoint import latest_checkpoint, load_pretrained_moe, save_moe_checkpoint
from .activation_checkpointing import apply_activation_checkpointing
from .loop import MoETrainer
from .results import EvalResult, TrainingResult
from .runtime import Runtime
from .step import StepSettings, StepStats, forward_loss, train_step

__all__ = [
    "EvalResult",
    "MoETrainer",
    "Runtime",
    "StepSettings",
    "StepStats",
    "TrainingResult",
    "apply_activation_checkpointing",
    "forward_loss",
    "latest_checkpoint",
    "load_pretrained_moe",
    "save_moe_checkpoint",
    "train_step",
]
