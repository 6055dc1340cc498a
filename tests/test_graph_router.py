"""Similarity-Aware and Attention-Aware routers (specs/graph_routing.md §2, §8): the baseline at
λ = 0, A = I, the temperature limits, rows and causality, p̃, equivariance, one head, detach_graph,
the entropy direction. The rest (fused path, registry, char-LM, compile, bad options):
tests/test_graph_router_more.py."""

from __future__ import annotations

import math

import pytest
import torch

from smoe import TopKRouter, ops
from smoe.models.charlm import CausalSelfAttention
from smoe.routing import (
    AttentionAwareRouter,
    RoutingContext,
    SimilarityAwareRouter,
)
from smoe.routing import _graph as G

D, E, B, S, H = 8, 5, 2, 7, 3
MIXES = ("poe", "logits", "probs")
CAUSAL = RoutingContext(batch_shape=(B, S), causal=True)
FULL = RoutingContext(batch_shape=(B, S), causal=False)


def _x(seed: int = 0, n: int = B * S) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _sim(k: int = 2, seed: int = 0, **kw) -> SimilarityAwareRouter:
    torch.manual_seed(seed)
    return SimilarityAwareRouter(D, E, k, **kw)


def _att(k: int = 2, seed: int = 0, **kw) -> AttentionAwareRouter:
    torch.manual_seed(seed)
    return AttentionAwareRouter(D, E, k, **kw)


def _attention(seed: int = 1, causal: bool = True, heads: int = H) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, heads, S, S, generator=g) * 2
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _ctx(attention: torch.Tensor | None = None, causal: bool = True) -> RoutingContext:
    return RoutingContext(batch_shape=(B, S), causal=causal, attention=attention)


def _baseline(r, k: int, renormalize: bool = True) -> TopKRouter:
    base = TopKRouter(D, E, k, renormalize=renormalize, bias=r.bias is not None)
    base.load_state_dict(r.state_dict())
    return base


def _same(a, b) -> None:
    assert torch.equal(a.expert, b.expert)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.logits, b.logits)
    assert a.aux.keys() == b.aux.keys()
    for name in a.aux:
        assert torch.equal(a.aux[name], b.aux[name]), name


def _graph_of(r: SimilarityAwareRouter, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The router's similarity graph, built explicitly: [B, S, S]."""
    u = x.view(B, S, D)
    z = torch.nn.functional.linear(x, r.weight).view(B, S, E)
    q, scale = G.similarity_query(r.sim, u, z, r.tau)
    return G.similarity_graph(q, scale, causal=causal, window=r.window, topm=r.topm)


def _mixed_logits(z: torch.Tensor, A: torch.Tensor, mix: str, lam: float) -> torch.Tensor:
    """The spec's §2 mix in float64, per sequence: z̃ (poe, logits) or log p̃ (probs)."""
    z, A = z.double().view(B, S, E), A.double()
    if mix == "poe":
        return (z + lam * A @ z).view(-1, E)
    if mix == "logits":
        return ((1 - lam) * z + lam * A @ z).view(-1, E)
    p = torch.softmax(z, -1)
    return torch.log((1 - lam) * p + lam * A @ p).view(-1, E)


# --- §8.1: λ = 0 is the baseline top-k gate, bit for bit --------------------------------------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("k, top1", [(1, "one"), (1, "prob"), (2, "one"), (3, "one")])
@pytest.mark.parametrize("kind", ["similarity", "similarity_explicit", "attention"])
def test_lam_zero_is_the_baseline_bit_for_bit(mix, k, top1, kind):
    x = _x()
    if kind == "attention":
        r, ctx = _att(k, mix=mix, lam=0.0, top1_weight=top1, bias=True), _ctx(_attention())
    else:
        r = _sim(
            k, mix=mix, lam=0.0, top1_weight=top1, bias=True, window=3 if "ex" in kind else None
        )
        ctx = CAUSAL
    with torch.no_grad():
        r.bias.normal_()
    base = _baseline(r, k, renormalize=k > 1 or top1 == "one")
    _same(r(x, ctx), base(x))
    _same(r(x), base(x))


# --- §8.2, §8.3: A = I --------------------------------------------------------------------------


def _identity_attention() -> torch.Tensor:
    return torch.eye(S).expand(B, 1, S, S).clone()


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize(
    "graph", ["attention_eye", "cosine_tau0", "cosine_tau0_explicit", "window1"]
)
def test_identity_graph(mix, graph):
    x = _x(3)
    lam = 0.7
    if graph == "attention_eye":
        r, ctx = _att(mix=mix, lam=lam), _ctx(_identity_attention(), causal=False)
    else:
        kw = {"window": 1} if graph == "window1" else {"sim": "cosine", "tau": 1e-6}
        r, ctx = _sim(mix=mix, lam=lam, fused="explicit" not in graph, **kw), FULL
    if graph != "attention_eye":
        torch.testing.assert_close(_graph_of(r, x, False), torch.eye(S).expand(B, S, S))
    out = r(x, ctx)
    z = torch.nn.functional.linear(x, r.weight)
    # "logits" and "probs" give the baseline; "poe" the baseline's experts, weighted by the
    # softmax over the selected experts of (1 + λ) z
    want_w, want_e = ops.topk_softmax(z * (1 + lam) if mix == "poe" else z, 2)
    assert torch.equal(out.expert, want_e)
    torch.testing.assert_close(out.weight, want_w, atol=1e-6, rtol=1e-5)


def test_cosine_tau_zero_gives_the_identity_graph_on_distinct_tokens():
    x = _x(4)
    for causal in (False, True):
        A = _graph_of(_sim(sim="cosine", tau=1e-6), x, causal)
        assert torch.equal(A, torch.eye(S).expand(B, S, S))


# --- §8.4, §8.5: τ → ∞, rows, causality -------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sim", ["dot", "cosine", "router"])
def test_large_tau_gives_a_uniform_or_prefix_mean_graph(causal, sim):
    x = _x(5)
    r = _sim(sim=sim, tau=1e9, mix="poe", lam=1.0)
    A = _graph_of(r, x, causal)
    want = torch.ones(S, S).tril() if causal else torch.ones(S, S)
    want = (want / want.sum(-1, keepdim=True)).expand(B, S, S)
    torch.testing.assert_close(A, want)
    for fused in (True, False):
        r.fused = fused
        out = r(x, CAUSAL if causal else FULL)
        z = torch.nn.functional.linear(x, r.weight)
        torch.testing.assert_close(out.logits, _mixed_logits(z, want, "poe", 1.0).float())


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"window": 2},
        {"window": 3, "causal": True},
        {"topm": 3},
        {"topm": 2, "causal": True, "window": 4},
        {"sim": "cosine", "topm": 1},
    ],
)
def test_similarity_graph_rows_are_distributions_over_the_neighbourhood(kw):
    x = _x(6)
    causal = kw.pop("causal", False)
    r = _sim(**kw)
    A = _graph_of(r, x, causal)
    torch.testing.assert_close(A.sum(-1), torch.ones(B, S))
    assert (A >= 0).all()
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    if causal:
        assert (A[:, j.expand(S, S) > i] == 0).all()
    if r.window is not None:
        assert (A[:, (i - j).abs() >= r.window] == 0).all()
    if r.topm is not None:
        assert ((A > 0).sum(-1) <= r.topm).all()


def test_max_over_heads_rows_sum_to_one():
    A = G.attention_graph("t", _attention(), "max", B * S, None, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(A.sum(-1), torch.ones(B, S))
    mean = G.attention_graph("t", _attention(), "mean", B * S, None, torch.float32, A.device)
    torch.testing.assert_close(mean, _attention().mean(1))


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize(
    "make",
    [
        lambda mix: (_sim(mix=mix), None),
        lambda mix: (_sim(mix=mix, fused=False), None),
        lambda mix: (_sim(mix=mix, sim="router", window=3), None),
        lambda mix: (_sim(mix=mix, sim="cosine", topm=2), None),
        lambda mix: (_att(mix=mix), "attention"),
        lambda mix: (_att(mix=mix, heads="max"), "attention"),
    ],
)
def test_causal_routing_of_token_i_ignores_later_tokens(mix, make):
    r, needs = make(mix)
    x = _x(7)
    att = _attention(8) if needs else None
    a = r(x, _ctx(att))
    for j in (2, 5):  # change every token after j, in both sequences
        y = x.view(B, S, D).clone()
        y[:, j + 1 :] = torch.randn(B, S - j - 1, D) * 3
        att2 = None
        if needs:
            att2 = att.clone()
            att2[:, :, j + 1 :] = _attention(9)[:, :, j + 1 :]  # later rows change, causally
        b = r(y.view(-1, D), _ctx(att2))
        early = torch.arange(B * S).view(B, S)[:, : j + 1].reshape(-1)
        assert torch.equal(a.expert[early], b.expert[early])
        assert torch.equal(a.weight[early], b.weight[early])
        assert torch.equal(a.logits[early], b.logits[early])
    # without the mask, earlier tokens see the later ones
    if not needs:
        r.causal = False
        c = r(y.view(-1, D), _ctx(None))
        assert not torch.equal(a.logits, c.logits)


# --- §8.6, §8.7: p̃ is a distribution; permutation equivariance --------------------------------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_mixed_probabilities_are_distributions(mix, lam):
    x = _x(10) * 4
    for r, ctx in ((_sim(mix=mix, lam=lam), CAUSAL), (_att(mix=mix, lam=lam), _ctx(_attention()))):
        out = r(x, ctx)
        p = out.logits.exp() if mix == "probs" else torch.softmax(out.logits, -1)
        assert (p >= 0).all() and torch.isfinite(out.logits).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(B * S))
        assert (out.weight > 0).all()
        torch.testing.assert_close(out.weight.sum(-1), torch.ones(B * S))
        # the experts are the k largest of p̃
        assert torch.equal(out.expert.long(), p.topk(2, -1).indices)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("kw", [{}, {"sim": "cosine", "fused": False}, {"sim": "router"}])
def test_permutation_equivariance_without_the_causal_mask(mix, kw):
    r, x = _sim(mix=mix, **kw), _x(11)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))
    xp = x.view(B, S, D)[:, perm].reshape(-1, D)
    a, b = r(x, FULL), r(xp, FULL)
    undo = lambda t: t.view(B, S, -1)[:, perm].reshape(B * S, -1)  # noqa: E731
    assert torch.equal(undo(a.expert), b.expert)
    torch.testing.assert_close(undo(a.weight), b.weight)
    torch.testing.assert_close(undo(a.logits), b.logits)
    # with A from an attention permuted alike, attention-aware is equivariant too
    att = _attention(12, causal=False)
    ra = _att(mix=mix)
    a, b = ra(x, _ctx(att, False)), ra(xp, _ctx(att[:, :, perm][:, :, :, perm], False))
    assert torch.equal(undo(a.expert), b.expert)
    torch.testing.assert_close(undo(a.weight), b.weight)


# --- §8.8: attention-aware with one head = similarity-aware with that head's matrix ----------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [False, True])
def test_single_head_equals_similarity_with_that_graph(mix, causal):
    x = _x(13)
    sim = _sim(mix=mix, lam=0.6 if mix != "poe" else 1.5, sim="dot", tau=0.5, fused=False)
    A = _graph_of(sim, x, causal)
    att = _attention(14, causal=causal).clone()
    att[:, 1] = A
    r = AttentionAwareRouter(D, E, 2, mix=mix, lam=sim.lam, heads=1)
    r.load_state_dict(sim.state_dict())
    a, b = sim(x, _ctx(None, causal)), r(x, _ctx(att, causal))
    _same(a, b)
    # and through the fused path, to rounding
    sim.fused = True
    c = sim(x, _ctx(None, causal))
    assert torch.equal(c.expert, b.expert)
    torch.testing.assert_close(c.weight, b.weight)


# --- §8.10: detach_graph ------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sim", ["dot", "router"])
def test_detach_graph_routes_as_a_constant_graph(fused, sim):
    # with detach_graph, d(weights)/dx is that of the same mix over a constant A; without, A's
    # own gradient adds to it
    x0 = _x(17)
    r = _sim(sim=sim, detach_graph=True, fused=fused)
    const = AttentionAwareRouter(D, E, 2)
    const.load_state_dict(r.state_dict())
    A = _graph_of(r, x0, True).detach()
    grads = []
    for router, ctx in ((r, CAUSAL), (const, _ctx(A[:, None]))):
        x = x0.clone().requires_grad_()
        (router(x, ctx).weight * torch.arange(1.0, 3.0)).sum().backward()
        grads.append((x.grad, router.weight.grad))
    for g, h in zip(grads[0], grads[1]):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    r.detach_graph = False
    x = x0.clone().requires_grad_()
    (r(x, CAUSAL).weight * torch.arange(1.0, 3.0)).sum().backward()
    assert not torch.allclose(x.grad, grads[0][0], atol=1e-6)


@pytest.mark.parametrize("mix", MIXES)
def test_detach_graph_gives_no_gradient_into_the_attention_nor_its_q_k(mix):
    torch.manual_seed(18)
    attn = CausalSelfAttention(D, 2)
    h = torch.randn(B, S, D)
    u = torch.randn(B * S, D)  # the router input, independent of the attention
    for detach in (True, False):
        attn.zero_grad()
        _, probs = attn(h, need_weights=True)
        probs.retain_grad()
        r = _att(mix=mix, detach_graph=detach)
        out = r(u, _ctx(probs))
        (out.weight * torch.arange(1.0, 3.0)).sum().backward()
        g = attn.qkv.weight.grad
        if detach:
            assert probs.grad is None and g is None
        else:
            assert probs.grad.abs().sum() > 0 and g.abs().sum() > 0


# --- §8.11: the entropy direction ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["similarity", "attention"])
def test_identical_tokens_poe_lowers_the_entropy_and_convex_mixes_keep_it(kind):
    x = _x(19, n=1).expand(B * S, D).contiguous() * 3
    for mix, lam in (("poe", 1.0), ("poe", 0.3), ("logits", 0.5), ("probs", 0.5)):
        r = _sim(mix=mix, lam=lam) if kind == "similarity" else _att(mix=mix, lam=lam)
        r(x, _ctx(_attention() if kind == "attention" else None))
        stats = r.routing_stats()
        assert stats["forwards"] == 1
        z = torch.nn.functional.linear(x, r.weight).detach()
        h_p = float(G.mean_entropy_of_logits(z))
        assert 0.05 < h_p < math.log(E) - 0.05  # p neither one-hot nor uniform
        assert stats["entropy_gate"] == pytest.approx(h_p, abs=1e-6)
        if mix == "poe":
            assert stats["entropy_mixed"] < h_p - 1e-3
            want = float(G.mean_entropy_of_logits(z * (1 + lam)))
            assert stats["entropy_mixed"] == pytest.approx(want, abs=1e-5)
        else:
            assert stats["entropy_mixed"] == pytest.approx(h_p, abs=1e-5)
