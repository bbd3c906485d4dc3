"""MoEModel: a pre-norm decoder-only transformer whose MLPs are Mixture-of-Experts layers.

Read top to bottom: RMSNorm, rotary embeddings, causal attention (SDPA, grouped-query
capable, optional QK-norm), dense MLP, decoder layer, model. No biases except the optional
q/k/v projection biases (``attention_bias``, Qwen2-MoE; o_proj never has one), and a per-head
width ``head_dim`` that may differ from ``hidden_size / num_attention_heads`` (Qwen3-MoE),
so the model maps exactly onto the transformers Mixtral, Qwen2-MoE and Qwen3-MoE layouts.

    model = MoEModel(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4)
    logits = model(input_ids)                                        # [B, S, V]
    logits, info = model(input_ids, attention_mask, return_routing_info=True)
    loss = cross_entropy(logits, labels) + info["aux_loss"]

Padding: ``attention_mask`` [B, S] (1 real, 0 pad). Padded positions are never attended
to, never routed, never counted, and positions (RoPE) count real tokens only, so padding
on either side changes nothing for the real tokens.

QK-norm (``qk_norm=True``, Qwen3): ``attn.q_norm`` and ``attn.k_norm``, RMSNorms over each
head's ``Dh`` values (weights [Dh], shared by the heads, eps ``rms_norm_eps``), are applied to
the queries and keys after the projections and before RoPE; the KV cache stores the normed,
rotated keys. Shared experts live in the MoE layers (see :mod:`moe_lab.model.moe_layer`).

Shape letters: B batch, S sequence, D hidden, H heads, Hkv key/value heads, Dh head dim,
V vocab, E experts, L MoE layers.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from ..errors import ConfigError, DistributedError, ExpertError, InputError
from ..types import ExpertType, RoutingInfo
from .experts import GroupedExperts, _activation, out_proj_std
from .moe_layer import MoELayer


def expert_parameter_names(config: MoEConfig) -> List[str]:
    """The parameters of a model with this config that are stacked over experts (dim 0 = the
    expert). Declared once: expert parallelism shards them, gradient sync reduces them over
    the expert-data-parallel group, checkpoint gathering concatenates them, and the expert
    cache loads them on demand."""
    return [f"{prefix}{p}" for prefix in expert_module_prefixes(config) for p in GroupedExperts.EXPERT_PARAMS]


def expert_module_prefixes(config: MoEConfig) -> List[str]:
    """``layers.<i>.mlp.experts.`` for every MoE layer: where the stacked experts live."""
    return [f"layers.{i}.mlp.experts." for i in config.moe_layer_indices]


class RotaryEmbedding(nn.Module):
    """RoPE with the "rotate half" convention (as Llama/Mixtral in transformers)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions

    def forward(self, position_ids_BS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids_BS.float().unsqueeze(-1) * self.inv_freq  # [B, S, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, Dh]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BSD.unsqueeze(1).to(x_BHSD.dtype), sin_BSD.unsqueeze(1).to(x_BHSD.dtype)
    return x_BHSD * cos + _rotate_half(x_BHSD) * sin


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query support, via SDPA.

    q_proj [H*Dh, D], k_proj and v_proj [Hkv*Dh, D], o_proj [D, H*Dh], with Dh =
    ``config.head_dim``; q/k/v carry biases (initialised to zero) when ``config.attention_bias``.
    """

    def __init__(self, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        #: QK-norm (Qwen3): RMSNorm over each head's Dh values of q and k, before RoPE
        self.q_norm: Optional[nn.RMSNorm] = None
        self.k_norm: Optional[nn.RMSNorm] = None
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attention_dropout = config.attention_dropout

    def project(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x``, QK-normed and rotated: ``[B, H, S, Dh]``,
        ``[B, Hkv, S, Dh]``, ``[B, Hkv, S, Dh]`` (what a KV cache stores for k and v)."""
        b, s, _ = x_BSD.shape
        q_BSHD = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim)
        k_BSHD = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSHD = self.q_norm(q_BSHD), self.k_norm(k_BSHD)
        q, k = q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2)  # [B, H, S, Dh], [B, Hkv, S, Dh]
        v = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        kv_cache: Optional[Any] = None,
    ) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q, k, v = self.project(x_BSD, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, S_total, Dh]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=attn_mask is None and kv_cache is None and s > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, S, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """The dense MLP of non-MoE layers; same shape family as the experts."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.glu = config.expert_type == ExpertType.GLU
        self.act = _activation(config.expert_type, config.activation.value)
        inner = config.dense_ffn_size
        self.up = nn.Linear(config.hidden_size, (2 if self.glu else 1) * inner, bias=False)
        self.down = nn.Linear(inner, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.expert_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.dropout(self.act(h)))


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the MLP is an MoE layer or dense."""

    def __init__(self, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.post_attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp: nn.Module = MoELayer(config) if self.is_moe else DenseMLP(config)
        self.dropout = nn.Dropout(config.dropout)
        #: activation checkpointing's seam (set by moe_lab.training.activation_checkpointing):
        #: ``checkpoint_fn(fn, *args)`` runs ``fn(*args)`` keeping fewer activations for backward
        #: (e.g. torch.utils.checkpoint); used only when gradients are on. None: a plain call
        self.checkpoint_fn: Optional[Callable[..., Any]] = None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        token_mask_BS: Optional[torch.Tensor],
        kv_cache: Optional[Any] = None,
    ) -> Tuple[torch.Tensor, Optional[Dict[str, Any]]]:
        if self.checkpoint_fn is not None and kv_cache is None and torch.is_grad_enabled():
            return self.checkpoint_fn(self._forward, x_BSD, cos, sin, attn_mask, token_mask_BS)
        return self._forward(x_BSD, cos, sin, attn_mask, token_mask_BS, kv_cache)

    def _forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        token_mask_BS: Optional[torch.Tensor],
        kv_cache: Optional[Any] = None,
    ) -> Tuple[torch.Tensor, Optional[Dict[str, Any]]]:
        x_BSD = x_BSD + self.dropout(self.attn(self.input_norm(x_BSD), cos, sin, attn_mask, kv_cache))
        h = self.post_attn_norm(x_BSD)
        if self.is_moe:
            y, info = self.mlp(h, token_mask_BS)
        else:
            y, info = self.mlp(h), None
        return x_BSD + self.dropout(y), info


def build_attention_mask(
    attention_mask_BS: torch.Tensor, query_len: int, past_len: int = 0
) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, S_q, S_k]: causal, padding keys hidden.

    A padded query row keeps its own diagonal so no row is fully masked (SDPA would return
    NaN); those rows are discarded anyway.
    """
    key_len = attention_mask_BS.shape[1]
    device = attention_mask_BS.device
    q_pos = torch.arange(past_len, past_len + query_len, device=device)  # [S_q]
    k_pos = torch.arange(key_len, device=device)  # [S_k]
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [S_q, S_k]
    mask = causal.unsqueeze(0) & attention_mask_BS.bool().unsqueeze(1)  # [B, S_q, S_k]
    mask = mask | (k_pos.unsqueeze(0) == q_pos.unsqueeze(1)).unsqueeze(0)
    return mask.unsqueeze(1)


class _DefaultInt(int):
    """An int default that a signature shows as its value but that ``is`` can tell apart
    from the same value passed explicitly."""


#: ``experts_per_token``'s default: 2, or 1 for ``router_type="switch"`` (see MoEConfig)
_DEFAULT_EXPERTS_PER_TOKEN = _DefaultInt(2)


class MoEModel(nn.Module):
    """Decoder-only MoE language model.

    Args mirror :class:`~moe_lab.config.MoEConfig`; extra keyword arguments are config fields
    (for example ``num_attention_heads``, ``num_key_value_heads``, ``max_position_embeddings``,
    ``expert_type``, ``activation``, ``moe_layer_frequency``, ``capacity_factor``,
    ``router_jitter_noise``, ``tie_word_embeddings``). Invalid values raise ConfigError.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_experts: int = 8,
        experts_per_token: int = _DEFAULT_EXPERTS_PER_TOKEN,
        expert_hidden_size: Optional[int] = None,
        router_type: str = "top_k",
        load_balancing_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        dropout: float = 0.1,
        *,
        config: Optional[MoEConfig] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if config is None:
            if experts_per_token is not _DEFAULT_EXPERTS_PER_TOKEN:  # left unset: MoEConfig decides
                kwargs["experts_per_token"] = experts_per_token
            config = MoEConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_layers=num_layers,
                num_experts=num_experts,
                expert_hidden_size=expert_hidden_size,
                router_type=router_type,
                load_balancing_loss_coef=load_balancing_loss_coef,
                router_z_loss_coef=router_z_loss_coef,
                dropout=dropout,
                **kwargs,
            )
        elif not isinstance(config, MoEConfig):
            raise ConfigError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.expert_parallel_group: Optional[Any] = None
        #: the ParallelGroups set by ExpertParallelism.parallelize_experts (None: one process)
        self.parallel_groups: Optional[Any] = None

    @classmethod
    def from_config(cls, config: Union[MoEConfig, Dict[str, Any]]) -> "MoEModel":
        """Build from a MoEConfig or a dict of its fields."""
        if isinstance(config, dict):
            config = MoEConfig.from_dict(config)
        return cls(config=config)

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        out_std = out_proj_std(std, self.config.num_layers)
        moe_prefixes = tuple(f"{n}." for n, m in self.named_modules() if isinstance(m, MoELayer))
        for name, module in self.named_modules():
            if isinstance(module, MoELayer) or name.startswith(moe_prefixes):
                continue  # initialised by the layer itself (router, experts, shared experts)
            if isinstance(module, nn.Linear):
                is_out = name.endswith("o_proj") or name.endswith("mlp.down")
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)  # the q/k/v biases of attention_bias
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    # ---- introspection --------------------------------------------------------------
    @property
    def moe_layers(self) -> List[MoELayer]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    @property
    def moe_layer_indices(self) -> List[int]:
        return [layer.layer_idx for layer in self.layers if layer.is_moe]

    def num_parameters(self, active_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``active_only`` counts only ``experts_per_token`` experts per MoE layer
        (global counts, also when the experts are sharded)."""
        total = 0
        seen = set()
        prefixes = tuple(expert_module_prefixes(self.config))  # the expert cache nests its slots below
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                continue
            if name.startswith(prefixes):
                per_expert = p[0].numel()
                n = self.config.experts_per_token if active_only else self.config.num_experts
                total += per_expert * n
            else:
                total += p.numel()
        return total

    def get_expert_weights(self, layer_idx: Optional[int] = None) -> Dict[int, torch.Tensor]:
        """Expert parameters as flat vectors (``w_in`` then ``w_out``, detached).

        With ``layer_idx`` (a transformer layer index that is an MoE layer): ``{expert_id:
        [params_per_expert]}``. With None: ``{layer_idx: [num_local_experts, params_per_expert]}``.
        Under expert parallelism only this rank's experts appear, keyed by global id.
        """
        if layer_idx is None:
            return {layer.layer_idx: layer.mlp.experts.flat_weights() for layer in self.layers if layer.is_moe}
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise ExpertError(f"layer_idx {layer_idx!r} out of range [0, {len(self.layers)})")
        layer = self.layers[layer_idx]
        if not layer.is_moe:
            raise ExpertError(f"layer {layer_idx} is a dense layer; MoE layers are {self.moe_layer_indices}")
        flat = layer.mlp.experts.flat_weights()
        return {layer.mlp.expert_offset + e: flat[e] for e in range(flat.shape[0])}

    def set_expert_parallel_group(self, group: Optional[Any]) -> None:
        """Shard the experts over ``group`` (a torch.distributed ProcessGroup) and switch every
        MoE layer to all-to-all dispatch. ``None`` is only accepted on an unsharded model.

        Raises DistributedError if the argument is not a process group, torch.distributed is
        not initialised, or the group size does not divide ``num_experts``.
        """
        if group is None:
            if self.expert_parallel_group is not None:
                raise DistributedError("the experts are already sharded; cannot unset the expert-parallel group")
            return
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; call init_process_group first")
        if not isinstance(group, dist.ProcessGroup):
            raise DistributedError(f"expected a torch.distributed ProcessGroup, got {type(group).__name__}")
        if self.expert_parallel_group is not None:
            raise DistributedError("the experts are already sharded over an expert-parallel group")
        size = dist.get_world_size(group)
        if self.config.num_experts % size:
            raise DistributedError(
                f"num_experts ({self.config.num_experts}) must be divisible by the expert-parallel group size ({size})"
            )
        for moe in self.moe_layers:
            moe.shard(group)
        self.expert_parallel_group = group

    def expert_parameter_names(self) -> List[str]:
        """Names of the parameters stacked over experts (what expert parallelism shards)."""
        return expert_parameter_names(self.config)

    # ---- forward --------------------------------------------------------------------
    def _validate_inputs(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], past_len: int
    ) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise InputError(
                f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}"
                + (" (use input_ids.unsqueeze(0) for one sequence)" if input_ids.dim() == 1 else "")
            )
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        seq = input_ids.shape[1] + past_len
        if seq > self.config.max_position_embeddings:
            raise InputError(
                f"sequence length {seq} exceeds max_position_embeddings ({self.config.max_position_embeddings})"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range [0, {self.config.vocab_size})")
        if attention_mask is not None:
            expected = (input_ids.shape[0], input_ids.shape[1] + past_len)
            if tuple(attention_mask.shape) != expected:
                raise InputError(
                    f"attention_mask must have shape {list(expected)} (batch, past + new tokens), "
                    f"got {list(attention_mask.shape)}"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        return_routing_info: bool = False,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[Any] = None,
        return_hidden_states: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, RoutingInfo]]:
        """Logits [B, S, V], or ``(logits, routing_info)``.

        Args:
            input_ids: [B, S] token ids in [0, vocab_size).
            attention_mask: [B, S] (or [B, past + S] with a KV cache), 1 for real tokens.
            return_routing_info: also return a :class:`~moe_lab.types.RoutingInfo`.
            position_ids: [B, S] RoPE positions; default counts real tokens from 0.
            kv_cache: a :class:`moe_lab.inference.KVCache` for incremental decoding.
            return_hidden_states: return the final-norm hidden states [B, S, D] instead of
                the logits (for a loss that applies ``lm_head`` itself, e.g.
                :func:`moe_lab.ops.linear_cross_entropy.linear_cross_entropy_sum`).
        """
        past_len = kv_cache.length if kv_cache is not None else 0
        self._validate_inputs(input_ids, attention_mask, past_len)
        input_ids = input_ids.long()
        b, s = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None if kv_cache is None else attention_mask
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + s, device=input_ids.device).expand(b, s)
        cos, sin = self.rotary(position_ids)
        attn_mask = None
        token_mask = None
        if attention_mask is not None:
            attn_mask = build_attention_mask(attention_mask, s, past_len)
            token_mask = attention_mask[:, past_len:].bool()  # [B, S]
        elif kv_cache is not None and s > 1:
            attn_mask = build_attention_mask(torch.ones(b, past_len + s, device=input_ids.device), s, past_len)

        x = self.embed_dropout(self.embed_tokens(input_ids))  # [B, S, D]
        infos: List[Dict[str, Any]] = []
        for layer in self.layers:
            x, info = layer(x, cos, sin, attn_mask, token_mask, kv_cache)
            if info is not None:
                infos.append(info)
        if kv_cache is not None:
            kv_cache.advance(s)
        h_BSD = self.norm(x)
        out = h_BSD if return_hidden_states else self.lm_head(h_BSD)  # [B, S, D] or [B, S, V]
        if not return_routing_info:
            return out
        return out, self._collect_routing_info(infos, token_mask, b * s, x.device)

    def _collect_routing_info(
        self, infos: List[Dict[str, Any]], token_mask: Optional[torch.Tensor], num_tokens: int, device: torch.device
    ) -> RoutingInfo:
        cfg = self.config
        if not infos:
            zero = torch.zeros((), device=device)
            return RoutingInfo(
                aux_loss=zero,
                load_balancing_loss=zero.new_zeros(0),
                router_z_loss=zero.new_zeros(0),
                selection_counts=torch.zeros(0, cfg.num_experts, dtype=torch.long, device=device),
                prob_sums=zero.new_zeros(0, cfg.num_experts),
                z_sums=zero.new_zeros(0),
                num_tokens=torch.tensor(float(num_tokens if token_mask is None else token_mask.sum()), device=device),
                expert_counts=torch.zeros(0, cfg.num_experts, dtype=torch.long, device=device),
                dropped_fraction=zero.new_zeros(0),
                router_probs=[],
                expert_indices=[],
                token_mask=torch.ones(num_tokens, dtype=torch.bool, device=device),
                moe_layer_indices=[],
            )
        lb = torch.stack([i["load_balancing_loss"] for i in infos])  # [L]
        z = torch.stack([i["router_z_loss"] for i in infos])  # [L]
        aux = cfg.load_balancing_loss_coef * lb.sum() + cfg.router_z_loss_coef * z.sum()
        tm = token_mask.reshape(-1) if token_mask is not None else torch.ones(num_tokens, dtype=torch.bool, device=device)
        return RoutingInfo(
            aux_loss=aux,
            load_balancing_loss=lb,
            router_z_loss=z,
            selection_counts=torch.stack([i["selection_counts"] for i in infos]),
            prob_sums=torch.stack([i["prob_sums"] for i in infos]),
            z_sums=torch.stack([i["z_sum"] for i in infos]),
            num_tokens=infos[0]["num_tokens"],
            expert_counts=torch.stack([i["expert_counts"] for i in infos]),
            dropped_fraction=torch.stack([torch.as_tensor(i["dropped_fraction"], device=device).float() for i in infos]),
            router_probs=[i["router_probs"].detach() for i in infos],
            expert_indices=[i["expert_indices"].detach() for i in infos],
            token_mask=tm,
            moe_layer_indices=self.moe_layer_indices,
            **self._sequence_stats(infos),
        )

    @staticmethod
    def _sequence_stats(infos: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """Per-sequence balancing statistics, when the routers computed them (sequence scope)."""
        if "seq_prob_sums" not in infos[0]:
            return {}
        return {
            "seq_prob_sums": torch.stack([i["seq_prob_sums"] for i in infos]),  # [L, B, E]
            "seq_selection_counts": torch.stack([i["seq_selection_counts"] for i in infos]),  # [L, B, E]
            "seq_num_tokens": infos[0]["seq_num_tokens"],  # [B]
        }
