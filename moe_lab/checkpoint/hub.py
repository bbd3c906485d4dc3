"""A checkpoint given as a local directory or as a Hugging Face hub id ("org/name").

    resolve_local_or_hub("outputs/demo/model")   # an existing directory: itself
    resolve_local_or_hub("org/name")             # downloaded (json, safetensors, tokenizer files)

Offline (``HF_HUB_OFFLINE=1`` or ``MOE_LAB_OFFLINE=1``) only the local hub cache is used.
Only JSON, safetensors and tokenizer files are downloaded: never pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .files import CONFIG_NAME

_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("0", "", "false")


def resolve_local_or_hub(name_or_path: str | os.PathLike) -> Path:
    """The local directory of a checkpoint.

    Raises:
        CheckpointError: a file instead of a directory, a missing directory, or a hub id
            that cannot be fetched (offline, unknown, no network).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory with {CONFIG_NAME}")
        return path
    name = str(name_or_path)
    if os.sep in name.strip("/").split("/", 1)[-1] or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint directory not found: {name}")
    offline = _flag("HF_HUB_OFFLINE") or _flag("MOE_LAB_OFFLINE")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=name, allow_patterns=_ALLOW_PATTERNS, local_files_only=offline)
    except Exception as exc:  # network errors, 404s, offline mode
        first_line = str(exc).splitlines()[0] if str(exc) else "offline?"
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {first_line}); pass a local checkpoint directory"
        ) from None
    return Path(local)
