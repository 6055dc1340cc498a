"""Padding in graph-of-tokens routing: ``RoutingContext.padding_mask`` makes padding tokens nobody's
neighbour (smoe/routing/graph.py, graph_attention.py)."""

from __future__ import annotations

import pytest
import torch

from smoe import AttentionAwareRouter, RoutingContext, SimilarityAwareRouter

B, S, D, E = 2, 6, 8, 5


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(B * S, D, generator=torch.Generator().manual_seed(seed))


def _mask() -> torch.Tensor:
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 4:] = False  # right padding
    keep[1, :2] = False  # left padding
    return keep


def _attention(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, 2, S, S, generator=g).masked_fill(torch.ones(S, S).triu(1) > 0, -1e9)
    return torch.softmax(logits, -1)


ROUTERS = {
    "similarity fused": lambda: SimilarityAwareRouter(D, E, 2, aux=False),
    "similarity window": lambda: SimilarityAwareRouter(D, E, 2, window=3, aux=False),
    "similarity probs": lambda: SimilarityAwareRouter(D, E, 2, mix="probs", aux=False),
    "attention": lambda: AttentionAwareRouter(D, E, 2, aux=False),
    "attention logits": lambda: AttentionAwareRouter(D, E, 2, mix="logits", aux=False),
}


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("causal", [True, False])
def test_a_padding_token_changes_no_other_tokens_routing(name, causal):
    router = ROUTERS[name]()
    keep = _mask()
    ctx = RoutingContext(batch_shape=(B, S), causal=causal, padding_mask=keep)
    if name.startswith("attention"):
        ctx = ctx._replace(attention=_attention())
    x = _tokens()
    base = router(x, ctx).logits
    x2 = x.clone()
    x2[~keep.reshape(-1)] += 5.0  # change every padding token
    other = router(x2, ctx).logits
    real = keep.reshape(-1)
    torch.testing.assert_close(other[real], base[real], rtol=1e-6, atol=1e-6)
    if name.startswith("similarity"):
        # without the mask the padding tokens do reach the real ones
        free = router(x2, ctx._replace(padding_mask=None)).logits
        assert not torch.allclose(
            free[real], router(x, ctx._replace(padding_mask=None)).logits[real]
        )


def test_an_all_true_mask_equals_no_mask():
    x = _tokens(1)
    full = torch.ones(B, S, dtype=torch.bool)
    ctx = RoutingContext(batch_shape=(B, S), causal=True)
    sim = SimilarityAwareRouter(D, E, 2, fused=False, aux=False)
    assert torch.equal(sim(x, ctx).logits, sim(x, ctx._replace(padding_mask=full)).logits)
    att = AttentionAwareRouter(D, E, 2, aux=False)
    ctx = ctx._replace(attention=_attention(1))
    assert torch.equal(att(x, ctx).logits, att(x, ctx._replace(padding_mask=full)).logits)


def test_memory_drop_gives_padding_mass_to_the_token_itself():
    x = _tokens(2)
    keep = _mask()
    att = torch.cat([torch.zeros(B, 2, S, 3), _attention(2)], dim=-1)  # three memory columns
    ctx = RoutingContext(batch_shape=(B, S), causal=True, attention=att, padding_mask=keep)
    r = AttentionAwareRouter(D, E, 2, lam=1.0, aux=False).double()
    got = r(x.double(), ctx._replace(attention=att.double())).logits
    a = att.double().mean(1)[..., 3:].tril(-1) * keep.double()[:, None, :]
    a = a + torch.diag_embed(1.0 - a.sum(-1))
    z = (x.double() @ r.weight.T).view(B, S, E)
    torch.testing.assert_close(got, (z + a @ z).reshape(B * S, E))


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(B, S), "bool"),
        (torch.ones(B, S + 1, dtype=torch.bool), "one entry per token"),
    ],
)
@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_bad_padding_masks_are_refused(mask, match, router):
    ctx = RoutingContext(batch_shape=(B, S), causal=True, padding_mask=mask)
    if router == "attention":
        r, ctx = AttentionAwareRouter(D, E), ctx._replace(attention=_attention())
    else:
        r = SimilarityAwareRouter(D, E)
    with pytest.raises(ValueError, match=f"padding_mask.*{match}|{match}.*padding_mask"):
        r(_tokens(), ctx)
