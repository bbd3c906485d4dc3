"""The MoE layer: route -> dispatch -> experts -> combine, plus optional shared experts.

    layer = MoELayer(config)                       # router + GroupedExperts + LocalDispatcher
    y_BSD, info = layer(x_BSD, token_mask_BS)      # info: the router's info for this layer

Each piece is its own object and can be tested alone. Padded tokens (``token_mask`` False)
are not routed, not counted and get a zero output (the residual stream carries them).

Shared experts (DeepSeek-MoE, Qwen2-MoE; ``num_shared_experts >= 1``): one dense MLP of
width ``config.shared_intermediate_size`` (``num_shared_experts * intermediate_size`` by
default: N shared experts of one token are one MLP N times as wide), of the experts' type
and activation, that every token goes through. Per token::

    y_t = sum_k w_tk * expert_k(x_t) + g_t * shared(x_t)
    g_t = sigmoid(x_t @ w_gate_1D.T)   with shared_expert_gate (Qwen2-MoE), else 1

``shared_experts`` is a :class:`~moe_lab.model.experts.GLUExpert` (``gate_up`` [2I_s, D],
``down`` [D, I_s]) or a :class:`~moe_lab.model.experts.FeedForwardExpert` (``up``/``down``),
``shared_expert_gate`` an ``nn.Linear(D, 1)`` (weight [1, D]). They are dense parameters:
replicated under expert parallelism (not in ``expert_parameter_names``) and summed over
every rank. Padded tokens get zero from them too.
Expert parallelism uses two seams the layer owns: :meth:`MoELayer.shard` keeps this rank's
experts and installs the all-to-all dispatcher (:meth:`MoELayer.use_dispatcher` installs any
dispatcher); see :mod:`moe_lab.parallel.expert_parallel`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

import torch.distributed as dist

from .dispatch import AllToAllDispatcher, LocalDispatcher
from .experts import FeedForwardExpert, GLUExpert, GroupedExperts, out_proj_std
from .routers import build_router
from ..types import ExpertType


def _enum_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


def build_shared_experts(config: Any) -> Optional[nn.Module]:
    """The shared experts' MLP of ``config`` (None without shared experts), initialised as
    the other MLPs: ``std = initializer_range`` in, :func:`out_proj_std` out."""
    if not config.num_shared_experts:
        return None
    d, inner = config.hidden_size, config.shared_intermediate_size
    if ExpertType(config.expert_type) == ExpertType.GLU:
        mlp: nn.Module = GLUExpert(d, inner, _enum_value(config.activation))
        w_in = mlp.gate_up.weight  # [2I_s, D]: gate rows, then up rows
    else:
        mlp = FeedForwardExpert(d, inner, _enum_value(config.activation), config.expert_dropout)
        w_in = mlp.up.weight  # [I_s, D]
    nn.init.normal_(w_in, std=config.initializer_range)
    nn.init.normal_(mlp.down.weight, std=out_proj_std(config.initializer_range, config.num_layers))
    return mlp


class MoELayer(nn.Module):
    """A sparse MLP block built from a :class:`~moe_lab.config.MoEConfig`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.router = build_router(config)
        self.experts = GroupedExperts(
            config.num_experts,
            config.hidden_size,
            config.intermediate_size,
            expert_type=_enum_value(config.expert_type),
            activation=_enum_value(config.activation),
            dropout=config.expert_dropout,
            backend=config.moe_backend,
        )
        self.experts.reset_parameters(
            config.initializer_range, out_proj_std(config.initializer_range, config.num_layers)
        )
        nn.init.normal_(self.router.gate.weight, std=config.initializer_range)
        #: the always-active MLP added to the routed output (None: no shared experts)
        self.shared_experts = build_shared_experts(config)
        #: Qwen2-MoE's per-token gate on the shared output, weight [1, D] (None: ungated)
        self.shared_expert_gate: Optional[nn.Linear] = None
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
            nn.init.normal_(self.shared_expert_gate.weight, std=config.initializer_range)
        self.dispatcher: Any = LocalDispatcher(config.num_experts)
        #: first global expert id held by this rank (0 without expert parallelism)
        self.expert_offset = 0

    def use_dispatcher(self, dispatcher: Any) -> None:
        """Route through ``dispatcher`` (it must hold no parameters; see moe_lab.model.dispatch)."""
        self.dispatcher = dispatcher

    def shard(self, group: Any) -> None:
        """Expert parallelism over ``group``: keep this rank's E/size experts, dispatch by all-to-all."""
        self.expert_offset = self.experts.shard(dist.get_rank(group), dist.get_world_size(group))
        self.use_dispatcher(AllToAllDispatcher(self.num_experts, group))

    def forward(
        self, x_BSD: torch.Tensor, token_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])  # [T, D]
        weights_TK, experts_TK, info = self.router(x_TD, training=self.training, token_mask=token_mask,
                                                   num_sequences=shape[0] if len(shape) == 3 else None)
        x_ND, tokens_per_expert, meta = self.dispatcher.dispatch(
            x_TD, experts_TK, weights_TK, all_valid=info.pop("all_valid", False)
        )
        y_ND = self.experts(x_ND, tokens_per_expert)  # [N, D]
        y_TD = self.dispatcher.combine(y_ND, meta)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_output(x_TD, token_mask)
        info["expert_indices"] = experts_TK
        return y_TD.reshape(shape), info

    def shared_output(self, x_TD: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The shared experts' part of the output, ``g_t * shared(x_t)``: [T, D], zero where
        ``token_mask`` ([T] or [B, S]) is False. Needs shared experts."""
        s_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            s_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * s_TD  # gate [T, 1]
        if token_mask is not None:
            s_TD = s_TD.masked_fill(~token_mask.reshape(-1, 1).bool(), 0.0)
        return s_TD
