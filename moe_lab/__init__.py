"""moe_lab: train, sweep, analyse and serve Mixture-of-Experts language models.

    from moe_lab import MoEModel, MoEConfig
    model = MoEModel(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4)
"""

from .analytics import (
    ExpertMonitor,
    MonitoringStats,
    RouterAnalyzer,
    RoutingAnalysis,
    TrainingVisualizer,
)
from .config import MoEConfig, TrainingConfig
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
    import_hf_mixtral,
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
from .version import __version__

__all__ = [
    "ActivationType",
    "CheckpointError",
    "ConfigError",
    "DEFAULT_EXPERTS_PER_TOKEN",
    "DEFAULT_HIDDEN_SIZE",
    "DEFAULT_NUM_EXPERTS",
    "DistributedError",
    "DynamicExpertLoader",
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
    "TrainingVisualizer",
    "UnsupportedConversionError",
    "__version__",
    "export_hf_mixtral",
    "import_hf_mixtral",
    "upcycle",
]
