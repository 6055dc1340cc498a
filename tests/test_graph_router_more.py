"""Similarity-Aware and Attention-Aware routers, continued: the fused path against the explicit
graph, the entropy statistics, the registry, the layer and the char-LM, state dicts, 16-bit and
float64, compile, and the bad options. The spec's §8 properties: tests/test_graph_router.py."""

from __future__ import annotations

import math

import pytest
import torch

from smoe import MoELayer
from smoe.examples.charlm import quick_config, run
from smoe.routing import (
    AttentionAwareRouter,
    RoutingContext,
    SimilarityAwareRouter,
    build_router,
    router_info,
)
from smoe.routing import _graph as G
from tests.test_graph_router import (
    CAUSAL,
    MIXES,
    B,
    D,
    E,
    H,
    S,
    _att,
    _attention,
    _ctx,
    _graph_of,
    _mixed_logits,
    _same,
    _sim,
    _x,
)

# --- the fused path agrees with the explicit one ----------------------------------------------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("sim", ["dot", "cosine", "router"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_and_explicit_paths_agree(mix, sim, causal):
    x = _x(15) * 2
    r = _sim(mix=mix, sim=sim, tau=0.7)
    explicit = SimilarityAwareRouter(D, E, 2, mix=mix, sim=sim, tau=0.7, fused=False)
    explicit.load_state_dict(r.state_dict())
    ctx = _ctx(None, causal)
    a, b = r(x, ctx), explicit(x, ctx)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.logits, b.logits)
    want = _mixed_logits(
        torch.nn.functional.linear(x, r.weight), _graph_of(r, x, causal), mix, r.lam
    )
    torch.testing.assert_close(a.logits.double(), want, atol=1e-5, rtol=1e-5)
    # gradients too
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (r(xa, ctx).weight * torch.arange(2.0)).sum().backward()
    (explicit(xb, ctx).weight * torch.arange(2.0)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.weight.grad, explicit.weight.grad, atol=1e-5, rtol=1e-4)


def test_one_sequence_without_batch_shape_and_non_causal_by_default():
    x = _x(16, n=9)
    r = _sim(fused=False)
    a = r(x)
    b = r(x, RoutingContext(batch_shape=(9,)))
    _same(a, b)
    u = x.view(1, 9, D)
    q, scale = G.similarity_query("dot", u, u, 1.0)
    A = G.similarity_graph(q, scale, causal=False, window=None, topm=None)
    z = torch.nn.functional.linear(x, r.weight).view(1, 9, E)
    torch.testing.assert_close(a.logits, (z + A @ z).view(9, E))
    # causal=True forces the mask without a context
    assert not torch.equal(_sim(causal=True, fused=False)(x).logits, a.logits)


def test_routing_stats_average_over_forwards_and_reset():
    r = _sim()
    assert math.isnan(r.routing_stats()["entropy_mixed"]) and r.routing_stats()["forwards"] == 0
    hs = []
    for seed in range(3):
        out = r(_x(seed), CAUSAL)
        hs.append(float(G.mean_entropy_of_logits(out.logits.detach())))
    s = r.routing_stats()
    assert s["forwards"] == 3 and s["entropy_mixed"] == pytest.approx(sum(hs) / 3, abs=1e-6)
    r.half()  # the fixed-point sums survive a dtype change of the module
    assert r.entropy_sums.dtype == torch.int64 and r.routing_stats()["forwards"] == 3
    r.reset_routing_stats()
    assert r.routing_stats()["forwards"] == 0
    assert "entropy_sums" not in r.state_dict()


# --- the registry, the layer and the char-LM ---------------------------------------------------


def test_registry_entries():
    s, a = router_info("similarity_aware"), router_info("attention_aware")
    assert s.aux_losses == a.aux_losses == ("balance", "z") and s.compiles and a.compiles
    assert a.needs_attention and not s.needs_attention
    assert not a.needs_sequence and not s.needs_sequence  # flat tokens: see the class docs
    assert "2505.00792" in s.description and "2505.00792" in a.description
    assert s.is_causal(build_router("similarity_aware", D, E, 2))
    assert not s.is_causal(build_router("similarity_aware", D, E, 2, causal=False))
    assert a.is_causal(build_router("attention_aware", D, E, 2, heads=0))
    assert isinstance(
        build_router("similarity_aware", D, E, 2, sim="cosine"), SimilarityAwareRouter
    )
    layer = MoELayer(D, 16, E, 2, router="similarity_aware", router_options={"causal": False})
    with pytest.raises(ValueError, match="not causal"):
        layer(torch.randn(B, S, D), RoutingContext(causal=True))
    layer = MoELayer(D, 16, E, 2, router="attention_aware")
    with pytest.raises(ValueError, match="context.attention"):
        layer(torch.randn(B, S, D))
    y, aux = layer(torch.randn(B, S, D), _ctx(_attention()))
    assert y.shape == (B, S, D) and set(aux.losses) == {"balance", "z"}


@pytest.mark.parametrize(
    "router, options",
    [("similarity_aware", {}), ("attention_aware", {}), ("similarity_aware", {"mix": "probs"})],
)
def test_routers_train_a_quick_charlm(router, options):
    result = run(quick_config(router=router, router_options=options, steps=30), progress=False)
    losses = [h["val_loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    stats = result["final"]["router_stats"]
    assert set(stats) == {"layer0", "layer1"}
    assert all(s["forwards"] > 0 and math.isfinite(s["entropy_mixed"]) for s in stats.values())


def test_state_dict_round_trip():
    for make, ctx in (
        (lambda s: _sim(bias=True, seed=s), CAUSAL),
        (lambda s: _att(seed=s), _ctx(_attention())),
    ):
        a, b = make(0), make(1)
        x = _x(20)
        assert not torch.equal(a(x, ctx).logits, b(x, ctx).logits)
        b.load_state_dict(a.state_dict())
        _same(a(x, ctx), b(x, ctx))
        assert set(a.state_dict()) <= {"weight", "bias"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
def test_low_precision_inputs_route_in_float32_without_nan(dtype, mix):
    x = (_x(21) * 30).to(dtype)
    for r, ctx in (
        (_sim(mix=mix), CAUSAL),
        (_sim(mix=mix, sim="cosine", topm=3, tau=0.05), CAUSAL),
        (_att(mix=mix), _ctx(_attention().to(dtype))),
    ):
        r = r.to(dtype)
        out = r(x, ctx)
        assert out.weight.dtype == out.logits.dtype == torch.float32
        assert torch.isfinite(out.weight).all() and torch.isfinite(out.logits).all()
        out.weight.sum().backward()
        assert torch.isfinite(r.weight.grad).all()


def test_float64_stays_float64_and_gradchecks():
    x = _x(22).double().requires_grad_()
    for r, ctx in (
        (_sim(fused=False), CAUSAL),
        (_sim(), CAUSAL),
        (_att(), _ctx(_attention().double())),
    ):
        r = r.double()
        out = r(x, ctx)
        assert out.weight.dtype == torch.float64
        torch.autograd.gradcheck(lambda t, r=r, ctx=ctx: r(t, ctx).weight, (x,))


@pytest.mark.parametrize("router", ["similarity_aware", "similarity_explicit", "attention_aware"])
def test_compiles_with_fullgraph_forward_and_backward(router):
    torch._dynamo.reset()
    opts = {"window": 3} if router == "similarity_explicit" else {}
    name = "similarity_aware" if router == "similarity_explicit" else router
    layer = MoELayer(D, 16, E, 2, router=name, router_options=opts)
    x = torch.randn(B, S, D)
    ctx = _ctx(_attention() if name == "attention_aware" else None)
    want, _ = layer(x, ctx)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got, aux = compiled(x, ctx)
    torch.testing.assert_close(got, want)
    (got.sum() + aux.losses["balance"]).backward()
    assert layer.router.weight.grad is not None and torch.isfinite(layer.router.weight.grad).all()


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (SimilarityAwareRouter, {"tau": 0.0}, "tau"),
        (SimilarityAwareRouter, {"tau": -1.0}, "tau"),
        (SimilarityAwareRouter, {"tau": math.inf}, "tau"),
        (SimilarityAwareRouter, {"lam": -0.1}, "lam"),
        (AttentionAwareRouter, {"lam": -1.0}, "lam"),
        (SimilarityAwareRouter, {"mix": "logits", "lam": 1.5}, "lam"),
        (AttentionAwareRouter, {"mix": "probs", "lam": 2.0}, "lam"),
        (SimilarityAwareRouter, {"mix": "sum"}, "mix"),
        (AttentionAwareRouter, {"mix": "avg"}, "mix"),
        (SimilarityAwareRouter, {"sim": "l2"}, "sim"),
        (SimilarityAwareRouter, {"window": 0}, "window"),
        (SimilarityAwareRouter, {"topm": 0}, "topm"),
        (SimilarityAwareRouter, {"topm": 1.5}, "topm"),
        (AttentionAwareRouter, {"heads": "min"}, "heads"),
        (AttentionAwareRouter, {"heads": -1}, "heads"),
        (AttentionAwareRouter, {"heads": True}, "heads"),
        (SimilarityAwareRouter, {"top1_weight": "raw"}, "top1_weight"),
        (SimilarityAwareRouter, {"causal": "yes"}, "causal"),
        (SimilarityAwareRouter, {"init_scale": 0.0}, "init_scale"),
    ],
)
def test_bad_options_name_the_argument(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(D, E, 2, **kw)


def test_bad_k_and_sizes():
    with pytest.raises(ValueError, match="k must be"):
        SimilarityAwareRouter(D, E, E + 1)
    with pytest.raises(ValueError, match="num_experts"):
        AttentionAwareRouter(D, 0, 1)


@pytest.mark.parametrize(
    "attention, match",
    [
        (None, "context.attention is missing"),
        (torch.rand(B, H, S, S - 1), r"\[B, H, S, S\]"),
        (torch.rand(B + 1, H, S, S), r"\[B, H, S, S\]"),
        (torch.rand(B, S, S, S, 1), r"\[B, H, S, S\]"),
        (torch.ones(B, H, S, S, dtype=torch.int64), "floating"),
        (torch.rand(1, H, B * S, B * S), "batch_shape"),
        (torch.rand(B, H, S, S), "heads=3"),
    ],
)
def test_bad_attention_names_it(attention, match):
    r = _att(heads=3)
    with pytest.raises(ValueError, match=match):
        r(_x(), _ctx(attention))


def test_bad_batch_shape_names_it():
    with pytest.raises(ValueError, match="batch_shape"):
        _sim()(_x(), RoutingContext(batch_shape=(3, 5)))


def test_attention_aware_takes_the_sequences_from_the_attention():
    x, att = _x(24), _attention()
    r = _att()
    want = r(x, _ctx(att))
    _same(r(x, RoutingContext(attention=att, causal=True)), want)
    layer = MoELayer(D, 16, E, 2, router="attention_aware")
    layer.router.load_state_dict(r.state_dict())
    y_flat, _ = layer(x, RoutingContext(attention=att, causal=True))
    y_seq, _ = layer(x.view(B, S, D), RoutingContext(attention=att, causal=True))
    torch.testing.assert_close(y_flat.view(B, S, D), y_seq, atol=0, rtol=0)


def test_heads_in_range_and_a_3d_attention_is_one_head():
    x = _x(23)
    att = _attention()
    for h in range(H):
        out = _att(heads=h)(x, _ctx(att))
        assert torch.equal(out.logits, _att(heads=0)(x, _ctx(att[:, h])).logits)
    with pytest.raises(ValueError, match="heads=1"):
        _att(heads=1)(x, _ctx(att[:, 0]))
