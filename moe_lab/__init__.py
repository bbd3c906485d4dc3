"""moe_lab: train, sweep, analyse and serve Mixture-of-Experts language models.

    from moe_lab import MoEModel, MoETrainer

    model = MoEModel(num_experts=8, experts_per_token=2)
    trainer = MoETrainer(model)
    trainer.train(dataset)   # a datasets.Dataset with a "text" column, a list of strings, or token blocks

Every public name of the API reference imports from here. ``import moe_lab`` imports neither
torch nor Ray: each name is imported from its module on first use (PEP 562).
"""

from typing import TYPE_CHECKING, Any

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
from .version import (
    __version__,
)

#: every other public name, imported from its module on first use (PEP 562): ``import moe_lab``
#: imports neither torch nor Ray, so light processes (Serve's HTTP proxy loading
#: :mod:`moe_lab.serving.proxy_guard`, ``moe-lab --help``) stay light
_LAZY = {
    "ExpertMonitor": "moe_lab.analytics",
    "MonitoringStats": "moe_lab.analytics",
    "RouterAnalyzer": "moe_lab.analytics",
    "RoutingAnalysis": "moe_lab.analytics",
    "TrainingVisualizer": "moe_lab.analytics",
    "MoEConfig": "moe_lab.config",
    "TrainingConfig": "moe_lab.config",
    "collate_moe_batch": "moe_lab.data",
    "prepare_moe_dataset": "moe_lab.data",
    "DynamicExpertLoader": "moe_lab.inference",
    "OptimizedMoEModel": "moe_lab.inference",
    "UnsupportedConversionError": "moe_lab.interop",
    "export_hf_mixtral": "moe_lab.interop",
    "export_hf_qwen2_moe": "moe_lab.interop",
    "export_hf_qwen3_moe": "moe_lab.interop",
    "import_hf_mixtral": "moe_lab.interop",
    "import_hf_qwen2_moe": "moe_lab.interop",
    "import_hf_qwen3_moe": "moe_lab.interop",
    "upcycle": "moe_lab.interop",
    "ExpertChoiceRouter": "moe_lab.model",
    "FeedForwardExpert": "moe_lab.model",
    "GLUExpert": "moe_lab.model",
    "GroupedExperts": "moe_lab.model",
    "MoELayer": "moe_lab.model",
    "MoEModel": "moe_lab.model",
    "SwitchRouter": "moe_lab.model",
    "TopKRouter": "moe_lab.model",
    "ExpertParallelism": "moe_lab.parallel",
    "ActivationType": "moe_lab.types",
    "ExpertOutputs": "moe_lab.types",
    "ExpertType": "moe_lab.types",
    "ExpertWeights": "moe_lab.types",
    "RouterType": "moe_lab.types",
    "RoutingInfo": "moe_lab.types",
    "TrainingMetrics": "moe_lab.types",
    "EvalResult": "moe_lab.training",
    "MoETrainer": "moe_lab.training",
    "TrainingResult": "moe_lab.training",
    "load_pretrained_moe": "moe_lab.training",
    "save_moe_checkpoint": "moe_lab.training",
    "DistributedMoETrainer": "moe_lab.orchestration.train",
}

if TYPE_CHECKING:  # what static analysis and IDEs see
    from .analytics import (
        ExpertMonitor,
        MonitoringStats,
        RouterAnalyzer,
        RoutingAnalysis,
        TrainingVisualizer,
    )
    from .config import (
        MoEConfig,
        TrainingConfig,
    )
    from .data import (
        collate_moe_batch,
        prepare_moe_dataset,
    )
    from .inference import (
        DynamicExpertLoader,
        OptimizedMoEModel,
    )
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
    from .parallel import (
        ExpertParallelism,
    )
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
    from .orchestration.train import DistributedMoETrainer


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
