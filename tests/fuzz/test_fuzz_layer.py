"""Layer-level fuzz: smoe.MoELayer with every registered router, drawn sizes (T = 0 and 1
included), dtypes and options. Checked on each draw: the output's shape and dtype, finite output
and aux losses, a bitwise rerun, float64 parity (output and gradients) with the reference path of
the router (strategies.LAYER_ROUTERS), and a backward with finite gradients in every dtype."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import smoe
from smoe import reference as ref
from smoe.routing import RoutingContext
from smoe.routing.registry import available_routers, router_info
from tests.fuzz.properties import assert_bitwise_equal, assert_values
from tests.fuzz.strategies import LAYER_ROUTERS
from tests.fuzz.values import Values, dtype_of, dtypes, fuzz_settings, materialize, values

pytestmark = pytest.mark.fuzz

LAYER_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal", "neg_subnormal")


class LayerCase(NamedTuple):
    """An ``smoe.MoELayer`` draw: x ``[B, S, d]`` (or flat ``[B*S, d]``), the layer's sizes and
    options, the router's ``options`` (a tuple of pairs) and the seed of its parameters."""

    B: int
    S: int
    flat: bool
    d: int
    d_ff: int
    E: int
    k: int
    activation: str
    dtype: str
    bias: bool
    capacity_factor: float | None
    options: tuple[tuple[str, object], ...]
    training: bool
    seed: int
    x: Values


def _router_options(
    draw, kind: str, name: str, T: int, E: int, dtype: str
) -> tuple[tuple[str, object], ...]:
    groups = st.none() | st.integers(1, max(T, 1) + 1)
    if kind == "vmoe":
        return (
            ("capacity_factor", draw(st.sampled_from([None, 0.25, 1.05, 2.0]))),
            ("group_size", draw(groups)),
            ("batch_priority", draw(st.booleans())),
            ("priority", draw(st.sampled_from(["max", "sum_topk"]))),
            ("noise_std", draw(st.sampled_from([0.0, 1.0]))),
        )
    if kind == "expert_choice":
        factor = draw(st.sampled_from([None, 0.5, 1.0, float(E)]))
        return (("capacity_factor", factor), ("group_size", draw(groups)))
    if kind == "xmoe":
        community = name == "xmoe_community"
        gate = "softmax" if community else draw(st.sampled_from(["softmax", "sigmoid"]))
        opts = [
            ("gate", gate),
            ("routing_dim", draw(st.none() | st.integers(1, 8))),
            ("expert_norm", draw(st.sampled_from([None, 1.0, 3.0]))),
            ("mix", draw(st.sampled_from(["gate", "interpolate"]))),
        ]
        if not community:  # the community variant has no temperature
            # In fp16 a tiny tau's gradient (-s / tau^2, 1e10 at 1e-5) overflows: not drawn there.
            taus = [None, 0.07, 1.0] if dtype == "float16" else [None, 1e-5, 0.07, 1.0]
            opts.append(("temperature_init", draw(st.sampled_from(taus))))
        return tuple(opts)
    if kind == "ssr":  # p in {0, 1}: every draw decided, whatever the step
        return (
            ("p", draw(st.sampled_from([0.0, 1.0]))),
            ("cost", draw(st.sampled_from(["softmax", "logits"]))),
            ("xi", draw(st.sampled_from([0.05, 1.0]))),
            ("max_iter", draw(st.sampled_from([1, 5, 20]))),
            ("tol", draw(st.sampled_from([0.0, 1e-3]))),
            ("grad_mode", draw(st.sampled_from(["unrolled", "detach"]))),
            ("weights_from", draw(st.sampled_from(["plan", "router_softmax"]))),
            ("route_scale", draw(st.sampled_from([1.0, 0.5]))),
            ("logit_noise_std", draw(st.sampled_from([0.0, 0.5]))),
            ("noise_std", draw(st.sampled_from([0.0, 0.1]))),
        )
    if kind == "sinkhorn":
        return (
            ("max_iter", draw(st.sampled_from([1, 5, 50]))),
            ("tol", draw(st.sampled_from([0.0, 1e-4]))),
        )
    if name == "topk":
        return (("renormalize", draw(st.booleans())),)
    return ()


@st.composite
def layer_cases(draw, router: str) -> LayerCase:
    kind = LAYER_ROUTERS.get(router, "dispatch")
    B, S = draw(st.integers(1, 3)), draw(st.integers(0, 8))
    E = draw(st.integers(1, 8))
    dtype = draw(dtypes)
    return LayerCase(
        B=B,
        S=S,
        flat=draw(st.booleans()),
        d=draw(st.integers(1, 16)),
        d_ff=draw(st.integers(1, 16)),
        E=E,
        k=draw(st.integers(1, E)),
        activation=draw(st.sampled_from(["gelu", "swiglu"])),
        dtype=dtype,
        bias=draw(st.booleans()),
        # the layer's capacity: only for routers that leave the plan to it
        capacity_factor=(
            draw(st.sampled_from([None, 0.5, 1.0, 2.0])) if kind in ("topk", "xmoe") else None
        ),
        options=_router_options(draw, kind, router, B * S, E, dtype),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        x=draw(values(LAYER_SPECIALS)),
    )


# Routers the gate (test_gate.py) finds missing from LAYER_ROUTERS still run here, on the least
# check ("dispatch"), so a new router is fuzzed before its entry is written.
ROUTERS = sorted(set(available_routers()) | set(LAYER_ROUTERS))


def build(name: str, case: LayerCase):
    """(layer, x, context) for a draw; the layer's parameters are seeded by the draw."""
    torch.manual_seed(case.seed)
    info = router_info(name)
    layer = smoe.MoELayer(
        case.d,
        case.d_ff,
        case.E,
        case.k,
        activation=case.activation,
        router=name,
        router_options=dict(case.options),
        capacity_factor=case.capacity_factor,
        bias=case.bias,
    )
    dt = dtype_of(case.dtype)
    layer = layer.to(dt).train(case.training)
    x = materialize(case.x, (case.B, case.S, case.d), dt, 1.0)
    if case.flat and not info.needs_sequence:
        x = x.reshape(-1, case.d)
    attention = None
    if info.needs_attention:
        g = torch.Generator().manual_seed(case.seed)
        scores = torch.randn(case.B, case.S, case.S, generator=g, dtype=torch.float64)
        attention = scores.softmax(-1).to(dt)
    return layer, x, RoutingContext(attention=attention)


def run(layer, x, context, seed: int):
    torch.manual_seed(seed)  # the noise a router draws in training
    return layer(x, context)


def xmoe_routing(router, flat):
    """(expert, weight) of X-MoE in float64: reference.cosine_scores on the router's parameters,
    then reference.xmoe_gate (paper) or the softmax over the k raw selected scores (community,
    specs/xmoe.md §11). The top-k must be the router's up to float64 rounding of near-ties."""
    with torch.no_grad():  # first: in training it re-projects E in place, as the layer did
        mine = router(flat).expert
    cos, _ = ref.cosine_scores(
        flat,
        router.proj,
        router.expert_emb,
        router.temperature,
        normalize_tokens=not router.community,
    )
    tau = router.temperature.double().clamp_min(1e-4)
    if router.community:
        expert = torch.sort(-cos.detach(), dim=-1, stable=True).indices[:, : router.k]
        expert = expert.to(torch.int32)
    else:
        expert, _ = ref.xmoe_gate(cos.detach(), tau.item(), router.k, gate=router.gate)
    # the selection as the router made it, if it differs only where scores tie up to rounding
    if not torch.equal(mine, expert):
        picked, best = cos.gather(1, mine.long()), cos.gather(1, expert.long())
        assert torch.allclose(picked, best, rtol=1e-12, atol=1e-12), "X-MoE chose others"
        expert = mine
    s = torch.gather(cos / tau, 1, expert.long())
    if router.gate == "sigmoid":
        weight = torch.sigmoid(s)
    elif router.k == 1 and not router.community:
        weight = torch.gather(torch.softmax(cos / tau, dim=-1), 1, expert.long())
    else:
        weight = torch.softmax(s, dim=-1)
    return expert, weight


def kept_and_weights(kind: str, layer, flat, context, seed, capacity):
    """(expert, weight, kept) [T, *] of the reference routing of ``kind`` in float64."""
    router, E, T = layer.router, layer.num_experts, flat.shape[0]
    if kind == "xmoe":
        expert, weight = xmoe_routing(router, flat)
        return expert, weight, ref.make_plan(expert, E, capacity=capacity).kept
    logits = flat @ router.weight.T
    if getattr(router, "bias", None) is not None:  # TopKRouter(bias=True): the momentum gate
        logits = logits + router.bias
    if kind == "topk":
        weight, expert = ref.topk_softmax(logits, router.k, renormalize=router.renormalize)
        return expert, weight, ref.make_plan(expert, E, capacity=capacity).kept
    if kind == "vmoe":
        weight, expert = ref.topk_softmax(logits, router.k, renormalize=False)
        prio = None
        if router.batch_priority:
            prio = weight[:, 0] if router.priority == "max" else weight.sum(1)
        plan = ref.make_plan(
            expert, E, capacity=router.capacity(T), priority=prio, group_size=router.group_size
        )
        if prio is not None:
            # Priorities equal up to rounding (e.g. "sum_topk" at k = E sums to 1 +- ulp for
            # every token) order tokens by summation-order noise: there, accept the router's own
            # kept set if the tokens it keeps differently tie with each other within rounding.
            torch.manual_seed(seed)
            own = router(flat, context=context).plan.kept
            differ = (own != plan.kept).any(dim=1)
            if differ.any():
                spread = prio[differ].max() - prio[differ].min()
                if spread <= 64 * torch.finfo(prio.dtype).eps * prio.abs().max():
                    return expert, weight, own
        return expert, weight, plan.kept
    if kind == "expert_choice":
        weight, plan = ref.expert_choice(logits, router.capacity(T), group_size=router.group_size)
        expert = torch.where(plan.kept, torch.arange(E, dtype=torch.int32), -1)
        return expert, weight, plan.kept
    # "dispatch": the router's own decisions (its noise redrawn from the same seed)
    torch.manual_seed(seed)
    routing = router(flat, context=context)
    kept = routing.plan.kept if routing.plan is not None else None
    if kept is None:
        kept = ref.make_plan(routing.expert, E, capacity=capacity).kept
    return routing.expert, routing.weight, kept


def reference_output(kind: str, layer, x, context, seed):
    """The float64 reference of the layer's output for routers of ``kind``."""
    flat = x.reshape(-1, x.shape[-1])
    capacity = None
    if layer.capacity_factor is not None:
        k, T = layer.router.k, flat.shape[0]
        capacity = ref.capacity_for(T, k, layer.num_experts, layer.capacity_factor)
    ex = layer.experts
    if kind == "topk" and ex.b_in is None and not noisy(layer):
        return ref.moe_layer(
            x,
            layer.router.weight,
            ex.w_in,
            ex.w_out,
            layer.router.k,
            activation=ex.activation,
            renormalize=layer.router.renormalize,
            capacity=capacity,
        )
    if noisy(layer):
        kind = "dispatch"
    context = context._replace(batch_shape=tuple(x.shape[:-1]))  # as the layer fills it in
    expert, weight, kept = kept_and_weights(kind, layer, flat, context, seed, capacity)
    out = ref.routed_moe(
        flat,
        expert,
        weight,
        kept,
        ex.w_in,
        ex.w_out,
        activation=ex.activation,
        b_in=ex.b_in,
        b_out=ex.b_out,
    )
    if getattr(layer.router, "mix", "gate") == "interpolate":  # X-MoE: + (1 - Σ kept g) x
        out = out + (1 - (weight.double() * kept).sum(-1, keepdim=True)) * flat.double()
    return out.reshape(x.shape)


def noisy(layer) -> bool:
    """Whether the router draws noise now (then only its dispatch is compared)."""
    r = layer.router
    return layer.training and (getattr(r, "noisy", False) or getattr(r, "noise_std", 0) > 0)


def check_layer(name: str, case: LayerCase) -> None:
    layer, x, context = build(name, case)
    dt, seed = dtype_of(case.dtype), case.seed + 1
    # X-MoE re-projects E in place in each training forward (not bit-idempotent in fp16): the
    # rerun starts from the same state
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y, aux = run(layer, x, context, seed)
    assert y.shape == x.shape and y.dtype == dt
    assert torch.isfinite(y).all(), "non-finite layer output"
    for loss, value in aux.losses.items():
        assert torch.isfinite(value).all(), f"aux loss {loss} is {value}"
    assert 0 <= float(aux.dropped_fraction) <= 1 and aux.tokens_per_expert.shape == (case.E,)
    if case.B * case.S == 0:  # found by the fuzz: no assignment was reported as all dropped
        assert float(aux.dropped_fraction) == 0
    with torch.no_grad():
        layer.load_state_dict(state)
    assert_bitwise_equal(run(layer, x, context, seed), (y, aux))

    g = materialize(Values(case.seed + 2), tuple(y.shape), dt, 1.0)
    leaves = [x.detach().requires_grad_(), *layer.parameters()]

    def grads_of(forward):
        out, extra = forward(leaves[0])
        loss = (out * g).sum() + extra
        if not loss.requires_grad:  # the reference at T = 0 uses no input
            return [None] * len(leaves)
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    def layer_forward(xl):
        out, a = run(layer, xl, context, seed)
        return out, sum(a.losses.values(), torch.zeros((), dtype=dt))

    mine = grads_of(layer_forward)
    for leaf, grad in zip(leaves, mine):
        assert grad is None or (grad.shape == leaf.shape and torch.isfinite(grad).all())
    if dt != torch.float64:
        return
    kind = LAYER_ROUTERS.get(name, "dispatch")
    with torch.no_grad():
        assert_values(y, reference_output(kind, layer, x, context, seed))

    def layer_only(xl):
        return run(layer, xl, context, seed)[0], 0.0

    def reference(xl):
        return reference_output(kind, layer, xl, context, seed), 0.0

    for a, b in zip(grads_of(layer_only), grads_of(reference)):
        if a is None or b is None:  # a parameter one side does not use: the other's is 0
            assert (a if b is None else b) is None or not (a if b is None else b).any()
            continue
        assert_values(a, b)


EMPTY = LayerCase(
    B=2,
    S=0,
    flat=False,
    d=3,
    d_ff=4,
    E=2,
    k=1,
    activation="gelu",
    dtype="float64",
    bias=False,
    capacity_factor=None,
    options=(),
    training=True,
    seed=0,
    x=Values(0),
)


# Found by the fuzz, per router: BPR priorities "sum_topk" at k = E tie up to rounding (every
# token's sum is 1 +- ulp), so the kept set follows summation order; see kept_and_weights.
EXAMPLES = {
    "vmoe": [
        LayerCase(
            B=1,
            S=5,
            flat=False,
            d=1,
            d_ff=1,
            E=5,
            k=5,
            activation="gelu",
            dtype="float64",
            bias=False,
            capacity_factor=None,
            options=(
                ("capacity_factor", 0.25),
                ("group_size", None),
                ("batch_priority", True),
                ("priority", "sum_topk"),
                ("noise_std", 0.0),
            ),
            training=False,
            seed=0,
            x=Values(seed=1),
        )
    ],
}


def _layer_test(name: str):
    def test(case: LayerCase) -> None:
        check_layer(name, case)

    for case in EXAMPLES.get(name, []):
        test = example(case=case)(test)
    # T = 0: found dropped_fraction = 1 (nothing was assigned, none dropped)
    test = fuzz_settings()(given(case=layer_cases(name))(example(case=EMPTY)(test)))

    test.__name__ = f"test_layer_fuzz_{name}"
    return test


for _name in ROUTERS:
    globals()[f"test_layer_fuzz_{_name}"] = _layer_test(_name)
