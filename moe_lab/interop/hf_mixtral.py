"""Export moe_lab models as transformers Mixtral checkpoints, and import Mixtral checkpoints.

    from moe_lab import export_hf_mixtral, import_hf_mixtral, load_pretrained_moe

    export_hf_mixtral("outputs/demo/model", "hf-out/")          # or export_hf_mixtral(model, ..., tokenizer=tok)
    # transformers.AutoModelForCausalLM.from_pretrained("hf-out/") -> MixtralForCausalLM, same logits
    model = load_pretrained_moe("hf-out/")                       # any local Mixtral directory -> MoEModel
    model, tokenizer = import_hf_mixtral("hf-out/", out="ckpt/") # + the tokenizer, saved as a moe_lab checkpoint

Written layout (what ``MixtralForCausalLM.save_pretrained`` itself writes, in transformers
v4 and v5, so vLLM, SGLang and TGI read it too):

==========================================================  ======================================
Mixtral key (``model.layers.{i}.`` prefix)                  moe_lab key (``layers.{i}.`` prefix)
==========================================================  ======================================
``self_attn.{q,k,v,o}_proj.weight``                         ``attn.{q,k,v,o}_proj.weight``
``input_layernorm.weight`` / ``post_attention_layernorm``   ``input_norm.weight`` / ``post_attn_norm``
``block_sparse_moe.gate.weight`` [E, D]                     ``mlp.router.gate.weight`` [E, D]
``block_sparse_moe.experts.{e}.w1.weight`` [I, D] (gate)    ``mlp.experts.w_in[e, :I]``
``block_sparse_moe.experts.{e}.w3.weight`` [I, D] (up)      ``mlp.experts.w_in[e, I:]``
``block_sparse_moe.experts.{e}.w2.weight`` [D, I] (down)    ``mlp.experts.w_out[e]``
``model.embed_tokens``, ``model.norm``, ``lm_head``         ``embed_tokens``, ``norm``, ``lm_head``
==========================================================  ======================================

The import also reads the fused transformers-v5 layout (``mlp.gate.weight``,
``mlp.experts.gate_up_proj`` [E, 2I, D], ``mlp.experts.down_proj`` [E, D, I]).

What Mixtral cannot express is refused with :class:`UnsupportedConversionError`, listing
every reason (see :func:`mixtral_export_problems`); nothing is approximated. The export
driver, the routing checks and the tensor mapping are shared with the Qwen converters
(:mod:`moe_lab.interop._hf`). The exported
``config.json`` also carries the full moe_lab config (``moe_lab_config``), so an export
imports back to the same config and bitwise the same weights.

Training-only settings are mapped by name but behave slightly differently in transformers:
``router_jitter_noise`` (transformers also jitters the experts' input),
``router_aux_loss_coef`` (transformers averages the load-balancing statistics over layers),
and moe_lab's residual ``dropout`` and ``router_z_loss_coef`` have no Mixtral field.
Inference is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import MoEConfig
from ._hf import (
    HFConfig,
    HFTarget,
    ExportTensors,
    TensorMapper,
    TokenIds,
    export_hf,
    finish_config,
    import_hf,
    open_hf,
    routing_problems,
    trunk_config_dict,
    trunk_fields,
)
from ._io import DEFAULT_MAX_SHARD_BYTES, PathLike

FORMATS = ("hf-mixtral",)

#: MixtralConfig defaults (transformers), used for fields a config.json leaves out
MIXTRAL_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "rope_theta": 1e6,
}
#: Mixtral's names of an expert's gate, up and down projections
_EXPERT_NAMES = ("w1", "w3", "w2")


# ---------------------------------------------------------------------------------------
# what Mixtral can express
# ---------------------------------------------------------------------------------------


def mixtral_export_problems(config: MoEConfig) -> List[str]:
    """Every reason why ``config`` cannot be written as a Mixtral model (empty: it can).

    Mixtral: every layer is an MoE layer of gated (SwiGLU/GeGLU) experts, routed by a
    bias-free linear router to the top-k experts by softmax probability, with the k weights
    renormalised to sum to 1 and no capacity limit; no shared experts, no QK-norm, no
    attention biases. Any ``head_dim`` is fine (Mixtral's ``head_dim`` field; transformers
    honours it).
    """
    problems = routing_problems(config, "Mixtral", renormalises=True)
    dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
    if dense:
        problems.append(
            f"moe_layer_frequency={config.moe_layer_frequency} makes layers {dense} dense "
            f"(MoE layers: {list(config.moe_layer_indices)}); every Mixtral layer is an MoE layer "
            "(moe_lab.upcycle turns the dense layers into MoE layers; hf-qwen2-moe and hf-qwen3-moe express them)"
        )
    if config.num_shared_experts:
        problems.append(
            f"num_shared_experts={config.num_shared_experts}: Mixtral has no shared experts "
            "(hf-qwen2-moe has one, gated)"
        )
    if config.qk_norm:
        problems.append("qk_norm=True: Mixtral attention has no QK-norm (hf-qwen3-moe has it)")
    if config.attention_bias:
        problems.append(
            "attention_bias=True: Mixtral's q/k/v projections have no biases (hf-qwen2-moe and hf-qwen3-moe have them)"
        )
    return problems


def check_mixtral_exportable(config: MoEConfig) -> None:
    """Raise :class:`UnsupportedConversionError` listing every problem, if there is one."""
    MIXTRAL.check(config)


def mixtral_config_dict(
    config: MoEConfig, token_ids: Optional[TokenIds] = None, dtype: torch.dtype = torch.float32
) -> Dict[str, Any]:
    """The ``config.json`` of the Mixtral equivalent of ``config`` (readable by transformers v4 and v5)."""
    jitter = config.router_jitter_noise
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **trunk_config_dict(config, token_ids, dtype),
        "intermediate_size": config.intermediate_size,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.load_balancing_loss_coef,
        "router_jitter_noise": 0.0 if jitter is None else jitter,
    }


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


def mixtral_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` under Mixtral names (per-expert ``w1``/``w2``/``w3``), on CPU.

    Every moe_lab tensor is accounted for; an unmapped one is an error, never dropped.
    """
    t = ExportTensors(model, dtype, "Mixtral")

    def moe_block(i: int, p: str, q: str) -> None:
        t.put(f"{q}block_sparse_moe.gate.weight", f"{p}mlp.router.gate.weight")  # [E, D]
        t.experts(i, f"{q}block_sparse_moe.experts.", _EXPERT_NAMES)

    return t.convert(moe_block)


MIXTRAL = HFTarget("hf-mixtral", "Mixtral", mixtral_export_problems, mixtral_config_dict, mixtral_state_dict)


def export_hf_mixtral(
    model_or_checkpoint: Union[nn.Module, PathLike],
    out_dir: PathLike,
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a transformers ``MixtralForCausalLM`` directory (config, safetensors, tokenizer).

    Args:
        model_or_checkpoint: a :class:`~moe_lab.MoEModel`, or a moe_lab checkpoint directory
            (or a job output directory with ``model/``), whose tokenizer comes along.
        out_dir: the directory to write (atomically).
        tokenizer: the model's tokenizer (ByteTokenizer, BPETokenizer or a transformers one);
            default: the checkpoint's, if it has one.
        dtype: "float32", "bfloat16" or "float16"; default: the model's.
        overwrite: replace a non-empty ``out_dir``.
        max_shard_bytes: split the weights into shards of at most this size.

    Returns:
        The output directory.

    Raises:
        UnsupportedConversionError: the model uses features Mixtral cannot express (all listed).
    """
    return export_hf(MIXTRAL, model_or_checkpoint, out_dir, tokenizer, dtype, overwrite, max_shard_bytes)


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def moe_config_from_mixtral(raw: Dict[str, Any], **overrides: Any) -> MoEConfig:
    """The :class:`MoEConfig` of a Mixtral ``config.json`` (plus MoEConfig ``overrides``).

    Raises:
        UnsupportedConversionError: features moe_lab cannot run exactly (all listed).
    """
    cfg = HFConfig(raw, MIXTRAL_DEFAULTS)
    problems: List[str] = []
    fields = trunk_fields(cfg, problems, overrides, window=raw.get("sliding_window"))
    fields.update({
        "num_experts": cfg.get("num_local_experts"),
        "experts_per_token": cfg.get("num_experts_per_tok"),
        "expert_hidden_size": cfg.get("intermediate_size"),
        "moe_layer_frequency": 1,
        "router_type": "top_k",
        "capacity_factor": None,
        "router_jitter_noise": float(cfg.get("router_jitter_noise")),
        "normalize_router_weights": True,
        "router_bias": False,
        "load_balancing_loss_coef": float(cfg.get("router_aux_loss_coef")),
        "router_z_loss_coef": 0.0,
    })
    return finish_config(raw, fields, problems, "Mixtral", overrides, mixtral_config_dict)


def moe_state_dict_from_mixtral(state: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
    """Mixtral weights (per-expert v4 names or fused v5 names) under moe_lab names.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped tensors.
    """
    m = TensorMapper(state, config, renames=((".block_sparse_moe.", ".mlp."),))

    def moe_block(i: int, p: str) -> None:
        m.put(f"{p}mlp.router.gate.weight", f"{p}mlp.gate.weight", (config.num_experts, config.hidden_size))
        m.experts(i, _EXPERT_NAMES)

    return m.convert(moe_block, "Mixtral")


def load_hf_mixtral(path: PathLike, **overrides: Any) -> nn.Module:
    """Load a local transformers Mixtral directory as a :class:`~moe_lab.MoEModel` (fp32).

    Args:
        path: a directory with ``config.json`` (model_type "mixtral") and safetensors weights.
        **overrides: MoEConfig fields to change (``dropout``, ``moe_backend``, ...).
    """
    return open_hf(path, ("mixtral",), **overrides).build_model()


def import_hf_mixtral(
    path: PathLike, out: Optional[PathLike] = None, **overrides: Any
) -> Tuple[nn.Module, Any]:
    """Load a transformers Mixtral directory with its tokenizer; optionally save a moe_lab checkpoint.

    Args:
        path: the transformers directory.
        out: if given, write a moe_lab checkpoint (model + tokenizer) there.
        **overrides: MoEConfig fields to change.

    Returns:
        ``(model, tokenizer)``; the tokenizer is the moe_lab tokenizer an export came from, a
        transformers tokenizer otherwise, or None if the directory has none.
    """
    return import_hf(path, ("mixtral",), out, **overrides)
