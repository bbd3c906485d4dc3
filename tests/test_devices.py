"""moe_lab.devices: one resolution of device and dtype names for every caller."""

import pytest
import torch

from moe_lab import ConfigError
from moe_lab.devices import dtype_name, resolve_device, resolve_dtype


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu") == resolve_device(None).type
    with pytest.raises(ConfigError, match="device_map must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        resolve_device("tpu", "device_map")
    with pytest.raises(ConfigError, match="device must be .* got 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_resolve_dtype():
    assert resolve_dtype(None) is None
    for name, dtype in [("float32", torch.float32), ("bf16", torch.bfloat16), ("torch.float16", torch.float16)]:
        assert resolve_dtype(name) == dtype and resolve_dtype(dtype) == dtype
    for bad in ("int8", torch.int64, 3):
        with pytest.raises(ConfigError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
            resolve_dtype(bad)
    assert dtype_name(torch.bfloat16) == "bfloat16"
