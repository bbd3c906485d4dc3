"""Inference: KV-cache generation, the expert cache and the optimised (offloading) model.

    from moe_lab.inference import OptimizedMoEModel, DynamicExpertLoader, generate
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
from .generate import KVCache, generate, pad_batch, sample_next_token
from .optimized import (
    BatchedDecoder,
    Completion,
    CompletionChunk,
    CompletionRequest,
    FieldError,
    OptimizedMoEModel,
    SamplingParams,
)

__all__ = [
    "BatchedDecoder",
    "CachedExperts",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "DynamicExpertLoader",
    "EVICTION_POLICIES",
    "ExpertStore",
    "FieldError",
    "KVCache",
    "OptimizedMoEModel",
    "PREFETCH_STRATEGIES",
    "SafetensorsExpertStore",
    "SamplingParams",
    "TensorExpertStore",
    "generate",
    "pad_batch",
    "sample_next_token",
]
