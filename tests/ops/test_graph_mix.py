"""graph_mix (Similarity-Aware / Attention-Aware routing; specs/graph_routing.md §2, §5, §8.9):
parity with the float64 reference over a shape table (with and without a cache, empty sizes,
strided inputs) in every dtype, forward and backward; opcheck, gradcheck w.r.t. x and A,
compile, determinism across thread counts, the op-level properties and one test per error."""

from __future__ import annotations

import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import DTYPES, TOL, assert_low_precision_close, noncontig

# (B, S, E, C): C = None is no cache. Empty batch, empty sequence (with and without a cache), one
# token, one expert, past one CPU row tile (16), column tile (128) and grad_A column tile (64).
SHAPES = [
    pytest.param(0, 3, 4, None, id="B0"),
    pytest.param(2, 0, 4, None, id="S0"),
    pytest.param(2, 0, 4, 3, id="S0-C3"),
    pytest.param(2, 1, 5, None, id="S1"),
    pytest.param(2, 1, 5, 2, id="S1-C2"),
    pytest.param(2, 7, 1, None, id="E1"),
    pytest.param(2, 7, 5, 4, id="C4"),
    pytest.param(3, 33, 20, None, id="S33-E20"),
    pytest.param(2, 20, 130, 3, id="E130-C3"),
    pytest.param(1, 70, 9, 5, id="S70-C5"),
]
OPTS = dict(self_coef=0.7, lam=1.3)
OP = torch.ops.smoe.graph_mix.default
BACKWARD = torch.ops.smoe.graph_mix_backward.default


def _inputs(B, S, E, C, dtype=torch.float32, layout="contiguous", seed=0):
    """(x, A, cache): A row-stochastic (softmax rows, as the routers build it)."""
    g = torch.Generator().manual_seed(seed)
    Sp = S + (C or 0)
    x = torch.randn(B, S, E, generator=g, dtype=torch.float64)
    A = torch.softmax(2 * torch.randn(B, S, Sp, generator=g, dtype=torch.float64), dim=-1)
    cache = torch.randn(B, C, E, generator=g, dtype=torch.float64) if C is not None else None
    ts = [t.to(dtype) if t is not None else None for t in (x, A, cache)]
    if layout == "strided":
        ts = [noncontig(t) if t is not None and t.shape[-1] > 1 and t.numel() else t for t in ts]
    elif layout == "transposed":  # A (and x, cache) column-major in their last two dims
        ts = [t.transpose(1, 2).contiguous().transpose(1, 2) if t is not None else t for t in ts]
    return ts


def _upstream(B, S, E, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, E, generator=g, dtype=torch.float64).to(dtype)


def _grads(fn, x, A, cache, up):
    """d <fn(x, A, cache), up> / d (x, A) on leaves keeping their layout (cache: no grad)."""
    xl, Al = x.detach().requires_grad_(), A.detach().requires_grad_()
    out = fn(xl, Al, cache)
    gx, gA = torch.autograd.grad(out, (xl, Al), up.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(xl) if gx is None else gx, torch.zeros_like(Al) if gA is None else gA]


def _close(got, want, dtype, scale=1.0):
    """fp16/bf16: STYLE.md's 3x rule; fp32/fp64: the TOL table times the magnitude scale."""
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_close(got, want, want.to(dtype))
    else:
        tol = TOL[dtype]
        torch.testing.assert_close(
            got.double(), want.double(), atol=tol["atol"] * scale, rtol=tol["rtol"]
        )


def _mine(x, A, cache, **kw):
    return ops.graph_mix(x, A, cache=cache, **(OPTS | kw))


def _theirs(x, A, cache, **kw):
    return ref.graph_mix(x, A, cache=cache, **(OPTS | kw))


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, S, E, C", SHAPES)
def test_graph_mix_matches_reference(B, S, E, C, dtype, layout):
    x, A, cache = _inputs(B, S, E, C, dtype, layout)
    got = _mine(x, A, cache)
    want = _theirs(x, A, cache)
    assert got.dtype == dtype and got.shape == (B, S, E) and got.is_contiguous()
    _close(got, want, dtype)

    up = _upstream(B, S, E, dtype)
    mine = _grads(_mine, x, A, cache, up)
    wide = [t.double() if t is not None else None for t in (x, A, cache)]
    theirs = _grads(_theirs, *wide, up.double())
    assert [g.dtype for g in mine] == [dtype, dtype]
    assert mine[0].shape == x.shape and mine[1].shape == A.shape
    scale = max(E, S + (C or 0)) ** 0.5 * 4  # |g|, |x'| ~ 1: a dot over E, a softmax row
    for a, b in zip(mine, theirs):
        _close(a, b, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_graph_mix_matches_reference_for_any_real_graph(dtype):
    # A need not be row-stochastic: signed entries, self_coef < 0 (logits mode with lam > 1)
    x, _, cache = _inputs(2, 9, 6, 3, dtype)
    A = torch.randn(2, 9, 12, dtype=dtype)
    kw = dict(self_coef=-0.5, lam=1.5)
    _close(_mine(x, A, cache, **kw), _theirs(x, A, cache, **kw), dtype, scale=10.0)


# --- opcheck, gradcheck, compile --------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "B, S, E, C", [(0, 3, 2, None), (2, 0, 3, 2), (2, 5, 3, None), (2, 4, 3, 2)]
)
def test_graph_mix_opcheck(B, S, E, C, requires_grad):
    x, A, cache = _inputs(B, S, E, C, torch.float64)
    x.requires_grad_(requires_grad)
    A.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (x, A, cache), OPTS)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("C", [None, 3])
def test_graph_mix_backward_opcheck(C, need):
    x, A, cache = _inputs(2, 5, 4, C)
    kw = OPTS | dict(need_x=need[0], need_A=need[1])
    torch.library.opcheck(BACKWARD, (_upstream(2, 5, 4, torch.float32), x, A, cache), kw)


@pytest.mark.parametrize("lam", [1.3, 0.0])
@pytest.mark.parametrize("C", [None, 3])
def test_graph_mix_gradcheck(C, lam):
    x, A, cache = _inputs(2, 5, 4, C, torch.float64)
    x.requires_grad_()
    A.requires_grad_()

    def fn(x, A):
        return ops.graph_mix(x, A, cache=cache, self_coef=0.7, lam=lam)

    assert torch.autograd.gradcheck(fn, (x, A), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("which", ["x", "A"])
def test_graph_mix_gradient_of_one_input_only(which):
    # the autograd saves only what the needed gradient reads; the other input gets none
    x, A, cache = _inputs(2, 6, 3, 2, torch.float64)
    leaf = (x if which == "x" else A).requires_grad_()
    up = _upstream(2, 6, 3, torch.float64)
    (got,) = torch.autograd.grad(ops.graph_mix(x, A, cache=cache, **OPTS), leaf, up)
    (want,) = torch.autograd.grad(ref.graph_mix(x, A, cache=cache, **OPTS), leaf, up)
    torch.testing.assert_close(got, want)


def test_graph_mix_cache_gets_no_gradient():
    x, A, cache = _inputs(2, 4, 3, 2)
    for t in (x, A, cache):
        t.requires_grad_()
    ops.graph_mix(x, A, cache=cache).square().sum().backward()
    assert cache.grad is None and x.grad is not None and A.grad is not None


def test_graph_mix_double_backward_is_refused():
    x, A, cache = _inputs(2, 4, 3, 2, torch.float64)
    x.requires_grad_()
    A.requires_grad_()
    (g,) = torch.autograd.grad(
        ops.graph_mix(x, A, cache=cache).square().sum(), A, create_graph=True
    )
    with pytest.raises(RuntimeError, match="smoe::graph_mix: double backward is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("C, dynamic", [(None, False), (3, False), (3, True)])
def test_graph_mix_compiles_without_graph_breaks(C, dynamic):
    torch._dynamo.reset()
    x, A, cache = _inputs(2, 6, 5, C)
    x.requires_grad_()
    A.requires_grad_()

    def fn(x, A, cache):
        return ops.graph_mix(x, A, cache=cache, **OPTS).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    a, b = fn(x, A, cache), compiled(x, A, cache)
    torch.testing.assert_close(a, b)
    for u, v in zip(torch.autograd.grad(a, (x, A)), torch.autograd.grad(b, (x, A))):
        torch.testing.assert_close(u, v)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_mix_is_deterministic_and_thread_count_independent(dtype):
    x, A, cache = _inputs(3, 50, 140, 20, dtype)  # several row, column and grad_A tiles
    up = _upstream(3, 50, 140, dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, 3, threads):
            torch.set_num_threads(n)
            results.append([_mine(x, A, cache), *_grads(_mine, x, A, cache, up)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- spec properties (specs/graph_routing.md §2, §8) ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [None, 3])
def test_graph_mix_lam0_is_self_coef_x_exactly(dtype, C):
    # §8.1: lam = 0 gives the baseline; the graph term is dropped, even a non-finite one
    x, A, cache = _inputs(2, 7, 5, C, dtype)
    A[0, 0, 0] = float("nan")
    for self_coef in (1.0, 0.5):
        got = ops.graph_mix(x, A, cache=cache, self_coef=self_coef, lam=0.0)
        assert torch.equal(got, (self_coef * x.double()).to(dtype))
    x.requires_grad_()
    A.requires_grad_()
    gx, gA = torch.autograd.grad(ops.graph_mix(x, A, lam=0.0, cache=cache).sum(), (x, A))
    assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gA, torch.zeros_like(A))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_graph_mix_identity_graph_with_convex_weights_gives_x(dtype):
    # §8.2: A = I with self_coef = 1 - lam ("logits", "probs") leaves every token unchanged
    x, _, _ = _inputs(3, 8, 6, None, dtype)
    eye = torch.eye(8, dtype=dtype).expand(3, 8, 8)
    for lam in (0.25, 0.5, 1.0):
        got = ops.graph_mix(x, eye, self_coef=1 - lam, lam=lam)
        torch.testing.assert_close(got, x, **TOL[dtype])


def test_graph_mix_cache_rows_are_mixed_like_current_ones():
    # §2.3 "cache": the mix over [cache; x] equals the mix over the concatenation with a full A,
    # keeping only the current-block rows
    x, A, cache = _inputs(2, 5, 4, 3, torch.float64)
    full = torch.cat([cache, x], dim=1)
    A_full = torch.cat([torch.zeros(2, 3, 8, dtype=torch.float64), A], dim=1)
    want = ops.graph_mix(full, A_full, self_coef=0.7, lam=1.3)[:, 3:]
    torch.testing.assert_close(ops.graph_mix(x, A, cache=cache, **OPTS), want)


# --- errors (each names the argument) --------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(self_coef=float("nan")), "self_coef must be finite"),
        (dict(self_coef=float("inf")), "self_coef must be finite"),
        (dict(lam=-0.5), "lam must be >= 0"),
        (dict(lam=float("nan")), "lam must be >= 0"),
        (dict(lam=float("inf")), "lam must be >= 0"),
    ],
    ids=str,
)
def test_graph_mix_rejects_bad_options(change, match):
    x, A, _ = _inputs(2, 3, 4, None)
    with pytest.raises(ValueError, match=match):
        ops.graph_mix(x, A, **change)
    with pytest.raises(RuntimeError, match=match):  # the op itself checks them too
        OP(x, A, **change)


def _bad_tensor_calls():
    x, A, cache = _inputs(2, 3, 4, 2)
    return [
        ((x[0], A[:, :, 2:]), r"x must be 3-D \[B, S, E\], got 2-D"),
        ((x, A[0]), r"A must be 3-D \[B, S, S'\], got 2-D"),
        ((x, A), r"A must be \[B, S, S'\] = \[2, 3, 3\]"),  # a cache's columns without a cache
        ((x, A[:1], cache), r"A must be \[B, S, S'\] = \[2, 3, 5\].*got \[1, 3, 5\]"),
        ((x, A[:, :2], cache), r"A must be \[B, S, S'\] = \[2, 3, 5\].*got \[2, 2, 5\]"),
        ((x, A[:, :, 1:], cache), r"A must be \[B, S, S'\] = \[2, 3, 5\].*got \[2, 3, 4\]"),
        ((x, A, cache[:, :, :3]), r"cache must be \[B, C, E\] with B = 2 and E = 4"),
        ((x, A, cache[:1]), r"cache must be \[B, C, E\] with B = 2 and E = 4"),
        ((x, A, cache[0]), r"cache must be \[B, C, E\]"),
        ((x.int(), A.int(), cache.int()), "x must be float32, float64, float16 or bfloat16"),
        ((x, A.double(), cache), "A must have x's dtype Float, got Double"),
        ((x, A, cache.half()), "cache must have x's dtype Float, got Half"),
        ((x, A.to("meta"), cache), "A must be on cpu like x, got meta"),
        ((x, A, cache.to("meta")), "cache must be on cpu like x, got meta"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_tensor_calls())))
def test_graph_mix_rejects_bad_tensors(i):
    args, match = _bad_tensor_calls()[i]
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


def test_graph_mix_backward_rejects_bad_grads():
    x, A, cache = _inputs(2, 3, 4, 2)
    g = torch.zeros(2, 3, 4)
    for args, match in (
        ((g.double(), x, A, cache), "grad must have x's dtype Float, got Double"),
        ((g[:, :2], x, A, cache), r"grad must have x's shape \[B, S, E\] = \[2, 3, 4\]"),
        ((g.to("meta"), x, A, cache), "grad must be on cpu like x"),
        ((g, x, A[:, :, 2:], cache), r"A must be \[B, S, S'\] = \[2, 3, 5\]"),
        ((g, x, A, cache), "lam must be >= 0"),
    ):
        kw = {"lam": -1.0} if match.startswith("lam") else {}
        with pytest.raises(RuntimeError, match=match):
            BACKWARD(*args, **kw)
