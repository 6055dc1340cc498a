"""Shared pieces of the router tests: sizes, an input, routers that record what they are handed."""

from __future__ import annotations

import torch
from torch import nn

from smoe.routing import RoutingContext, TopKRouter, router_info

D, D_FF, E, K, B, S = 8, 16, 4, 2, 2, 6
CUSTOM = "test_registry_custom"  # the name custom routers register under (conftest cleans it)


def _x(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(B, S, D, requires_grad=requires_grad)


def attention_context(name: str, x: torch.Tensor) -> RoutingContext | None:
    """What the router's registry entry says it needs: the block's attention probabilities
    ``[B, H, S, S]`` (a causal softmax, one head) for an attention-aware router; x is [B, S, d]."""
    if not router_info(name).needs_attention:
        return None
    B, S = x.shape[:2]
    scores = torch.randn(B, 1, S, S, generator=torch.Generator().manual_seed(0))
    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    return RoutingContext(attention=scores.masked_fill(future, float("-inf")).softmax(-1))


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
