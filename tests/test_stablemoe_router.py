"""StableMoECommunityRouter (specs/s2moe.md §8): fastmoe's "StableMoE" gate, the S2MoE / USMoE
papers' baseline. Parity with a plain-torch float64 reference (scores, top-k, weights, balance
loss), init, non-finite scores, gradients, low precision, compile, state_dict, errors, the
registry entry and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from smoe import MoELayer, StableMoECommunityRouter
from smoe import reference as ref
from smoe.examples.charlm import quick_config, run
from smoe.losses import DEFAULT_LOSS_WEIGHTS
from smoe.routing import available_routers, build_router, router_info

D, N = 12, 8
AUX = "stablemoe_community_balance"

CASES = [
    pytest.param(T, E, k, id=f"T{T}-E{E}-k{k}")
    for T in (0, 1, 7, 64)
    for E in (1, 4, 16)
    for k in sorted({1, min(2, E), E})
]


def _reference(x: torch.Tensor, emb: torch.Tensor, k: int):
    """specs/s2moe.md §8 in float64, written for obviousness: s = x · e_i / max(‖e_i‖, 1e-4), a
    non-finite score -> the smallest finite one of its row (0 if none), the k largest (ties to
    the lower index), the softmax over the k selected raw scores, the community balance loss.
    Returns (scores [T, N], expert [T, k] int32, weight [T, k], balance)."""
    x, emb = x.detach().double(), emb.detach().double()
    unit = torch.stack([e / max(torch.linalg.vector_norm(e).item(), 1e-4) for e in emb])
    scores = x @ unit.T
    for row in scores:
        finite = row[torch.isfinite(row)]
        fill = finite.min().item() if finite.numel() else 0.0
        row[~torch.isfinite(row)] = fill
    expert = torch.sort(-scores, dim=-1, stable=True).indices[:, :k]
    weight = torch.softmax(torch.gather(scores, 1, expert), dim=-1)
    expert = expert.to(torch.int32)
    return scores, expert, weight, ref.xmoe_community_balance_loss(scores, expert, emb.shape[0])


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, E, k", CASES)
def test_stablemoe_router_matches_reference(T, E, k, dtype):
    r = StableMoECommunityRouter(D, E, k).to(dtype)
    x = torch.randn(T, D, dtype=dtype)
    out = r(x)
    scores, expert, weight, balance = _reference(x, r.expert_emb, k)
    assert out.expert.shape == (T, k) and out.expert.dtype == torch.int32
    assert out.weight.dtype == out.logits.dtype == dtype
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.logits.double(), scores, **tol)
    if dtype == torch.float64:
        assert torch.equal(out.expert, expert)
    else:  # float32 cannot separate scores closer than its rounding: there, either order
        picked = torch.gather(scores, 1, out.expert.long())
        torch.testing.assert_close(picked, torch.gather(scores, 1, expert.long()), **tol)
        expert = out.expert
        weight = torch.softmax(picked, dim=-1)
    torch.testing.assert_close(out.weight.double(), weight, **tol)
    if T == 0:  # the reference's 0/0; the library's loss is 0 without tokens
        assert out.aux[AUX].item() == 0.0
        return
    balance = ref.xmoe_community_balance_loss(scores, expert, E)
    torch.testing.assert_close(out.aux[AUX].double(), balance, **tol)
    ones = torch.ones(T, dtype=torch.float64)
    torch.testing.assert_close(out.weight.sum(-1).double(), ones, **tol)


def test_stablemoe_scores_are_cosine_scores_with_identity_projection_and_raw_tokens():
    # The library's X-MoE oracle with W = I, τ = 1 and the token not normalised is this gate.
    r = StableMoECommunityRouter(D, N).double()
    x = torch.randn(30, D, dtype=torch.float64)
    want = ref.cosine_scores(
        x, torch.eye(D, dtype=torch.float64), r.expert_emb, torch.ones(()), normalize_tokens=False
    ).cos
    torch.testing.assert_close(r(x).logits, want)


def test_stablemoe_scores_scale_with_the_token_and_not_with_the_experts():
    r = StableMoECommunityRouter(D, N)
    x = torch.randn(20, D)
    out = r(x)
    torch.testing.assert_close(r(2 * x).logits, 2 * out.logits)  # token not normalised
    with torch.no_grad():
        r.expert_emb.mul_(torch.rand(N, 1) * 10 + 0.1)  # rows at any norm
    torch.testing.assert_close(r(x).logits, out.logits, rtol=1e-5, atol=1e-6)


def test_stablemoe_router_is_causal_per_token():
    r = StableMoECommunityRouter(D, N)
    x = torch.randn(10, D)
    out, head = r(x), r(x[:4])
    assert torch.equal(out.expert[:4], head.expert)
    torch.testing.assert_close(out.weight[:4], head.weight)


# --- init, no rescaling -----------------------------------------------------------------------


@pytest.mark.parametrize("d, E", [(D, N), (4, 16)])
def test_stablemoe_router_init_is_orthogonal_with_gain_032(d, E):
    r = StableMoECommunityRouter(d, E)
    emb = r.expert_emb.detach().double()
    assert emb.shape == (E, d) and r.k == 2
    # rows orthogonal when E <= d, columns otherwise; either way at norm 0.32
    gram = emb @ emb.T if E <= d else emb.T @ emb
    torch.testing.assert_close(gram, 0.32**2 * torch.eye(min(d, E), dtype=torch.float64))
    before = emb.clone()
    r.reset_parameters()
    assert not torch.equal(r.expert_emb.detach().double(), before)  # a fresh draw


def test_stablemoe_router_forward_never_rescales_the_experts():
    r = StableMoECommunityRouter(D, N).train()
    with torch.no_grad():
        r.expert_emb.mul_(torch.rand(N, 1) * 5)  # as if an optimiser step moved them
    before = r.expert_emb.detach().clone()
    r(torch.randn(9, D)).weight.sum().backward()
    r.eval()(torch.randn(9, D))
    assert torch.equal(r.expert_emb.detach(), before)


# --- non-finite scores ------------------------------------------------------------------------


def test_stablemoe_router_replaces_non_finite_scores_by_the_row_minimum():
    d, E = 4, 4
    r = StableMoECommunityRouter(d, E, 2)
    with torch.no_grad():  # for the big token: +inf, -inf and two exact finite scores
        r.expert_emb.copy_(
            torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 1], [-1, -1, 0, 0], [0, 0, 1, 0]])
        )
    x = torch.randn(4, d)
    x[1] = torch.tensor([3e38, 3e38, 0.5, -0.25])  # overflows float32 for experts 0 and 2
    x[3, 1] = float("nan")  # a whole row of NaN
    out = r(x)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.weight).all()
    row = out.logits[1]
    assert row[1] == -0.25 and row[3] == 0.5  # the finite scores kept
    assert row[0] == row[2] == -0.25  # the infinities take the row's smallest finite score
    assert out.expert[1].tolist() == [3, 0]  # ties to the lower index
    assert torch.equal(out.logits[3], torch.zeros(E))
    torch.testing.assert_close(out.weight[3], torch.full((2,), 0.5))
    assert torch.isfinite(out.aux[AUX])
    clean = r(x[[0, 2]])  # the other rows are those of the same tokens routed alone
    torch.testing.assert_close(out.logits[[0, 2]], clean.logits)
    assert torch.equal(out.expert[[0, 2]], clean.expert)
    scores, _, _, _ = _reference(x.double(), r.expert_emb, 2)  # float64 does not overflow
    assert torch.isfinite(scores[1]).all() and torch.equal(scores[3], torch.zeros(E).double())


def test_stablemoe_router_non_finite_fill_carries_no_gradient():
    r = StableMoECommunityRouter(D, N).double()
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    logits = r(torch.cat([x, torch.full((1, D), float("nan"), dtype=torch.float64)])).logits
    (g,) = torch.autograd.grad(logits[:5].sum() + logits[5].sum(), x)
    want = r.expert_emb / torch.linalg.vector_norm(r.expert_emb, dim=-1, keepdim=True)
    torch.testing.assert_close(g, want.sum(0).expand(5, D).detach())


# --- gradients --------------------------------------------------------------------------------


def test_stablemoe_router_gradcheck():
    # The weights and the balance loss w.r.t. x and E (float64, through the topk_softmax op);
    # inputs with clear top-k margins so that no selection flips under gradcheck's steps.
    torch.manual_seed(0)
    r = StableMoECommunityRouter(5, 4, 2).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    top = r(x).logits.topk(3, dim=-1).values
    assert (top[:, 1] - top[:, 2]).min() > 1e-3  # margin at the k-th place
    emb = r.expert_emb.detach().clone().requires_grad_()

    def fn(x, emb):
        out = torch.func.functional_call(r, {"expert_emb": emb}, (x,))
        return out.weight, out.aux[AUX]

    assert torch.autograd.gradcheck(fn, (x, emb), eps=1e-6, atol=1e-6)


def test_stablemoe_router_gradients_match_the_reference():
    r = StableMoECommunityRouter(D, N, 2).double()
    x = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    out = r(x)
    mine = torch.autograd.grad(out.weight[:, 0].sum(), (x, r.expert_emb))
    emb = r.expert_emb.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    unit = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
    scores = xr @ unit.T
    weight = torch.softmax(torch.gather(scores, 1, out.expert.long()), dim=-1)
    want = torch.autograd.grad(weight[:, 0].sum(), (xr, emb))
    for a, b in zip(mine, want):
        torch.testing.assert_close(a, b)


# --- precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stablemoe_router_low_precision_matches_float32(dtype):
    r = StableMoECommunityRouter(D, N, 2)
    x = torch.randn(200, D)
    low = StableMoECommunityRouter(D, N, 2).to(dtype)
    low.load_state_dict(r.state_dict())
    out = low(x.to(dtype))
    assert out.weight.dtype == out.logits.dtype == out.aux[AUX].dtype == torch.float32
    # computed in float32: the same as float32 on the rounded inputs
    rounded = StableMoECommunityRouter(D, N, 2)
    rounded.load_state_dict(low.state_dict())  # casts back to float32
    want = rounded(x.to(dtype).float())
    assert torch.equal(out.expert, want.expert)
    torch.testing.assert_close(out.weight, want.weight)
    torch.testing.assert_close(out.aux[AUX], want.aux[AUX])
    # and close to float32 on the exact inputs wherever the top-k is clear of the rounding
    full = r(x)
    top = full.logits.topk(3, dim=-1).values
    clear = ((top[:, 0] - top[:, 1]) > 0.05) & ((top[:, 1] - top[:, 2]) > 0.05)
    assert clear.float().mean() > 0.5
    assert torch.equal(out.expert[clear], full.expert[clear])
    torch.testing.assert_close(out.weight[clear], full.weight[clear], rtol=0, atol=0.02)


def test_stablemoe_router_is_float32_under_bf16_autocast():
    r = StableMoECommunityRouter(D, N, 2)
    x = torch.randn(10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x.bfloat16())
    assert out.weight.dtype == out.logits.dtype == out.aux[AUX].dtype == torch.float32
    torch.testing.assert_close(out.logits, r(x.bfloat16().float()).logits)


# --- compile, state_dict ----------------------------------------------------------------------


def test_stablemoe_router_compiles_fullgraph_once_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = StableMoECommunityRouter(D, N, 2).train()
    compiled_router = StableMoECommunityRouter(D, N, 2).train()
    compiled_router.load_state_dict(eager.state_dict())
    counter = CompileCounter()
    compiled = torch.compile(compiled_router, fullgraph=True, backend=counter)
    for _ in range(2):
        x = torch.randn(10, D)
        a, b = eager(x), compiled(x)
        assert torch.equal(a.expert, b.expert)
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.aux[AUX], b.aux[AUX])
        (a.weight[:, 0].sum() + a.aux[AUX]).backward()
        (b.weight[:, 0].sum() + b.aux[AUX]).backward()
    torch.testing.assert_close(eager.expert_emb.grad, compiled_router.expert_emb.grad)
    assert counter.frame_count == 1


def test_stablemoe_router_compiles_with_aot_eager_and_dynamic_shapes():
    torch._dynamo.reset()
    r = StableMoECommunityRouter(D, N, 2)
    compiled = torch.compile(
        lambda x: r(x).weight, fullgraph=True, backend="aot_eager", dynamic=True
    )
    for T in (5, 9):
        x = torch.randn(T, D)
        torch.testing.assert_close(compiled(x), r(x).weight)


def test_stablemoe_router_state_dict_round_trip():
    torch.manual_seed(0)
    a = StableMoECommunityRouter(D, N, 2)
    torch.manual_seed(1)
    b = StableMoECommunityRouter(D, N, 2)
    x = torch.randn(15, D)
    assert not torch.equal(a(x).logits, b(x).logits)
    state = a.state_dict()
    assert set(state) == {"expert_emb"} and state._metadata[""]["version"] == 1
    b.load_state_dict(state)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.expert, rb.expert) and torch.equal(ra.weight, rb.weight)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param((D, 0, 1), r"\bnum_experts must be >= 1", id="E0"),
        pytest.param((D, N, 0), r"\bk must be in \[1, num_experts=8\]", id="k0"),
        pytest.param((D, N, N + 1), r"\bk must be in \[1, num_experts=8\]", id="k>N"),
        pytest.param((0, N, 2), r"\bd_model must be >= 1", id="d0"),
    ],
)
def test_stablemoe_router_rejects_bad_options(args, match):
    with pytest.raises(ValueError, match=match):
        StableMoECommunityRouter(*args)
    with pytest.raises(ValueError, match=match):
        build_router("stablemoe_community", *args)


def test_stablemoe_router_rejects_unknown_options():
    with pytest.raises(ValueError, match="bogus"):
        build_router("stablemoe_community", D, N, 2, bogus=1)
    with pytest.raises(TypeError):
        StableMoECommunityRouter(D, N, 2, bogus=1)  # type: ignore[call-arg]


# --- registry and the layer -------------------------------------------------------------------


def test_stablemoe_router_is_registered():
    assert "stablemoe_community" in available_routers()
    info = router_info("stablemoe_community")
    assert info.factory is StableMoECommunityRouter and info.description.strip()
    assert info.aux_losses == (AUX,) and DEFAULT_LOSS_WEIGHTS[AUX] == 0.0
    assert info.selection == "token_choice" and info.compiles and not info.needs_sequence
    assert not info.needs_attention and info.stack is None and dict(info.defaults) == {}
    r = build_router("stablemoe_community", D, N, 3)
    assert isinstance(r, StableMoECommunityRouter) and r.k == 3 and info.is_causal(r)


def test_moe_layer_returns_the_balance_loss_at_weight_zero():
    layer = MoELayer(D, 16, N, 2, router="stablemoe_community")
    x = torch.randn(2, 5, D)
    _, aux = layer(x)
    assert set(aux.losses) == {AUX} and aux.losses[AUX] > 0
    assert aux.loss().item() == 0.0
    assert aux.loss({AUX: 1.0}).item() == pytest.approx(aux.losses[AUX].item())


def test_stablemoe_router_trains_a_quick_charlm():
    # Tiny Shakespeare, the library's 2-MoE-layer decoder at k = 2: the validation loss falls.
    result = run(quick_config(router="stablemoe_community", steps=30), progress=False)
    losses = [h["val_loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    final = result["final"]
    assert final["dropped"] == 0.0  # no capacity
    assert all(math.isfinite(final[m]) for m in ("val_bpc", "max_vio", "entropy"))
