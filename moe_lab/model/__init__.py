"""The pure-PyTorch MoE model: routers, experts, dispatch, the MoE layer and the transformer."""

from .dispatch import AllToAllDispatcher, DispatchMetadata, LocalDispatcher
from .experts import EXPERT_BACKENDS, FeedForwardExpert, GLUExpert, GroupedExperts
from .moe_layer import MoELayer
from .routers import ExpertChoiceRouter, Router, SwitchRouter, TopKRouter, build_router
from .transformer import MoEModel, expert_parameter_names

__all__ = [
    "AllToAllDispatcher",
    "DispatchMetadata",
    "EXPERT_BACKENDS",
    "ExpertChoiceRouter",
    "FeedForwardExpert",
    "GLUExpert",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEModel",
    "Router",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "expert_parameter_names",
]
