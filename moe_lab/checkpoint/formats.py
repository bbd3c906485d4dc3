"""Which reader opens a directory whose ``config.json`` names a transformers ``model_type``.

    register_format("mixtral", MixtralCheckpoint)   # done by moe_lab.interop on import
    reader_for("mixtral", path)                      # -> MixtralCheckpoint

moe_lab's own checkpoints have no ``model_type``. Readers of other formats live in higher
layers (:mod:`moe_lab.interop` converts transformers names and configs) and add
themselves here when imported, so this package never imports them at module level. When
a ``model_type`` is not registered, :func:`reader_for` imports :mod:`moe_lab.interop` once
(the only place such readers come from) and looks again.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict, List

from ..errors import CheckpointError

#: model_type -> a Checkpoint subclass (typed Any: this module must not import the reader)
_READERS: Dict[str, Any] = {}
#: the package whose import registers the transformers readers
_INTEROP = "moe_lab.interop"


def register_format(model_type: str, reader: Any) -> None:
    """Open directories whose ``config.json`` has this ``model_type`` with ``reader``
    (a :class:`~moe_lab.checkpoint.Checkpoint` subclass with a ``from_directory`` classmethod)."""
    _READERS[model_type] = reader


def registered_formats() -> List[str]:
    """The ``model_type`` values that have a reader."""
    return sorted(_READERS)


def reader_for(model_type: str, path: Path) -> Any:
    """The reader class of ``model_type``.

    Raises:
        CheckpointError: no reader for it (the message lists the model types there are).
    """
    if model_type not in _READERS:
        importlib.import_module(_INTEROP)  # registers the transformers readers
    if model_type not in _READERS:
        raise CheckpointError(
            f"{path} is a transformers checkpoint of model_type {model_type!r}; moe_lab reads moe_lab "
            f"checkpoints and transformers {registered_formats()} directories"
        )
    return _READERS[model_type]
