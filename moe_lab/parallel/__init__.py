"""Parallelism applied to a built model: ``parallelize(model, dims, options)`` (device mesh,
expert parallelism, tensor/sequence parallelism, activation checkpointing, FSDP2), and the
distributed runtime (gradient sync, global norms, state gathering) the trainer is handed."""

from .expert_parallel import (
    ExpertParallelism,
    ParallelDims,
    ParallelGroups,
    ParameterPlan,
    parallelize,
    validate_parallel_sizes,
)
from .layout import ParallelOptions
from ..training.activation_checkpointing import apply_activation_checkpointing
from .mesh import ParallelMesh, model_problems
from .runtime import DistributedRuntime, parallel_runtime
from .tensor_parallel import tp_plan, vocab_parallel_loss_sum

__all__ = [
    "DistributedRuntime",
    "ExpertParallelism",
    "ParallelDims",
    "ParallelGroups",
    "ParallelMesh",
    "ParallelOptions",
    "ParameterPlan",
    "apply_activation_checkpointing",
    "model_problems",
    "parallel_runtime",
    "parallelize",
    "tp_plan",
    "validate_parallel_sizes",
    "vocab_parallel_loss_sum",
]
