"""gate_linear: the routers' logits in float32 from the exact values of 16-bit inputs.

The oracles: ``smoe.reference.gate_linear`` on float64 copies of the inputs (every product of
16-bit values is exact there), and the routers' former gate, ``F.linear`` on the inputs upcast to
float32 (``tests.low_precision.gate_linear``), which the op must match up to summation order.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from smoe import _C, ops
from smoe import reference as ref
from tests.helpers import DTYPES, noncontig
from tests.low_precision import ci_settings
from tests.low_precision import gate_linear as upcast_linear
from tests.test_low_precision import DEVICES, LOW, draw_scale, run_rule

# T covers: no tokens, fewer than the micro-kernel path's 16, one and several 64-row tiles with
# tails; E covers one expert and more than a 256-column block; d odd takes the float32 path.
SHAPES = [
    pytest.param(0, 8, 4, id="T0"),
    pytest.param(5, 8, 1, id="T5-E1"),
    pytest.param(16, 32, 8, id="T16"),
    pytest.param(130, 64, 8, id="T130"),
    pytest.param(200, 33, 6, id="d33-odd"),
    pytest.param(300, 48, 300, id="E300"),
]


def _case(T, d, E, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    w = (torch.randn(E, d, generator=g) / d**0.5).to(dtype)
    b = torch.randn(E, generator=g).to(dtype) if bias else None
    return x, w, b


def _exact(x, w, b):
    return ref.gate_linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,E", SHAPES)
def test_gate_linear_matches_the_upcast_linear(T, d, E, dtype, bias):
    x, w, b = _case(T, d, E, dtype, bias)
    got = ops.gate_linear(x, w, b)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.shape == (T, E) and got.dtype == want_dtype
    exact = _exact(x, w, b)
    upcast = upcast_linear(x, w, b)
    # within 2x the float32 GEMM's own error against the exact logits (summation order only)
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    base = (upcast.double() - exact).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * base + (1e-12 if dtype == torch.float64 else 1e-6)


def test_gate_linear_bf16_logits_are_not_rounded_to_bf16():
    x, w, _ = _case(256, 64, 16, torch.bfloat16)
    got = ops.gate_linear(x, w)
    assert got.dtype == torch.float32
    rounded = got.bfloat16().float()
    assert (got != rounded).float().mean() > 0.9  # float32 values, not bf16 ones widened


def test_gate_linear_mixed_dtypes():
    # a bf16 x against a float32 master weight (autocast) and a float16 bias
    x, w, b = _case(100, 32, 8, torch.bfloat16)
    w32, b16 = w.float() + 1e-3, b.half()
    torch.testing.assert_close(
        ops.gate_linear(x, w32, b16), upcast_linear(x, w32, b16), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_linear_noncontiguous_inputs(dtype):
    x, w, b = _case(150, 64, 12, dtype)
    want = ops.gate_linear(x, w, b)
    assert torch.equal(ops.gate_linear(noncontig(x), w, b), want)
    wt = w.t().contiguous().t()  # [E, d] with column-major storage
    assert torch.equal(ops.gate_linear(x, wt, noncontig(b)), want)
    torch.testing.assert_close(ops.gate_linear(x, noncontig(w), b), want, atol=1e-6, rtol=1e-6)


def test_gate_linear_micro_kernel_and_float32_paths_agree():
    # the same bf16 inputs with oneDNN disabled take the float32 GEMM on upcast inputs
    x, w, b = _case(1000, 128, 64, torch.bfloat16)
    fast = ops.gate_linear(x, w, b)
    with torch.backends.mkldnn.flags(enabled=False):
        slow = ops.gate_linear(x, w, b)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, upcast_linear(x, w, b), atol=0, rtol=0)


def test_gate_linear_path_is_reported_and_can_be_turned_off():
    line = _C.cpu_gate_path()
    assert line.startswith("CPU bf16 router gate (gate_linear and its backward): ")
    code = "from smoe import _C; print(_C.cpu_gate_path())"
    env = dict(os.environ, SMOE_CPU_BRGEMM="0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "float32 GEMM on upcast inputs (SMOE_CPU_BRGEMM=0)" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_linear_gradients_equal_the_upcast_linear(dtype):
    # outside the bf16 micro-kernel the backward is the float32 GEMMs on upcasts, bit for bit
    x, w, b = _case(120, 32, 8, dtype)
    g = torch.randn(120, 8)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(ops.gate_linear(*leaves), leaves, g)
    leaves2 = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(upcast_linear(*leaves2), leaves2, g)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == dtype and torch.equal(a, e)


def _backward_scale(grad, x, w):
    """The error scale of the backward's GEMMs, |grad| @ |w| and |grad|^T @ |x|: a GEMM's own
    error is relative to it."""
    g = grad.double().abs()
    return g @ w.double().abs(), g.t() @ x.double().abs()


# past the weight gradient's 2048-token reduction chunks (two and a tail of 4)
@pytest.mark.parametrize("T,d,E", [*SHAPES, pytest.param(4100, 80, 24, id="T4100-chunks")])
def test_gate_linear_backward_bf16_within_its_rounding_of_the_exact_gradients(T, d, E):
    # bf16 x and weight: the micro-kernel with the logit gradient as hi + lo bf16 parts. Each
    # gradient is the exact one rounded to bf16 (2^-8 relative at most) up to 2^-14 of the error
    # scale; without lo (the gradient rounded to bf16) the error would be ~2^-9 of the scale.
    x, w, _ = _case(T, d, E, torch.bfloat16)
    grad = torch.randn(T, E, generator=torch.Generator().manual_seed(1))
    got = torch.ops.smoe.gate_linear_backward(grad, x, w, True, True)
    exact, scale = ref.gate_linear_backward(grad, x, w), _backward_scale(grad, x, w)
    upcast = [(grad @ w.float()).bfloat16(), (grad.t() @ x.float()).bfloat16()]
    for a, e, s, u in zip(got, exact, scale, upcast, strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape
        err = (a.double() - e).abs()
        assert (err <= 2**-8 * e.abs() + 2**-14 * s).all(), (err - 2**-8 * e.abs()).max()
        if a.numel():  # the same bits as the float32 GEMMs' but for rare rounding-boundary flips
            assert (a != u).double().mean() < 0.02


def test_gate_linear_backward_micro_kernel_and_float32_paths_agree():
    # oneDNN disabled: the float32 GEMMs on upcasts, bit for bit; enabled: within the bf16 rounding
    x, w, _ = _case(1000, 128, 64, torch.bfloat16)
    grad = torch.randn(1000, 64)
    fast = torch.ops.smoe.gate_linear_backward(grad, x, w, True, True)
    with torch.backends.mkldnn.flags(enabled=False):
        slow = torch.ops.smoe.gate_linear_backward(grad, x, w, True, True)
    assert torch.equal(slow[0], (grad @ w.float()).bfloat16())
    assert torch.equal(slow[1], (grad.t() @ x.float()).bfloat16())
    for a, e in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2**-7)


def test_gate_linear_backward_gives_each_gradient_alone_and_noncontiguous_inputs_alike():
    x, w, _ = _case(150, 64, 12, torch.bfloat16)
    grad = torch.randn(150, 12)
    op = torch.ops.smoe.gate_linear_backward
    gx, gw = op(grad, x, w, True, True)
    assert torch.equal(op(grad, x, w, True, False)[0], gx)
    assert torch.equal(op(grad, x, w, False, True)[1], gw)
    assert (
        op(grad, x, w, False, True)[0].numel() == 0 and op(grad, x, w, True, False)[1].numel() == 0
    )
    got = op(noncontig(grad), noncontig(x), w.t().contiguous().t(), True, True)
    assert torch.equal(got[0], gx) and torch.equal(got[1], gw)


def test_gate_linear_backward_keeps_infinite_gradients_infinite():
    # an infinite logit gradient has no finite lo part: hi alone carries it (hi + lo would be NaN)
    x, w, _ = _case(64, 32, 4, torch.bfloat16)
    x, w = x.abs() + 0.1, w.abs() + 0.1  # positive products: the sum stays +inf
    grad = torch.rand(64, 4)
    grad[3, 1] = float("inf")
    gx, gw = torch.ops.smoe.gate_linear_backward(grad, x, w, True, True)
    assert torch.isinf(gx[3]).all() and torch.isfinite(gx[torch.arange(64) != 3]).all()
    assert torch.isinf(gw[1]).all() and torch.isfinite(gw[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_gate_linear_backward_opcheck(dtype, need):
    x, w, _ = _case(40, 16, 5, dtype)
    grad = torch.randn(40, 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.smoe.gate_linear_backward.default, (grad, x, w, *need))


def test_gate_linear_backward_is_the_autograd_backward_and_double_backward_still_works():
    x, w, b = (t.requires_grad_() for t in _case(80, 16, 6, torch.bfloat16))
    g = torch.randn(80, 6)
    got = torch.autograd.grad(ops.gate_linear(x, w, b), (x, w), g)
    want = torch.ops.smoe.gate_linear_backward(g, x.detach(), w.detach(), True, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # create_graph: the ATen GEMMs on upcasts, differentiable again
    gx, gw = torch.autograd.grad(ops.gate_linear(x, w, b), (x, w), g, create_graph=True)
    assert gx.requires_grad and torch.equal(gx.detach(), (g @ w.detach().float()).bfloat16())


@pytest.mark.parametrize("T,d,E", [(0, 4, 3), (5, 8, 1), (17, 6, 4), (9, 5, 3)])
def test_gate_linear_gradcheck(T, d, E):
    x, w, b = (t.requires_grad_() for t in _case(T, d, E, torch.float64))
    assert torch.autograd.gradcheck(ops.gate_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(ops.gate_linear, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_gate_linear_low_precision_error_within_3x_torch(dtype, device, data):
    # the baseline is the routers' former gate, F.linear on float32 upcasts (tests/low_precision.py)
    T = data.draw(st.integers(0, 150), label="T")  # past 16 tokens: the micro-kernel path
    d, E = data.draw(st.integers(1, 80), label="d"), data.draw(st.integers(1, 40), label="E")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    x = torch.randn(T, d, dtype=torch.float64, device=device) * draw_scale(data, dtype)
    w = torch.randn(E, d, dtype=torch.float64, device=device) / math.sqrt(d)
    b = torch.randn(E, dtype=torch.float64, device=device)
    run_rule(lambda o, x, w, b: (o["gate_linear"](x, w, b),), [x, w, b], dtype)


def test_gate_linear_compiles_without_graph_breaks():
    x, w, b = _case(64, 32, 8, torch.bfloat16)
    fn = torch.compile(lambda x, w, b: ops.gate_linear(x, w, b).softmax(-1), fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), ops.gate_linear(x, w, b).softmax(-1))


def test_gate_linear_is_deterministic():
    x, w, b = _case(500, 64, 40, torch.bfloat16)
    assert torch.equal(ops.gate_linear(x, w, b), ops.gate_linear(x, w, b))


ERRORS = [
    ("x", lambda x, w, b: (x.long(), w, b), "x must be float32, float64, float16 or bfloat16"),
    ("weight", lambda x, w, b: (x, w.long(), b), "weight must be float32, float64, float16"),
    ("bias", lambda x, w, b: (x, w, b.long()), "bias must be float32, float64, float16"),
    ("x-rank", lambda x, w, b: (x[0], w, b), r"x must be 2-D \[T, d\], got 1-D"),
    ("w-rank", lambda x, w, b: (x, w[None], b), r"weight must be 2-D \[E, d\], got 3-D"),
    ("w-d", lambda x, w, b: (x, w[:, :-1], b), r"weight must be \[E, d\] with d = 8"),
    ("b-shape", lambda x, w, b: (x, w, b[:-1]), r"bias must be \[E\] with E = 4"),
]


@pytest.mark.parametrize("name,bad,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_gate_linear_rejects_bad_input(name, bad, message):
    x, w, b = _case(10, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match=rf"smoe::gate_linear: {message}"):
        ops.gate_linear(*bad(x, w, b))


BACKWARD_ERRORS = [
    ("grad-dtype", lambda g, x, w: (g.bfloat16(), x, w), r"grad must be Float \(the logits' dtype"),
    ("grad-rows", lambda g, x, w: (g[1:], x, w), r"grad must be \[T, E\] = \[10, 4\]"),
    ("grad-cols", lambda g, x, w: (g[:, 1:], x, w), r"grad must be \[T, E\] = \[10, 4\]"),
    ("w-d", lambda g, x, w: (g, x, w[:, :-1]), r"weight must be \[E, d\] with d = 8"),
]


@pytest.mark.parametrize("name,bad,message", BACKWARD_ERRORS, ids=[e[0] for e in BACKWARD_ERRORS])
def test_gate_linear_backward_rejects_bad_input(name, bad, message):
    x, w, _ = _case(10, 8, 4, torch.bfloat16)
    with pytest.raises(RuntimeError, match=rf"smoe::gate_linear_backward: {message}"):
        torch.ops.smoe.gate_linear_backward(*bad(torch.randn(10, 4), x, w), True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gate_linear_cuda_matches_cpu(dtype):
    x, w, b = _case(300, 64, 16, dtype)
    leaves = [t.cuda().requires_grad_() for t in (x, w, b)]
    got = ops.gate_linear(*leaves)
    got.sum().backward()
    torch.testing.assert_close(got.cpu(), ops.gate_linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert got.dtype == torch.float32
    assert all(t.grad is not None and t.grad.dtype == dtype for t in leaves)
