"""Parallelism applied to a built model: ``parallelize(model, dims)``, expert parallelism, and
the distributed runtime (gradient sync, global norms, state gathering) the trainer is handed."""

from .expert_parallel import (
    ExpertParallelism,
    ParallelDims,
    ParallelGroups,
    ParameterPlan,
    parallelize,
    validate_parallel_sizes,
)
from .runtime import DistributedRuntime

__all__ = [
    "DistributedRuntime",
    "ExpertParallelism",
    "ParallelDims",
    "ParallelGroups",
    "ParameterPlan",
    "parallelize",
    "validate_parallel_sizes",
]
