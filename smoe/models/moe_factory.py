"""One factory for a model's MoE feed-forward layer: :class:`smoe.MoELayer`, or the layer a
layer-level method names in the router registry (``RouterInfo.layer``: ``"s2moe"`` builds
:class:`smoe.S2MoELayer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from smoe.layer import MoELayer
from smoe.routing.registry import router_info

__all__ = ["layer_kind", "moe_layer"]


def layer_kind(router: str | nn.Module | None) -> str | None:
    """The layer-level method a router name stands for (``"s2moe"``), or None."""
    return router_info(router).layer if isinstance(router, str) else None


def moe_layer(
    d_model: int,
    d_ff: int,
    num_experts: int,
    k: int,
    *,
    router: str | nn.Module | None = "topk",
    router_options: Mapping[str, Any] | None = None,
    layer_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> MoELayer:
    """A MoE layer for ``router``: :class:`smoe.MoELayer` with it, or, for a layer-level method
    (``router="s2moe"``), that method's layer around the entry's router with ``layer_options``
    (:class:`smoe.S2MoELayer`'s ``noise_form``, ``route_noisy``, ``unc_temperature``, ...).
    ``kwargs`` are MoELayer's (activation, bias, layer_index, expert_dropout, ...).

    Raises:
        ValueError: ``layer_options`` for a router that is not a layer-level method.
    """
    kind = layer_kind(router)
    if kind is None:
        if layer_options:
            raise ValueError(
                f"moe_layer: layer_options {sorted(layer_options)} apply to a layer-level method "
                f"('s2moe'), not router {router!r}"
            )
        return MoELayer(
            d_model, d_ff, num_experts, k, router=router, router_options=router_options, **kwargs
        )
    from smoe.s2moe import S2MoELayer  # (imports smoe.layer: kept out of module import time)

    return S2MoELayer(
        d_model,
        d_ff,
        num_experts,
        k,
        router=router,
        router_options=router_options,
        **dict(layer_options or {}),
        **kwargs,
    )
