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
every reason (see :func:`mixtral_export_problems`); nothing is approximated. The exported
``config.json`` also carries the full moe_lab config (``moe_lab_config``), so an export
imports back to the same config and bitwise the same weights.

Training-only settings are mapped by name but behave slightly differently in transformers:
``router_jitter_noise`` (transformers also jitters the experts' input),
``router_aux_loss_coef`` (transformers averages the load-balancing statistics over layers),
and moe_lab's residual ``dropout`` and ``router_z_loss_coef`` have no Mixtral field.
Inference is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..checkpoint import (
    AtomicDirectory,
    Checkpoint,
    describe_key_mismatch,
    read_config_json,
    resolve_checkpoint_dir,
    write_checkpoint,
    write_model_files,
)
from ..config import MoEConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..types import ActivationType, ExpertType, RouterType
from ..version import __version__
from ._io import (
    DEFAULT_MAX_SHARD_BYTES,
    PathLike,
    UnsupportedConversionError,
    dtype_name,
    put_attention_and_norms,
    resolve_dtype,
    rope_theta_of,
    write_json,
)

logger = logging.getLogger(__name__)

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
_ACT_TO_HF = {ActivationType.SWIGLU: "silu", ActivationType.GEGLU: "gelu"}
#: transformers ACT2FN names that are exactly F.silu / F.gelu (erf)
_HF_TO_ACT = {"silu": ActivationType.SWIGLU, "swish": ActivationType.SWIGLU, "gelu": ActivationType.GEGLU}
EMBEDDED_CONFIG_KEY = "moe_lab_config"


# ---------------------------------------------------------------------------------------
# what Mixtral can express
# ---------------------------------------------------------------------------------------


def mixtral_export_problems(config: MoEConfig) -> List[str]:
    """Every reason why ``config`` cannot be written as a Mixtral model (empty: it can).

    Mixtral: every layer is an MoE layer of gated (SwiGLU/GeGLU) experts, routed by a
    bias-free linear router to the top-k experts by softmax probability, with the k weights
    renormalised to sum to 1 and no capacity limit.
    """
    problems: List[str] = []
    rt = RouterType(config.router_type)
    if rt == RouterType.SWITCH:
        problems.append(
            "router_type is 'switch': it weights the chosen expert by its raw softmax probability and drops "
            "tokens over capacity; Mixtral renormalises the top-k weights and never drops tokens"
        )
    elif rt == RouterType.EXPERT_CHOICE:
        problems.append(
            "router_type is 'expert_choice': experts pick tokens; Mixtral routes each token to its top-k experts"
        )
    elif config.capacity_factor is not None and config.drop_tokens:
        problems.append(
            f"capacity_factor={config.capacity_factor} with drop_tokens=True drops tokens over capacity; "
            "Mixtral never drops tokens (set capacity_factor=None or drop_tokens=False)"
        )
    if ExpertType(config.expert_type) == ExpertType.FFN:
        problems.append(
            f"expert_type is 'ffn' (activation {ActivationType(config.activation).value!r}); Mixtral experts are "
            "gated (w1/w3/w2): use expert_type 'glu' with 'swiglu' or 'geglu'"
        )
    dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
    if dense:
        problems.append(
            f"moe_layer_frequency={config.moe_layer_frequency} makes layers {dense} dense "
            f"(MoE layers: {list(config.moe_layer_indices)}); every Mixtral layer is an MoE layer "
            "(moe_lab.upcycle turns the dense layers into MoE layers)"
        )
    if not config.normalize_router_weights and config.experts_per_token < config.num_experts:
        problems.append(
            "normalize_router_weights=False weights experts by raw softmax probabilities; Mixtral renormalises "
            "the top-k weights to sum to 1"
        )
    if config.router_bias:
        problems.append("router_bias=True: the Mixtral router has no bias")
    return problems


def check_mixtral_exportable(config: MoEConfig) -> None:
    """Raise :class:`UnsupportedConversionError` listing every problem, if there is one."""
    problems = mixtral_export_problems(config)
    if problems:
        raise UnsupportedConversionError("this model cannot be exported as Mixtral", problems)


def mixtral_config_dict(
    config: MoEConfig, token_ids: Optional[Dict[str, Optional[int]]] = None, dtype: torch.dtype = torch.float32
) -> Dict[str, Any]:
    """The ``config.json`` of the Mixtral equivalent of ``config`` (readable by transformers v4 and v5)."""
    ids = token_ids or {}
    jitter = config.router_jitter_noise
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": _ACT_TO_HF[ActivationType(config.activation)],
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,  # transformers v4
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # v5
        "sliding_window": None,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": config.tie_word_embeddings,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.load_balancing_loss_coef,
        "router_jitter_noise": 0.0 if jitter is None else jitter,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": ids.get("bos_token_id"),
        "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"),
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


def mixtral_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` under Mixtral names (per-expert ``w1``/``w2``/``w3``), on CPU.

    Every moe_lab tensor is accounted for; an unmapped one is an error, never dropped.
    """
    config: MoEConfig = model.config
    sd = model.state_dict()
    num_i = config.intermediate_size
    used = set()

    def take(key: str, copy: bool = True) -> torch.Tensor:
        used.add(key)
        t = sd[key].detach().to("cpu")
        t = t.to(dtype) if dtype is not None else t
        return t.clone().contiguous() if copy else t  # safetensors refuses tensors that share storage

    out: Dict[str, torch.Tensor] = {"model.embed_tokens.weight": take("embed_tokens.weight")}
    for i in range(config.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{q}self_attn.{proj}.weight"] = take(f"{p}attn.{proj}.weight")
        out[f"{q}input_layernorm.weight"] = take(f"{p}input_norm.weight")
        out[f"{q}post_attention_layernorm.weight"] = take(f"{p}post_attn_norm.weight")
        out[f"{q}block_sparse_moe.gate.weight"] = take(f"{p}mlp.router.gate.weight")  # [E, D]
        w_in = take(f"{p}mlp.experts.w_in", copy=False)  # [E, 2I, D]: gate rows, then up rows
        w_out = take(f"{p}mlp.experts.w_out", copy=False)  # [E, D, I]
        if w_in.shape[0] != config.num_experts:
            raise UnsupportedConversionError(
                "this model cannot be exported as Mixtral",
                [
                    f"layer {i} holds {w_in.shape[0]} of {config.num_experts} experts (expert-parallel shard): "
                    "export from a checkpoint directory, which always holds every expert"
                ],
            )
        for e in range(config.num_experts):
            out[f"{q}block_sparse_moe.experts.{e}.w1.weight"] = w_in[e, :num_i].clone()  # [I, D]
            out[f"{q}block_sparse_moe.experts.{e}.w3.weight"] = w_in[e, num_i:].clone()  # [I, D]
            out[f"{q}block_sparse_moe.experts.{e}.w2.weight"] = w_out[e].clone()  # [D, I]
    out["model.norm.weight"] = take("norm.weight")
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # tied to embed_tokens; transformers re-ties it
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    left = sorted(set(sd) - used)
    if left:
        raise UnsupportedConversionError("this model cannot be exported as Mixtral", [f"unmapped weights {left}"])
    return out


def _token_ids(tokenizer: Any) -> Dict[str, Optional[int]]:
    if tokenizer is None:
        return {}
    return {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")


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
    out = Path(out_dir).expanduser()
    target_dtype = resolve_dtype(dtype)
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        config = getattr(model, "config", None)
        if not isinstance(config, MoEConfig):
            raise InputError(f"expected a moe_lab MoEModel, got {type(model).__name__}")
        check_mixtral_exportable(config)
    elif isinstance(model_or_checkpoint, (str, Path)) or hasattr(model_or_checkpoint, "__fspath__"):
        ckpt = Checkpoint.open(resolve_checkpoint_dir(model_or_checkpoint))
        check_mixtral_exportable(ckpt.config)  # before the weights are read
        model = ckpt.build_model()
        config = model.config
        if tokenizer is None and ckpt.has_tokenizer:
            tokenizer = ckpt.tokenizer()
    else:
        raise InputError(
            f"model_or_checkpoint must be a MoEModel or a checkpoint directory, got {type(model_or_checkpoint).__name__}"
        )
    _check_out_dir(out, overwrite)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    tensors = mixtral_state_dict(model, target_dtype)
    out_dtype = target_dtype or next(iter(tensors.values())).dtype
    hf_config = mixtral_config_dict(config, _token_ids(tokenizer), out_dtype)
    hf_config[EMBEDDED_CONFIG_KEY] = config.to_dict()
    hf_config["moe_lab_version"] = __version__
    with AtomicDirectory(out) as tmp:
        write_model_files(tmp, hf_config, tensors, metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
        ids = {k: v for k, v in _token_ids(tokenizer).items() if v is not None}
        if ids:
            write_json(tmp / "generation_config.json", {**ids, "_from_model_config": True})
        if tokenizer is not None:
            from .hf_tokenizer import save_hf_tokenizer

            save_hf_tokenizer(tokenizer, tmp, model_max_length=config.max_position_embeddings)
    _make_shareable(out)
    logger.info("exported %s as Mixtral to %s", type(model).__name__, out)
    return out


def _make_shareable(directory: Path) -> None:
    """Give the export the usual umask permissions (the atomic temp dir is created 0700), so a
    server running as another user can read it."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def _get(raw: Dict[str, Any], key: str) -> Any:
    """A Mixtral config field, with transformers' default where it is absent or null."""
    value = raw.get(key)
    if value is None and key == "num_key_value_heads" and key in raw:
        return _get(raw, "num_attention_heads")  # null means one kv head per attention head
    return MIXTRAL_DEFAULTS[key] if value is None else value


def moe_config_from_mixtral(raw: Dict[str, Any], **overrides: Any) -> MoEConfig:
    """The :class:`MoEConfig` of a Mixtral ``config.json`` (plus MoEConfig ``overrides``).

    Raises:
        UnsupportedConversionError: features moe_lab cannot run exactly (all listed).
    """
    problems: List[str] = []
    act_name = _get(raw, "hidden_act")
    activation = _HF_TO_ACT.get(act_name)
    if activation is None:
        problems.append(
            f"hidden_act is {act_name!r}; moe_lab's gated experts implement 'silu' (swiglu) and 'gelu' (geglu) exactly"
        )
    hidden, heads = _get(raw, "hidden_size"), _get(raw, "num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hidden:
        problems.append(
            f"head_dim ({head_dim}) * num_attention_heads ({heads}) != hidden_size ({hidden}); moe_lab uses "
            "head_dim = hidden_size / num_attention_heads"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            problems.append(f"{flag}=True; moe_lab's layers have no biases")
    rope_theta = rope_theta_of(raw, MIXTRAL_DEFAULTS["rope_theta"], problems)
    window = raw.get("sliding_window")
    context = overrides.get("max_position_embeddings") or _get(raw, "max_position_embeddings")
    if window is not None and window < context:
        problems.append(
            f"sliding_window={window} is smaller than max_position_embeddings ({context}); moe_lab has no "
            f"sliding-window attention. Pass max_position_embeddings={window} (or less) to load it for "
            "sequences that fit the window"
        )
    fields: Dict[str, Any] = {
        "vocab_size": _get(raw, "vocab_size"),
        "hidden_size": hidden,
        "num_layers": _get(raw, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(raw, "num_key_value_heads"),
        "max_position_embeddings": _get(raw, "max_position_embeddings"),
        "rope_theta": rope_theta,
        "rms_norm_eps": _get(raw, "rms_norm_eps"),
        "tie_word_embeddings": bool(_get(raw, "tie_word_embeddings")),
        "initializer_range": _get(raw, "initializer_range"),
        "dropout": 0.0,
        "attention_dropout": float(_get(raw, "attention_dropout")),
        "num_experts": _get(raw, "num_local_experts"),
        "experts_per_token": _get(raw, "num_experts_per_tok"),
        "expert_hidden_size": _get(raw, "intermediate_size"),
        "expert_type": "glu",
        "activation": (activation or ActivationType.SWIGLU).value,
        "moe_layer_frequency": 1,
        "router_type": "top_k",
        "capacity_factor": None,
        "router_jitter_noise": float(_get(raw, "router_jitter_noise")),
        "normalize_router_weights": True,
        "router_bias": False,
        "load_balancing_loss_coef": float(_get(raw, "router_aux_loss_coef")),
        "router_z_loss_coef": 0.0,
    }
    if problems:
        raise UnsupportedConversionError("this Mixtral checkpoint cannot be loaded exactly by moe_lab", problems)
    try:
        derived = MoEConfig.from_dict(fields)
    except ConfigError as exc:
        raise CheckpointError(f"the Mixtral config does not make a valid moe_lab model: {exc}") from None
    base = fields
    embedded = raw.get(EMBEDDED_CONFIG_KEY)
    if isinstance(embedded, dict):
        # An export of ours: restore the moe_lab config exactly if it still describes this model.
        try:
            original = MoEConfig.from_dict(embedded)
        except ConfigError:
            original = None
        if original is not None and mixtral_config_dict(original) == mixtral_config_dict(derived):
            base = original.to_dict()
        else:
            logger.warning("ignoring %s in config.json: it no longer matches the Mixtral fields", EMBEDDED_CONFIG_KEY)
    try:
        config = MoEConfig.from_dict({**base, **overrides})
    except ConfigError as exc:
        raise ConfigError(f"overrides {sorted(overrides)} do not make a valid config: {exc}") from None
    return config


def _strip_prefix(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def moe_state_dict_from_mixtral(state: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
    """Mixtral weights (per-expert v4 names or fused v5 names) under moe_lab names.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped tensors.
    """
    src = {_strip_prefix(k).replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()}
    if "lm_head.weight" in state:
        src["lm_head.weight"] = state["lm_head.weight"]
    used = set()
    missing: List[str] = []
    mismatched: List[str] = []
    out: Dict[str, torch.Tensor] = {}
    num_e, num_i, d = config.num_experts, config.intermediate_size, config.hidden_size

    def take(key: str, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
        if key not in src:
            missing.append(key)
            return None
        used.add(key)
        t = src[key]
        if tuple(t.shape) != shape:
            mismatched.append(f"{key}: {tuple(t.shape)}, expected {shape}")
            return None
        return t

    def put(dst: str, src_key: str, shape: Tuple[int, ...]) -> None:
        t = take(src_key, shape)
        if t is not None:
            out[dst] = t

    q_out, kv_out = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    put("embed_tokens.weight", "embed_tokens.weight", (config.vocab_size, d))
    for i in range(config.num_layers):
        p = f"layers.{i}."
        put_attention_and_norms(put, i, d, q_out, kv_out)
        put(f"{p}mlp.router.gate.weight", f"{p}mlp.gate.weight", (num_e, d))
        if f"{p}mlp.experts.gate_up_proj" in src or f"{p}mlp.experts.down_proj" in src:  # fused (v5)
            put(f"{p}mlp.experts.w_in", f"{p}mlp.experts.gate_up_proj", (num_e, 2 * num_i, d))
            put(f"{p}mlp.experts.w_out", f"{p}mlp.experts.down_proj", (num_e, d, num_i))
            continue
        gate_up, down = [], []
        for e in range(num_e):
            w1 = take(f"{p}mlp.experts.{e}.w1.weight", (num_i, d))
            w3 = take(f"{p}mlp.experts.{e}.w3.weight", (num_i, d))
            w2 = take(f"{p}mlp.experts.{e}.w2.weight", (d, num_i))
            if w1 is not None and w3 is not None and w2 is not None:
                gate_up.append(torch.cat([w1, w3], dim=0))  # [2I, D]: gate rows, then up rows
                down.append(w2)
        if len(gate_up) == num_e:
            out[f"{p}mlp.experts.w_in"] = torch.stack(gate_up)  # [E, 2I, D]
            out[f"{p}mlp.experts.w_out"] = torch.stack(down)  # [E, D, I]
    put("norm.weight", "norm.weight", (d,))
    if config.tie_word_embeddings:
        if "lm_head.weight" in src:
            used.add("lm_head.weight")
            head, embed = src["lm_head.weight"], out.get("embed_tokens.weight")
            if embed is not None and not head.is_meta and not torch.equal(head, embed):
                mismatched.append("lm_head.weight differs from embed_tokens.weight but tie_word_embeddings=True")
    else:
        put("lm_head.weight", "lm_head.weight", (config.vocab_size, d))
    unexpected = sorted(set(src) - used)
    if missing or unexpected or mismatched:
        raise CheckpointError("the Mixtral weights do not match the config: " + describe_key_mismatch(missing, unexpected, mismatched, "tensors moe_lab's Mixtral layout has no place for"))
    return out


def load_hf_mixtral(path: PathLike, **overrides: Any) -> nn.Module:
    """Load a local transformers Mixtral directory as a :class:`~moe_lab.MoEModel` (fp32).

    Args:
        path: a directory with ``config.json`` (model_type "mixtral") and safetensors weights.
        **overrides: MoEConfig fields to change (``dropout``, ``moe_backend``, ...).
    """
    return _open_mixtral(path, **overrides).build_model()


def _open_mixtral(path: PathLike, **overrides: Any) -> Checkpoint:
    d = Path(path).expanduser()
    model_type = read_config_json(d).get("model_type")
    if model_type != "mixtral":
        raise CheckpointError(f"{d} holds model_type {model_type!r}, not 'mixtral'")
    return Checkpoint.open(d, **overrides)


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
    ckpt = _open_mixtral(path, **overrides)
    model = ckpt.build_model()
    tokenizer = ckpt.tokenizer() if ckpt.has_tokenizer else None
    if out is not None:
        write_checkpoint(out, model.config, model.state_dict(), tokenizer=tokenizer)
    return model, tokenizer
