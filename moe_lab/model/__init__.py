"""The pure-PyTorch MoE model: routers, experts, dispatch, the MoE layer and the transformer."""

from .dispatch import DispatchMetadata, LocalDispatcher
from .experts import FeedForwardExpert, GLUExpert, GroupedExperts, grouped_mm_supported
from .moe_layer import MoELayer
from .routers import ExpertChoiceRouter, Router, SwitchRouter, TopKRouter, build_router
from .transformer import MoEModel

__all__ = [
    "DispatchMetadata",
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
    "grouped_mm_supported",
]
