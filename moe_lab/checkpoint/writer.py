"""Writing checkpoints: model files, whole checkpoint directories, atomically.

    save_moe_checkpoint(model, optimizer, scheduler, "ckpt/", trainer_state={...}, tokenizer=tok)
    write_checkpoint("ckpt/", config, state_dict, routing_stats=stats)    # already-gathered CPU state
    write_model_files(tmp, config_dict, tensors, max_shard_bytes=5 * 2**30) # config.json + weights

The weights are one ``model.safetensors`` (metadata ``{"format": "pt", "moe_lab": "1"}``),
keyed by parameter name and unsharded; a tied ``lm_head.weight`` is not stored (it is the
embedding). :func:`write_model_files` can also write transformers' sharded layout
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), which the
readers accept for transformers directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import MoEConfig
from .files import (
    CONFIG_NAME,
    INDEX_NAME,
    OPTIMIZER_META,
    OPTIMIZER_TENSORS,
    ROUTING_STATS,
    SCHEDULER_NAME,
    TRAINER_STATE,
    WEIGHTS_NAME,
    AtomicDirectory,
    write_json_atomic,
)
from .training_state import optimizer_state_by_name, scheduler_state_json

#: the metadata of moe_lab's own weights files
MOE_LAB_METADATA = {"format": "pt", "moe_lab": "1"}


def _untied_state_dict(model_state: Dict[str, torch.Tensor], tied: bool) -> Dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop the tied lm_head (it is re-tied on load)."""
    out = {}
    for k, v in model_state.items():
        if tied and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_model_files(
    directory: Path,
    config: Dict[str, Any],
    tensors: Dict[str, torch.Tensor],
    metadata: Optional[Dict[str, str]] = None,
    max_shard_bytes: Optional[int] = None,
) -> List[str]:
    """Write ``config.json`` and the weights into ``directory``; returns the file names.

    Args:
        config: the JSON of ``config.json``.
        tensors: CPU tensors (no two sharing storage).
        metadata: the safetensors metadata of every weights file.
        max_shard_bytes: split into shards of at most this size plus an index (None: one file).
    """
    from ..errors import ConfigError

    _write_json(directory / CONFIG_NAME, config)
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=metadata)
        return [CONFIG_NAME, WEIGHTS_NAME]
    names: List[str] = []
    weight_map: Dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        names.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    _write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [CONFIG_NAME, *names, INDEX_NAME]


def save_model_files(
    directory: Path, config: MoEConfig, model_state: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    """``config.json`` + ``model.safetensors`` of a moe_lab model into ``directory``."""
    write_model_files(
        directory,
        config.to_dict(),
        _untied_state_dict(model_state, config.tie_word_embeddings),
        metadata={**MOE_LAB_METADATA, **(metadata or {})},
    )


def write_checkpoint(
    path: str | os.PathLike,
    config: MoEConfig,
    model_state: Dict[str, torch.Tensor],
    optimizer_tensors: Optional[Dict[str, torch.Tensor]] = None,
    optimizer_meta: Optional[Dict[str, Any]] = None,
    scheduler_state: Optional[Dict[str, Any]] = None,
    trainer_state: Optional[Dict[str, Any]] = None,
    routing_stats: Optional[Dict[str, Any]] = None,
    tokenizer: Any = None,
    extra_files: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint directory atomically from already-gathered (CPU) state."""
    path = Path(path)
    with AtomicDirectory(path) as tmp:
        save_model_files(tmp, config, model_state)
        if optimizer_tensors is not None and optimizer_meta is not None:
            save_file(optimizer_tensors, str(tmp / OPTIMIZER_TENSORS))
            write_json_atomic(tmp / OPTIMIZER_META, optimizer_meta)
        if scheduler_state is not None:
            write_json_atomic(tmp / SCHEDULER_NAME, scheduler_state)
        if trainer_state is not None:
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        if routing_stats is not None:
            write_json_atomic(tmp / ROUTING_STATS, routing_stats)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
    return path


def save_moe_checkpoint(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler: Any,
    path: str | os.PathLike,
    trainer_state: Optional[Dict[str, Any]] = None,
    tokenizer: Any = None,
) -> Path:
    """Save ``model`` (+ optimizer and scheduler when given) as a checkpoint directory.

    For a single process. Under expert parallelism use the trainer, which gathers the
    experts first.
    """
    opt_t = opt_m = None
    if optimizer is not None:
        opt_t, opt_m = optimizer_state_by_name(model, optimizer)
    return write_checkpoint(
        path,
        model.config,
        model.state_dict(),
        opt_t,
        opt_m,
        scheduler_state_json(scheduler) if scheduler is not None else None,
        trainer_state,
        tokenizer=tokenizer,
    )
