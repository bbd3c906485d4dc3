"""Export moe_lab models as transformers Qwen2-MoE / Qwen3-MoE checkpoints, and import them.

    from moe_lab.interop import export_hf_qwen2_moe, export_hf_qwen3_moe, import_hf_qwen2_moe

    export_hf_qwen2_moe(model, "hf-out/")     # shared expert + gate -> Qwen2MoeForCausalLM
    export_hf_qwen3_moe(model, "hf-out/")     # QK-norm, no shared experts -> Qwen3MoeForCausalLM
    model = load_pretrained_moe("hf-out/")    # any local qwen2_moe / qwen3_moe directory -> MoEModel
    model, tokenizer = import_hf_qwen3_moe("hf-out/", out="ckpt/")

What each layout is, and what moe_lab config expresses it:

- **Qwen2-MoE** (``Qwen2MoeForCausalLM``): every ``decoder_sparse_step``-th layer not in
  ``mlp_only_layers`` is an MoE layer (``moe_layer_frequency``); the others are dense gated
  MLPs of width ``intermediate_size`` (``dense_intermediate_size``). An MoE layer is a
  bias-free softmax top-k router (``norm_topk_prob`` = ``normalize_router_weights``) over
  gated experts of width ``moe_intermediate_size``, plus one shared gated MLP of width
  ``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``
  (``num_shared_experts >= 1`` with ``shared_expert_gate=True``; N moe_lab shared experts
  are one MLP N times as wide). No QK-norm. Its q/k/v projections have biases
  (``qkv_bias``, always true in transformers v4): an import sets ``attention_bias=True``
  and maps them; an export always writes ``qkv_bias: true`` with the model's biases, or
  zeros when it has none (``attention_bias=False``: transformers v4 always builds them), and
  such an export imports back without biases (the embedded config says so; the zeros are
  dropped, a non-zero one is refused).
- **Qwen3-MoE** (``Qwen3MoeForCausalLM``): the same MoE and dense layers without shared
  experts, and QK-norm (``qk_norm=True``: RMSNorm over each head's Dh values of q and k,
  before RoPE). Its ``attention_bias`` gives q/k/v **and o_proj** biases: it maps to moe_lab's
  ``attention_bias`` (q/k/v only), so an export writes zero o_proj biases and an import
  accepts zero o_proj biases and refuses non-zero ones (naming each).

Both write and read ``head_dim`` (Qwen3-MoE: 128 with hidden_size 2048 and 32 heads): a
``head_dim`` other than ``hidden_size / num_attention_heads`` becomes MoEConfig's ``head_dim``.

Tensor names (``model.layers.{i}.`` prefix; what ``save_pretrained`` writes in transformers
v4 and v5; the import also reads v5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``):

==============================================================  ==========================================
transformers                                                    moe_lab (``layers.{i}.`` prefix)
==============================================================  ==========================================
``self_attn.{q,k,v,o}_proj.weight``, ``self_attn.{q,k}_norm``   ``attn.{q,k,v,o}_proj.weight``, ``attn.{q,k}_norm``
``self_attn.{q,k,v}_proj.bias`` [H*Dh], [Hkv*Dh]                 ``attn.{q,k,v}_proj.bias`` (``attention_bias``)
``mlp.gate.weight`` [E, D]                                      ``mlp.router.gate.weight``
``mlp.experts.{e}.{gate,up}_proj.weight`` [I, D]                ``mlp.experts.w_in[e, :I]`` / ``[e, I:]``
``mlp.experts.{e}.down_proj.weight`` [D, I]                     ``mlp.experts.w_out[e]``
``mlp.shared_expert.{gate,up}_proj.weight`` [I_s, D]            ``mlp.shared_experts.gate_up.weight`` [2I_s, D]
``mlp.shared_expert.down_proj.weight``                          ``mlp.shared_experts.down.weight``
``mlp.shared_expert_gate.weight`` [1, D]                        ``mlp.shared_expert_gate.weight``
dense layers: ``mlp.{gate,up}_proj``, ``mlp.down_proj``         ``mlp.up.weight`` [2I, D], ``mlp.down.weight``
==============================================================  ==========================================

What a layout cannot express (capacity dropping, switch or expert-choice routing, sigmoid
scores, aux-loss-free expert bias, group-limited routing, scaled combine weights, FFN
experts, a router bias, shared experts or QK-norm the layout lacks) is refused with every
reason listed. The export embeds the moe_lab config (``moe_lab_config``), so export ->
import is bitwise for weights and config. Nothing here imports transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config import MoEConfig
from ._hf import (
    ExportTensors,
    HFConfig,
    HFTarget,
    TensorMapper,
    TokenIds,
    export_hf,
    finish_config,
    import_hf,
    moe_layer_frequency,
    open_hf,
    routing_problems,
    trunk_config_dict,
    trunk_fields,
)
from ._io import DEFAULT_MAX_SHARD_BYTES, QKV, QKVO, PathLike

FORMATS = ("hf-qwen2-moe", "hf-qwen3-moe")
QWEN2_MOE, QWEN3_MOE = "qwen2_moe", "qwen3_moe"  #: the transformers model_type values

#: Qwen2MoeConfig / Qwen3MoeConfig defaults (transformers), for fields a config.json leaves out
_COMMON_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [],
    "rope_theta": 10000.0,
}
QWEN2_MOE_DEFAULTS: Dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_window_layers": 28,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "qkv_bias": True,
}
QWEN3_MOE_DEFAULTS: Dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "num_experts": 128,
    "attention_bias": False,
}
_NAMES = {QWEN2_MOE: "Qwen2-MoE", QWEN3_MOE: "Qwen3-MoE"}


# ---------------------------------------------------------------------------------------
# what Qwen2-MoE and Qwen3-MoE can express
# ---------------------------------------------------------------------------------------


def qwen2_moe_export_problems(config: MoEConfig) -> List[str]:
    """Every reason why ``config`` cannot be written as a Qwen2-MoE model (empty: it can).

    Qwen2-MoE: softmax top-k routing (renormalised or not) over gated experts, no capacity,
    dense layers allowed, and in every MoE layer one shared expert behind a sigmoid gate;
    no QK-norm.
    """
    problems = routing_problems(config, "Qwen2-MoE", renormalises=False)
    if not config.num_shared_experts:
        problems.append(
            "num_shared_experts=0: every Qwen2-MoE MoE layer has a gated shared expert (export a model without "
            "shared experts as hf-mixtral, or as hf-qwen3-moe with qk_norm=True)"
        )
    elif not config.shared_expert_gate:
        problems.append(
            f"shared_expert_gate=False: the {config.num_shared_experts} shared expert(s) are added ungated; "
            "Qwen2-MoE always scales its shared expert by sigmoid(shared_expert_gate(x))"
        )
    if config.qk_norm:
        problems.append("qk_norm=True: Qwen2-MoE attention has no QK-norm (hf-qwen3-moe has it)")
    return problems


def qwen3_moe_export_problems(config: MoEConfig) -> List[str]:
    """Every reason why ``config`` cannot be written as a Qwen3-MoE model (empty: it can).

    Qwen3-MoE: as Qwen2-MoE without shared experts, and with QK-norm in every layer.
    """
    problems = routing_problems(config, "Qwen3-MoE", renormalises=False)
    if config.num_shared_experts:
        problems.append(
            f"num_shared_experts={config.num_shared_experts}: Qwen3-MoE has no shared experts "
            "(hf-qwen2-moe has one, gated)"
        )
    if not config.qk_norm:
        problems.append(
            "qk_norm=False: Qwen3-MoE attention always applies QK-norm (RMSNorm on each head's queries and keys)"
        )
    return problems


def _config_dict(config: MoEConfig, model_type: str, ids: TokenIds, dtype: torch.dtype) -> Dict[str, Any]:
    out = {
        "architectures": ["Qwen2MoeForCausalLM" if model_type == QWEN2_MOE else "Qwen3MoeForCausalLM"],
        "model_type": model_type,
        **trunk_config_dict(config, ids, dtype),
        "intermediate_size": config.dense_ffn_size,  # the dense layers' MLP
        "moe_intermediate_size": config.intermediate_size,
        "use_sliding_window": False,
        "decoder_sparse_step": config.moe_layer_frequency,
        "mlp_only_layers": [],
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "norm_topk_prob": config.normalize_router_weights,
        "router_aux_loss_coef": config.load_balancing_loss_coef,
    }
    if model_type == QWEN2_MOE:
        out.update({
            "shared_expert_intermediate_size": config.shared_intermediate_size,
            "qkv_bias": True,  # always there in transformers v4: zeros without attention_bias
            "max_window_layers": config.num_layers,
        })
    else:
        # attention_bias: q/k/v and o_proj biases (o_proj's written as zeros)
        out.update({"num_local_experts": config.num_experts, "attention_bias": config.attention_bias})  # v5 name too
    return out


def qwen2_moe_config_dict(
    config: MoEConfig, token_ids: Optional[TokenIds] = None, dtype: torch.dtype = torch.float32
) -> Dict[str, Any]:
    """The ``config.json`` of the Qwen2-MoE equivalent of ``config`` (transformers v4 and v5)."""
    return _config_dict(config, QWEN2_MOE, token_ids or {}, dtype)


def qwen3_moe_config_dict(
    config: MoEConfig, token_ids: Optional[TokenIds] = None, dtype: torch.dtype = torch.float32
) -> Dict[str, Any]:
    """The ``config.json`` of the Qwen3-MoE equivalent of ``config`` (transformers v4 and v5)."""
    return _config_dict(config, QWEN3_MOE, token_ids or {}, dtype)


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


def _qwen_state_dict(model: nn.Module, dtype: Optional[torch.dtype], model_type: str) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` under Qwen names, on CPU; every moe_lab tensor is accounted for."""
    t = ExportTensors(model, dtype, _NAMES[model_type])

    def layer_mlp(i: int, p: str, q: str) -> None:
        if not model.config.is_moe_layer(i):
            t.glu(f"{q}mlp.", f"{p}mlp.up.weight", f"{p}mlp.down.weight")
            return
        t.put(f"{q}mlp.gate.weight", f"{p}mlp.router.gate.weight")  # [E, D]
        t.experts(i, f"{q}mlp.experts.")
        if model.config.num_shared_experts:
            t.glu(f"{q}mlp.shared_expert.", f"{p}mlp.shared_experts.gate_up.weight", f"{p}mlp.shared_experts.down.weight")
            t.put(f"{q}mlp.shared_expert_gate.weight", f"{p}mlp.shared_expert_gate.weight")  # [1, D]

    return t.convert(layer_mlp, qkv_bias=model_type == QWEN2_MOE, o_proj_bias=model_type == QWEN3_MOE)


def qwen2_moe_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` under Qwen2-MoE names (zero q/k/v biases without ``attention_bias``), on CPU."""
    return _qwen_state_dict(model, dtype, QWEN2_MOE)


def qwen3_moe_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` under Qwen3-MoE names (zero o_proj biases with ``attention_bias``), on CPU."""
    return _qwen_state_dict(model, dtype, QWEN3_MOE)


QWEN2_MOE_TARGET = HFTarget("hf-qwen2-moe", "Qwen2-MoE", qwen2_moe_export_problems, qwen2_moe_config_dict,
                            qwen2_moe_state_dict)
QWEN3_MOE_TARGET = HFTarget("hf-qwen3-moe", "Qwen3-MoE", qwen3_moe_export_problems, qwen3_moe_config_dict,
                            qwen3_moe_state_dict)


def export_hf_qwen2_moe(
    model_or_checkpoint: Union[nn.Module, PathLike],
    out_dir: PathLike,
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a transformers ``Qwen2MoeForCausalLM`` directory (config, safetensors, tokenizer).

    The model needs shared experts with ``shared_expert_gate=True`` and no QK-norm. Arguments
    as :func:`moe_lab.interop.export_hf_mixtral`.

    Raises:
        UnsupportedConversionError: the model uses features Qwen2-MoE cannot express (all listed).
    """
    return export_hf(QWEN2_MOE_TARGET, model_or_checkpoint, out_dir, tokenizer, dtype, overwrite, max_shard_bytes)


def export_hf_qwen3_moe(
    model_or_checkpoint: Union[nn.Module, PathLike],
    out_dir: PathLike,
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a transformers ``Qwen3MoeForCausalLM`` directory (config, safetensors, tokenizer).

    The model needs ``qk_norm=True`` and no shared experts. Arguments as
    :func:`moe_lab.interop.export_hf_mixtral`.

    Raises:
        UnsupportedConversionError: the model uses features Qwen3-MoE cannot express (all listed).
    """
    return export_hf(QWEN3_MOE_TARGET, model_or_checkpoint, out_dir, tokenizer, dtype, overwrite, max_shard_bytes)


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def moe_config_from_qwen(raw: Dict[str, Any], **overrides: Any) -> MoEConfig:
    """The :class:`MoEConfig` of a Qwen2-MoE or Qwen3-MoE ``config.json`` (plus ``overrides``).

    Raises:
        UnsupportedConversionError: features moe_lab cannot run exactly (all listed).
    """
    model_type = raw.get("model_type")
    qwen2 = model_type == QWEN2_MOE
    cfg = HFConfig(raw, QWEN2_MOE_DEFAULTS if qwen2 else QWEN3_MOE_DEFAULTS)
    what = _NAMES.get(model_type, str(model_type))
    problems: List[str] = []
    layer_types = raw.get("layer_types") or []
    sliding = bool(cfg.get("use_sliding_window")) or "sliding_attention" in layer_types
    fields = trunk_fields(cfg, problems, overrides, window=cfg.get("sliding_window") if sliding else None)
    num_layers, num_experts = cfg.get("num_hidden_layers"), cfg.get("num_experts")
    if not qwen2:
        num_experts = raw.get("num_local_experts", num_experts)  # transformers v5 writes this name
    step, mlp_only = cfg.get("decoder_sparse_step"), list(cfg.get("mlp_only_layers") or [])
    if not num_experts:
        problems.append(f"num_experts={num_experts}: a dense model (moe_lab.load_hf_llama_dense reads dense Llamas)")
    moe_layers = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    freq = moe_layer_frequency(num_layers, moe_layers, problems,
                               f"decoder_sparse_step={step} with mlp_only_layers={mlp_only}")
    dense = len(moe_layers) < num_layers
    fields.update({
        "num_experts": num_experts or 1,
        "experts_per_token": cfg.get("num_experts_per_tok"),
        "expert_hidden_size": cfg.get("moe_intermediate_size"),
        "dense_intermediate_size": cfg.get("intermediate_size") if dense else None,
        "moe_layer_frequency": freq,
        "router_type": "top_k",
        "capacity_factor": None,
        "router_jitter_noise": 0.0,
        "normalize_router_weights": bool(cfg.get("norm_topk_prob")),
        "router_bias": False,
        "load_balancing_loss_coef": float(cfg.get("router_aux_loss_coef")),
        "router_z_loss_coef": 0.0,
    })
    if qwen2:
        fields.update({
            "num_shared_experts": 1,
            "shared_expert_intermediate_size": cfg.get("shared_expert_intermediate_size"),
            "shared_expert_gate": True,
            "attention_bias": bool(cfg.get("qkv_bias")),
        })
        config_dict = qwen2_moe_config_dict
    else:
        fields["qk_norm"] = True
        fields["attention_bias"] = bool(cfg.get("attention_bias"))
        config_dict = qwen3_moe_config_dict
    return finish_config(raw, fields, problems, what, overrides, config_dict)


def moe_state_dict_from_qwen(
    state: Dict[str, torch.Tensor], config: MoEConfig, model_type: str = QWEN3_MOE
) -> Dict[str, torch.Tensor]:
    """Qwen2-MoE / Qwen3-MoE weights (per-expert or fused v5 names) under moe_lab names.

    With ``config.attention_bias`` the q/k/v biases are mapped; the other attention biases
    (Qwen3-MoE's o_proj, q/k/v without ``attention_bias``) are dropped when zero and refused
    otherwise.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped tensors.
        UnsupportedConversionError: non-zero biases moe_lab has no place for (all listed).
    """
    m = TensorMapper(state, config)
    d = config.hidden_size

    def layer_mlp(i: int, p: str) -> None:
        if not config.is_moe_layer(i):
            m.glu(f"{p}mlp.up.weight", f"{p}mlp.down.weight", f"{p}mlp.", config.dense_ffn_size)
            return
        m.put(f"{p}mlp.router.gate.weight", f"{p}mlp.gate.weight", (config.num_experts, d))
        m.experts(i)
        if config.num_shared_experts:
            m.glu(f"{p}mlp.shared_experts.gate_up.weight", f"{p}mlp.shared_experts.down.weight",
                  f"{p}mlp.shared_expert.", config.shared_intermediate_size)
            if config.shared_expert_gate:
                m.put(f"{p}mlp.shared_expert_gate.weight", f"{p}mlp.shared_expert_gate.weight", (1, d))

    return m.convert(layer_mlp, _NAMES[model_type], biased=QKV if model_type == QWEN2_MOE else QKVO)


def load_hf_qwen_moe(path: PathLike, **overrides: Any) -> nn.Module:
    """Load a local transformers Qwen2-MoE or Qwen3-MoE directory as a :class:`~moe_lab.MoEModel` (fp32).

    Args:
        path: a directory with ``config.json`` (model_type "qwen2_moe" or "qwen3_moe") and safetensors.
        **overrides: MoEConfig fields to change (``dropout``, ``moe_backend``, ...).
    """
    return open_hf(path, (QWEN2_MOE, QWEN3_MOE), **overrides).build_model()


def import_hf_qwen2_moe(
    path: PathLike, out: Optional[PathLike] = None, **overrides: Any
) -> Tuple[nn.Module, Any]:
    """Load a transformers Qwen2-MoE directory with its tokenizer; optionally save a moe_lab
    checkpoint at ``out``. Returns ``(model, tokenizer)`` (see :func:`moe_lab.interop.import_hf_mixtral`)."""
    return import_hf(path, (QWEN2_MOE,), out, **overrides)


def import_hf_qwen3_moe(
    path: PathLike, out: Optional[PathLike] = None, **overrides: Any
) -> Tuple[nn.Module, Any]:
    """Load a transformers Qwen3-MoE directory with its tokenizer; optionally save a moe_lab
    checkpoint at ``out``. Returns ``(model, tokenizer)`` (see :func:`moe_lab.interop.import_hf_mixtral`)."""
    return import_hf(path, (QWEN3_MOE,), out, **overrides)
