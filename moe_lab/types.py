"""Enums and type aliases shared across moe_lab.

Shape letters used throughout the package (after torchtitan):
    B batch, S sequence, T tokens (B*S flattened), D hidden size, E experts,
    K assignments per token, I expert intermediate size, V vocabulary, L MoE layers.
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, Tuple, TypedDict

import torch


class RouterType(str, Enum):
    """How tokens are assigned to experts."""

    TOP_K = "top_k"  #: each token picks its k best experts (Mixtral, GShard)
    SWITCH = "switch"  #: each token picks one expert, with capacity (Switch Transformer)
    EXPERT_CHOICE = "expert_choice"  #: each expert picks its best tokens (Zhou et al. 2022)


class ActivationType(str, Enum):
    """Expert activations. ``relu``/``gelu`` are for FFN experts, ``swiglu``/``geglu`` for GLU experts."""

    RELU = "relu"
    GELU = "gelu"
    SWIGLU = "swiglu"
    GEGLU = "geglu"


class ExpertType(str, Enum):
    """Expert MLP shape."""

    GLU = "glu"  #: down(act(gate(x)) * up(x)) with gate/up fused in one weight
    FFN = "ffn"  #: down(dropout(act(up(x))))


#: ``{expert_id: flat parameter vector}`` for one layer, or ``{layer_idx: [E, params_per_expert]}``.
ExpertWeights = Dict[int, torch.Tensor]

#: Scalar training metrics by name (loss, lr, tokens_per_s, ...).
TrainingMetrics = Dict[str, float]


class RoutingInfo(TypedDict, total=False):
    """What ``MoEModel.forward(..., return_routing_info=True)`` returns next to the logits.

    L is the number of MoE layers, T = batch * seq (padding included), E experts, K slots.
    """

    aux_loss: torch.Tensor  #: scalar in the graph: lb_coef * sum(lb) + z_coef * sum(z), this call's statistics
    load_balancing_loss: torch.Tensor  #: [L], unweighted, in the graph
    router_z_loss: torch.Tensor  #: [L], unweighted, in the graph
    selection_counts: torch.Tensor  #: [L, E], the router's selections before capacity dropping
    prob_sums: torch.Tensor  #: [L, E], router probabilities summed over real tokens, in the graph
    z_sums: torch.Tensor  #: [L], logsumexp(logits)^2 summed over real tokens, in the graph
    num_tokens: torch.Tensor  #: scalar, real tokens of this call (the losses' denominator)
    seq_prob_sums: torch.Tensor  #: [L, B, E], per sequence (load_balancing_scope "sequence" only)
    seq_selection_counts: torch.Tensor  #: [L, B, E], per sequence (sequence scope only)
    seq_num_tokens: torch.Tensor  #: [B], real tokens per sequence (sequence scope only)
    expert_counts: torch.Tensor  #: [L, E] int64, tokens processed per expert (real tokens only)
    dropped_fraction: torch.Tensor  #: [L] float, see the router docs
    router_probs: List[torch.Tensor]  #: L x [T, E] fp32, detached
    expert_indices: List[torch.Tensor]  #: L x [T, K] int64, -1 where not routed, detached
    token_mask: torch.Tensor  #: [T] bool, True for real (non-padding) tokens
    moe_layer_indices: List[int]  #: transformer layer index of each MoE layer


#: What an MoE layer returns: its ``[batch, seq, hidden]`` output and the routing info of
#: that layer (``MoELayer.forward``; ``MoEModel.forward(..., return_routing_info=True)`` returns
#: the logits and the model-level :class:`RoutingInfo` in the same shape).
ExpertOutputs = Tuple[torch.Tensor, RoutingInfo]
