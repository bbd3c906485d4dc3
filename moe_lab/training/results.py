"""What training and evaluation return.

    result = trainer.train(train_ds)     # TrainingResult
    result.history["loss"], result.eval_loss, result.checkpoint_path
    ev = trainer.evaluate(eval_ds)       # EvalResult
    ev.loss, ev.perplexity, ev.expert_counts[layer][expert]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

#: the final checkpoint (``output_dir/model``) carries the TrainingResult as JSON
RESULT_FILE = "training_result.json"


@dataclass
class EvalResult:
    """Evaluation loss and routing statistics over a dataset."""

    loss: float
    perplexity: float
    num_tokens: int
    expert_counts: List[List[int]] = field(default_factory=list)  # [L][E]
    load_imbalance: List[float] = field(default_factory=list)  # max/mean per layer
    load_cv: List[float] = field(default_factory=list)  # coefficient of variation per layer
    dropped_fraction: List[float] = field(default_factory=list)  # per layer

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingResult:
    """What :meth:`MoETrainer.train` returns."""

    global_step: int
    train_loss: float
    eval_loss: Optional[float]
    history: Dict[str, List[float]]
    checkpoint_path: Optional[str]
    tokens_per_second: float
    total_tokens: int = 0
    elapsed_seconds: float = 0.0
    output_dir: Optional[str] = None
    eval_perplexity: Optional[float] = None
    #: optimizer steps this call ran (``global_step`` minus the step it resumed from)
    steps_run: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
