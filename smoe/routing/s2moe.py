"""The layer-level S2MoE method's registry entry (issue 27; specs/s2moe.md).

S2MoE changes what a MoE layer computes around its router (a Gaussian-perturbed second path,
a learned per-token gate, an InfoNCE loss), not how it routes. Its entry names the layer a model
builds (``RouterInfo.layer = "s2moe"``: :class:`smoe.S2MoELayer`, through
:func:`smoe.models.moe_layer`) and the router inside: the library's softmax top-k router
(:class:`TopKRouter`, its Switch balance and z losses on the deterministic path), k = 1 as in
the paper's headline setting when a model passes k = 1.
"""

from __future__ import annotations

from smoe.routing.registry import register_router
from smoe.routing.topk import TopKRouter

register_router(
    "s2moe",
    TopKRouter,
    description="S2MoE (Do et al. 2025): a noisy second path through the same experts, gated",
    aux_losses=("balance", "z"),
    layer="s2moe",
)
