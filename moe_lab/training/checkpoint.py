"""Checkpoints: one directory, no pickles, written atomically.

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

Nothing is unpickled on load. A legacy ``*.pt`` state is read with ``weights_only=True`` only.

Saves are atomic: everything is written into a hidden temporary directory next to the
target, fsynced, then renamed into place. A crash mid-save leaves only a ``.tmp-*``
directory that loaders ignore and the next save removes.

    save_moe_checkpoint(model, optimizer, scheduler, "ckpt/")
    model = load_pretrained_moe("ckpt/", dropout=0.0)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import MoEConfig
from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_NAME = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
ROUTING_STATS = "routing_stats.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------
# atomic directory writes
# ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicDirectory:
    """Context manager: yields a temporary directory that becomes ``target`` on success.

    On an exception the temporary directory is removed and ``target`` is untouched. An
    existing ``target`` is replaced only after the new one is complete.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.target.name}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.with_name(f"{_OLD_PREFIX}{self.target.name}-{os.getpid()}")
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except BaseException:
            if old is not None and not self.target.exists():
                os.rename(old, self.target)  # put the previous checkpoint back
            raise
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_OLD_PREFIX = ".old-"


def clean_stale_temporaries(directory: str | os.PathLike) -> None:
    """Clean up after interrupted saves in ``directory``.

    A ``.old-NAME-PID`` whose ``NAME`` is missing is a complete previous checkpoint whose
    replacement never moved in (the process died between the two renames): it is put back.
    Every other ``.tmp-*`` / ``.old-*`` leftover is removed.
    """
    d = Path(directory)
    if not d.is_dir():
        return
    for child in sorted(d.iterdir()):
        if child.is_dir() and child.name.startswith(_OLD_PREFIX):
            name, _, pid = child.name[len(_OLD_PREFIX):].rpartition("-")
            target = d / name
            if name and pid.isdigit() and not target.exists():
                os.rename(child, target)
                logger.warning("restored %s: a save replacing it was interrupted", target)
            else:
                shutil.rmtree(child, ignore_errors=True)
    for child in d.iterdir():
        if child.is_dir() and child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# model weights
# ---------------------------------------------------------------------------------------


def _untied_state_dict(model_state: Dict[str, torch.Tensor], tied: bool) -> Dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop the tied lm_head (it is re-tied on load)."""
    out = {}
    for k, v in model_state.items():
        if tied and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_model_files(
    directory: Path, config: MoEConfig, model_state: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    config.to_json(directory / CONFIG_NAME)
    save_file(
        _untied_state_dict(model_state, config.tie_word_embeddings),
        str(directory / WEIGHTS_NAME),
        metadata={"format": "pt", "moe_lab": "1", **(metadata or {})},
    )


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (the file is truncated or not safetensors)") from None


def _key_list(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def describe_key_mismatch(
    missing: Any, unexpected: Any, mismatched: Any, unexpected_what: str = "unexpected keys"
) -> str:
    """``"missing keys [...]; unexpected keys [...]; shape mismatches [...]"`` (only the non-empty parts)."""
    parts = []
    if missing:
        parts.append(f"missing keys {_key_list(missing)}")
    if unexpected:
        parts.append(f"{unexpected_what} {_key_list(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {list(mismatched)[:8]}")
    return "; ".join(parts)


def load_model_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load ``model.safetensors`` into ``model`` strictly; CheckpointError names what is wrong."""
    directory = Path(directory)
    state = _read_weights(directory / WEIGHTS_NAME)
    if getattr(model.config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {directory} does not match the model: " + describe_key_mismatch(missing, unexpected, mismatched)
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------
# optimizer / scheduler
# ---------------------------------------------------------------------------------------


def optimizer_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split the optimizer state into tensors keyed ``"{param_name}::{key}"`` and JSON metadata."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"{name}::{key}"] = val.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(name, {})[key] = val
    groups = []
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Dict[str, torch.Tensor],
    meta: Dict[str, Any],
    expert_slices: Optional[Dict[str, slice]] = None,
) -> None:
    """Inverse of :func:`optimizer_state_by_name`. ``expert_slices`` maps a sharded parameter's
    name to the rows of the full tensor that this rank holds."""
    params = dict(model.named_parameters())
    saved_class = meta.get("class")
    if saved_class is not None and saved_class != type(optimizer).__name__:
        raise CheckpointError(
            f"the checkpoint holds {saved_class} state but the optimizer is {type(optimizer).__name__}; "
            f"pass an optimizer of the same class"
        )
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"optimizer has {len(optimizer.param_groups)} param groups, checkpoint has {len(meta['param_groups'])}"
        )
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if k == "betas" else v
    for name, p in params.items():
        state: Dict[str, Any] = dict(meta.get("scalars", {}).get(name, {}))
        prefix = f"{name}::"
        for key in [k for k in tensors if k.startswith(prefix)]:
            t = tensors[key]
            if expert_slices and name in expert_slices and t.dim() > 0 and t.shape[0] != p.shape[0]:
                t = t[expert_slices[name]]
            state[key[len(prefix) :]] = t.to(p.device) if t.dim() > 0 else t
        if state:
            optimizer.state[p] = state


def _scheduler_state_json(scheduler: Any) -> Dict[str, Any]:
    state = scheduler.state_dict()
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


# ---------------------------------------------------------------------------------------
# whole checkpoints
# ---------------------------------------------------------------------------------------


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
        _scheduler_state_json(scheduler) if scheduler is not None else None,
        trainer_state,
        tokenizer=tokenizer,
    )


def read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def load_training_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    expert_slices: Optional[Dict[str, slice]] = None,
) -> Dict[str, Any]:
    """Load optimizer and scheduler state (if present) and return ``trainer_state.json``."""
    d = Path(directory)
    if optimizer is not None and (d / OPTIMIZER_TENSORS).exists():
        tensors = _read_weights(d / OPTIMIZER_TENSORS)
        load_optimizer_state(model, optimizer, tensors, read_json(d / OPTIMIZER_META), expert_slices)
    elif optimizer is not None and (d / "optimizer.pt").exists():  # legacy format: tensors only, no pickle
        try:
            state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # an unsafe or corrupt pickle: refused, never executed
            raise CheckpointError(f"cannot read {d / 'optimizer.pt'} as weights only: {exc}") from None
        optimizer.load_state_dict(state)
    if scheduler is not None and (d / SCHEDULER_NAME).exists():
        state = read_json(d / SCHEDULER_NAME)
        state["lr_lambdas"] = [None] * len(getattr(scheduler, "lr_lambdas", [None]))
        scheduler.load_state_dict(state)
    return read_json(d / TRAINER_STATE) if (d / TRAINER_STATE).exists() else {}


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> List[Path]:
    """Complete ``step-N`` checkpoints in ``checkpoints_dir``, oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / WEIGHTS_NAME).exists() and (child / CONFIG_NAME).exists():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_or_checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``dir`` or ``dir/checkpoints``, or None."""
    d = Path(output_or_checkpoints_dir)
    for cand in (d / "checkpoints", d):
        ckpts = list_checkpoints(cand)
        if ckpts:
            return ckpts[-1]
    return None


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: Optional[int]) -> None:
    if keep is None:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# loading for inference / fine-tuning
# ---------------------------------------------------------------------------------------


def _resolve_local_or_hub(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory with {CONFIG_NAME}")
        return path
    name = str(name_or_path)
    if os.sep in name.strip("/").split("/", 1)[-1] or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint directory not found: {name}")
    # looks like a hub id "org/name"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "MOE_LAB_OFFLINE", "0"
    ) not in ("0", "", "false")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=name,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            local_files_only=offline,
        )
    except Exception as exc:  # network errors, 404s, offline mode
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'offline?'}); "
            "pass a local checkpoint directory"
        ) from None
    return Path(local)


def load_pretrained_moe(model_name_or_path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Load a moe_lab checkpoint directory (or a hub id when online) as a :class:`MoEModel`.

    Args:
        model_name_or_path: a checkpoint directory (``config.json`` + ``model.safetensors``),
            a transformers Mixtral directory (see :mod:`moe_lab.interop.hf_mixtral`), or a
            Hugging Face hub id when the hub is reachable.
        **overrides: MoEConfig fields to change on load (``dropout``, ``moe_backend``,
            ``capacity_factor``, ...). Changing shapes makes the load fail.

    Raises:
        CheckpointError: missing, truncated or mismatched files, with the reason.
    """
    from ..model.transformer import MoEModel

    d = _resolve_local_or_hub(model_name_or_path)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.exists():
        raise CheckpointError(f"{d} has no {CONFIG_NAME}; not a moe_lab checkpoint")
    raw = read_json(cfg_path)
    if "model_type" in raw:
        if raw["model_type"] == "mixtral":
            from ..interop.hf_mixtral import load_hf_mixtral

            return load_hf_mixtral(d, **overrides)
        raise CheckpointError(
            f"{d} is a transformers checkpoint of model_type {raw['model_type']!r}; load_pretrained_moe reads "
            "moe_lab checkpoints and transformers 'mixtral' directories (a dense 'llama'/'mistral' model can "
            "become an MoE with moe_lab.upcycle or `moe-lab upcycle`)"
        )
    if not (d / WEIGHTS_NAME).exists():
        raise CheckpointError(f"{d} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    try:
        config = MoEConfig.from_dict({**raw, **overrides})
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_path} holds an invalid configuration: {exc}") from None
    model = MoEModel.from_config(config)
    load_model_state(model, d)
    return model
