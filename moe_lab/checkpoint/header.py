"""The safetensors header, read and checked before any tensor is.

    header = read_header("ckpt/model.safetensors")
    header.tensors["embed_tokens.weight"].spec      # TensorSpec(shape=(259, 64), dtype=torch.float32)
    header.num_elements, header.data_bytes

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then
the tensor bytes, with offsets relative to the start of that data. Only the header is read
here, and everything a loader relies on is checked against the file's size: N must fit the
file (a corrupt 2^62 is refused, not allocated), the JSON must be an object of well-formed
entries, every tensor's bytes must lie inside the data, and ``end - begin`` must equal
``prod(shape) * itemsize(dtype)``. Any failure is a :class:`~moe_lab.errors.CheckpointError`
that says what is wrong and that the file is truncated or not safetensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..errors import CheckpointError

#: safetensors' own limit on the header size (100 MB)
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype names -> torch dtypes (those this torch build has)
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
        "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
        "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor, without its data."""

    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), t.dtype)

    def meta(self) -> torch.Tensor:
        """An empty meta tensor of this shape and dtype (no memory)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class StoredTensor:
    """One header entry: the tensor's spec and where its bytes are in the data section."""

    spec: TensorSpec
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of one safetensors file."""

    path: Path
    tensors: Dict[str, StoredTensor]
    metadata: Dict[str, str]
    data_bytes: int  #: size of the data section (file size - 8 - header length)

    @property
    def specs(self) -> Dict[str, TensorSpec]:
        return {name: t.spec for name, t in self.tensors.items()}

    @property
    def num_elements(self) -> int:
        return sum(t.spec.numel for t in self.tensors.values())


def _refuse(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {reason} (the file is truncated or not safetensors)")


def _entry(path: Path, name: str, entry: object, data_bytes: int) -> StoredTensor:
    if not isinstance(entry, dict):
        raise _refuse(path, f"the header entry of {name!r} is {type(entry).__name__}, expected an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise _refuse(path, f"tensor {name!r} has dtype {dtype_name!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _refuse(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _refuse(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _refuse(path, f"tensor {name!r} has data_offsets {offsets}; expected 0 <= begin <= end")
    if end > data_bytes:
        raise _refuse(path, f"tensor {name!r} ends at byte {end} of the data, but the file holds only {data_bytes} bytes of data")
    spec = TensorSpec(tuple(shape), SAFETENSORS_DTYPES[dtype_name])
    if end - begin != spec.nbytes:
        raise _refuse(
            path,
            f"tensor {name!r} has data_offsets {offsets} ({end - begin} bytes) but shape {shape} of {dtype_name} "
            f"needs {spec.nbytes} bytes",
        )
    return StoredTensor(spec, begin, end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and check the header of a safetensors file (the tensor data is not read).

    Raises:
        CheckpointError: the file is missing, too small, or its header is absurd, not JSON,
            malformed, or describes bytes the file does not hold.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _refuse(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise _refuse(
                    path,
                    f"the header length is {header_len} bytes but the file has {size} bytes "
                    f"(and a header may have at most {MAX_HEADER_BYTES})",
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _refuse(path, f"the header is a JSON {type(header).__name__}, expected an object")
    data_bytes = size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ must map strings to strings")
    tensors = {name: _entry(path, name, entry, data_bytes) for name, entry in header.items()}
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise _refuse(path, f"the bytes of tensors {a!r} and {b!r} overlap")
    return SafetensorsHeader(path, tensors, metadata, data_bytes)
