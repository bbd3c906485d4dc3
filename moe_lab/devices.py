"""Device and dtype names, resolved once for every caller (trainer, inference, checkpoints, interop).

    resolve_device("auto")                 # cuda if available, else cpu
    resolve_device("cuda:1", "device_map") # a ConfigError names the argument when it is bad
    resolve_dtype("bf16")                  # torch.bfloat16; None stays None
    dtype_name(torch.bfloat16)             # "bfloat16"

Only CPU and CUDA devices are accepted, and only the floating dtypes models are run in
(float32, bfloat16, float16, with the short names fp32/bf16/fp16 and a ``torch.`` prefix).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .errors import ConfigError

#: dtype names accepted wherever a dtype is given as a string
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_CANONICAL = ("float32", "bfloat16", "float16")


def resolve_device(device: Union[None, str, torch.device] = "auto", name: str = "device") -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device.

    Args:
        device: what the user asked for.
        name: the argument's name, used in the error message (``device_map``, ``device``).

    Raises:
        ConfigError: an unknown device, or CUDA asked for on a machine without it.
    """
    expected = f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        resolved = device
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(expected) from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(expected)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name}={device!r} but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: Union[None, str, torch.dtype], name: str = "dtype") -> Optional[torch.dtype]:
    """``None`` / ``"float32"`` / ``"bf16"`` / ``"torch.float16"`` / ``torch.bfloat16`` as a torch dtype.

    Raises:
        ConfigError: anything else, listing the accepted names.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"{name} must be one of {list(_CANONICAL)} (or fp32/bf16/fp16), got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")
