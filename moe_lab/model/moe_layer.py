"""The MoE layer: route -> dispatch -> experts -> combine.

    layer = MoELayer(config)                       # router + GroupedExperts + LocalDispatcher
    y_BSD, info = layer(x_BSD, token_mask_BS)      # info: the router's info for this layer

Each piece is its own object and can be tested alone. Padded tokens (``token_mask`` False)
are not routed, not counted and get a zero output (the residual stream carries them).
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
from .experts import GroupedExperts, out_proj_std
from .routers import build_router


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
            expert_type=config.expert_type.value if hasattr(config.expert_type, "value") else config.expert_type,
            activation=config.activation.value if hasattr(config.activation, "value") else config.activation,
            dropout=config.expert_dropout,
            backend=config.moe_backend,
        )
        self.experts.reset_parameters(
            config.initializer_range, out_proj_std(config.initializer_range, config.num_layers)
        )
        nn.init.normal_(self.router.gate.weight, std=config.initializer_range)
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
        info["expert_indices"] = experts_TK
        return y_TD.reshape(shape), info
