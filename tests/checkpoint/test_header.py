"""The safetensors header check: what read_header accepts and what it refuses (without reading tensors)."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from moe_lab import CheckpointError
from moe_lab.checkpoint import TensorSpec, read_header


def _file(tmp_path, header, data=b""):
    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_reads_shapes_dtypes_and_metadata(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.zeros(0)}, str(path),
              metadata={"format": "pt"})
    header = read_header(path)
    assert header.specs == {"a": TensorSpec((3, 4), torch.float32), "b": TensorSpec((2,), torch.bfloat16),
                            "c": TensorSpec((0,), torch.float32)}
    assert header.metadata == {"format": "pt"} and header.num_elements == 14 and header.data_bytes == 52
    assert TensorSpec((3, 4), torch.float32).nbytes == 48 and str(TensorSpec((3, 4), torch.float32)) == "[3, 4] float32"


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype 'F99'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape [-1]"),
        ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 4]}}, b"\0" * 4, "shape '2'"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "0 <= begin <= end"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, "expected [begin, end]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "ends at byte 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
        ({"a": [1, 2]}, b"", "expected an object"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__ must map strings to strings"),
    ],
)
def test_refuses_malformed_entries(tmp_path, header, data, needle):
    with pytest.raises(CheckpointError) as err:
        read_header(_file(tmp_path, header, data))
    assert needle in str(err.value) and "truncated or not safetensors" in str(err.value)


def test_refuses_short_files_absurd_lengths_and_non_json(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="fewer than the 8-byte header length"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="header length is 4611686018427387904 bytes but the file has 10 bytes"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="JSON list, expected an object"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")
