"""Parallelism applied to a built model: expert parallelism and gradient sync."""

from .expert_parallel import (
    AllToAllDispatcher,
    ExpertParallelism,
    ParallelGroups,
    all_to_all,
    validate_parallel_sizes,
)

__all__ = ["AllToAllDispatcher", "ExpertParallelism", "ParallelGroups", "all_to_all", "validate_parallel_sizes"]
