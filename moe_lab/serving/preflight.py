"""The driver's check of a checkpoint before the server starts: no Ray, no tensor data read.

    path = check_servable_checkpoint("outputs/demo/model")   # absolute Path, or CheckpointError

``moe-lab serve`` (and :func:`~moe_lab.orchestration.serve.app_builder`) run this before a
Ray cluster or a replica starts, so a broken checkpoint costs a second and one line instead
of a cluster start-up, a 2.8 GB replica and Serve's wrapper traceback. It does what the
replica's :class:`~moe_lab.inference.OptimizedMoEModel` does before it reads tensors:

- :meth:`Checkpoint.open <moe_lab.checkpoint.Checkpoint.open>`: ``config.json`` must be a
  JSON object and a valid configuration (strict types), and a weights file must exist;
- the checks of :meth:`Checkpoint.build_model <moe_lab.checkpoint.Checkpoint.build_model>`
  on the meta device, with every tensor excluded from loading: each safetensors header is
  read and checked against the file's size (a truncated file or a corrupt header is
  refused), the layer count, and every parameter's name, shape and dtype against the config;
- the format (the server reads moe_lab checkpoints) and the tokenizer files: they must load,
  and the tokenizer may not have more tokens than ``vocab_size``.

What it cannot know is left to the replica: whether its device exists and has the memory
(the replicas may run on other machines than the driver), and the tensor bytes themselves.
Every refusal is a one-line :class:`~moe_lab.errors.CheckpointError` naming the file and the
problem, which ``moe-lab serve`` prints with exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import CheckpointError


def _load_nothing(name: str) -> bool:
    return True


def check_servable_checkpoint(checkpoint: Union[str, os.PathLike]) -> Path:
    """Check ``checkpoint`` as the server's replicas will load it, without reading tensor data.

    Returns:
        The checkpoint directory as an absolute path (a relative one is taken from the
        current directory).

    Raises:
        CheckpointError: not a directory, an invalid or non-JSON ``config.json``, missing,
            truncated or corrupt weights, weights that do not match the config, a
            transformers (not moe_lab) checkpoint, tokenizer files that do not load, or a
            tokenizer with more tokens than the config's ``vocab_size``.
    """
    from ..checkpoint import Checkpoint

    path = Path(checkpoint).expanduser()
    if not path.is_dir():  # a directory only: the replicas never look a name up on the hub
        raise CheckpointError(f"checkpoint: {str(checkpoint)!r} is not a checkpoint directory (no such directory)")
    path = path.resolve()
    ckpt = Checkpoint.open(path, dropout=0.0)
    if ckpt.format != "moe_lab":
        raise CheckpointError(
            f"{path} is a transformers checkpoint (model_type {ckpt.model_type!r}); the server reads moe_lab "
            "checkpoints: convert it first with moe_lab.import_hf_mixtral(path, out=DIR)"
        )
    ckpt.build_model(exclude=_load_nothing)  # every check before data is read; the model stays on meta
    try:
        tokenizer = ckpt.tokenizer()
    except Exception as exc:  # ours (ConfigError) or a third-party tokenizer's own: one line, naming the files
        raise CheckpointError(f"{path}: its tokenizer files do not load ({describe_exception(exc)})") from None
    vocab = _tokenizer_size(tokenizer)
    if vocab is not None and vocab > ckpt.config.vocab_size:
        raise CheckpointError(
            f"{path}: its tokenizer has {vocab} tokens but config.json's vocab_size is {ckpt.config.vocab_size}; "
            "the model cannot read every token id (the tokenizer files belong to another model)"
        )
    return path


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tokenizer_size(tokenizer: object) -> Optional[int]:
    try:
        return len(tokenizer)  # type: ignore[arg-type]
    except TypeError:
        return None
