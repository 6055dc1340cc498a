"""sinkhorn (log-domain entropic OT, specs/sinkhorn_ssr.md §3, §7-§10): parity with the float64
reference, opcheck, gradcheck through the unrolled iterations, compile, determinism, errors and
the op-level spec properties."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from smoe import ops
from smoe import reference as ref
from tests.helpers import DTYPES, assert_low_precision_close, noncontig

# (T, E): empty batch, one expert, one token, T not divisible by E, T = E, more tokens than one
# column-reduction chunk (256) and not a multiple of it.
SHAPES = [
    pytest.param(0, 4, id="T0-E4"),
    pytest.param(5, 1, id="T5-E1"),
    pytest.param(1, 6, id="T1-E6"),
    pytest.param(17, 5, id="T17-E5"),
    pytest.param(8, 8, id="T8-E8"),
    pytest.param(600, 16, id="T600-E16"),
]


def _scores(T, E, dtype=torch.float64, scale=1.0):
    return (scale * torch.randn(T, E, dtype=torch.float64)).to(dtype)


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E", SHAPES)
def test_sinkhorn_matches_reference(T, E, dtype, strided):
    s = _scores(T, E, dtype)
    if strided and T > 0 and E > 1:
        s = noncontig(s)
    out = ops.sinkhorn(s, eps=0.5, max_iter=20)
    lp, f, g = ref.sinkhorn(s.double(), eps=0.5, max_iter=20)
    assert out.log_plan.dtype == _out_dtype(dtype) and out.log_plan.shape == (T, E)
    assert out.iters_done.dtype == torch.int64 and out.iters_done.item() == (20 if T else 0)
    if T == 0:
        assert out.f.shape == (0,) and out.g.shape == (E,)
        assert out.row_err.item() == 0 and out.col_err.item() == 0
        return
    if dtype in (torch.float16, torch.bfloat16):  # the op computes in float32 from these values
        lp32, f32, g32 = ref.sinkhorn(s.float().double(), eps=0.5, max_iter=20)
        torch.testing.assert_close(out.log_plan.double(), lp32, atol=2e-5, rtol=2e-5)
        return
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.log_plan.double(), lp, **tol)
    torch.testing.assert_close(out.f.double(), f, **tol)
    torch.testing.assert_close(out.g.double(), g, **tol)


@pytest.mark.parametrize("T,E", [(17, 5), (64, 8)])
def test_sinkhorn_log_domain_equals_the_scaling_form(T, E):
    # §10.2: float64, moderate inputs.
    s = _scores(T, E)
    out = ops.sinkhorn(s, eps=0.3, max_iter=50)
    torch.testing.assert_close(out.log_plan.exp(), ref.sinkhorn_scaling(s, eps=0.3, max_iter=50))


@pytest.mark.parametrize("T,E", [(17, 5), (40, 8), (1000, 7)])
def test_sinkhorn_marginals_ssr_and_sbase(T, E):
    # §10.1: SSR marginals (1, T/E) and S-BASE's (1/T, 1/E), T not divisible by E included.
    # float64 scores: float32 column sums of T/E ~ 143 cannot reach 1e-4 (their rounding alone).
    s = _scores(T, E, torch.float64)
    for row, col in ((1.0, None), (1.0 / T, 1.0 / E)):
        out = ops.sinkhorn(s, eps=0.5, max_iter=500, tol=1e-4, row_mass=row, col_mass=col)
        plan = out.log_plan.double().exp()
        c = T * row / E if col is None else col
        torch.testing.assert_close(
            plan.sum(1), torch.full((T,), row).double(), atol=1e-4, rtol=1e-4
        )
        assert (plan.sum(0) - c).norm() <= 1.5e-4
        assert out.row_err.item() <= 1e-4 and out.col_err.item() <= 1e-4
        # the reported residuals are the plan's own
        assert abs((plan.sum(0) - c).norm().item() - out.col_err.item()) < 1e-5


def test_sinkhorn_tolerance_stops_early_at_a_check():
    s = _scores(50, 6, torch.float32)
    out = ops.sinkhorn(s, eps=1.0, max_iter=1000, tol=1e-5, check_every=7)
    n = out.iters_done.item()
    assert n < 1000 and n % 7 == 0
    assert out.row_err.item() <= 1e-5 and out.col_err.item() <= 1e-5
    fixed = ops.sinkhorn(s, eps=1.0, max_iter=n)  # the same iterations without the checks
    assert torch.equal(fixed.log_plan, out.log_plan)
    before = ops.sinkhorn(s, eps=1.0, max_iter=n - 7)
    assert max(before.row_err.item(), before.col_err.item()) > 1e-5


# --- opcheck, gradcheck, compile --------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("T,E", [(0, 4), (7, 3), (3, 1)])
def test_sinkhorn_opcheck(T, E, requires_grad):
    s = _scores(T, E).requires_grad_(requires_grad)
    for kwargs in (
        {"eps": 0.5, "max_iter": 5},
        {"eps": 0.1, "max_iter": 30, "tol": 1e-3, "check_every": 4},
        {"eps": 1.0, "max_iter": 3, "row_mass": 0.5, "col_mass": 0.5 * T / E if T else None},
    ):
        torch.library.opcheck(torch.ops.smoe.sinkhorn.default, (s,), kwargs)


def test_sinkhorn_backward_opcheck():
    s = _scores(6, 4)
    out = torch.ops.smoe.sinkhorn.default(s, eps=0.5, max_iter=5)
    g = torch.randn(6, 4, dtype=torch.float64)
    args = (g, g[:, 0].clone(), g[0].clone(), s, out[6], out[7], out[3], 0.5)
    torch.library.opcheck(torch.ops.smoe.sinkhorn_backward.default, args)


@pytest.mark.parametrize("output", ["log_plan", "f", "g"])
@pytest.mark.parametrize("T,E", [(1, 1), (6, 4), (9, 3)])
def test_sinkhorn_gradcheck_through_the_unrolled_iterations(T, E, output):
    s = _scores(T, E).requires_grad_()
    fn = lambda x: getattr(ops.sinkhorn(x, eps=0.7, max_iter=6), output)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def test_sinkhorn_gradient_matches_autograd_through_the_reference():
    s = _scores(30, 6).requires_grad_()
    w = torch.randn(30, 6, dtype=torch.float64)
    out = ops.sinkhorn(s, eps=0.2, max_iter=40)
    (ga,) = torch.autograd.grad((out.log_plan.exp() * w).sum() + out.f.sum(), s)
    lp, f, _ = ref.sinkhorn(s, eps=0.2, max_iter=40)
    (gb,) = torch.autograd.grad((lp.exp() * w).sum() + f.sum(), s)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-9)
    assert ga.abs().sum() > 0


def test_sinkhorn_gradient_of_low_precision_scores_has_their_dtype():
    s = _scores(12, 4, torch.bfloat16).requires_grad_()
    out = ops.sinkhorn(s, eps=0.5, max_iter=10)
    out.log_plan.exp().pow(2).sum().backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_sinkhorn_double_backward_is_refused():
    s = _scores(5, 3).requires_grad_()
    out = ops.sinkhorn(s, eps=0.5, max_iter=4)
    (g,) = torch.autograd.grad(out.log_plan.exp().square().sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("dynamic", [False, True])
def test_sinkhorn_compiles_without_graph_breaks(dynamic):
    torch._dynamo.reset()
    s = _scores(24, 6, torch.float32).requires_grad_()

    def fn(x):
        out = ops.sinkhorn(x, eps=0.3, max_iter=15)
        return (out.log_plan.exp() * torch.arange(6.0)).sum() + out.g.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    a, b = fn(s), compiled(s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0])


# --- determinism ------------------------------------------------------------------------------


def test_sinkhorn_is_deterministic_and_thread_count_independent():
    s = _scores(1500, 16, torch.float32).requires_grad_()
    w = torch.randn(1500, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = ops.sinkhorn(s, eps=0.1, max_iter=25)
            (grad,) = torch.autograd.grad((out.log_plan * w).sum(), s)
            results.append((*out, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- spec properties (§9, §10) ----------------------------------------------------------------


def test_sinkhorn_is_invariant_to_row_and_column_shifts():
    # §10.3: adding a_t to row t or b_j to column j of C leaves the plan unchanged.
    s = _scores(20, 5)
    a, b = torch.randn(20, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    base = ops.sinkhorn(s, eps=0.5, max_iter=300).log_plan
    shifted = ops.sinkhorn(s + a + b, eps=0.5, max_iter=300).log_plan
    torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)


def test_sinkhorn_is_permutation_equivariant():
    # §10.4, in tokens and in experts.
    s = _scores(23, 6)
    pt, pe = torch.randperm(23), torch.randperm(6)
    base = ops.sinkhorn(s, eps=0.4, max_iter=200).log_plan
    perm = ops.sinkhorn(s[pt][:, pe], eps=0.4, max_iter=200).log_plan
    torch.testing.assert_close(perm, base[pt][:, pe], atol=1e-9, rtol=1e-9)


def test_sinkhorn_large_eps_gives_the_uniform_plan():
    # §10.5: ξ → ∞, every entry row_mass / E.
    out = ops.sinkhorn(_scores(13, 4), eps=1e8, max_iter=3)
    torch.testing.assert_close(out.log_plan.exp(), torch.full((13, 4), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("T,E", [(6, 3), (8, 4), (6, 2)])
def test_sinkhorn_small_eps_gives_the_balanced_optimal_assignment(T, E):
    # §10.5: ξ → 0 with E | T: a hard balanced assignment maximising <Π, C>, as the linear
    # assignment of tokens to T/E copies of each expert finds it.
    torch.manual_seed(T * 10 + E)
    s = torch.rand(T, E, dtype=torch.float64)
    plan = ops.sinkhorn(s, eps=2e-3, max_iter=5000).log_plan.exp()
    cost = s.repeat_interleave(T // E, dim=1).numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    best = cost[rows, cols].sum()
    assert abs((plan * s).sum().item() - best) < 2e-2
    assert torch.allclose(plan, plan.round(), atol=5e-2)  # nearly hard
    # small ξ converges slowly: the columns are within 1e-3 after 5000 iterations
    torch.testing.assert_close(
        plan.sum(0), torch.full((E,), T / E, dtype=torch.float64), atol=1e-3, rtol=0
    )


def test_sinkhorn_large_logits_stay_finite_forward_and_backward():
    # §10.10: |ℓ| ~ 1e4 with cost = logits and ξ = 0.05.
    s = (torch.randn(64, 8) * 1e4).requires_grad_()
    out = ops.sinkhorn(s, eps=0.05, max_iter=100)
    for t in out:
        assert torch.isfinite(t).all()
    (grad,) = torch.autograd.grad((out.log_plan.exp() * torch.randn(64, 8)).sum(), s)
    assert torch.isfinite(grad).all()


def test_sinkhorn_low_precision_error_is_that_of_float32_math():
    s = _scores(40, 8, torch.float16)
    out = ops.sinkhorn(s, eps=0.5, max_iter=30)
    lp64, _, _ = ref.sinkhorn(s.double(), eps=0.5, max_iter=30)
    lp32 = ops.sinkhorn(s.float(), eps=0.5, max_iter=30).log_plan
    assert_low_precision_close(out.log_plan, lp64, lp32)


# --- errors (each names the argument) ---------------------------------------------------------


def test_sinkhorn_errors_name_the_argument():
    s = _scores(6, 3)
    cases = [
        (dict(eps=0.0), ValueError, "eps must be finite and > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be finite and > 0"),
        (dict(max_iter=0), ValueError, "max_iter must be >= 1"),
        (dict(tol=-1.0), ValueError, "tol must be finite and >= 0"),
        (dict(check_every=0), ValueError, "check_every must be >= 1"),
        (dict(row_mass=0.0), ValueError, "row_mass must be finite and > 0"),
        (dict(col_mass=-1.0), ValueError, "col_mass must be finite and > 0"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.sinkhorn(s, **{"eps": 0.5, **kwargs})
    op = torch.ops.smoe.sinkhorn.default
    for kwargs, msg in [
        (dict(eps=0.0, max_iter=3), "eps must be finite and > 0"),
        (dict(eps=1.0, max_iter=0), "max_iter must be >= 1"),
        (dict(eps=1.0, max_iter=3, tol=-1.0), "tol must be finite and >= 0"),
        (dict(eps=1.0, max_iter=3, check_every=0), "check_every must be >= 1"),
        (dict(eps=1.0, max_iter=3, row_mass=-2.0), "row_mass must be finite and > 0"),
        (dict(eps=1.0, max_iter=3, col_mass=0.0), "col_mass must be finite and > 0"),
        (dict(eps=1.0, max_iter=3, col_mass=5.0), r"same mass: T \* row_mass = 6"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            op(s, **kwargs)


def test_sinkhorn_errors_on_bad_scores():
    with pytest.raises(RuntimeError, match="scores must be 2-D"):
        ops.sinkhorn(torch.randn(3), eps=1.0)
    with pytest.raises(RuntimeError, match="scores must be float"):
        ops.sinkhorn(torch.ones(3, 2, dtype=torch.int64), eps=1.0)
    with pytest.raises(RuntimeError, match="at least one expert column"):
        ops.sinkhorn(torch.randn(3, 0), eps=1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        s = torch.randn(4, 3)
        s[1, 2] = bad
        with pytest.raises(RuntimeError, match="scores must be finite"):
            ops.sinkhorn(s, eps=1.0)
    with pytest.raises(RuntimeError, match="scores / eps must not overflow"):
        ops.sinkhorn(torch.full((2, 2), 3e38), eps=1e-3)


def test_sinkhorn_backward_errors_name_the_argument():
    s = _scores(6, 4)
    out = torch.ops.smoe.sinkhorn.default(s, eps=0.5, max_iter=5)
    g = torch.randn(6, 4, dtype=torch.float64)
    good = dict(
        grad_log_plan=g,
        grad_f=g[:, 0].clone(),
        grad_g=g[0].clone(),
        scores=s,
        f_hist=out[6],
        g_hist=out[7],
        iters_done=out[3],
        eps=0.5,
    )
    bad = {
        "grad_log_plan": g.float(),
        "grad_f": g[:3, 0].clone(),
        "grad_g": g[0, :3].clone(),
        "f_hist": out[6][:, :3],
        "g_hist": out[7][:2],
        "iters_done": out[3].int(),
    }
    for name, value in bad.items():
        with pytest.raises(RuntimeError, match=f"{name} must be"):
            torch.ops.smoe.sinkhorn_backward.default(**{**good, name: value})
    for n in (-1, 6):
        with pytest.raises(RuntimeError, match="iters_done must be in"):
            torch.ops.smoe.sinkhorn_backward.default(**{**good, "iters_done": torch.tensor(n)})
    with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
        torch.ops.smoe.sinkhorn_backward.default(**{**good, "eps": 0.0})
