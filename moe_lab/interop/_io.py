"""Shared pieces of the converters: the refusal error, reading and writing transformers-style
safetensors (single file or sharded with an index), config helpers.

Nothing here imports transformers: a transformers directory is plain JSON + safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError

PathLike = Union[str, "os.PathLike[str]"]

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
#: shards written by :func:`write_hf_weights` stay below this size (as transformers' default)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedConversionError(ConfigError):
    """A model uses features the target format cannot express.

    ``reasons`` lists every problem found, one string each; the message shows them all.
    """

    def __init__(self, what: str, reasons: Sequence[str]) -> None:
        self.reasons: List[str] = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{what}:\n{lines}")


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None`` / ``"float32"`` / ``torch.bfloat16`` ... as a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def read_config(directory: Path) -> Dict[str, Any]:
    """``config.json`` of a transformers directory as a dict (CheckpointError if absent/bad)."""
    path = directory / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {HF_CONFIG}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(directory: Path) -> List[Path]:
    """The safetensors files of a transformers directory (one file, or the shards of an index)."""
    index = directory / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the shard index {index}: {exc}") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = directory / HF_WEIGHTS
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (
        f"; it holds {pickles}, which are pickles and are never loaded: re-save the model with "
        "safetensors (save_pretrained(..., safe_serialization=True))"
        if pickles
        else ""
    )
    raise CheckpointError(f"{directory} has no {HF_WEIGHTS} or {HF_INDEX}{hint}")


def read_hf_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a transformers directory, by their stored names."""
    state: Dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc} (truncated or not safetensors)") from None
    return state


def write_hf_weights(
    directory: Path, tensors: Dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> List[str]:
    """Write tensors as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards
    plus ``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. Returns file names."""
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / HF_WEIGHTS), metadata=metadata)
        return [HF_WEIGHTS]
    names = []
    weight_map: Dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        names.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / HF_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return names + [HF_INDEX]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def rope_theta_of(raw: Dict[str, Any], default: float, problems: List[str]) -> float:
    """RoPE base of a transformers config (v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``);
    a scaled RoPE is appended to ``problems``."""
    params = raw.get("rope_parameters")
    theta = raw.get("rope_theta")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            problems.append(
                f"rope_parameters.rope_type is {rope_type!r}; moe_lab implements only the default "
                "(unscaled) rotary embedding"
            )
        theta = params.get("rope_theta", theta)
    elif params is not None:
        problems.append(f"rope_parameters must be a mapping, got {params!r}")
    scaling = raw.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type not in (None, "default"):
            problems.append(f"rope_scaling {scaling!r} is set; moe_lab implements only unscaled RoPE")
    return float(default if theta is None else theta)


def unknown_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def put_attention_and_norms(put: Callable[[str, str, tuple], None], layer: int, d: int, q_out: int, kv_out: int) -> None:
    """Map one decoder layer's attention projections and norms from the transformers
    Llama/Mixtral names to moe_lab's (``put(moe_lab_name, hf_name, expected_shape)``)."""
    p = f"layers.{layer}."
    put(f"{p}attn.q_proj.weight", f"{p}self_attn.q_proj.weight", (q_out, d))
    put(f"{p}attn.k_proj.weight", f"{p}self_attn.k_proj.weight", (kv_out, d))
    put(f"{p}attn.v_proj.weight", f"{p}self_attn.v_proj.weight", (kv_out, d))
    put(f"{p}attn.o_proj.weight", f"{p}self_attn.o_proj.weight", (d, q_out))
    put(f"{p}input_norm.weight", f"{p}input_layernorm.weight", (d,))
    put(f"{p}post_attn_norm.weight", f"{p}post_attention_layernorm.weight", (d,))
