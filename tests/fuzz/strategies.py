"""Hypothesis strategies of the fuzz suite: one per op, the backward -> forward map and the router
table of the layer-level fuzz (tests/fuzz/test_gate.py checks that every registered op and router
is in them).

A draw is a plain NamedTuple of sizes, options and seeds, so a shrunk failure can be kept as an
explicit ``@example(case=...)``; the ``build_*`` functions turn it into tensors, whose values
tests/fuzz/values.py fills: zeros of both signs, ties, duplicated rows, subnormals, +-large.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.strategies_experts import (  # noqa: F401 (GroupedMMCase, ...: re-exported)
    W_LAYOUTS,
    GroupedMMCase,
    SwigluCase,
    build_weight,
    expert_mlp_cases,
    gather_mm_cases,
    grouped_mm_cases,
    swiglu_cases,
)
from tests.fuzz.strategies_gate import gate_linear_cases
from tests.fuzz.strategies_graph import graph_cases
from tests.fuzz.strategies_momentum import momentum_cases
from tests.fuzz.strategies_s2moe import s2moe_cases
from tests.fuzz.strategies_sigmoid import topk_sigmoid_cases
from tests.fuzz.strategies_sinkhorn import sinkhorn_cases
from tests.fuzz.strategies_stats import router_stats_cases
from tests.fuzz.strategies_usmoe import unified_topk_cases
from tests.fuzz.strategies_xmoe import cosine_scores_cases
from tests.fuzz.values import (
    SOFTMAX_SPECIALS,
    Values,
    dtype_of,
    dtypes,
    laid_out,
    layouts,
    materialize,
    product_large,  # noqa: F401 (re-exported)
    values,
)


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------
class TopKCase(NamedTuple):
    T: int
    E: int
    k: int
    dtype: str
    renormalize: bool
    layout: str
    logits: Values


@st.composite
def _topk_cases(draw) -> TopKCase:
    # E past 16 reaches the kernel's 16-lane softmax sums and, with k > 16, its sorting selection
    E = draw(st.integers(1, 16) | st.integers(17, 48))
    return TopKCase(
        T=draw(st.integers(0, 64)),
        E=E,
        k=draw(st.integers(1, E)),
        dtype=draw(dtypes),
        renormalize=draw(st.booleans()),
        layout=draw(layouts),
        logits=draw(values(SOFTMAX_SPECIALS)),
    )


topk_cases = _topk_cases()


def build_logits(T: int, E: int, dtype: str, layout: str, v: Values) -> Tensor:
    dt = dtype_of(dtype)
    return laid_out(materialize(v, (T, E), dt, torch.finfo(dt).max), layout)


class ExpertChoiceCase(NamedTuple):
    T: int
    E: int
    capacity: int
    group_size: int | None
    dtype: str
    layout: str
    logits: Values


@st.composite
def _expert_choice_cases(draw) -> ExpertChoiceCase:
    T = draw(st.integers(0, 64))
    return ExpertChoiceCase(
        T=T,
        E=draw(st.integers(1, 16) | st.integers(17, 48)),  # past 16: the 16-lane softmax sums
        capacity=draw(st.integers(0, T + 2)),
        group_size=draw(st.none() | st.integers(1, T + 2)),
        dtype=draw(dtypes),
        layout=draw(layouts),
        logits=draw(values(SOFTMAX_SPECIALS)),
    )


expert_choice_cases = _expert_choice_cases()


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
class Routes(NamedTuple):
    """Expert ids ``[T, k]``: ``pattern`` "uniform" (any expert, repeats allowed), "distinct" (k
    different experts per token, as top-k gives), "one" (every slot to one expert), "few" (two
    experts, the others empty); a fraction ``unassigned`` of slots is -1."""

    seed: int
    pattern: str = "distinct"
    unassigned: float = 0.0


routes = st.builds(
    Routes,
    seed=st.integers(0, 2**31 - 1),
    pattern=st.sampled_from(["uniform", "distinct", "one", "few"]),
    unassigned=st.sampled_from([0.0, 0.0, 0.2, 1.0]),
)


def build_expert(T: int, E: int, k: int, r: Routes) -> Tensor:
    g = torch.Generator().manual_seed(r.seed)
    if r.pattern == "distinct" and k <= E:
        ex = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else None
    elif r.pattern == "one":
        ex = torch.full((T, k), int(torch.randint(E, (1,), generator=g)))
    elif r.pattern == "few":
        pair = torch.randint(E, (2,), generator=g)
        ex = pair[torch.randint(2, (T, k), generator=g)]
    else:
        ex = torch.randint(E, (T, k), generator=g)
    if ex is None:
        ex = torch.empty(0, k, dtype=torch.int64)
    drop = torch.rand(T, k, generator=g) < r.unassigned
    return torch.where(drop, -1, ex).to(torch.int32)


class Priority(NamedTuple):
    per: str  # "token" ([T]) or "rank" ([T, k])
    dtype: str
    values: Values
    layout: str = "contiguous"


priorities = st.builds(
    Priority,
    per=st.sampled_from(["token", "rank"]),
    dtype=dtypes,
    values=values(),
    layout=layouts,
)


class MakePlanCase(NamedTuple):
    T: int
    E: int
    k: int
    capacity: int | None
    group_size: int | None
    routes: Routes
    layout: str = "contiguous"
    priority: Priority | None = None


@st.composite
def _make_plan_cases(draw) -> MakePlanCase:
    T, E = draw(st.integers(0, 64)), draw(st.integers(1, 16))
    k = draw(st.integers(1, E))
    return MakePlanCase(
        T=T,
        E=E,
        k=k,
        capacity=draw(st.none() | st.integers(0, T * k)),
        group_size=draw(st.none() | st.integers(1, T + 2)),
        routes=draw(routes),
        layout=draw(layouts),
        priority=draw(st.none() | priorities),
    )


make_plan_cases = _make_plan_cases()


def build_priority(T: int, k: int, p: Priority) -> Tensor:
    dt = dtype_of(p.dtype)
    if p.per == "token":
        prio = materialize(p.values, (T,), dt, torch.finfo(dt).max)
        return prio if p.layout == "contiguous" else laid_out(prio[:, None], "row_strided")[:, 0]
    return laid_out(materialize(p.values, (T, k), dt, torch.finfo(dt).max), p.layout)


class PlanCase(NamedTuple):
    """A plan from make_plan (``kind="make_plan"``: row ``[T, k]``, M = T*k) or expert_choice
    (row ``[T, E]``, M = E*C_tot; ``routes.seed`` seeds its logits, ``capacity`` is its C)."""

    kind: str
    T: int
    E: int
    k: int
    capacity: int | None
    group_size: int | None
    routes: Routes


@st.composite
def _plan_cases(draw) -> PlanCase:
    T, E = draw(st.integers(0, 64)), draw(st.integers(1, 16))
    kind = draw(st.sampled_from(["make_plan", "make_plan", "expert_choice"]))
    k = draw(st.integers(1, E)) if kind == "make_plan" else E
    cap = draw(st.none() | st.integers(0, T * k))
    if kind == "expert_choice":
        cap = draw(st.integers(0, T + 1))
    return PlanCase(kind, T, E, k, cap, draw(st.none() | st.integers(1, T + 2)), draw(routes))


plan_cases = _plan_cases()


def build_plan(p: PlanCase):
    """(plan, k): the plan of ``p`` from the ops (their index outputs are fuzzed on their own)."""
    from smoe import ops

    if p.kind == "expert_choice":
        logits = materialize(Values(p.routes.seed, grid=True), (p.T, p.E), torch.float64, 1.0)
        return ops.expert_choice(logits, p.capacity, group_size=p.group_size).plan, p.E
    ex = build_expert(p.T, p.E, p.k, p.routes)
    return ops.make_plan(ex, p.E, capacity=p.capacity, group_size=p.group_size), p.k


class PermuteCase(NamedTuple):
    plan: PlanCase
    d: int
    dtype: str
    layout: str
    x: Values


permute_cases = st.builds(
    PermuteCase,
    plan=plan_cases,
    d=st.integers(1, 32),
    dtype=dtypes,
    layout=layouts,
    x=values(),
)


class CombineCase(NamedTuple):
    plan: PlanCase
    d: int
    dtype: str
    y_layout: str
    weight_layout: str
    y: Values
    weight: Values


combine_cases = st.builds(
    CombineCase,
    plan=plan_cases,
    d=st.integers(1, 32),
    dtype=dtypes,
    y_layout=layouts,
    weight_layout=layouts,
    y=values(),
    weight=values(),
)


# ---------------------------------------------------------------------------------------------
# what the gate (test_gate.py) checks against
# ---------------------------------------------------------------------------------------------
# Each forward op -> its strategy; the fuzz test of the op runs the forward and
# (for a differentiable op) its backward op on every draw.
OP_STRATEGIES = {
    "gate_linear": gate_linear_cases,  # tests/fuzz/strategies_gate.py (backward: ATen GEMMs)
    "topk_softmax": topk_cases,
    "topk_sigmoid": topk_sigmoid_cases,  # tests/fuzz/strategies_sigmoid.py
    "expert_choice": expert_choice_cases,
    "make_plan": make_plan_cases,
    "permute": permute_cases,
    "combine": combine_cases,
    "grouped_mm": grouped_mm_cases,
    "swiglu": swiglu_cases,
    "cosine_scores": cosine_scores_cases,
    "sinkhorn": sinkhorn_cases,  # tests/fuzz/strategies_sinkhorn.py
    "momentum_update": momentum_cases,  # tests/fuzz/strategies_momentum.py
    "graph_mix": graph_cases,  # tests/fuzz/strategies_graph.py
    "s2moe_perturb": s2moe_cases,  # tests/fuzz/strategies_s2moe.py
    "unified_topk": unified_topk_cases,  # tests/fuzz/strategies_usmoe.py (index-only: no backward)
    "expert_mlp": expert_mlp_cases,  # tests/fuzz/strategies_experts.py (backward: the chain's)
    "router_stats": router_stats_cases,  # tests/fuzz/strategies_stats.py
    "gather_mm": gather_mm_cases,  # tests/fuzz/strategies_experts.py
}

# Each backward op -> the forward whose fuzz test exercises it.
BACKWARD_OF = {
    "topk_softmax_backward": "topk_softmax",
    "topk_sigmoid_backward": "topk_sigmoid",
    "expert_choice_backward": "expert_choice",
    "permute_backward": "permute",
    "combine_backward": "combine",
    "grouped_mm_backward": "grouped_mm",
    "grouped_mm_bias_backward": "grouped_mm",
    "swiglu_backward": "swiglu",
    "cosine_scores_backward": "cosine_scores",
    "sinkhorn_backward": "sinkhorn",
    "momentum_update_backward": "momentum_update",
    "graph_mix_backward": "graph_mix",
    "s2moe_perturb_backward": "s2moe_perturb",
    "gate_linear_backward": "gate_linear",
    "router_stats_backward": "router_stats",
    "gather_mm_backward": "gather_mm",
}

# Each registered router -> the reference its layer is checked against (test_fuzz_layer.py):
# "topk": smoe.reference.moe_layer (reference.topk_softmax + make_plan + routed_moe with biases);
# "vmoe": reference.topk_softmax + make_plan(capacity, priority, group_size) + routed_moe;
# "expert_choice": reference.expert_choice + routed_moe; "dispatch" (the least a new router
# needs): reference.routed_moe on the router's own decisions, i.e. the dispatch is checked and the
# routing only for being finite and reproducible. Noise drawn in training is always checked so.
# "xmoe": reference.cosine_scores + reference.xmoe_gate (community: the softmax over the k raw
# selected scores) + make_plan(capacity) + routed_moe, plus (1 - Σ kept g) x for mix="interpolate".
# "stablemoe" (fastmoe's StableMoE gate): reference.cosine_scores with W = I and raw tokens, the
# softmax over the k raw selected scores + make_plan(capacity) + routed_moe.
# "ssr" (p in {0, 1}, so every draw is decided) and "sinkhorn" (S-BASE): the router's own
# decisions, as "dispatch" (the op is fuzzed against reference.sinkhorn on its own).
# "graph" (Similarity-/Attention-Aware): reference.similarity_aware_routing or
# attention_aware_routing (z, A, the mix, top-k, the weights) + make_plan(capacity) + routed_moe.
# "usmoe": layer_reference_usmoe.usmoe_routing (U, each group's competition through
# reference_usmoe.unified_topk, the router's plan checked to be the expert-choice layout) +
# routed_moe.
LAYER_ROUTERS = {
    "topk": "topk",
    "switch": "topk",
    "noisy_topk": "topk",
    "vmoe": "vmoe",
    "expert_choice": "expert_choice",
    "xmoe": "xmoe",
    "xmoe_community": "xmoe",
    "stablemoe_community": "stablemoe",
    "ssr": "ssr",
    "sinkhorn": "sinkhorn",
    "similarity_aware": "graph",
    "attention_aware": "graph",
    "usmoe": "usmoe",
    # the layer-level S2MoE's gate: the plain TopKRouter
    "s2moe": "topk",
    # the stack-level momentum methods' gate: a TopKRouter with a bias and no aux loss
    "momentum": "topk",
    "adam": "topk",
    "robust_momentum": "topk",
}
