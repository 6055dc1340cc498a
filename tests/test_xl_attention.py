"""Transformer-XL attention (smoe/models/xl.py) and the attention-aware router's ``memory`` option
(specs/graph_routing.md §2.3, §8 item 12): every graph is checked against a float64
recomputation from Q, K and ``key_pe`` written with loops, not with skew/unskew."""

from __future__ import annotations

import math

import pytest
import torch

from smoe import RoutingContext
from smoe.data.text import eval_windows, stream_batch
from smoe.models.charlm import CharLM
from smoe.models.xl import XLAttention, skew, unskew
from smoe.routing.graph_attention import AttentionAwareRouter

B, M, L, D, H = 2, 5, 4, 12, 3


def _attention(seed: int = 0, span: int = L) -> tuple[XLAttention, torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    att = XLAttention(D, H, span).double()
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    cache = torch.randn(B, span, D, generator=g, dtype=torch.float64)
    key_pe = torch.randn(1, D // H, span, generator=g, dtype=torch.float64)
    return att, x, cache, key_pe


def _recompute(att: XLAttention, x, cache, key_pe) -> torch.Tensor:
    """``[B, H, M, L + M]`` by the definition: query i (absolute L + i) over positions p = i …
    L + i − 1 of [cache; x], logit (q_i·k_p + q_i·key_pe[:, p − i]) / sqrt(d_head)."""
    span, Dh = att.attn_span, D // H
    allx = torch.cat([cache, x], dim=1)
    q = att.q(x).view(B, M, H, Dh)
    k = att.kv(allx)[..., :D].view(B, span + M, H, Dh)
    out = torch.zeros(B, H, M, span + M, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(M):
                cols = list(range(i, span + i))
                logit = torch.stack(
                    [q[b, i, h] @ k[b, p, h] + q[b, i, h] @ key_pe[0, :, p - i] for p in cols]
                ) / math.sqrt(Dh)
                out[b, h, i, cols] = torch.softmax(logit, dim=0)
    return out


def test_skew_and_unskew_are_the_shift_by_row():
    X = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4) + 1
    S = skew(X, pad_value=-1.0)
    assert S.shape == (2, 3, 7)
    for i in range(3):
        assert torch.equal(S[:, i, i : i + 4], X[:, i])
        others = [c for c in range(7) if not i <= c < i + 4]
        assert (S[:, i, others] == -1).all()
    assert torch.equal(unskew(S), X)


@pytest.mark.parametrize("span", [L, 7])  # span below and above the block length
def test_probabilities_equal_a_float64_recomputation(span):
    att, x, cache, key_pe = _attention(span=span)
    out, probs = att(x, cache, key_pe)
    want = _recompute(att, x, cache, key_pe)
    torch.testing.assert_close(probs, want, rtol=1e-12, atol=1e-12)
    # a token never attends to itself, and every row is a distribution over its span
    assert (probs.diagonal(offset=span, dim1=-2, dim2=-1) == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, M, dtype=torch.float64))
    v = att.kv(torch.cat([cache, x], 1))[..., D:].view(B, span + M, H, D // H).transpose(1, 2)
    y = (want @ v).transpose(1, 2).reshape(B, M, D)
    torch.testing.assert_close(out, att.proj(y), rtol=1e-12, atol=1e-12)


def test_attention_is_causal_within_the_block():
    att, x, cache, key_pe = _attention()
    out, _ = att(x, cache, key_pe)
    x2 = x.clone()
    x2[:, 3] += 1.0
    out2, _ = att(x2, cache, key_pe)
    assert torch.equal(out[:, :3], out2[:, :3])  # a later token changes nothing before it
    assert not torch.equal(out[:, 4], out2[:, 4])


def _router_input(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, RoutingContext]:
    att, x, cache, key_pe = _attention(seed)
    with torch.no_grad():
        probs = _recompute(att, x, cache, key_pe)
    u = torch.randn(B * M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return u, probs, RoutingContext(batch_shape=(B, M), attention=probs, causal=True)


@pytest.mark.parametrize("mix", ["poe", "logits", "probs"])
def test_memory_drop_equals_the_hand_graph(mix):
    u, probs, ctx = _router_input()
    r = AttentionAwareRouter(D, 6, 2, mix=mix, memory="drop", aux=False).double()
    got = r(u, ctx).logits
    a = probs.mean(dim=1)
    A = torch.zeros(B, M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(i):
            A[:, i, j] = a[:, i, L + j]
        A[:, i, i] = 1.0 - A[:, i, :i].sum(-1)
    assert torch.equal(A[:, 0, 0], torch.ones(B, dtype=torch.float64))  # token 0: only itself
    torch.testing.assert_close(A.sum(-1), torch.ones(B, M, dtype=torch.float64))
    z = (u @ r.weight.T).view(B, M, -1)
    lam = r.lam
    if mix == "poe":
        want = z + lam * A @ z
    elif mix == "logits":
        want = (1 - lam) * z + lam * A @ z
    else:
        p = torch.softmax(z, -1)
        want = torch.log((1 - lam) * p + lam * A @ p)
    torch.testing.assert_close(got, want.reshape(B * M, -1), rtol=1e-10, atol=1e-10)


def test_memory_drop_is_stateless():
    u, probs, ctx = _router_input()
    r = AttentionAwareRouter(D, 6, 2, memory="drop", aux=False).double()
    assert torch.equal(r(u, ctx).logits, r(u, ctx).logits)


@pytest.mark.parametrize("mix", ["poe", "probs"])
def test_memory_cache_mixes_the_cached_logits_of_the_last_tokens(mix):
    u1, p1, c1 = _router_input(1)
    u2, p2, c2 = _router_input(2)
    r = AttentionAwareRouter(D, 6, 2, mix=mix, memory="cache", aux=False).double()
    r(u1, c1)
    z1 = (u1 @ r.weight.T).view(B, M, -1)
    cache = torch.cat([torch.zeros(B, L, 6, dtype=torch.float64), z1], 1)[:, -L:]
    torch.testing.assert_close(r._z_cache, cache)
    got = r(u2, c2).logits
    z2 = (u2 @ r.weight.T).view(B, M, -1)
    A = p2.mean(dim=1)  # the whole row, memory included
    if mix == "poe":
        want = z2 + A @ torch.cat([cache, z2], 1)
    else:
        v = torch.softmax(torch.cat([cache, z2], 1), -1)
        want = torch.log(0.5 * v[:, L:] + 0.5 * A @ v)
    torch.testing.assert_close(got, want.reshape(B * M, -1), rtol=1e-10, atol=1e-10)
    r.reset_memory()
    assert r._z_cache is None


def test_memory_option_is_checked():
    with pytest.raises(ValueError, match="memory"):
        AttentionAwareRouter(D, 6, memory="keep")


def test_attention_without_memory_columns_ignores_memory():
    torch.manual_seed(0)
    u = torch.randn(B * M, D)
    a = torch.softmax(torch.randn(B, H, M, M).masked_fill(torch.ones(M, M).triu(1) > 0, -1e9), -1)
    ctx = RoutingContext(batch_shape=(B, M), attention=a, causal=True)
    drop = AttentionAwareRouter(D, 6, memory="drop")
    cache = AttentionAwareRouter(D, 6, memory="cache")
    cache.load_state_dict(drop.state_dict())
    assert torch.equal(drop(u, ctx).logits, cache(u, ctx).logits)
    assert cache._z_cache is None


def test_stream_batches_continue_each_row():
    data = torch.arange(1000)
    x0, y0 = stream_batch(data, 4, 10, 0)
    x1, _ = stream_batch(data, 4, 10, 1)
    assert torch.equal(x1[:, 0], y0[:, -1])  # row r of step 1 continues row r of step 0
    assert torch.equal(y0, x0 + 1)
    plain = torch.cat([x for x, _ in eval_windows(data, 4, 10, max_batches=3)])
    streams = list(eval_windows(data, 4, 10, max_batches=3, stream=True))
    assert torch.equal(streams[1][0][:, 0], streams[0][0][:, -1] + 1)
    both = torch.cat([x for x, _ in streams])
    assert sorted(plain[:, 0].tolist()) == sorted(both[:, 0].tolist())  # the same windows
    with pytest.raises(ValueError, match="batch_size"):
        stream_batch(torch.arange(10), 4, 10, 0)


def _lm(**kw) -> CharLM:
    torch.manual_seed(0)
    base = dict(d_model=24, n_layers=2, n_heads=3, context=8, num_experts=4, k=2)
    return CharLM(30, **{**base, "attention": "xl", "attn_span": 6, **kw})


@pytest.mark.parametrize("memory", ["drop", "cache"])
def test_xl_charlm_carries_its_memory_and_resets_it(memory):
    m = _lm(router="attention_aware", router_options={"memory": memory}).eval()
    idx = torch.randint(0, 30, (3, 8), generator=torch.Generator().manual_seed(0))
    first, _ = m(idx)
    second, _ = m(idx)
    assert not torch.equal(first, second)  # the second block sees the first as memory
    m.reset_memory()
    assert torch.equal(m(idx)[0], first)
    m.train()  # a mode switch starts a fresh memory
    m.eval()
    assert torch.equal(m(idx)[0], first)
    stateless = _lm(router="attention_aware", router_options={"memory": memory}, xl_memory=False)
    stateless.eval()
    assert torch.equal(stateless(idx)[0], stateless(idx)[0])


def test_xl_charlm_is_causal_and_trains():
    m = _lm(router="attention_aware", xl_memory=False).eval()
    idx = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(1))
    idx2 = idx.clone()
    idx2[:, 5:] = (idx2[:, 5:] + 1) % 30
    # causal: the first 5 positions do not see the changed later tokens. To the last bit only up to
    # the expert GEMMs' rounding: a token's expert output can move by an ulp with the number of
    # rows its expert got (BLAS takes another kernel for 1-3 rows), and the later tokens' routing
    # moves those counts; a leak would move the outputs by far more
    torch.testing.assert_close(m(idx)[0][:, :5], m(idx2)[0][:, :5], rtol=1e-6, atol=1e-7)
    assert "pos.weight" not in m.state_dict() and "key_pe" in m.state_dict()
    clone = _lm(router="attention_aware", xl_memory=False).eval()
    with torch.no_grad():
        clone.key_pe.add_(1.0)
    clone.load_state_dict(m.state_dict())
    assert torch.equal(clone(idx)[0], m(idx)[0])


def test_xl_charlm_options_are_checked():
    with pytest.raises(ValueError, match="attention"):
        CharLM(30, attention="local")
    with pytest.raises(ValueError, match="attn_span"):
        CharLM(30, attn_span=4)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="attn_span"):
            _lm(attn_span=bad)


def test_xl_charlm_training_lowers_the_loss_on_shakespeare():
    from smoe.examples.charlm import run
    from smoe.examples.charlm_config import quick_config

    cfg = quick_config(
        router="attention_aware",
        router_options={"memory": "cache"},  # the stateful mode: streams, cache, resets
        attention="xl",
        attn_span=16,
    )
    result = run(cfg, progress=False)
    losses = [h["val_loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.3
