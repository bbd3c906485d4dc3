"""Training: the MoETrainer loop, checkpoints, and the runtime abstraction launchers plug into."""

from .checkpoint import latest_checkpoint, load_pretrained_moe, save_moe_checkpoint
from .trainer import EvalResult, MoETrainer, TrainingResult

__all__ = [
    "EvalResult",
    "MoETrainer",
    "TrainingResult",
    "latest_checkpoint",
    "load_pretrained_moe",
    "save_moe_checkpoint",
]
