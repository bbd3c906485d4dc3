"""Inference: KV-cache generation (and, with the serving issue, the optimised model and expert cache)."""

from .generate import KVCache, generate, pad_batch, sample_next_token

__all__ = ["KVCache", "generate", "pad_batch", "sample_next_token"]
