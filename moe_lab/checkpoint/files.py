"""The files of a checkpoint directory: their names, atomic writes, JSON, finding checkpoints.

    with AtomicDirectory("ckpt/") as tmp:     # tmp becomes ckpt/ only if the block succeeds
        write_json_atomic(tmp / TRAINER_STATE, {"global_step": 1})
    clean_stale_temporaries("checkpoints/")  # after a crash: restore or remove leftovers
    latest_checkpoint("outputs/run")          # newest complete checkpoints/step-N, or None
    resolve_checkpoint_dir("outputs/run")     # a job output directory -> outputs/run/model

Saves are atomic: everything is written into a hidden temporary directory next to the
target, fsynced, then renamed into place. A crash mid-save leaves only a ``.tmp-*``
directory (ignored by the loaders, removed by the next save); a crash between the two
renames of an overwrite leaves the complete old checkpoint as ``.old-NAME-PID``, which
:func:`clean_stale_temporaries` puts back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: sharded weights (transformers layout): ``model-0000i-of-0000n.safetensors`` + this index
INDEX_NAME = "model.safetensors.index.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
#: the optimizer state of old checkpoints (read with ``weights_only=True``, never unpickled)
LEGACY_OPTIMIZER = "optimizer.pt"
SCHEDULER_NAME = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
ROUTING_STATS = "routing_stats.json"
#: a sharded (torch.distributed.checkpoint) checkpoint: this marker file + the DCP shards' directory
SHARDED_META = "sharded.json"
DCP_DIR = "dcp"
#: a checkpoint has a tokenizer when one of these is present (moe_lab's or transformers')
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
#: the final model of a job output directory
JOB_MODEL_DIR = "model"

_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_PREFIX = ".old-"
_TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------
# atomic writes
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
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{self.target.name}-", dir=self.target.parent))
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
        if child.is_dir() and child.name.startswith(_TMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; CheckpointError (naming the file) when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def read_json_object(path: Path) -> Dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_routing_stats(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """``routing_stats.json`` of a checkpoint directory (or that file itself), or None if absent.

    It holds ``moe_layer_indices`` [L] and ``expert_counts`` [L, E]: the tokens each expert
    received over training (what the expert cache warms up with).
    """
    p = Path(path)
    if p.is_dir():
        p = p / ROUTING_STATS
    return read_json_object(p) if p.is_file() else None


# ---------------------------------------------------------------------------------------
# finding checkpoints and their files
# ---------------------------------------------------------------------------------------


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint directory (see :mod:`.sharded`)."""
    return (Path(path) / SHARDED_META).is_file() and (Path(path) / DCP_DIR).is_dir()


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A directory with ``config.json`` (of any format)."""
    return (Path(path) / CONFIG_NAME).is_file()


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a job output directory holding its final model in ``model/``."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    if not is_checkpoint_dir(d) and is_checkpoint_dir(d / JOB_MODEL_DIR):
        return d / JOB_MODEL_DIR
    if not is_checkpoint_dir(d):
        raise CheckpointError(f"{d} has no {CONFIG_NAME}; expected a checkpoint directory (or a job output with {JOB_MODEL_DIR}/)")
    return d


def find_weight_files(directory: Path, allow_shards: bool = True) -> List[Path]:
    """The safetensors weight files of a directory: ``model.safetensors``, or (transformers'
    sharded layout) the shards listed by ``model.safetensors.index.json``.

    Raises:
        CheckpointError: no weights (naming pickled ``*.bin``/``*.pt`` files, which are never
            loaded), a bad index, or shards that do not exist.
    """
    index = directory / INDEX_NAME
    if allow_shards and index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"the shard index {index} has no 'weight_map' of tensor name -> file name")
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (
        f"; it holds {pickles}, which are pickles and are never loaded: re-save the model with "
        "safetensors (save_pretrained(..., safe_serialization=True))"
        if pickles
        else ""
    )
    shards = f" or {INDEX_NAME}" if allow_shards else ""
    raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}{shards}{hint}; the checkpoint is incomplete")


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> List[Path]:
    """Complete ``step-N`` checkpoints (full or sharded) in ``checkpoints_dir``, oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / CONFIG_NAME).exists() and (
            (child / WEIGHTS_NAME).exists() or is_sharded_checkpoint(child)
        ):
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
    """Delete all but the newest ``keep`` step checkpoints (None keeps everything)."""
    if keep is None:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
