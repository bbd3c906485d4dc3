"""What the transformers converters share: one export driver, the routing a transformers
top-k MoE can express, and the config and tensor mapping in both directions.

    MIXTRAL = HFTarget("hf-mixtral", "Mixtral", mixtral_export_problems, mixtral_config_dict, mixtral_state_dict)
    export_hf(MIXTRAL, model_or_checkpoint, "hf-out/")    # refuse (every reason), convert, write atomically

- Export: :class:`HFTarget` (a format: what it cannot express, its ``config.json``, its tensor
  names), :func:`export_hf` (the one driver), :func:`routing_problems` (what a transformers
  top-k softmax router cannot express), :class:`ExportTensors` (moe_lab names to transformers
  names; a tensor left unmapped is an error, never dropped).
- Import: :class:`HFConfig` (``config.json`` fields with the config class's defaults),
  :func:`trunk_fields` (the decoder fields every format has, and what moe_lab cannot run),
  :func:`finish_config` (refuse, restore an embedded moe_lab config, apply overrides),
  :class:`TensorMapper` (transformers names to moe_lab names; every missing, unexpected and
  mis-shaped tensor listed), :func:`open_hf` / :func:`import_hf`.

Used by :mod:`.hf_mixtral`, :mod:`.hf_qwen` and :mod:`.hf_llama`. Nothing here imports
transformers. Shape letters: E experts, I intermediate, D hidden.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    nonzero_bias_reasons,
    put_attention_and_norms,
    put_attention_biases,
    resolve_dtype,
    rope_theta_of,
    write_json,
)

logger = logging.getLogger(__name__)

#: the key of ``config.json`` that carries the full moe_lab config of an export
EMBEDDED_CONFIG_KEY = "moe_lab_config"
ACT_TO_HF = {ActivationType.SWIGLU: "silu", ActivationType.GEGLU: "gelu"}
#: transformers ACT2FN names that are exactly F.silu / F.gelu (erf)
HF_TO_ACT = {"silu": ActivationType.SWIGLU, "swish": ActivationType.SWIGLU, "gelu": ActivationType.GEGLU}
#: transformers' names of a gated MLP's projections (Llama, Qwen, and Qwen's experts)
GLU_NAMES = ("gate_proj", "up_proj", "down_proj")

TokenIds = Dict[str, Optional[int]]


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTarget:
    """One transformers format moe_lab exports to."""

    format: str  #: the CLI name, e.g. "hf-mixtral"
    name: str  #: the model family in messages, e.g. "Mixtral"
    problems: Callable[[MoEConfig], List[str]]  #: every reason a config cannot be written (empty: it can)
    config_dict: Callable[[MoEConfig, Optional[TokenIds], torch.dtype], Dict[str, Any]]  #: its config.json
    state_dict: Callable[[nn.Module, Optional[torch.dtype]], Dict[str, torch.Tensor]]  #: its tensors, on CPU

    def check(self, config: MoEConfig) -> None:
        """Raise :class:`UnsupportedConversionError` listing every problem, if there is one."""
        problems = self.problems(config)
        if problems:
            raise UnsupportedConversionError(f"this model cannot be exported as {self.name}", problems)


def routing_problems(config: MoEConfig, target: str, renormalises: bool) -> List[str]:
    """Why a transformers top-k MoE (softmax router without bias, no capacity, gated experts)
    cannot express ``config``'s routing and experts. ``renormalises``: the target always
    renormalises the top-k weights (Mixtral); else it has a flag for it (Qwen's ``norm_topk_prob``)."""
    problems: List[str] = []
    rt = RouterType(config.router_type)
    if rt == RouterType.SWITCH:
        problems.append(
            "router_type is 'switch': it weights the chosen expert by its raw softmax probability and drops "
            f"tokens over capacity; {target} renormalises the top-k weights and never drops tokens"
            if renormalises else
            f"router_type is 'switch': it drops tokens over capacity while training; {target} routes with a "
            "top-k router that never drops (router_type 'top_k' with experts_per_token=1 and "
            "normalize_router_weights=False computes what switch computes at inference)"
        )
    elif rt == RouterType.EXPERT_CHOICE:
        problems.append(
            f"router_type is 'expert_choice': experts pick tokens; {target} routes each token to its top-k experts"
        )
    else:
        for name, factor in (("capacity_factor", config.capacity_factor),
                             ("eval_capacity_factor", config.eval_capacity_factor)):
            if factor is not None and config.drop_tokens:
                problems.append(
                    f"{name}={factor} with drop_tokens=True drops tokens over capacity; {target} never drops "
                    f"tokens (set {name}=None or drop_tokens=False)"
                )
        if config.router_score_function != "softmax":
            problems.append(
                f"router_score_function is {config.router_score_function!r} (DeepSeek-V3 affinities); {target} "
                "routes by softmax probability"
            )
        if config.router_bias_update_rate is not None:
            problems.append(
                f"router_bias_update_rate={config.router_bias_update_rate}: aux-loss-free balancing adds a learned "
                f"per-expert bias (expert_bias) to the scores that pick the experts; the {target} router has none"
            )
        if config.router_num_groups is not None:
            problems.append(
                f"router_num_groups={config.router_num_groups} with router_topk_groups={config.router_topk_groups}: "
                f"group-limited routing; {target} picks the top-k of all experts"
            )
        if config.router_scaling_factor != 1.0:
            problems.append(
                f"router_scaling_factor={config.router_scaling_factor} scales the combine weights; {target} does not"
            )
    if ExpertType(config.expert_type) == ExpertType.FFN:
        problems.append(
            f"expert_type is 'ffn' (activation {ActivationType(config.activation).value!r}); {target} experts are "
            "gated: use expert_type 'glu' with 'swiglu' or 'geglu'"
        )
    if renormalises and not config.normalize_router_weights and config.experts_per_token < config.num_experts:
        problems.append(
            f"normalize_router_weights=False weights experts by raw softmax probabilities; {target} renormalises "
            "the top-k weights to sum to 1"
        )
    if config.router_bias:
        problems.append(f"router_bias=True: the {target} router has no bias")
    return problems


def token_ids(tokenizer: Any) -> TokenIds:
    """bos/eos/pad ids of a tokenizer (empty for None)."""
    if tokenizer is None:
        return {}
    return {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def trunk_config_dict(config: MoEConfig, token_ids: Optional[TokenIds], dtype: torch.dtype) -> Dict[str, Any]:
    """The ``config.json`` fields every transformers decoder layout shares (attention, norms,
    RoPE for transformers v4 and v5, embeddings, special tokens, dtype); each format adds its
    MLP and routing fields."""
    ids = token_ids or {}
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": ACT_TO_HF[ActivationType(config.activation)],
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,  # transformers v4
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # v5
        "sliding_window": None,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": config.tie_word_embeddings,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": ids.get("bos_token_id"),
        "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"),
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")


def export_hf(
    target: HFTarget,
    model_or_checkpoint: Union[nn.Module, PathLike],
    out_dir: PathLike,
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model_or_checkpoint`` as a transformers directory of ``target`` (config,
    safetensors, tokenizer), atomically. A checkpoint's config is checked before its weights
    are read. See :func:`moe_lab.interop.export_hf_mixtral` for the arguments."""
    out = Path(out_dir).expanduser()
    target_dtype = resolve_dtype(dtype)
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        config = getattr(model, "config", None)
        if not isinstance(config, MoEConfig):
            raise InputError(f"expected a moe_lab MoEModel, got {type(model).__name__}")
        target.check(config)
    elif isinstance(model_or_checkpoint, (str, Path)) or hasattr(model_or_checkpoint, "__fspath__"):
        ckpt = Checkpoint.open(resolve_checkpoint_dir(model_or_checkpoint))
        target.check(ckpt.config)  # before the weights are read
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
    tensors = target.state_dict(model, target_dtype)
    out_dtype = target_dtype or next(iter(tensors.values())).dtype
    ids = token_ids(tokenizer)
    hf_config = target.config_dict(config, ids, out_dtype)
    hf_config[EMBEDDED_CONFIG_KEY] = config.to_dict()
    hf_config["moe_lab_version"] = __version__
    with AtomicDirectory(out) as tmp:
        write_model_files(tmp, hf_config, tensors, metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
        known = {k: v for k, v in ids.items() if v is not None}
        if known:
            write_json(tmp / "generation_config.json", {**known, "_from_model_config": True})
        if tokenizer is not None:
            from .hf_tokenizer import save_hf_tokenizer

            save_hf_tokenizer(tokenizer, tmp, model_max_length=config.max_position_embeddings)
    _make_shareable(out)
    logger.info("exported %s as %s to %s", type(model).__name__, target.name, out)
    return out


def _make_shareable(directory: Path) -> None:
    """Give the export the usual umask permissions (the atomic temp dir is created 0700), so a
    server running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


class ExportTensors:
    """The weights of ``model`` under transformers names, on CPU, built by the ``put`` calls
    of a format; :meth:`convert` maps the parts every decoder has and refuses leftovers."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype], target: str) -> None:
        self.config: MoEConfig = model.config
        self.sd = model.state_dict()
        self.dtype = dtype
        self.what = f"this model cannot be exported as {target}"
        self.used: set = set()
        self.out: Dict[str, torch.Tensor] = {}

    def take(self, key: str, copy: bool = True) -> torch.Tensor:
        self.used.add(key)
        t = self.sd[key].detach().to("cpu")
        t = t.to(self.dtype) if self.dtype is not None else t
        return t.clone().contiguous() if copy else t  # safetensors refuses tensors that share storage

    def put(self, hf_key: str, key: str) -> None:
        self.out[hf_key] = self.take(key)

    def glu(self, hf_prefix: str, w_in_key: str, down_key: str, names: Sequence[str] = GLU_NAMES) -> None:
        """A fused ``[2I, D]`` gated projection (gate rows, then up rows) and its down projection
        as three transformers matrices ``{hf_prefix}{gate,up,down}.weight``."""
        w_in = self.take(w_in_key, copy=False)
        inner = w_in.shape[0] // 2
        self.out[f"{hf_prefix}{names[0]}.weight"] = w_in[:inner].clone()  # [I, D]
        self.out[f"{hf_prefix}{names[1]}.weight"] = w_in[inner:].clone()  # [I, D]
        self.put(f"{hf_prefix}{names[2]}.weight", down_key)  # [D, I]

    def experts(self, layer: int, hf_prefix: str, names: Sequence[str] = GLU_NAMES) -> None:
        """Layer ``layer``'s stacked experts as per-expert matrices ``{hf_prefix}{e}.{name}.weight``."""
        p = f"layers.{layer}.mlp.experts."
        w_in = self.take(f"{p}w_in", copy=False)  # [E, 2I, D]: gate rows, then up rows
        w_out = self.take(f"{p}w_out", copy=False)  # [E, D, I]
        num_e, num_i = self.config.num_experts, self.config.intermediate_size
        if w_in.shape[0] != num_e:
            raise UnsupportedConversionError(self.what, [
                f"layer {layer} holds {w_in.shape[0]} of {num_e} experts (expert-parallel shard): "
                "export from a checkpoint directory, which always holds every expert"
            ])
        for e in range(num_e):
            self.out[f"{hf_prefix}{e}.{names[0]}.weight"] = w_in[e, :num_i].clone()  # [I, D]
            self.out[f"{hf_prefix}{e}.{names[1]}.weight"] = w_in[e, num_i:].clone()  # [I, D]
            self.out[f"{hf_prefix}{e}.{names[2]}.weight"] = w_out[e].clone()  # [D, I]

    def convert(
        self, layer_mlp: Callable[[int, str, str], None], qkv_bias: bool = False, o_proj_bias: bool = False
    ) -> Dict[str, torch.Tensor]:
        """Embeddings; per layer the attention (with QK-norm), the two norms and
        ``layer_mlp(i, moe_lab_prefix, hf_prefix)``; the final norm and the head. Raises
        :class:`UnsupportedConversionError` naming any tensor left unmapped.

        The q/k/v biases of ``attention_bias`` are written as they are. ``qkv_bias``: the
        layout always has q/k/v biases (Qwen2-MoE), so a model without them gets zeros.
        ``o_proj_bias``: the layout's flag also gives o_proj a bias (Qwen3-MoE's and Llama's
        ``attention_bias``), written as zeros when the model has q/k/v biases."""
        self.put("model.embed_tokens.weight", "embed_tokens.weight")
        for i in range(self.config.num_layers):
            p, q = f"layers.{i}.", f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                self.put(f"{q}self_attn.{proj}.weight", f"{p}attn.{proj}.weight")
                w = self.out[f"{q}self_attn.{proj}.weight"]  # [out, in]
                if proj != "o_proj" and self.config.attention_bias:
                    self.put(f"{q}self_attn.{proj}.bias", f"{p}attn.{proj}.bias")  # [out]
                elif (proj != "o_proj" and qkv_bias) or (proj == "o_proj" and o_proj_bias and self.config.attention_bias):
                    self.out[f"{q}self_attn.{proj}.bias"] = w.new_zeros(w.shape[0])
            if self.config.qk_norm:
                self.put(f"{q}self_attn.q_norm.weight", f"{p}attn.q_norm.weight")
                self.put(f"{q}self_attn.k_norm.weight", f"{p}attn.k_norm.weight")
            self.put(f"{q}input_layernorm.weight", f"{p}input_norm.weight")
            self.put(f"{q}post_attention_layernorm.weight", f"{p}post_attn_norm.weight")
            layer_mlp(i, p, q)
        self.put("model.norm.weight", "norm.weight")
        if self.config.tie_word_embeddings:
            self.used.add("lm_head.weight")  # tied to embed_tokens; transformers re-ties it
        else:
            self.put("lm_head.weight", "lm_head.weight")
        left = sorted(set(self.sd) - self.used)
        if left:
            raise UnsupportedConversionError(self.what, [f"unmapped weights {left}"])
        return self.out


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


class HFConfig:
    """A transformers ``config.json`` read with the config class's defaults where a field is
    absent or null (a null ``num_key_value_heads`` means one per attention head)."""

    def __init__(self, raw: Dict[str, Any], defaults: Dict[str, Any]) -> None:
        self.raw, self.defaults = raw, defaults

    def get(self, key: str) -> Any:
        value = self.raw.get(key)
        if value is None and key == "num_key_value_heads" and (key in self.raw or self.defaults.get(key) is None):
            return self.get("num_attention_heads")
        return self.defaults.get(key) if value is None else value


def trunk_fields(cfg: HFConfig, problems: List[str], overrides: Dict[str, Any], window: Optional[int]) -> Dict[str, Any]:
    """The MoEConfig fields of the decoder trunk (sizes, attention, norms, RoPE, embeddings,
    gated-MLP activation), appending to ``problems`` what moe_lab cannot run exactly.
    ``window``: the sliding window the model uses (None or 0: none)."""
    act_name = cfg.get("hidden_act")
    activation = HF_TO_ACT.get(act_name)
    if activation is None:
        problems.append(
            f"hidden_act is {act_name!r}; moe_lab's gated MLPs implement 'silu' (swiglu) and 'gelu' (geglu) exactly"
        )
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if cfg.raw.get("mlp_bias"):
        problems.append("mlp_bias=True; moe_lab's MLPs and experts have no biases")
    rope_theta = rope_theta_of(cfg.raw, cfg.defaults["rope_theta"], problems)
    context = overrides.get("max_position_embeddings") or cfg.get("max_position_embeddings")
    if window and window < context:
        problems.append(
            f"sliding_window={window} is smaller than max_position_embeddings ({context}); moe_lab has no "
            f"sliding-window attention. Pass max_position_embeddings={window} (or less) to load it for "
            "sequences that fit the window"
        )
    return {
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": cfg.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads"),
        "head_dim": head_dim_field(cfg.raw.get("head_dim"), hidden, heads),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "rope_theta": rope_theta,
        "rms_norm_eps": cfg.get("rms_norm_eps"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings")),
        "initializer_range": cfg.get("initializer_range"),
        "dropout": 0.0,
        "attention_dropout": float(cfg.get("attention_dropout") or 0.0),
        "expert_type": "glu",
        "activation": (activation or ActivationType.SWIGLU).value,
    }


def head_dim_field(head_dim: Optional[int], hidden: int, heads: int) -> Optional[int]:
    """MoEConfig's ``head_dim`` for a transformers one: None (derived) when it is absent or
    equals ``hidden // heads`` (what transformers derives too), else the value itself."""
    if head_dim is None or (heads and hidden % heads == 0 and head_dim == hidden // heads):
        return None
    return head_dim


def finish_config(
    raw: Dict[str, Any],
    fields: Dict[str, Any],
    problems: List[str],
    what: str,
    overrides: Dict[str, Any],
    config_dict: Optional[Callable[[MoEConfig], Dict[str, Any]]] = None,
) -> MoEConfig:
    """The MoEConfig of a converted ``config.json``: refuse the ``problems`` (all listed), validate
    ``fields``, restore the embedded moe_lab config of an export of ours (when ``config_dict``,
    the target's ``config.json`` of a config, still gives the same for it), apply ``overrides``."""
    if problems:
        raise UnsupportedConversionError(f"this {what} checkpoint cannot be loaded exactly by moe_lab", problems)
    try:
        derived = MoEConfig.from_dict(fields)
    except ConfigError as exc:
        raise CheckpointError(f"the {what} config does not make a valid moe_lab model: {exc}") from None
    base = fields
    embedded = raw.get(EMBEDDED_CONFIG_KEY)
    if isinstance(embedded, dict) and config_dict is not None:
        try:
            original = MoEConfig.from_dict(embedded)
        except ConfigError:
            original = None
        if original is not None and config_dict(original) == config_dict(derived):
            base = original.to_dict()
        else:
            logger.warning("ignoring %s in config.json: it no longer matches the %s fields", EMBEDDED_CONFIG_KEY, what)
    try:
        return MoEConfig.from_dict({**base, **overrides})
    except ConfigError as exc:
        raise ConfigError(f"overrides {sorted(overrides)} do not make a valid config: {exc}") from None


def moe_layer_frequency(num_layers: int, moe_layers: Sequence[int], problems: List[str], why: str) -> int:
    """The ``moe_layer_frequency`` whose MoE layers are exactly ``moe_layers`` (``num_layers + 1``:
    none); appends to ``problems`` (with ``why``, the source's setting) if there is none."""
    wanted = sorted(moe_layers)
    for freq in range(1, num_layers + 2):
        if [i for i in range(num_layers) if (i + 1) % freq == 0] == wanted:
            return freq
    problems.append(
        f"{why} makes layers {wanted} MoE layers; moe_lab's MoE layers are every moe_layer_frequency-th "
        "layer ((i + 1) % moe_layer_frequency == 0)"
    )
    return 1


Shape = Tuple[int, ...]


class TensorMapper:
    """Transformers tensors (``model.`` prefix stripped, ``renames`` applied) to moe_lab names,
    keeping count of what is missing, unused and mis-shaped (:meth:`convert` reports it all)."""

    def __init__(self, state: Dict[str, torch.Tensor], config: MoEConfig, renames: Sequence[Tuple[str, str]] = ()):
        self.src: Dict[str, torch.Tensor] = {}
        for key, t in state.items():
            key = key[len("model.") :] if key.startswith("model.") else key
            for old, new in renames:
                key = key.replace(old, new)
            self.src[key] = t
        self.config = config
        self.used: set = set()
        self.missing: List[str] = []
        self.mismatched: List[str] = []
        self.out: Dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: Shape) -> Optional[torch.Tensor]:
        if key not in self.src:
            self.missing.append(key)
            return None
        self.used.add(key)
        t = self.src[key]
        if tuple(t.shape) != shape:
            self.mismatched.append(f"{key}: {tuple(t.shape)}, expected {shape}")
            return None
        return t

    def put(self, dst: str, key: str, shape: Shape) -> None:
        t = self.take(key, shape)
        if t is not None:
            self.out[dst] = t

    def glu(self, dst_w_in: str, dst_down: str, src_prefix: str, inner: int, names: Sequence[str] = GLU_NAMES) -> None:
        """``{src_prefix}{gate,up,down}.weight`` as a fused ``[2I, D]`` (gate rows first) and a down ``[D, I]``."""
        d = self.config.hidden_size
        gate = self.take(f"{src_prefix}{names[0]}.weight", (inner, d))
        up = self.take(f"{src_prefix}{names[1]}.weight", (inner, d))
        if gate is not None and up is not None:
            self.out[dst_w_in] = torch.cat([gate, up], dim=0)  # [2I, D]
        self.put(dst_down, f"{src_prefix}{names[2]}.weight", (d, inner))

    def experts(self, layer: int, names: Sequence[str] = GLU_NAMES) -> None:
        """Layer ``layer``'s experts from ``layers.{i}.mlp.experts.``: per-expert matrices
        ``{e}.{gate,up,down}.weight`` or transformers v5's fused ``gate_up_proj`` / ``down_proj``."""
        src, dst = f"layers.{layer}.mlp.experts.", f"layers.{layer}.mlp.experts."
        num_e, num_i, d = self.config.num_experts, self.config.intermediate_size, self.config.hidden_size
        if f"{src}gate_up_proj" in self.src or f"{src}down_proj" in self.src:  # fused (v5)
            self.put(f"{dst}w_in", f"{src}gate_up_proj", (num_e, 2 * num_i, d))
            self.put(f"{dst}w_out", f"{src}down_proj", (num_e, d, num_i))
            return
        gate_up, down = [], []
        for e in range(num_e):
            gate = self.take(f"{src}{e}.{names[0]}.weight", (num_i, d))
            up = self.take(f"{src}{e}.{names[1]}.weight", (num_i, d))
            w_out = self.take(f"{src}{e}.{names[2]}.weight", (d, num_i))
            if gate is not None and up is not None and w_out is not None:
                gate_up.append(torch.cat([gate, up], dim=0))  # [2I, D]: gate rows, then up rows
                down.append(w_out)
        if len(gate_up) == num_e:
            self.out[f"{dst}w_in"] = torch.stack(gate_up)  # [E, 2I, D]
            self.out[f"{dst}w_out"] = torch.stack(down)  # [E, D, I]

    def convert(
        self, layer_mlp: Callable[[int, str], None], what: str, biased: Sequence[str] = ()
    ) -> Dict[str, torch.Tensor]:
        """Embeddings; per layer the attention (its q/k/v biases with ``attention_bias``, and
        QK-norm), the two norms and ``layer_mlp(i, prefix)``; the final norm and the head (a
        tied head must equal the embeddings). ``biased``: the projections the format can give
        a bias (see :func:`put_attention_biases`). Raises :class:`CheckpointError` listing every
        missing, unexpected and mis-shaped tensor, then :class:`UnsupportedConversionError`
        listing every non-zero attention bias moe_lab has no place for (o_proj's, or q/k/v's
        without ``attention_bias``; zero ones are dropped)."""
        cfg = self.config
        d, dh = cfg.hidden_size, cfg.head_dim
        nonzero: List[str] = []
        self.put("embed_tokens.weight", "embed_tokens.weight", (cfg.vocab_size, d))
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            q_out, kv_out = cfg.num_attention_heads * dh, cfg.kv_heads * dh
            put_attention_and_norms(self.put, i, d, q_out, kv_out)
            put_attention_biases(self.put, self.take, self.src.__contains__, i, d, q_out, kv_out,
                                 cfg.attention_bias, biased, nonzero)
            if cfg.qk_norm:
                self.put(f"{p}attn.q_norm.weight", f"{p}self_attn.q_norm.weight", (dh,))
                self.put(f"{p}attn.k_norm.weight", f"{p}self_attn.k_norm.weight", (dh,))
            layer_mlp(i, p)
        self.put("norm.weight", "norm.weight", (d,))
        if cfg.tie_word_embeddings:
            if "lm_head.weight" in self.src:
                self.used.add("lm_head.weight")
                head, embed = self.src["lm_head.weight"], self.out.get("embed_tokens.weight")
                if embed is not None and not head.is_meta and not torch.equal(head, embed):
                    self.mismatched.append("lm_head.weight differs from embed_tokens.weight but tie_word_embeddings=True")
        else:
            self.put("lm_head.weight", "lm_head.weight", (cfg.vocab_size, d))
        # non-persistent buffers some old checkpoints carry
        unexpected = sorted(k for k in set(self.src) - self.used if not k.endswith("rotary_emb.inv_freq"))
        if self.missing or unexpected or self.mismatched:
            raise CheckpointError(
                f"the {what} weights do not match the config: "
                + describe_key_mismatch(self.missing, unexpected, self.mismatched,
                                        f"tensors moe_lab's {what} layout has no place for")
            )
        if nonzero:
            raise UnsupportedConversionError(f"this {what} checkpoint cannot be loaded exactly by moe_lab",
                                             nonzero_bias_reasons(nonzero, cfg.attention_bias))
        return self.out


def open_hf(path: PathLike, model_types: Sequence[str], **overrides: Any) -> Checkpoint:
    """Open a local transformers directory whose ``model_type`` is one of ``model_types``."""
    d = Path(path).expanduser()
    model_type = read_config_json(d).get("model_type")
    if model_type not in model_types:
        raise CheckpointError(f"{d} holds model_type {model_type!r}, not {' or '.join(map(repr, model_types))}")
    return Checkpoint.open(d, **overrides)


def import_hf(
    path: PathLike, model_types: Sequence[str], out: Optional[PathLike] = None, **overrides: Any
) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a transformers directory, optionally saved as a moe_lab checkpoint
    (see :func:`moe_lab.interop.import_hf_mixtral`)."""
    ckpt = open_hf(path, model_types, **overrides)
    model = ckpt.build_model()
    tokenizer = ckpt.tokenizer() if ckpt.has_tokenizer else None
    if out is not None:
        write_checkpoint(out, model.config, model.state_dict(), tokenizer=tokenizer)
    return model, tokenizer
