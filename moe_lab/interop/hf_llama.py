"""Load a dense transformers Llama (or Mistral) directory as an all-dense moe_lab model.

    dense = load_hf_llama_dense("llama-dir/")        # MoEModel with no MoE layers, same logits
    moe = moe_lab.upcycle(dense, num_experts=8, experts_per_token=2)

The dense model is a :class:`~moe_lab.MoEModel` whose config has
``moe_layer_frequency = num_layers + 1``, which makes every layer dense (MoEConfig's way to
say "no MoE layers"). Its only use is as the source of :func:`moe_lab.upcycle`.

Mapping: ``mlp.gate_proj`` and ``mlp.up_proj`` [I, D] become the dense MLP's fused
``up.weight`` [2I, D] (gate rows first), ``mlp.down_proj`` becomes ``down.weight``; the
attention, norms, embeddings and head map as for Mixtral; ``head_dim`` becomes MoEConfig's
``head_dim`` and ``attention_bias`` its ``attention_bias`` (Llama's also gives o_proj a bias,
which must then be zero: moe_lab's o_proj has none). Features moe_lab cannot run exactly (MLP
biases, a non-zero o_proj bias, scaled RoPE, a sliding window shorter than the context, other
activations) are refused with every reason listed. Read through
:class:`moe_lab.checkpoint.Checkpoint` (JSON and safetensors only; transformers is not needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from ..checkpoint import Checkpoint, describe_key_mismatch, read_config_json
from ..config import MoEConfig
from ..errors import CheckpointError, ConfigError
from ._hf import head_dim_field
from ._io import (
    QKVO,
    PathLike,
    UnsupportedConversionError,
    nonzero_bias_reasons,
    put_attention_and_norms,
    put_attention_biases,
    rope_theta_of,
)

#: transformers defaults for the fields a config.json may leave out
DENSE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "rope_theta": 10000.0,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
    },
}
DENSE_MODEL_TYPES = tuple(DENSE_DEFAULTS)
_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def dense_config_from_hf(raw: Dict[str, Any], **overrides: Any) -> MoEConfig:
    """The all-dense :class:`MoEConfig` of a Llama/Mistral ``config.json``."""
    model_type = raw.get("model_type")
    if model_type not in DENSE_DEFAULTS:
        raise CheckpointError(f"model_type {model_type!r} is not a supported dense model; expected one of {list(DENSE_MODEL_TYPES)}")
    defaults = DENSE_DEFAULTS[model_type]

    def get(key: str) -> Any:
        value = raw.get(key)
        return defaults.get(key) if value is None else value

    problems: List[str] = []
    act = get("hidden_act")
    if act not in _ACTS:
        problems.append(f"hidden_act is {act!r}; moe_lab's gated MLPs implement 'silu' and 'gelu' exactly")
    if raw.get("mlp_bias"):
        problems.append("mlp_bias=True; moe_lab's MLPs have no biases")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    rope_theta = rope_theta_of(raw, defaults["rope_theta"], problems)
    window = raw.get("sliding_window", defaults["sliding_window"])
    context = overrides.get("max_position_embeddings") or get("max_position_embeddings")
    if window is not None and window < context:
        problems.append(
            f"sliding_window={window} is smaller than max_position_embeddings ({context}); moe_lab has no "
            f"sliding-window attention. Pass max_position_embeddings={window} (or less)"
        )
    kv = raw.get("num_key_value_heads")
    if kv is None:
        kv = defaults.get("num_key_value_heads", heads) if "num_key_value_heads" not in raw else heads
    num_layers = get("num_hidden_layers")
    fields = {
        "vocab_size": get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim_field(raw.get("head_dim"), hidden, heads),
        "attention_bias": bool(raw.get("attention_bias")),  # mistral has no such field: False
        "max_position_embeddings": get("max_position_embeddings"),
        "rope_theta": rope_theta,
        "rms_norm_eps": get("rms_norm_eps"),
        "tie_word_embeddings": bool(get("tie_word_embeddings")),
        "initializer_range": get("initializer_range"),
        "dropout": 0.0,
        "attention_dropout": float(get("attention_dropout") or 0.0),
        "num_experts": 1,
        "experts_per_token": 1,
        "expert_hidden_size": get("intermediate_size"),
        "dense_intermediate_size": get("intermediate_size"),
        "expert_type": "glu",
        "activation": _ACTS.get(act, "swiglu"),
        "moe_layer_frequency": num_layers + 1,  # no MoE layers
    }
    if problems:
        raise UnsupportedConversionError(f"this {model_type} checkpoint cannot be loaded exactly by moe_lab", problems)
    try:
        config = MoEConfig.from_dict({**fields, **overrides})
    except ConfigError as exc:
        raise CheckpointError(f"the {model_type} config does not make a valid moe_lab model: {exc}") from None
    return config


def dense_state_dict_from_hf(state: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
    """Llama-layout weights under the names of an all-dense MoEModel.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped tensors.
        UnsupportedConversionError: non-zero o_proj biases (all listed).
    """
    src = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    if "lm_head.weight" in state:
        src["lm_head.weight"] = state["lm_head.weight"]
    d, inner = config.hidden_size, config.dense_ffn_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    used, missing, mismatched, nonzero = set(), [], [], []
    out: Dict[str, torch.Tensor] = {}

    def take(key: str, shape: tuple) -> Any:
        if key not in src:
            missing.append(key)
            return None
        used.add(key)
        if tuple(src[key].shape) != shape:
            mismatched.append(f"{key}: {tuple(src[key].shape)}, expected {shape}")
            return None
        return src[key]

    def put(dst: str, key: str, shape: tuple) -> None:
        t = take(key, shape)
        if t is not None:
            out[dst] = t

    put("embed_tokens.weight", "embed_tokens.weight", (config.vocab_size, d))
    for i in range(config.num_layers):
        p = f"layers.{i}."
        put_attention_and_norms(put, i, d, q_out, kv_out)
        put_attention_biases(put, take, src.__contains__, i, d, q_out, kv_out, config.attention_bias, QKVO, nonzero)
        gate = take(f"{p}mlp.gate_proj.weight", (inner, d))
        up = take(f"{p}mlp.up_proj.weight", (inner, d))
        if gate is not None and up is not None:
            out[f"{p}mlp.up.weight"] = torch.cat([gate, up], dim=0)  # [2I, D]: gate rows, then up rows
        put(f"{p}mlp.down.weight", f"{p}mlp.down_proj.weight", (d, inner))
    put("norm.weight", "norm.weight", (d,))
    if config.tie_word_embeddings:
        used.add("lm_head.weight")
    else:
        put("lm_head.weight", "lm_head.weight", (config.vocab_size, d))
    # non-persistent buffers some old checkpoints carry
    unexpected = sorted(k for k in set(src) - used if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected or mismatched:
        raise CheckpointError("the dense weights do not match the config: " + describe_key_mismatch(missing, unexpected, mismatched, "tensors with no place in moe_lab's layout"))
    if nonzero:
        raise UnsupportedConversionError("this Llama checkpoint cannot be loaded exactly by moe_lab",
                                         nonzero_bias_reasons(nonzero, config.attention_bias))
    return out


def load_hf_llama_dense(path: PathLike, **overrides: Any) -> nn.Module:
    """A local transformers Llama/Mistral directory as an all-dense :class:`~moe_lab.MoEModel` (fp32)."""
    d = Path(path).expanduser()
    model_type = read_config_json(d).get("model_type")
    if model_type not in DENSE_DEFAULTS:
        raise CheckpointError(f"model_type {model_type!r} is not a supported dense model; expected one of {list(DENSE_MODEL_TYPES)}")
    return Checkpoint.open(d, **overrides).build_model()
