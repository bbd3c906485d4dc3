"""Loading checks: a checkpoint is compared with the model it describes before anything is allocated.

    check_layer_count(config, stored, where)            # before the meta model is built
    check_model_matches(meta_model, stored, converted, config, where)   # names, shapes, dtypes, size
    check_memory(num_bytes, device, config, where)      # what materialising will take

Everything here works on :class:`~moe_lab.checkpoint.header.TensorSpec` (shapes and dtypes
from the safetensors headers) and on a model built on the meta device, so a config that
asks for terabytes costs nothing to refuse. Each refusal is a one-line
:class:`~moe_lab.errors.CheckpointError` that names the config fields that disagree with
the weights (``hidden_size is 65536 in config.json but 32 in the weights``) or, when none
can be told apart, lists the size fields.

Memory available: on CPU, ``psutil.virtual_memory().available`` when psutil is installed,
else the physical memory (``SC_PHYS_PAGES * SC_PAGE_SIZE``), capped by a cgroup limit if the
process runs under one; on CUDA, the device's free memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import MoEConfig
from ..errors import CheckpointError
from .header import TensorSpec
from .weights import describe_key_mismatch

Specs = Dict[str, TensorSpec]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTER = re.compile(r"layers\.\d+\.(?:mlp\.router\.gate|block_sparse_moe\.gate|mlp\.gate)\.weight$")
_EXPERTS_OUT = re.compile(r"layers\.\d+\.mlp\.experts\.w_out$")


@dataclass(frozen=True)
class Where:
    """What the messages name: the config file and a description of the weights files."""

    config_path: Path
    weights: str  #: e.g. "model.safetensors" or "3 safetensors shards"

    @property
    def config_name(self) -> str:
        return self.config_path.name


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def size_fields(config: MoEConfig) -> str:
    """The fields that set the model's size, with their values."""
    return (
        f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, num_layers={config.num_layers}, "
        f"num_attention_heads={config.num_attention_heads}, num_experts={config.num_experts}, "
        f"expert_hidden_size={config.expert_hidden_size}"
    )


# ---------------------------------------------------------------------------------------
# which config fields disagree with the weights
# ---------------------------------------------------------------------------------------


def implied_sizes(specs: Specs) -> Dict[str, Tuple[int, str]]:
    """Config fields the stored tensors pin down: ``{field: (value, evidence)}``."""
    out: Dict[str, Tuple[int, str]] = {}
    for name, spec in specs.items():
        if name.endswith("embed_tokens.weight") and len(spec.shape) == 2:
            out["vocab_size"] = (spec.shape[0], f"{name} {list(spec.shape)}")
            out["hidden_size"] = (spec.shape[1], f"{name} {list(spec.shape)}")
        elif _ROUTER.search(name) and len(spec.shape) == 2 and "num_experts" not in out:
            out["num_experts"] = (spec.shape[0], f"{name} {list(spec.shape)}")
        elif _EXPERTS_OUT.search(name) and len(spec.shape) == 3 and "expert_hidden_size" not in out:
            out["expert_hidden_size"] = (spec.shape[2], f"{name} {list(spec.shape)}")
    layers = sorted({int(m.group(1)) for m in map(_LAYER.search, specs) if m})
    if layers:
        out["num_layers"] = (layers[-1] + 1, f"layers.0 ... layers.{layers[-1]}")
    return out


def disagreements(config: MoEConfig, specs: Specs, where: Where) -> List[str]:
    """``"hidden_size is 65536 in config.json but 32 in the weights (...)"`` for each field that differs."""
    out = []
    for field, (value, evidence) in implied_sizes(specs).items():
        if field == "num_experts" and not config.moe_layer_indices:
            continue
        configured = config.intermediate_size if field == "expert_hidden_size" else getattr(config, field)
        if configured != value:
            out.append(f"{field} is {configured} in {where.config_name} but {value} in the weights ({evidence})")
    return out


def _explain(config: MoEConfig, specs: Specs, where: Where) -> str:
    found = disagreements(config, specs, where)
    return "; ".join(found) if found else f"check the size fields of {where.config_name} ({size_fields(config)})"


# ---------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------


def check_layer_count(config: MoEConfig, stored: Specs, where: Where) -> None:
    """Refuse a ``num_layers`` beyond the layers the weights hold, before a model is built
    (building even a meta model costs time and memory per layer)."""
    layers = [int(m.group(1)) for m in map(_LAYER.search, stored) if m]
    held = max(layers) + 1 if layers else 0
    if config.num_layers > held:
        raise CheckpointError(
            f"{where.config_path}: num_layers is {config.num_layers} but {where.weights} holds "
            + (f"{held} layers (layers.0 ... layers.{held - 1})" if held else "no layers.N tensors")
        )


def model_specs(model: nn.Module, config: MoEConfig) -> Specs:
    """What the model's state dict holds (the tied ``lm_head.weight`` left out)."""
    specs = {name: TensorSpec.of(t) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        specs.pop("lm_head.weight", None)
    return specs


def compare_specs(
    expected: Specs, stored: Specs, expert_slices: Optional[Dict[str, slice]] = None
) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, mismatched) between what a model expects and what is stored.

    A name in ``expert_slices`` is a shard: the stored tensor must hold the slice's rows.
    The tied ``lm_head.weight`` may be stored or not. Floating parameters need floating
    tensors (the dtype itself may differ: it is converted on load).
    """
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(n for n in set(stored) - set(expected) if n != "lm_head.weight" or "embed_tokens.weight" not in expected)
    mismatched = []
    for name in expected:
        if name not in stored:
            continue
        want, got = expected[name], stored[name]
        sl = (expert_slices or {}).get(name)
        if sl is not None:
            ok = got.shape[1:] == want.shape[1:] and len(got.shape) > 0 and got.shape[0] >= sl.stop
            if not ok:
                mismatched.append(f"{name}: checkpoint {got.shape}, this rank holds rows {sl.start}:{sl.stop} of {want.shape}")
                continue
        elif got.shape != want.shape:
            mismatched.append(f"{name}: checkpoint {got.shape} vs model {want.shape}")
            continue
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            mismatched.append(f"{name}: checkpoint dtype {got.dtype}, the model expects {want.dtype}")
    return missing, unexpected, mismatched


def check_model_matches(model: nn.Module, stored: Specs, converted: Specs, config: MoEConfig, where: Where) -> int:
    """Refuse weights that do not fit the (meta) model of ``config``; returns its parameter count.

    Args:
        model: the model built from ``config`` (on the meta device).
        stored: the specs as stored (the headers), for the size of the files.
        converted: the stored specs under moe_lab names (equal to ``stored`` for moe_lab files).
    """
    expected = model_specs(model, config)
    missing, unexpected, mismatched = compare_specs(expected, converted)
    mismatch = describe_key_mismatch(missing, unexpected, mismatched)
    num_params = sum(s.numel for s in expected.values())
    num_stored = sum(s.numel for s in stored.values())
    if num_params > num_stored:
        raise CheckpointError(
            f"{where.config_path} describes {num_params:,} parameters ({format_bytes(num_params * 4)} as float32) "
            f"but {where.weights} holds {num_stored:,} values: {_explain(config, converted, where)}"
            + (f"; {mismatch}" if mismatch else "")
        )
    if mismatch:
        found = disagreements(config, converted, where)
        raise CheckpointError(
            f"checkpoint {where.config_path.parent} does not match its {where.config_name}: {mismatch}"
            + (f" ({'; '.join(found)})" if found else "")
        )
    return num_params


def _cgroup_limit() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def host_memory() -> Optional[int]:
    """Bytes of host memory a load may use (None when unknown)."""
    try:
        import psutil  # optional

        avail: Optional[int] = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    limit = _cgroup_limit()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free where parameters go: the CUDA device's free memory, else :func:`host_memory`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory()


def check_memory(num_bytes: int, device: torch.device, config: MoEConfig, where: Where, dtype: torch.dtype) -> None:
    """Refuse to materialise ``num_bytes`` of parameters that do not fit ``device``."""
    avail = available_memory(device)
    if avail is not None and num_bytes > avail:
        raise CheckpointError(
            f"{where.config_path}: the model needs {format_bytes(num_bytes)} for its parameters "
            f"({str(dtype).replace('torch.', '')}) but {device} has {format_bytes(avail)} available "
            f"({size_fields(config)})"
        )
