"""moe_lab: train, sweep, analyse and serve Mixture-of-Experts language models.

    from moe_lab import MoEModel, MoETrainer

    model = MoEModel(num_experts=8, experts_per_token=2)
    trainer = MoETrainer(model)
    trainer.train(dataset)   # a datasets.Dataset with a "text" column, a list of strings, or token blocks

Every public name of the API reference imports from here. ``import moe_lab`` does not import
Ray: :class:`DistributedMoETrainer` (the Ray Train launcher) is imported on first use.
"""

from typing import Any

from .analytics import (
    ExpertMonitor,
    MonitoringStats,
    RouterAnalyzer,
    RoutingAnalysis,
    TrainingVisualizer,
)
from .config import MoEConfig, TrainingConfig
from .data import collate_moe_batch, prepare_moe_dataset
from .constants import (
    DEFAULT_EXPERTS_PER_TOKEN,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_NUM_EXPERTS,
    MAX_EXPERTS_SUPPORTED,
)
from .errors import (
    CheckpointError,
    ConfigError,
    DistributedError,
    ExpertError,
    InputError,
    MoEError,
    RouterError,
)
from .inference import DynamicExpertLoader, OptimizedMoEModel
from .interop import (
    UnsupportedConversionError,
    export_hf_mixtral,
    export_hf_qwen2_moe,
    export_hf_qwen3_moe,
    import_hf_mixtral,
    import_hf_qwen2_moe,
    import_hf_qwen3_moe,
    upcycle,
)
from .model import (
    ExpertChoiceRouter,
    FeedForwardExpert,
    GLUExpert,
    GroupedExperts,
    MoELayer,
    MoEModel,
    SwitchRouter,
    TopKRouter,
)
from .parallel import ExpertParallelism
from .types import (
    ActivationType,
    ExpertOutputs,
    ExpertType,
    ExpertWeights,
    RouterType,
    RoutingInfo,
    TrainingMetrics,
)
from .training import (
    EvalResult,
    MoETrainer,
    TrainingResult,
    load_pretrained_moe,
    save_moe_checkpoint,
)
from .version import __version__

#: names imported on first use (PEP 562), so that ``import moe_lab`` does not import Ray
_LAZY = {"DistributedMoETrainer": "moe_lab.orchestration.train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moe_lab' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActivationType",
    "CheckpointError",
    "ConfigError",
    "DEFAULT_EXPERTS_PER_TOKEN",
    "DEFAULT_HIDDEN_SIZE",
    "DEFAULT_NUM_EXPERTS",
    "DistributedError",
    "DistributedMoETrainer",
    "DynamicExpertLoader",
    "EvalResult",
    "ExpertChoiceRouter",
    "ExpertError",
    "ExpertOutputs",
    "ExpertMonitor",
    "ExpertParallelism",
    "ExpertType",
    "ExpertWeights",
    "FeedForwardExpert",
    "GLUExpert",
    "GroupedExperts",
    "InputError",
    "MAX_EXPERTS_SUPPORTED",
    "MoEConfig",
    "MoEError",
    "MoELayer",
    "MoETrainer",
    "MonitoringStats",
    "MoEModel",
    "OptimizedMoEModel",
    "RouterError",
    "RouterAnalyzer",
    "RouterType",
    "RoutingInfo",
    "RoutingAnalysis",
    "SwitchRouter",
    "TopKRouter",
    "TrainingConfig",
    "TrainingMetrics",
    "TrainingResult",
    "TrainingVisualizer",
    "UnsupportedConversionError",
    "__version__",
    "collate_moe_batch",
    "export_hf_mixtral",
    "export_hf_qwen2_moe",
    "export_hf_qwen3_moe",
    "import_hf_mixtral",
    "import_hf_qwen2_moe",
    "import_hf_qwen3_moe",
    "load_pretrained_moe",
    "prepare_moe_dataset",
    "save_moe_checkpoint",
    "upcycle",
]
