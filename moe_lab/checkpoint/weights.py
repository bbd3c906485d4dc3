"""Tensors of safetensors files, read only when asked.

    weights = LazyWeights.from_files([Path("ckpt/model.safetensors")])
    weights.spec("layers.0.mlp.experts.w_in")      # TensorSpec from the header, nothing read
    w = weights["embed_tokens.weight"]               # reads this tensor only
    e3 = weights.rows("layers.0.mlp.experts.w_in", 3, 4)[0]   # one expert's rows only

The files are opened with ``safetensors.safe_open`` (memory-mapped) after their headers
have passed :func:`~moe_lab.checkpoint.header.read_header`; a tensor's bytes are read when
it is looked up. Nothing is unpickled. ``exclude`` (names, or a predicate on the name)
hides tensors, e.g. the experts that an expert cache reads on demand instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .header import SafetensorsHeader, TensorSpec, read_header

#: tensor names to skip: a collection of names, or a predicate ``name -> bool``
Exclude = Union[None, Collection[str], Callable[[str], bool]]


def exclusion(exclude: Exclude) -> Callable[[str], bool]:
    """``exclude`` as a predicate (None excludes nothing)."""
    if exclude is None:
        return lambda name: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of tensor names or a predicate, not one string")
    names = frozenset(exclude)
    return names.__contains__


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {exc} (the file is truncated or not safetensors)")


class LazyWeights(Mapping[str, torch.Tensor]):
    """A read-only mapping of tensor name -> tensor over one or more safetensors files.

    Args:
        headers: the checked headers of the files (tensor names must be unique across them).
        exclude: tensors to hide (names or a predicate).
    """

    def __init__(self, headers: Sequence[SafetensorsHeader], exclude: Exclude = None) -> None:
        skip = exclusion(exclude)
        self._where: Dict[str, SafetensorsHeader] = {}
        for header in headers:
            for name in header.tensors:
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is in both {self._where[name].path} and {header.path}")
                if not skip(name):
                    self._where[name] = header
        self._handles: Dict[Path, Any] = {}

    @classmethod
    def from_files(cls, paths: Sequence[Union[str, Path]], exclude: Exclude = None) -> "LazyWeights":
        """Check the headers of ``paths`` and map their tensors."""
        return cls([read_header(p) for p in paths], exclude)

    # ---- Mapping ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        header = self._where[name]  # KeyError for an unknown name, as a Mapping should
        try:
            return self._handle(header.path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _unreadable(header.path, exc) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    # ---- without reading the data -----------------------------------------------------
    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of ``name`` from the header."""
        return self._where[name].tensors[name].spec

    def specs(self) -> Dict[str, TensorSpec]:
        return {name: self.spec(name) for name in self._where}

    @property
    def files(self) -> List[Path]:
        return sorted({h.path for h in self._where.values()})

    # ---- partial reads ----------------------------------------------------------------
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` reading only those rows (e.g. some experts of ``[E, ...]``)."""
        header = self._where[name]
        try:
            return self._handle(header.path).get_slice(name)[start:stop]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _unreadable(header.path, exc) from None

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise _unreadable(path, exc) from None
        return self._handles[path]

    def __repr__(self) -> str:
        return f"LazyWeights({len(self)} tensors in {[p.name for p in self.files]})"


# ---------------------------------------------------------------------------------------
# describing mismatches
# ---------------------------------------------------------------------------------------


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
        mismatched = list(mismatched)
        parts.append(f"shape mismatches {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}")
    return "; ".join(parts)


def restrict(weights: Mapping[str, torch.Tensor], exclude: Exclude) -> Dict[str, torch.Tensor]:
    """An eager ``{name: tensor}`` of ``weights`` without the excluded names."""
    skip = exclusion(exclude)
    return {name: weights[name] for name in weights if not skip(name)}
