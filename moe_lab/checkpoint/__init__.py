"""Checkpoints: one directory format, read through one :class:`Checkpoint`, written atomically.

    from moe_lab.checkpoint import Checkpoint, save_moe_checkpoint, load_pretrained_moe

    save_moe_checkpoint(model, optimizer, scheduler, "ckpt/", tokenizer=tok)
    ckpt = Checkpoint.open("ckpt/")                 # also a transformers Mixtral directory
    model = ckpt.build_model(dropout=0.0)           # checked against the headers, then loaded
    tok = ckpt.tokenizer()                          # the saved one, else ByteTokenizer
    load_pretrained_moe("ckpt/", dropout=0.0)       # = Checkpoint.open(...).build_model()

A checkpoint directory holds:

- ``config.json``: the :class:`~moe_lab.config.MoEConfig`;
- ``model.safetensors``: the full (unsharded) weights, keyed by parameter name;
- ``optimizer.safetensors`` + ``optimizer.json``: optimizer tensors keyed by *parameter name*
  (so they load at any expert-parallel size) and its hyper-parameters;
- ``scheduler.json``: the LR scheduler state;
- ``trainer_state.json``: step, epoch, data position, RNG states, metrics;
- ``routing_stats.json``: cumulative tokens per expert per MoE layer (used by the expert
  cache to keep hot experts resident);
- tokenizer files, when a tokenizer is given.

A *sharded* training checkpoint (``training.checkpoint_format``, see :mod:`.sharded`) has
``sharded.json`` + ``dcp/`` (torch.distributed.checkpoint shards of model and optimizer,
written by every rank) instead of the weights and optimizer files. ``Checkpoint.open`` reads
it too (a :class:`ShardedCheckpoint`): the trainer resumes from it at any layout, and
everything else gets the full format, consolidated on first use.

Nothing is unpickled on load. A legacy ``optimizer.pt`` is read with ``weights_only=True``
only. Loading checks before it allocates (see :mod:`moe_lab.checkpoint.checks`).

Modules: :mod:`.files` (names, atomic directories, finding checkpoints), :mod:`.writer`
(writing), :mod:`.header` (the safetensors header, checked), :mod:`.weights` (lazy
tensors), :mod:`.config_file` (``config.json`` -> MoEConfig), :mod:`.checks` (loading
checks), :mod:`.training_state` (optimizer/scheduler/trainer state), :mod:`.formats`
(readers of transformers directories), :mod:`.reader` (:class:`Checkpoint`), :mod:`.sharded`
(sharded checkpoints with torch.distributed.checkpoint, loadable at any parallel layout, and
their consolidation into this format).
"""

from .checks import available_memory
from .config_file import moe_config_from_json, read_config_json
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    OPTIMIZER_META,
    OPTIMIZER_TENSORS,
    ROUTING_STATS,
    SCHEDULER_NAME,
    TOKENIZER_FILES,
    TRAINER_STATE,
    WEIGHTS_NAME,
    AtomicDirectory,
    clean_stale_temporaries,
    find_weight_files,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_json,
    read_routing_stats,
    resolve_checkpoint_dir,
    write_json_atomic,
)
from .formats import register_format, registered_formats
from .header import SafetensorsHeader, TensorSpec, read_header
from .reader import Checkpoint, ShardedCheckpoint, load_pretrained_moe
from .sharded import consolidate, is_sharded_checkpoint, load_sharded, save_sharded, write_sharded_checkpoint
from .training_state import (
    TrainingState,
    load_optimizer_state,
    load_training_state,
    optimizer_state_by_name,
    read_training_state,
    scheduler_state_json,
)
from .weights import LazyWeights, describe_key_mismatch
from .writer import save_model_files, save_moe_checkpoint, write_checkpoint, write_model_files

__all__ = [
    "AtomicDirectory",
    "CONFIG_NAME",
    "Checkpoint",
    "INDEX_NAME",
    "LazyWeights",
    "OPTIMIZER_META",
    "OPTIMIZER_TENSORS",
    "ROUTING_STATS",
    "SCHEDULER_NAME",
    "SafetensorsHeader",
    "ShardedCheckpoint",
    "TOKENIZER_FILES",
    "TRAINER_STATE",
    "TensorSpec",
    "TrainingState",
    "WEIGHTS_NAME",
    "available_memory",
    "clean_stale_temporaries",
    "consolidate",
    "describe_key_mismatch",
    "find_weight_files",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_optimizer_state",
    "load_pretrained_moe",
    "load_sharded",
    "load_training_state",
    "moe_config_from_json",
    "optimizer_state_by_name",
    "prune_checkpoints",
    "read_config_json",
    "read_header",
    "read_json",
    "read_routing_stats",
    "read_training_state",
    "register_format",
    "registered_formats",
    "resolve_checkpoint_dir",
    "save_model_files",
    "save_moe_checkpoint",
    "save_sharded",
    "scheduler_state_json",
    "write_checkpoint",
    "write_json_atomic",
    "write_model_files",
    "write_sharded_checkpoint",
]
