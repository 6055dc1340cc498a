"""The stack-level momentum methods' registry entries (issue 23; specs/momentum_smoe.md §7).

MomentumSMoE, AdamSMoE and Robust MomentumSMoE change how a stack of MoE layers adds their
outputs to the residual stream (:class:`smoe.momentum.MomentumMoE`), not how a layer routes. Each
entry names the stack kind a model wraps its MoE layers in (``RouterInfo.stack``) and the router
inside: the reference code's gate, a Linear with bias, top-k on the raw logits, softmax over the
k selected (a :class:`TopKRouter` with ``bias=True``), with no auxiliary loss.
"""

from __future__ import annotations

from smoe.routing.registry import register_router
from smoe.routing.topk import TopKRouter

__all__ = ["MOMENTUM_ROUTERS"]

# the registry names of the stack-level methods and their MomentumMoE kinds
MOMENTUM_ROUTERS = {"momentum": "heavy_ball", "adam": "adam", "robust_momentum": "robust"}
_GATE = {"bias": True, "aux": False, "renormalize": True}

register_router(
    "momentum",
    TopKRouter,
    description="MomentumSMoE (Teo & Nguyen 2024): heavy-ball momentum across the MoE stack",
    stack="heavy_ball",
    defaults=_GATE,
)
register_router(
    "adam",
    TopKRouter,
    description="AdamSMoE (Teo & Nguyen 2024): an Adam step at the first MoE layer, then momentum",
    stack="adam",
    defaults=_GATE,
)
register_router(
    "robust_momentum",
    TopKRouter,
    description="Robust MomentumSMoE (Teo & Nguyen 2024): Robust Momentum with a look-ahead input",
    stack="robust",
    defaults=_GATE,
)
