"""momentum_update (MomentumSMoE, AdamSMoE, Robust MomentumSMoE; specs/momentum_smoe.md §3-§5,
§9-§11): parity with the float64 reference for every kind and dtype, opcheck, gradcheck, compile,
determinism across thread counts, the op-level spec properties and one test per error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from smoe import ops
from smoe import reference as ref
from smoe.reference_momentum import adam_first_step, closed_form_momentum
from tests.helpers import DTYPES, TOL, assert_low_precision_close, noncontig

KINDS = ["heavy_ball", "adam", "robust"]
# any rank: 0-dim, empty (1-D and with a zero inner dim), odd sizes, past one 8192-element block
SHAPES = [
    pytest.param((), id="0d"),
    pytest.param((0,), id="n0"),
    pytest.param((3, 0, 4), id="3x0x4"),
    pytest.param((7,), id="7"),
    pytest.param((4, 33), id="4x33"),
    pytest.param((2, 5, 17), id="2x5x17"),
    pytest.param((3, 9000), id="3x9000"),
]
# non-default options, so that every coefficient shows in the results
OPTS = {
    "heavy_ball": dict(mu=0.6, gamma=1.5, sign=-1.0),
    "adam": dict(mu=0.7, gamma=0.5, sign=1.0, beta1=0.8, beta2=0.99, gamma1=0.8, eps=1e-6),
    "robust": dict(robust_a=0.9, robust_b=0.3),
}
OP = torch.ops.smoe.momentum_update.default
BACKWARD = torch.ops.smoe.momentum_update_backward.default


def _state(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, kind, dtype=torch.float32, strided=False, seed=0):
    """[u, m, p, v]: u in dtype, the state in the state dtype, p and v (v >= 0.1) for Adam only."""
    g = torch.Generator().manual_seed(seed)
    st = _state(dtype)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    m = torch.randn(shape, generator=g, dtype=torch.float64).to(st)
    p = v = None
    if kind == "adam":
        p = (0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(st)
        v = (0.1 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)).to(st)
    ts = [u, m, p, v]
    if strided and len(shape) and math.prod(shape) and shape[-1] > 1:
        ts = [noncontig(t) if t is not None else None for t in ts]
    return ts


def _upstream(shape, dtype, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = 4 if kind == "adam" else 2
    ups = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return [ups[0].to(dtype), *[x.to(_state(dtype)) for x in ups[1:]]]


def _grads(fn, inputs, upstream):
    """d <outputs, upstream> / d inputs (None inputs skipped), on leaves keeping their layout."""
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
    full = iter(leaves)
    out = [o for o in fn(*[next(full) if t is not None else None for t in inputs]) if o is not None]
    torch.autograd.backward(out, [g.to(o.dtype) for o, g in zip(out, upstream)])
    return [t.grad for t in leaves]


def _close(got, want, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_close(got, want, want.to(dtype))
    else:
        torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_momentum_update_matches_reference(shape, kind, dtype, strided):
    inputs = _inputs(shape, kind, dtype, strided)
    got = ops.momentum_update(*inputs, kind=kind, **OPTS[kind])
    want = ref.momentum_update(*inputs, kind=kind, **OPTS[kind])
    st = _state(dtype)
    assert got.delta.dtype == dtype and got.delta.shape == shape
    assert got.delta.is_contiguous() and got.m.is_contiguous()
    _close(got.delta, want.delta, dtype)
    for name in ("m", "p", "v"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) == (name != "m" and kind != "adam"), name
        if a is not None:
            assert a.dtype == st and a.shape == shape, name
            torch.testing.assert_close(a.double(), b, **TOL[st])

    up = _upstream(shape, dtype, kind)
    mine = _grads(lambda *a: ops.momentum_update(*a, kind=kind, **OPTS[kind]), inputs, up)
    wide = [t.double() if t is not None else None for t in inputs]
    theirs = _grads(lambda *a: ref.momentum_update(*a, kind=kind, **OPTS[kind]), wide, up)
    expected_dtypes = [dtype] + [st] * (len(mine) - 1)
    assert [g.dtype for g in mine] == expected_dtypes
    for i, (a, b) in enumerate(zip(mine, theirs)):
        scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
        if a.dtype in (torch.float16, torch.bfloat16):
            assert_low_precision_close(a, b, b.to(a.dtype))
        else:
            tol = TOL[a.dtype]
            torch.testing.assert_close(
                a.double(), b, atol=tol["atol"] * scale, rtol=tol["rtol"] * 10, msg=f"grad {i}"
            )


# --- opcheck, gradcheck, compile --------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0,), (), (3, 5), (2, 3, 4)], ids=str)
def test_momentum_update_opcheck(shape, kind, requires_grad):
    inputs = _inputs(shape, kind, torch.float64)
    args = [t.requires_grad_(requires_grad) if t is not None else None for t in inputs]
    torch.library.opcheck(OP, tuple(args), {"kind": kind, **OPTS[kind]})


@pytest.mark.parametrize("kind", KINDS)
def test_momentum_update_backward_opcheck(kind):
    u, m, p, v = _inputs((4, 6), kind, torch.float32)
    g = _upstream((4, 6), torch.float32, kind)
    empty = torch.empty(0)
    gp, gv = (g[2], g[3]) if kind == "adam" else (empty, empty)
    args = (g[0], g[1], gp, gv, u, m, p, v)
    torch.library.opcheck(BACKWARD, args, {"kind": kind, **OPTS[kind]})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 3), ()], ids=str)
def test_momentum_update_gradcheck(shape, kind):
    inputs = [
        t.requires_grad_() if t is not None else None for t in _inputs(shape, kind, torch.float64)
    ]

    def fn(*a):
        return tuple(o for o in ops.momentum_update(*a, kind=kind, **OPTS[kind]) if o is not None)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["heavy_ball", "adam"])
def test_momentum_update_double_backward_is_refused(kind):
    u, m, p, v = [t.requires_grad_() if t is not None else None for t in _inputs((3, 4), kind)]
    delta = ops.momentum_update(u, m, p, v, kind=kind).delta
    (g,) = torch.autograd.grad(delta.square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_momentum_update_unused_outputs_get_zero_gradients():
    u, m, p, v = [t.requires_grad_() if t is not None else None for t in _inputs((3, 4), "adam")]
    ops.momentum_update(u, m, p, v, kind="adam").m.sum().backward()  # delta, p, v unused
    assert (p.grad == 0).all() and (v.grad == 0).all() and (m.grad == 0.7).all()


@pytest.mark.parametrize(
    "kind, dynamic", [("heavy_ball", False), ("adam", False), ("robust", False), ("adam", True)]
)
def test_momentum_update_compiles_without_graph_breaks(kind, dynamic):
    torch._dynamo.reset()
    inputs = [t.requires_grad_() if t is not None else None for t in _inputs((6, 10), kind)]

    def fn(u, m, p, v):
        out = ops.momentum_update(u, m, p, v, kind=kind, **OPTS[kind])
        total = (out.delta * out.delta).sum() + out.m.sum()
        return total + (out.p.sum() + out.v.sum() if kind == "adam" else 0)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    a, b = fn(*inputs), compiled(*inputs)
    torch.testing.assert_close(a, b)
    leaves = [t for t in inputs if t is not None]
    for x, y in zip(torch.autograd.grad(a, leaves), torch.autograd.grad(b, leaves)):
        torch.testing.assert_close(x, y)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_momentum_update_is_deterministic_and_thread_count_independent(kind, dtype):
    inputs = _inputs((5, 20001), kind, dtype)  # 13 blocks, the last one partial
    up = _upstream((5, 20001), dtype, kind)

    def fn(*a):
        return ops.momentum_update(*a, kind=kind, **OPTS[kind])

    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, 3, threads):
            torch.set_num_threads(n)
            out = [o for o in fn(*inputs) if o is not None]
            results.append(out + _grads(fn, inputs, up))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- spec properties (specs/momentum_smoe.md §11) ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_update_mu0_gamma1_is_plain_smoe_exactly(dtype):
    # §11.1: sign=+1 gives delta = u (x + u, plain SMoE); sign=-1 the reference's x - m exactly.
    u, m, _, _ = _inputs((4, 37), "heavy_ball", dtype)
    plus = ops.momentum_update(u, m, mu=0.0, gamma=1.0, sign=1.0)
    minus = ops.momentum_update(u, m, mu=0.0, gamma=1.0, sign=-1.0)
    assert torch.equal(plus.delta, u) and torch.equal(minus.delta, -u)
    assert torch.equal(plus.m, u.to(plus.m.dtype))


@pytest.mark.parametrize("kind", ["heavy_ball", "adam"])
def test_momentum_update_first_layer_is_independent_of_mu(kind):
    # §11.2: the state is zero at the first MoE layer
    u, m, p, v = _inputs((3, 50), kind)
    zeros = [torch.zeros_like(t) if t is not None else None for t in (m, p, v)]
    a = ops.momentum_update(u, *zeros, kind=kind, mu=0.1)
    b = ops.momentum_update(u, *zeros, kind=kind, mu=0.95)
    assert torch.equal(a.delta, b.delta) and torch.equal(a.m, b.m)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_momentum_update_constant_u_follows_the_closed_form(dtype):
    # §11.3: m_t = gamma u (1 - mu^(t+1)) / (1 - mu) over a stack of identical layers
    mu, gamma = 0.7, 1.3
    u = torch.randn(4, 9, dtype=torch.float64).to(dtype)
    m = torch.zeros(4, 9, dtype=_state(dtype))
    for t in range(12):
        out = ops.momentum_update(u, m, mu=mu, gamma=gamma, sign=-1.0)
        m = out.m
        want = closed_form_momentum(u, t, mu=mu, gamma=gamma)
        tol = TOL[_state(dtype)]
        torch.testing.assert_close(m.double(), want, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
        _close(out.delta, -want, dtype)


@pytest.mark.parametrize("gamma1", [1.0, 0.8])
def test_adam_first_step_is_sign_like(gamma1):
    # §4, §11.5: zero state, |u| >> sqrt(eps / (1 - beta2)) ~ 3e-3: step ~ 3.162 gamma1 sign(u)
    u = torch.empty(2000).uniform_(0.5, 20.0) * torch.randn(2000).sign()
    z = torch.zeros_like(u)
    out = ops.momentum_update(u, z, z, z, kind="adam", gamma1=gamma1, sign=1.0)
    want = adam_first_step(u, gamma1=gamma1, beta1=0.9, beta2=0.999)
    torch.testing.assert_close(out.delta.double(), want, rtol=1e-4, atol=0)
    assert abs(want.abs().max().item() - 3.16227766 * gamma1) < 1e-6


def test_robust_coefficients_of_the_reference_defaults():
    # §11.6: rho = 0.2, kappa = 1.25 give a = 0.96, b = 0.04, c = 0.0416667; the op's defaults
    a, b, c = ops.robust_coefficients(0.2, 1.25)
    assert abs(a - 0.96) < 1e-6 and abs(b - 0.04) < 1e-6 and abs(c - 0.0416667) < 1e-6
    assert abs(ops.robust_coefficients(0.2, 1.25, L=2.0).a - 0.48) < 1e-12
    u, m, _, _ = _inputs((3, 8), "robust")
    default = ops.momentum_update(u, m, kind="robust")
    explicit = ops.momentum_update(u, m, kind="robust", robust_a=a, robust_b=b)
    torch.testing.assert_close(default.delta, explicit.delta)


def test_robust_coefficients_refuse_kappa_at_most_one_and_warn_outside_the_range():
    for kappa in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="kappa must be finite and > 1"):
            ops.robust_coefficients(0.2, kappa)
    with pytest.raises(ValueError, match="rho must be in"):
        ops.robust_coefficients(1.0, 1.25)
    with pytest.raises(ValueError, match="L must be finite and > 0"):
        ops.robust_coefficients(0.2, 1.25, L=0.0)
    for rho in (0.05, 0.3):  # the range at kappa = 1.25 is [0.1056, 0.2]
        with pytest.warns(UserWarning, match="outside the Robust Momentum range"):
            ops.robust_coefficients(rho, 1.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.robust_coefficients(0.15, 1.25)
        ops.robust_coefficients(1 - 1 / math.sqrt(4.0), 4.0)  # the range's ends
        ops.robust_coefficients(0.75, 4.0)


@pytest.mark.parametrize("kind", KINDS)
def test_momentum_update_bf16_with_large_u_stays_finite(kind):
    # §11.9: bf16 activations with |u| up to 1e4, float32 state, over 12 layers and back
    u = (torch.rand(8, 64) * 2e4 - 1e4).to(torch.bfloat16)
    u[0, :4] = torch.tensor([1e4, -1e4, 0.0, 1e-30])
    u.requires_grad_()
    state = [torch.zeros(8, 64) for _ in range(3 if kind == "adam" else 1)]
    m, p, v = state + [None] * (3 - len(state))
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    for _ in range(12):
        out = ops.momentum_update(u, m, p, v, kind=kind)
        m, p, v, x = out.m, out.p, out.v, x + out.delta
        for t in out:
            assert t is None or torch.isfinite(t).all()
    x.float().square().sum().backward()
    assert torch.isfinite(u.grad.float()).all()


# --- errors (each names the argument) --------------------------------------------------------


WRAPPER_ERRORS = [
    (dict(kind="nesterov"), "kind must be 'heavy_ball', 'adam' or 'robust'"),
    (dict(mu=1.0), r"mu must be in \[0, 1\)"),
    (dict(mu=float("nan")), r"mu must be in \[0, 1\)"),
    (dict(gamma=-1.0), "gamma must be finite and >= 0"),
    (dict(sign=0.5), r"sign must be -1 or \+1"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (dict(gamma1=-0.5), "gamma1 must be finite and >= 0"),
    (dict(eps=0.0), "eps must be finite and > 0"),
    (dict(robust_a=0.0), "robust_a must be finite and > 0"),
    (dict(robust_b=1.0), r"robust_b must be in \[0, 1\)"),
]


@pytest.mark.parametrize("change, match", WRAPPER_ERRORS, ids=lambda x: str(x)[:30])
def test_momentum_update_rejects_bad_options(change, match):
    u, m, _, _ = _inputs((2, 3), "heavy_ball")
    with pytest.raises(ValueError, match=match):
        ops.momentum_update(u, m, **change)
    with pytest.raises(RuntimeError, match=match):  # the op itself checks them too
        OP(u, m, **change)


def test_momentum_update_rejects_missing_or_extra_adam_state():
    u, m, p, v = _inputs((2, 3), "adam")
    for call, match in (
        (lambda f: f(u, m, None, v, kind="adam"), "p must be given when kind='adam'"),
        (lambda f: f(u, m, p, None, kind="adam"), "v must be given when kind='adam'"),
        (lambda f: f(u, m, p, None, kind="heavy_ball"), "p must be None unless kind='adam'"),
        (lambda f: f(u, m, None, v, kind="robust"), "v must be None unless kind='adam'"),
    ):
        with pytest.raises(ValueError, match=match):
            call(ops.momentum_update)
        with pytest.raises(RuntimeError, match=match):
            call(OP)


def test_momentum_update_rejects_bad_tensors():
    u, m, p, v = _inputs((2, 3), "adam")
    for args, match in (
        ((u.long(), m.long()), "u must be float32, float64, float16 or bfloat16"),
        ((u, m.double()), r"m must be Float \(the state dtype for Float u\), got Double"),
        ((u.half(), m.half()), r"m must be Float \(the state dtype for Half u\)"),
        ((u, m[:1]), r"m must have u's shape \[2, 3\], got \[1, 3\]"),
        ((u, m, p.t(), v), r"p must have u's shape"),
        ((u, m, p, v.half()), r"v must be Float"),
        ((u, m.to("meta")), "m must be on cpu like u"),
    ):
        kw = {"kind": "adam"} if len(args) == 4 else {}
        with pytest.raises(RuntimeError, match=match):
            OP(*args, **kw)


def test_momentum_update_backward_rejects_bad_grads():
    u, m, p, v = _inputs((2, 3), "adam")
    g, e = torch.zeros(2, 3), torch.empty(0)
    for args, kind, match in (
        ((g.double(), g, e, e, u, m, None, None), "heavy_ball", "grad_delta must be Float"),
        ((g, g[:1], e, e, u, m, None, None), "robust", "grad_m must have u's shape"),
        ((g, g, g, e, u, m, None, None), "heavy_ball", r"grad_p must be an empty \[0\]"),
        ((g, g, g, g.t(), u, m, p, v), "adam", "grad_v must have u's shape"),
        ((g, g, g, g, u, m, p, v), "nesterov", "kind must be"),
    ):
        with pytest.raises(RuntimeError, match=match):
            BACKWARD(*args, kind=kind)
