"""Typed Python wrappers of the ``torch.ops.smoe`` custom ops, with their fakes and autograd.

One module per op family, each with one section per op in schema order (csrc/registration.cpp):
wrapper, fake, autograd. The kernels live in csrc/; nothing numerical happens here.

- :mod:`smoe.ops.gate`: ``gate_linear`` (the routers' gate GEMM)
- :mod:`smoe.ops.routing`: ``topk_softmax``, ``topk_sigmoid``, ``expert_choice``
- :mod:`smoe.ops.dispatch`: ``make_plan``, ``permute``, ``combine`` (and :class:`Plan`)
- :mod:`smoe.ops.experts`: ``grouped_mm``, ``swiglu``, ``expert_mlp``
- :mod:`smoe.ops.gather`: ``gather_mm`` (grouped_mm over a plan's gathered rows)
- :mod:`smoe.ops.xmoe`: ``cosine_scores`` (X-MoE)
- :mod:`smoe.ops.sinkhorn`: ``sinkhorn`` (SSR, S-BASE)
- :mod:`smoe.ops.momentum`: ``momentum_update`` (MomentumSMoE, AdamSMoE, Robust MomentumSMoE)
- :mod:`smoe.ops.graph`: ``graph_mix`` (Similarity-Aware and Attention-Aware routing)
- :mod:`smoe.ops.usmoe`: ``unified_topk`` (USMoE)
- :mod:`smoe.ops.s2moe`: ``s2moe_perturb`` (S2MoE)
- :mod:`smoe.ops.stats`: ``router_stats`` (the auxiliary losses' statistics)

A new router family adds its own module here (and its csrc files), then re-exports it below.
"""

from smoe import _loader

_loader.load_library()

try:  # each family registers fakes and autograd for ops the compiled _C must define
    from smoe.ops._common import refuse_sparse
    from smoe.ops.dispatch import Plan, combine, make_plan, permute
    from smoe.ops.experts import MLP_ACTIVATIONS, expert_mlp, grouped_mm, swiglu
    from smoe.ops.gate import gate_linear
    from smoe.ops.gather import gather_mm
    from smoe.ops.graph import graph_mix
    from smoe.ops.momentum import (
        MomentumUpdate,
        RobustCoefficients,
        momentum_update,
        robust_coefficients,
    )
    from smoe.ops.routing import ExpertChoice, TopK, expert_choice, topk_sigmoid, topk_softmax
    from smoe.ops.s2moe import s2moe_perturb
    from smoe.ops.sinkhorn import Sinkhorn, sinkhorn
    from smoe.ops.stats import RouterStats, router_stats
    from smoe.ops.usmoe import unified_topk
    from smoe.ops.xmoe import CosineScores, cosine_scores
except RuntimeError as e:
    if "does not exist" not in str(e):
        raise
    raise ImportError(
        f"smoe's compiled extension is older than its Python sources ({e}); rebuild it with: "
        f"{_loader.REBUILD}"
    ) from e

refuse_sparse()  # every smoe op: a sparse argument is an error naming it

__all__ = [
    "MLP_ACTIVATIONS",
    "CosineScores",
    "ExpertChoice",
    "MomentumUpdate",
    "Plan",
    "RobustCoefficients",
    "RouterStats",
    "Sinkhorn",
    "TopK",
    "combine",
    "cosine_scores",
    "expert_choice",
    "expert_mlp",
    "gather_mm",
    "gate_linear",
    "graph_mix",
    "grouped_mm",
    "make_plan",
    "momentum_update",
    "permute",
    "robust_coefficients",
    "router_stats",
    "s2moe_perturb",
    "sinkhorn",
    "swiglu",
    "topk_sigmoid",
    "topk_softmax",
    "unified_topk",
]
