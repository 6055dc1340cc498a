"""Routers: each scores tokens against experts and returns the common :class:`Routing`."""

from smoe.routing.base import Routing
from smoe.routing.topk import TopKRouter

__all__ = ["Routing", "TopKRouter"]
