"""Routers: each scores tokens against experts and returns the common :class:`Routing`.

Every router family registers itself by name (:mod:`smoe.routing.registry`) at the bottom of its
module; importing it here is what makes the name known.
"""

from smoe.routing import s2moe as _s2moe  # noqa: F401  (registers "s2moe")
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from smoe.routing.graph import SimilarityAwareRouter
from smoe.routing.graph_attention import AttentionAwareRouter
from smoe.routing.momentum import MOMENTUM_ROUTERS
from smoe.routing.registry import (
    RouterInfo,
    available_routers,
    build_router,
    register_router,
    router_info,
)
from smoe.routing.sbase import SinkhornRouter
from smoe.routing.sinkhorn import SelectiveSinkhornRouter
from smoe.routing.stablemoe import StableMoECommunityRouter
from smoe.routing.topk import TopKRouter
from smoe.routing.usmoe import USMoERouter
from smoe.routing.vmoe import VMoERouter, vmoe_capacity
from smoe.routing.xmoe import XMoERouter

__all__ = [
    "AttentionAwareRouter",
    "ExpertChoiceRouter",
    "MOMENTUM_ROUTERS",
    "RouterInfo",
    "Routing",
    "RoutingContext",
    "SelectiveSinkhornRouter",
    "SimilarityAwareRouter",
    "SinkhornRouter",
    "StableMoECommunityRouter",
    "TopKRouter",
    "USMoERouter",
    "VMoERouter",
    "XMoERouter",
    "available_routers",
    "build_router",
    "expert_choice_capacity",
    "register_router",
    "router_info",
    "vmoe_capacity",
]
