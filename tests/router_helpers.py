"""Shared pieces of the router tests: sizes, an input, routers that record what they are handed."""

from __future__ import annotations

import torch
from torch import nn

from smoe.routing import RoutingContext, TopKRouter

D, D_FF, E, K, B, S = 8, 16, 4, 2, 2, 6
CUSTOM = "test_registry_custom"  # the name custom routers register under (conftest cleans it)


def _x(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(B, S, D, requires_grad=requires_grad)


class _RecordingRouter(nn.Module):
    """A top-k router that records the context it is handed."""

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__()
        self.inner = TopKRouter(d_model, num_experts, k)
        self.contexts: list[RoutingContext | None] = []

    def forward(self, x, context=None):
        self.contexts.append(context)
        return self.inner(x)


class _PlainRouter(nn.Module):
    """A router whose forward takes only x."""

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__()
        self.inner = TopKRouter(d_model, num_experts, k)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)
