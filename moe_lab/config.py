"""Model and training configuration, validated once with pydantic.

    cfg = MoEConfig(hidden_size=128, num_layers=2, num_attention_heads=4)
    cfg.to_json("config.json"); MoEConfig.from_json("config.json") == cfg   # exact round trip

Invalid values raise :class:`moe_lab.errors.ConfigError` (also a ``ValueError``) with a
message that names each bad field, its value and what was expected. Derived values
(``kv_heads``, ``intermediate_size``, ``dense_ffn_size``, ``moe_layer_indices``)
are properties, so what you store is exactly what is saved. ``head_dim`` is the one field
that reads back derived: left unset (or ``None``) it reads as ``hidden_size //
num_attention_heads``, follows later changes of those two and is saved as ``null``; set, it
is saved and kept as given (transformers' name and meaning). Router-specific defaults
(``capacity_factor=None``, ``router_jitter_noise=None``) are resolved by
:func:`moe_lab.model.routers.build_router`.
"""

from __future__ import annotations

import contextvars
import json
import os
from typing import Any, Dict, Literal, Optional, Tuple, Type, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from .constants import (
    DEFAULT_EXPERTS_PER_TOKEN,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_NUM_EXPERTS,
    MAX_EXPERTS_SUPPORTED,
)
from .errors import ConfigError
from .types import ActivationType, ExpertType, RouterType

_C = TypeVar("_C", bound="_StrictModel")
_INIT_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("moe_lab_config_init_depth", default=0)

_FFN_ACTIVATIONS = (ActivationType.RELU, ActivationType.GELU)
_GLU_ACTIVATIONS = (ActivationType.SWIGLU, ActivationType.GEGLU)


def format_validation_error(exc: ValidationError, owner: str) -> str:
    """Turn a pydantic error into one line per bad field: ``owner.field = value: reason``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        where = f"{owner}.{loc}" if loc else owner
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err.get("type") == "extra_forbidden":
            lines.append(f"{where}: unknown field (check the spelling; see {owner} for the fields)")
        elif "input" in err and not loc == "":
            lines.append(f"{where} = {err['input']!r}: {msg}")
        else:
            lines.append(f"{where}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def check_groups(num_experts: int, top_k: int, num_groups: Optional[int], topk_groups: Optional[int], error: type) -> None:
    """Raise ``error`` naming the values when group-limited routing cannot work."""
    if (num_groups is None) != (topk_groups is None):
        raise error(f"num_groups ({num_groups}) and topk_groups ({topk_groups}) go together: set both or neither")
    if num_groups is None:
        return
    if num_groups < 1 or num_experts % num_groups:
        raise error(f"num_experts ({num_experts}) must be divisible by num_groups ({num_groups})")
    if not 1 <= topk_groups <= num_groups:
        raise error(f"topk_groups ({topk_groups}) must be in [1, num_groups ({num_groups})]")
    if top_k > topk_groups * (num_experts // num_groups):
        raise error(f"top_k ({top_k}) must be <= topk_groups ({topk_groups}) * experts per group "
                    f"({num_experts // num_groups})")



class _StrictModel(BaseModel):
    """Pydantic base: unknown keys are errors, and validation errors become ConfigError."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    def __init__(self, **data: Any) -> None:
        # pydantic calls a custom __init__ for nested models too: translate only at the
        # outermost level so nested errors keep their full location (model.hidden_size).
        depth = _INIT_DEPTH.get()
        token = _INIT_DEPTH.set(depth + 1)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if depth:
                raise
            raise ConfigError(format_validation_error(exc, type(self).__name__)) from None
        finally:
            _INIT_DEPTH.reset(token)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self).__name__)) from None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (enums as strings)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls: Type[_C], data: Dict[str, Any]) -> _C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls: Type[_C], path: str | os.PathLike) -> _C:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{cls.__name__}: config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: {path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def replace(self: _C, **changes: Any) -> _C:
        """A validated copy with some fields changed."""
        return type(self)(**{**self.to_dict(), **changes})


class MoEConfig(_StrictModel):
    """Architecture of an :class:`~moe_lab.MoEModel`: a pre-norm decoder (RMSNorm, RoPE,
    causal SDPA attention) whose MLPs are MoE layers. Linear layers have no biases, except
    the q/k/v projections when ``attention_bias`` is set (Qwen2-MoE).

    ``head_dim`` is the per-head width of the attention (q_proj: [heads * head_dim,
    hidden_size]). ``None`` (the default) means ``hidden_size // num_attention_heads``; reading
    ``cfg.head_dim`` always gives the effective width, an int, and a derived value is saved as
    ``null`` so it follows ``replace(hidden_size=...)``. Set it to decouple the two (Qwen3-MoE:
    hidden_size 2048, 32 heads of 128).

    Router options: ``capacity_factor=None`` means the router's own default (top_k: no
    capacity limit; switch: 1.25; expert_choice: 1.0). ``router_jitter_noise=None`` means
    the router's default (switch: 0.1, others 0.0). ``router_type="switch"`` routes each
    token to one expert: ``experts_per_token`` left unset becomes 1, any other explicit
    value is an error.

    Capacity applies while training. Evaluation and inference (``model.eval()``) never drop
    tokens unless ``eval_capacity_factor`` is set, so a sequence's eval logits do not depend
    on the other sequences of its batch (except under expert choice with
    ``expert_choice_eval_routing="expert_choice"``, which ranks tokens against the batch). Capacity is computed per call, from the tokens of
    that call: under data or expert parallelism, from this rank's micro-batch (as in
    Megatron-Core), so each rank's tokens are dropped exactly as a single-process forward of
    that micro-batch alone would drop them.
    """

    # vocabulary and trunk
    vocab_size: int = Field(50257, gt=0)
    hidden_size: int = Field(DEFAULT_HIDDEN_SIZE, gt=0)
    num_layers: int = Field(12, gt=0)
    num_attention_heads: int = Field(12, gt=0)
    num_key_value_heads: Optional[int] = Field(None, gt=0)
    max_position_embeddings: int = Field(2048, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    # experts
    num_experts: int = Field(DEFAULT_NUM_EXPERTS, ge=1, le=MAX_EXPERTS_SUPPORTED)
    experts_per_token: int = Field(DEFAULT_EXPERTS_PER_TOKEN, ge=1)
    expert_hidden_size: Optional[int] = Field(None, gt=0)
    expert_type: ExpertType = ExpertType.GLU
    activation: ActivationType = ActivationType.SWIGLU
    expert_dropout: float = Field(0.0, ge=0, lt=1)
    moe_layer_frequency: int = Field(1, ge=1)
    dense_intermediate_size: Optional[int] = Field(None, gt=0)
    # router
    router_type: RouterType = RouterType.TOP_K
    capacity_factor: Optional[float] = Field(None, gt=0)
    eval_capacity_factor: Optional[float] = Field(None, gt=0)  #: None: no dropping in eval mode
    drop_tokens: bool = True
    router_jitter_noise: Optional[float] = Field(None, ge=0, lt=1)
    normalize_router_weights: bool = True
    router_bias: bool = False
    expert_choice_eval_routing: Literal["token_choice", "expert_choice"] = "token_choice"
    load_balancing_loss_coef: float = Field(0.01, ge=0)
    router_z_loss_coef: float = Field(0.001, ge=0)
    #: what one balancing-loss value averages over: each micro-batch (Switch, Megatron-Core),
    #: each sequence (DeepSeek-V3's sequence-wise loss), or the global batch of an optimizer
    #: step, all micro-batches and data-parallel ranks (Qwen); see moe_lab.training.losses
    load_balancing_scope: Literal["micro_batch", "sequence", "global_batch"] = "micro_batch"
    # 2025-2026 routing recipes (router_type top_k)
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"  #: sigmoid: DeepSeek-V3 affinities
    router_scaling_factor: float = Field(1.0, gt=0)  #: multiplies the combine weights
    router_bias_update_rate: Optional[float] = Field(None, gt=0)  #: aux-loss-free balancing (DeepSeek-V3)
    router_num_groups: Optional[int] = Field(None, ge=1)  #: group-limited routing: expert groups
    router_topk_groups: Optional[int] = Field(None, ge=1)  #: groups each token may use
    # shared experts and attention options
    num_shared_experts: int = Field(0, ge=0)  #: always-active experts, added to the routed output
    shared_expert_intermediate_size: Optional[int] = Field(None, gt=0)  #: default num_shared * expert size
    shared_expert_gate: bool = False  #: a per-token sigmoid gate on the shared output (Qwen2-MoE)
    qk_norm: bool = False  #: RMSNorm on each head's queries and keys before RoPE (Qwen3)
    #: per-head width; None: hidden_size // num_attention_heads (read back as that int)
    head_dim: Optional[int] = Field(None, ge=1)
    attention_bias: bool = False  #: biases on q_proj, k_proj and v_proj (Qwen2-MoE); never on o_proj
    # implementation
    moe_backend: Literal["auto", "grouped", "eager"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _switch_routes_one_expert(cls, data: Any) -> Any:
        """``router_type="switch"`` with ``experts_per_token`` unset means top-1."""
        if isinstance(data, dict) and "experts_per_token" not in data:
            rt = data.get("router_type")
            if rt == RouterType.SWITCH or rt == RouterType.SWITCH.value:
                data = {**data, "experts_per_token": 1}
        return data

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        problems = []
        if self.experts_per_token > self.num_experts:
            problems.append(
                f"experts_per_token ({self.experts_per_token}) must be <= num_experts ({self.num_experts})"
            )
        head_dim_ok = True
        if self.__dict__["head_dim"] is None or "head_dim" not in self.model_fields_set:
            # derived head_dim: (re)computed here, also after an assignment to another field;
            # "head_dim" in model_fields_set <=> the user gave it (see _save_head_dim)
            if self.hidden_size % self.num_attention_heads:
                head_dim_ok = False
                problems.append(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is set"
                )
            self.__dict__["head_dim"] = max(1, self.hidden_size // self.num_attention_heads)
            self.__pydantic_fields_set__.discard("head_dim")
            derived = "head dim hidden_size/num_attention_heads"
        else:
            derived = "head_dim"
        if head_dim_ok and self.head_dim % 2:
            problems.append(f"{derived} ({self.head_dim}) must be even for rotary embeddings")
        if self.num_attention_heads % self.kv_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.kv_heads})"
            )
        allowed = _GLU_ACTIVATIONS if self.expert_type == ExpertType.GLU else _FFN_ACTIVATIONS
        if self.activation not in allowed:
            problems.append(
                f"activation {self.activation.value!r} does not fit expert_type {self.expert_type.value!r} "
                f"(expected one of {[a.value for a in allowed]})"
            )
        if self.router_type == RouterType.SWITCH and self.experts_per_token != 1:
            problems.append(
                f"router_type 'switch' routes each token to 1 expert; got experts_per_token "
                f"({self.experts_per_token}): leave it unset or set it to 1"
            )
        recipe = {
            "router_score_function": self.router_score_function != "softmax",
            "router_bias_update_rate": self.router_bias_update_rate is not None,
            "router_num_groups": self.router_num_groups is not None,
        }
        if self.router_type != RouterType.TOP_K:
            for name, used in recipe.items():
                if used:
                    problems.append(f"{name} needs router_type 'top_k', got {self.router_type.value!r}")
        try:
            check_groups(self.num_experts, self.experts_per_token, self.router_num_groups, self.router_topk_groups,
                         ValueError)
        except ValueError as exc:
            problems.append(str(exc))
        if self.shared_expert_gate and not self.num_shared_experts:
            problems.append("shared_expert_gate needs num_shared_experts >= 1")
        if self.shared_expert_intermediate_size is not None and not self.num_shared_experts:
            problems.append("shared_expert_intermediate_size needs num_shared_experts >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_serializer("head_dim")
    def _save_head_dim(self, value: int) -> Optional[int]:
        """A derived head_dim is saved as null, so a loaded config derives it again."""
        return value if "head_dim" in self.model_fields_set else None

    # ---- derived values -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        """Expert intermediate size (``expert_hidden_size``, default 4 * hidden_size)."""
        return self.expert_hidden_size or 4 * self.hidden_size

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the shared experts' MLP (``num_shared_experts * intermediate_size`` by default)."""
        return self.shared_expert_intermediate_size or self.num_shared_experts * self.intermediate_size

    @property
    def dense_ffn_size(self) -> int:
        return self.dense_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``i`` is MoE when ``(i + 1) % moe_layer_frequency == 0`` (1: every layer)."""
        return (layer_idx + 1) % self.moe_layer_frequency == 0

    @property
    def moe_layer_indices(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))


class TrainingConfig(_StrictModel):
    """Optimisation settings for :class:`~moe_lab.MoETrainer` and the ``training`` job section.

    ``batch_size`` is the global micro-batch (split over data-parallel ranks); one optimiser
    step consumes ``batch_size * gradient_accumulation_steps`` sequences.
    """

    output_dir: str = "./outputs"
    num_epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(1000, ge=0)
    mixed_precision: bool = True
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_steps: Optional[int] = Field(None, ge=1)
    eval_steps: int = Field(500, ge=1)
    save_steps: int = Field(1000, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_samples: Optional[int] = Field(None, ge=1)
    seed: int = 42
    device: str = "auto"
    save_total_limit: Optional[int] = Field(2, ge=1)
    #: the format of the step checkpoints (``checkpoints/step-N``): "full" (config.json +
    #: model.safetensors + optimizer.safetensors, gathered onto every rank, written by rank 0),
    #: "sharded" (torch.distributed.checkpoint: every rank writes its own pieces, loadable at
    #: any layout; see moe_lab.checkpoint.sharded) or "auto" (sharded when the layout shards
    #: parameters: dp_shard, tp or pp > 1). The final ``model/`` is always the full format.
    checkpoint_format: Literal["auto", "full", "sharded"] = "auto"
    progress_bar: bool = True
    fast_paths: bool = True
    #: the LM loss: "logits" (lm_head, then cross-entropy), "chunked" (lm_head and cross-entropy
    #: fused in chunks, no logits tensor: moe_lab.ops.linear_cross_entropy), "auto" (chunked on
    #: CUDA with fast_paths, else logits)
    lm_loss: Literal["auto", "logits", "chunked"] = "auto"
    tensorboard: bool = True  #: TensorBoard events in output_dir/tensorboard
    #: recompute decoder layers in backward instead of keeping their activations: "none",
    #: "full" (every layer) or "selective" (every ``activation_checkpointing_every``-th layer,
    #: from layer 0); exact (see moe_lab.training.activation_checkpointing)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    activation_checkpointing_every: int = Field(2, ge=1)  #: "selective": checkpoint layers 0, n, 2n, ...
    #: CUDA graphs of every decoder layer's forward and backward (the fast paths' layers compiled
    #: in torch.compile mode "reduce-overhead"; gradients stay allocated and are zeroed in place,
    #: so accumulation over micro-batches works). Needs fast_paths on a CUDA device, one process
    #: or data parallelism, and no activation checkpointing; a new micro-batch shape records
    #: new graphs. See moe_lab.training.fast_paths.
    cuda_graphs: bool = False
    mlflow_tracking_uri: Optional[str] = None  #: log to MLflow too (e.g. "file:./mlruns"; needs mlflow)
    mlflow_experiment: str = "moe-lab"

    @model_validator(mode="after")
    def _check_cuda_graphs(self) -> "TrainingConfig":
        if not self.cuda_graphs:
            return self
        problems = []
        if not self.fast_paths:
            problems.append("cuda_graphs needs fast_paths: true (the graphs are of the compiled layers)")
        if self.device.startswith("cpu"):
            problems.append(f"cuda_graphs needs a CUDA device, got device {self.device!r}")
        if self.activation_checkpointing != "none":
            problems.append(f"cuda_graphs does not combine with activation_checkpointing "
                            f"{self.activation_checkpointing!r} (expected 'none')")
        if problems:
            raise ValueError("; ".join(problems))
        return self
