"""Inference: the engine (continuous batching, CUDA graphs), the expert cache and the
optimised (offloading) model.

    from moe_lab.inference import OptimizedMoEModel, DynamicExpertLoader, InferenceEngine, generate
"""

from .expert_cache import (
    EVICTION_POLICIES,
    PREFETCH_STRATEGIES,
    CachedExperts,
    DynamicExpertLoader,
    ExpertStore,
    SafetensorsExpertStore,
    TensorExpertStore,
)
from .engine import InferenceEngine, Request, RequestOutput, SamplingParams
from .generate import KVCache, generate, pad_batch, sample_next_token
from .optimized import (
    Completion,
    CompletionChunk,
    CompletionRequest,
    FieldError,
    OptimizedMoEModel,
)

__all__ = [
    "CachedExperts",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "DynamicExpertLoader",
    "EVICTION_POLICIES",
    "ExpertStore",
    "FieldError",
    "InferenceEngine",
    "KVCache",
    "OptimizedMoEModel",
    "PREFETCH_STRATEGIES",
    "Request",
    "RequestOutput",
    "SafetensorsExpertStore",
    "SamplingParams",
    "TensorExpertStore",
    "generate",
    "pad_batch",
    "sample_next_token",
]
