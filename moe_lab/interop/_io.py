"""Shared pieces of the converters: the refusal error, dtype names, config helpers.

Nothing here imports transformers, and nothing here reads files: transformers directories
are read through :class:`moe_lab.checkpoint.Checkpoint` (the readers in
:mod:`moe_lab.interop.readers`) and written with :func:`moe_lab.checkpoint.write_model_files`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..devices import dtype_name
from ..devices import resolve_dtype as _resolve_dtype
from ..errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

#: shards written by an export stay below this size (as transformers' default)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


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
    return _resolve_dtype(dtype)


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


def put_attention_biases(
    put: Callable[[str, str, tuple], None],
    take: Callable[[str, tuple], Optional[torch.Tensor]],
    has: Callable[[str], bool],
    layer: int,
    d: int,
    q_out: int,
    kv_out: int,
    attention_bias: bool,
    layout: Sequence[str],
    nonzero: List[str],
) -> None:
    """Map one layer's attention biases from transformers names to moe_lab's.

    With ``attention_bias`` the q/k/v biases are moe_lab's ``attn.{q,k,v}_proj.bias``.
    ``layout``: the projections the source format can give a bias (Qwen2-MoE: q/k/v; Llama,
    Qwen3-MoE: q/k/v/o; Mixtral: none). Any other bias of those the source holds (q/k/v
    without ``attention_bias``, and ``o_proj``, which moe_lab never has) is exact only when
    zero: zero ones are dropped, non-zero ones are appended to ``nonzero`` (full names). A
    bias outside ``layout`` is left alone (the caller reports it as unexpected).
    """
    p = f"layers.{layer}."
    for proj, n, mapped in (("q_proj", q_out, attention_bias), ("k_proj", kv_out, attention_bias),
                            ("v_proj", kv_out, attention_bias), ("o_proj", d, False)):
        key = f"{p}self_attn.{proj}.bias"
        if mapped:
            put(f"{p}attn.{proj}.bias", key, (n,))
        elif proj in layout and has(key):
            t = take(key, (n,))
            if t is not None and not t.is_meta and bool(t.any()):
                nonzero.append(f"model.{key}")


QKV = ("q_proj", "k_proj", "v_proj")  #: the projections Qwen2-MoE's qkv_bias covers
QKVO = QKV + ("o_proj",)  #: the projections Llama's and Qwen3-MoE's attention_bias covers


def nonzero_bias_reasons(nonzero: Sequence[str], attention_bias: bool) -> List[str]:
    """One refusal reason per non-zero bias that moe_lab cannot hold (see put_attention_biases)."""
    return [
        f"{key} is non-zero; moe_lab's o_proj has no bias (zero ones are accepted)" if ".o_proj." in key else
        f"{key} is non-zero but attention_bias={attention_bias} (zero ones are accepted; do not override "
        "attention_bias=False)"
        for key in nonzero
    ]
