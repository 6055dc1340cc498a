"""Routers: each scores tokens against experts and returns the common :class:`Routing`."""

from smoe.routing.base import Routing
from smoe.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from smoe.routing.topk import TopKRouter
from smoe.routing.vmoe import VMoERouter, vmoe_capacity

__all__ = [
    "ExpertChoiceRouter",
    "Routing",
    "TopKRouter",
    "VMoERouter",
    "expert_choice_capacity",
    "vmoe_capacity",
]
