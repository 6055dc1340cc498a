"""smoe.ops.router_stats: the auxiliary losses' statistics (softmax column sums and logsumexps) in
one pass, and the losses built on it."""

import math

import pytest
import torch

from smoe import ops
from smoe import reference as ref
from smoe.losses import importance_loss, router_z_loss, switch_balance_loss
from tests.helpers import CUDA_DTYPES, DTYPES, TOL, assert_close, noncontig

# (T, E): no tokens, one expert, a row shorter than the 16 summation lanes, one past it, and
# several of the CPU's 256-row (CUDA's 32-row) blocks of prob_sum with a partial last one.
SHAPES = [
    pytest.param(0, 4, id="T0"),
    pytest.param(5, 1, id="E1"),
    pytest.param(7, 8, id="E8"),
    pytest.param(33, 17, id="E17"),
    pytest.param(600, 64, id="blocks"),
]


def _logits(T, E, dtype, scale=3.0):
    return (torch.randn(T, E, dtype=torch.float64) * scale).to(dtype)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("layout", ["contiguous", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E", SHAPES)
def test_router_stats_matches_reference(T, E, dtype, layout):
    logits = _logits(T, E, dtype)
    if layout == "noncontig" and T:  # (an empty tensor is contiguous whatever its strides)
        logits = noncontig(logits)
    prob_sum, lse = ops.router_stats(logits)
    want_sum, want_lse = ref.router_stats(logits)  # float64 math on the exact input values
    assert prob_sum.dtype == lse.dtype == _stats_dtype(dtype)
    assert prob_sum.shape == (E,) and lse.shape == (T,)
    tol = TOL[_stats_dtype(dtype)]
    # prob_sum adds T positive terms: its rounding grows with T, relative to itself
    torch.testing.assert_close(prob_sum, want_sum, atol=tol["atol"], rtol=tol["rtol"] * 4)
    torch.testing.assert_close(lse, want_lse, **tol)
    if T:
        assert_close(prob_sum.sum() / T, torch.tensor(1.0, dtype=torch.float64), prob_sum.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E", SHAPES)
def test_router_stats_gradients_match_reference(T, E, dtype):
    logits = _logits(T, E, dtype)
    gp = torch.randn(E, dtype=_stats_dtype(dtype))
    gl = torch.randn(T, dtype=_stats_dtype(dtype))
    for grads in ((gp, gl), (gp, None), (None, gl)):
        outs = [i for i, g in enumerate(grads) if g is not None]
        x = logits.clone().requires_grad_()
        got = ops.router_stats(x)
        (mine,) = torch.autograd.grad([got[i] for i in outs], x, [grads[i] for i in outs])
        x64 = logits.double().requires_grad_()
        want = ref.router_stats(x64)
        (theirs,) = torch.autograd.grad(
            [want[i] for i in outs], x64, [grads[i].double() for i in outs]
        )
        assert mine.dtype == dtype and mine.shape == (T, E)
        if dtype in (torch.float16, torch.bfloat16):  # the exact gradient, rounded once
            torch.testing.assert_close(mine, theirs.to(dtype), **TOL[dtype])
        else:
            assert_close(mine, theirs)


def test_router_stats_gradcheck():
    x = torch.randn(40, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.router_stats, (x,))
    assert torch.autograd.gradcheck(lambda t: ops.router_stats(t).prob_sum, (x,))
    assert torch.autograd.gradcheck(lambda t: ops.router_stats(t).lse, (x,))
    assert torch.autograd.gradgradcheck(ops.router_stats, (x,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("T,E", [(0, 3), (5, 1), (300, 9)])
def test_router_stats_opcheck(T, E, requires_grad):
    x = torch.randn(T, E, dtype=torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.smoe.router_stats.default, (x,))


def test_router_stats_backward_opcheck():
    op = torch.ops.smoe.router_stats_backward.default
    x = torch.randn(300, 9)
    gp, gl = torch.randn(9), torch.randn(300)
    for args in ((gp, gl, x), (gp, None, x), (None, gl, x), (None, None, x)):
        torch.library.opcheck(op, args)
    torch.library.opcheck(op, (gp, gl, x.bfloat16()))


def test_router_stats_keeps_the_softmax_where_lse_rounds_to_the_max():
    """exp(x - lse) would give 1 for both top entries of [big, 0, big] (lse rounds to big); the
    op's gradient is the softmax itself (0.5 each), recomputed as the forward computes it."""
    big = 1e300
    x = torch.tensor([[big, 0.0, big]], dtype=torch.float64, requires_grad=True)
    prob_sum, lse = ops.router_stats(x)
    assert prob_sum.tolist() == [0.5, 0.0, 0.5] and lse.item() == big
    (g,) = torch.autograd.grad(lse.sum(), x)
    assert g.tolist() == [[0.5, 0.0, 0.5]]


def test_router_stats_edges_follow_torch():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0, 1.0, -inf], [-inf, -inf, -inf], [0.0, nan, 1.0], [inf, 0.0, 1.0]])
    prob_sum, lse = ops.router_stats(x)
    want = torch.logsumexp(x, dim=-1)
    assert lse[0].item() == pytest.approx(math.log(1 + math.e))
    assert lse[1].item() == -inf == want[1].item()  # torch.logsumexp's shift: no NaN
    assert math.isnan(lse[2].item()) and lse[3].item() == inf == want[3].item()
    assert prob_sum.isnan().all()  # the -inf row's softmax is NaN, as torch.softmax's


def test_router_stats_is_deterministic_across_thread_counts():
    logits = torch.randn(5000, 64)  # 20 blocks of 256 rows
    a = ops.router_stats(logits)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = ops.router_stats(logits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.prob_sum, b.prob_sum) and torch.equal(a.lse, b.lse)


def test_router_stats_compiles_without_graph_breaks():
    logits = torch.randn(12, 8, requires_grad=True)

    def fn(x):
        p, lse = ops.router_stats(x)
        return (p * p).sum() + (lse * lse).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = fn(logits), compiled(logits)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)


def test_router_stats_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="router_stats: logits must be float"):
        ops.router_stats(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="router_stats: logits must be 2-D"):
        ops.router_stats(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="at least one expert"):
        ops.router_stats(torch.randn(3, 0))
    op = torch.ops.smoe.router_stats_backward.default
    with pytest.raises(RuntimeError, match="grad_prob_sum must be Float"):
        op(torch.randn(4, dtype=torch.float64), None, torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"grad_lse must be \[3\]"):
        op(None, torch.randn(4), torch.randn(3, 4))


# ---- the losses on it ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_losses_on_router_stats_match_their_reference(dtype):
    T, E, k = 300, 16, 2
    logits = _logits(T, E, dtype, scale=1.0).requires_grad_()
    expert = torch.topk(logits.detach().float(), k, dim=-1).indices.int()
    stats = ops.router_stats(logits)
    got = [
        switch_balance_loss(logits, expert, E),
        switch_balance_loss(logits, expert, E, stats=stats),
        router_z_loss(logits),
        router_z_loss(logits, stats=stats),
        importance_loss(logits),
    ]
    want = [
        ref.switch_balance_loss(logits.detach(), expert, E),
        ref.switch_balance_loss(logits.detach(), expert, E),
        ref.router_z_loss(logits.detach()),
        ref.router_z_loss(logits.detach()),
        ref.importance_loss(logits.detach()),
    ]
    for g, w in zip(got, want):
        assert g.dtype == _stats_dtype(dtype)
        assert_close(g, w, _stats_dtype(dtype))
    assert torch.equal(got[0], got[1]) and torch.equal(got[2], got[3])
    (g1,) = torch.autograd.grad(got[0] + got[2], logits)
    x64 = logits.detach().double().requires_grad_()
    w64 = ref.switch_balance_loss(x64, expert, E) + ref.router_z_loss(x64)
    (g2,) = torch.autograd.grad(w64, x64)
    torch.testing.assert_close(g1.double(), g2, **TOL[dtype])  # in logits' dtype


# ---- CUDA ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E", SHAPES)
def test_router_stats_cuda_matches_cpu(T, E, dtype):
    # strided rows on the device itself (.cuda() of a strided view would copy it contiguous)
    dev = noncontig(_logits(T, E, dtype).cuda()) if T else _logits(T, E, dtype).cuda()
    assert T == 0 or dev.stride(0) == 2 * E
    logits = dev.cpu()
    cpu = ops.router_stats(logits)
    gpu = ops.router_stats(dev)
    assert gpu.prob_sum.dtype == gpu.lse.dtype == torch.float32
    torch.testing.assert_close(gpu.prob_sum.cpu(), cpu.prob_sum, atol=1e-5, rtol=4e-5)
    torch.testing.assert_close(gpu.lse.cpu(), cpu.lse, **TOL[torch.float32])
    gp, gl = torch.randn(E), torch.randn(T)
    for grads in ((gp, gl), (gp, None), (None, gl)):
        want = torch.ops.smoe.router_stats_backward.default(*grads, logits)
        cuda_grads = [None if g is None else g.cuda() for g in grads]
        got = torch.ops.smoe.router_stats_backward.default(*cuda_grads, dev)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@pytest.mark.cuda
def test_router_stats_cuda_is_deterministic_and_sync_free():
    logits = torch.randn(4100, 300, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = ops.router_stats(logits), ops.router_stats(logits)
        (ga,) = torch.autograd.grad(a.prob_sum.square().sum() + a.lse.sum(), logits)
        (gb,) = torch.autograd.grad(b.prob_sum.square().sum() + b.lse.sum(), logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a.prob_sum, b.prob_sum) and torch.equal(a.lse, b.lse)
    assert torch.equal(ga, gb)


@pytest.mark.cuda
def test_router_stats_cuda_rejects_float64():
    with pytest.raises(RuntimeError, match="router_stats"):
        ops.router_stats(torch.randn(3, 4, dtype=torch.float64, device="cuda"))
