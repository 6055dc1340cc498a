import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import CUDA_DTYPES, DTYPES, assert_close, assert_low_precision_close, noncontig

SHAPES = [
    pytest.param(0, 4, id="M0"),
    pytest.param(1, 1, id="M1-f1"),
    pytest.param(7, 5, id="M7-f5"),
    pytest.param(64, 48, id="M64-f48"),
    pytest.param(300, 33, id="M300-f33"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,f", SHAPES)
def test_swiglu_matches_reference(M, f, dtype):
    h = (torch.randn(M, 2 * f) * 4).to(dtype)  # covers the saturated tails of the sigmoid
    got = ops.swiglu(h)
    assert got.shape == (M, f) and got.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_close(got, ref.swiglu(h.double()), ref.swiglu(h))
    else:
        assert_close(got, ref.swiglu(h.double()), dtype)


def test_swiglu_extreme_values():
    h = torch.tensor([[-200.0, -80.0, 0.0, 80.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(ops.swiglu(h), ref.swiglu(h.double()).float())


def test_swiglu_noncontiguous():
    h = torch.randn(9, 12)
    assert torch.equal(ops.swiglu(noncontig(h)), ops.swiglu(h))


@pytest.mark.parametrize("M,f", SHAPES[:4])
def test_swiglu_gradcheck(M, f):
    h = torch.randn(M, 2 * f, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("M,f", SHAPES[:4])
def test_swiglu_opcheck(M, f, requires_grad):
    h = torch.randn(M, 2 * f, dtype=torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.smoe.swiglu.default, (h,))
    torch.library.opcheck(
        torch.ops.smoe.swiglu_backward.default, (torch.randn(M, f, dtype=torch.float64), h.detach())
    )


def test_swiglu_float32_backward_matches_autograd_of_reference():
    h = torch.randn(50, 40, requires_grad=True)
    g = torch.randn(50, 20)
    (a,) = torch.autograd.grad(ops.swiglu(h), h, g)
    gate, up = h.chunk(2, dim=-1)
    (b,) = torch.autograd.grad(torch.nn.functional.silu(gate) * up, h, g)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_compiles_without_graph_breaks():
    h = torch.randn(16, 10, requires_grad=True)
    compiled = torch.compile(lambda t: ops.swiglu(t).sum(), fullgraph=True, backend="aot_eager")
    a, b = compiled(h), ops.swiglu(h).sum()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, h)[0], torch.autograd.grad(b, h)[0])


def test_swiglu_is_deterministic():
    h = torch.randn(1000, 256)
    assert torch.equal(ops.swiglu(h), ops.swiglu(h))


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="even number of columns"):
        ops.swiglu(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"h must be 2-D \[M, 2\*f\]"):
        torch.ops.smoe.swiglu(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="h must be float"):
        ops.swiglu(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"grad_out must be \[M, f\] = \[3, 2\]"):
        torch.ops.smoe.swiglu_backward(torch.randn(3, 3), torch.randn(3, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("M,f", SHAPES)
def test_swiglu_cuda_matches_cpu(M, f, dtype):
    h = (torch.randn(M, 2 * f) * 4).to(dtype)
    assert_close(ops.swiglu(h.cuda()).cpu(), ops.swiglu(h))
    g = torch.randn(M, f, dtype=dtype)
    assert_close(
        torch.ops.smoe.swiglu_backward(g.cuda(), h.cuda()).cpu(),
        torch.ops.smoe.swiglu_backward(g, h),
    )


@pytest.mark.cuda
def test_swiglu_cuda_matches_cpu_at_large_gates():
    # the approximate __expf is ~20 ulp (2.4e-6) off at |g| ~ 16; expf and the CPU's exp are
    # within 1e-6 together. Below g ~ -87 both results are tiny (|silu| < 1e-35) but differ:
    # the CPU's vectorised exp clamps its input there, the GPU's expf overflows to 0.
    gate = torch.tensor([-100.0, -90.0, -88.5, -16.0, -12.0, -1.0, 0.0, 1.0, 16.0, 90.0])
    h = torch.cat([gate, torch.ones_like(gate)]).reshape(1, -1)
    torch.testing.assert_close(ops.swiglu(h.cuda()).cpu(), ops.swiglu(h), rtol=1e-6, atol=1e-35)
