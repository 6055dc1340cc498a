"""grouped_mm's optional per-expert bias (fused into the GEMM) and its gradient op,
grouped_mm_bias_backward (each group's rows of grad_out summed in row order)."""

import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import (
    CUDA_DTYPES,
    DTYPES,
    assert_close,
    assert_low_precision_close,
    noncontig,
)
from tests.ops.test_grouped_mm import CASES, make, offsets_from


def make_bias(E, d_out, dtype, layout="contiguous"):
    if layout == "transposed":  # a column-major view: strides (1, E)
        return torch.randn(d_out, E, dtype=dtype).t()
    return torch.randn(E, d_out, dtype=dtype)


def segment_sum(g, off):
    """The reference bias gradient, in float64."""
    o = off.tolist()
    return torch.stack([g[o[e] : o[e + 1]].double().sum(0) for e in range(len(o) - 1)])


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES)
def test_grouped_mm_with_bias_matches_reference(counts, pad, d_in, d_out, dtype, layout):
    x, w, off = make(counts, pad, d_in, d_out, dtype, transposed=layout == "transposed")
    b = make_bias(len(counts), d_out, dtype, layout)
    got = ops.grouped_mm(x, w, off, b)
    assert got.shape == (x.shape[0], d_out) and got.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        want64 = ref.grouped_mm(x.double(), w.double(), off, b.double())
        assert_low_precision_close(got, want64, ref.grouped_mm(x, w, off, b))
    else:
        assert_close(got, ref.grouped_mm(x, w, off, b), dtype)
    assert (got[sum(counts) :] == 0).all()  # padding rows get no bias


def test_bias_alone_when_d_in_is_zero():
    # K = 0: each row is its expert's bias (the GEMM adds nothing)
    x, w, off = torch.zeros(5, 0), torch.zeros(2, 0, 3), offsets_from([2, 2])
    b = torch.randn(2, 3)
    got = ops.grouped_mm(x, w, off, b)
    torch.testing.assert_close(got[:2], b[0].expand(2, 3))
    torch.testing.assert_close(got[2:4], b[1].expand(2, 3))
    assert (got[4:] == 0).all()


def test_bias_changes_only_its_own_group():
    x, w, off = make([3, 0, 4], 1, 5, 6, torch.float32)
    b = torch.zeros(3, 6)
    base = ops.grouped_mm(x, w, off, b)
    torch.testing.assert_close(base, ops.grouped_mm(x, w, off))  # a zero bias is no bias
    b[2] = 1.0
    moved = ops.grouped_mm(x, w, off, b) - base
    assert (moved[:3] == 0).all() and (moved[7:] == 0).all()
    torch.testing.assert_close(moved[3:7], torch.ones(4, 6))


@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES[:5])
def test_grouped_mm_with_bias_gradcheck(counts, pad, d_in, d_out):
    x, w, off = make(counts, pad, d_in, d_out, transposed=True)
    b = make_bias(len(counts), d_out, torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.grouped_mm(x, w, off, b), (x, w, b))
    # the bias alone requiring grad
    x.requires_grad_(False)
    w.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda b: ops.grouped_mm(x, w, off, b), (b,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES[:5])
def test_grouped_mm_with_bias_opcheck(counts, pad, d_in, d_out, requires_grad):
    x, w, off = make(counts, pad, d_in, d_out)
    b = make_bias(len(counts), d_out, torch.float64).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.smoe.grouped_mm.default, (x, w, off, b))
    g = torch.randn(x.shape[0], d_out, dtype=x.dtype)
    torch.library.opcheck(torch.ops.smoe.grouped_mm_bias_backward.default, (g, off))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_backward_is_each_groups_row_sum(dtype):
    off = offsets_from([0, 700, 1, 33])
    g = torch.randn(740, 300, dtype=dtype)  # 300 columns: two column blocks
    got = torch.ops.smoe.grouped_mm_bias_backward(g, off)
    assert got.shape == (4, 300) and got.dtype == dtype
    want = segment_sum(g, off)
    assert (got[0] == 0).all()  # an empty group
    if dtype in (torch.float32, torch.float64):
        assert_close(got, want.to(dtype), dtype)
    else:
        # accumulated in float32, one rounding to dtype at the end: within 16-bit rounding of the
        # exact sum (a 16-bit running sum over 700 rows would be off by far more)
        torch.testing.assert_close(got, want.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-3)


def test_bias_backward_of_noncontiguous_grad_and_offsets():
    off = offsets_from([4, 0, 5])
    g = torch.randn(11, 6)
    spaced = torch.stack([off, off]).t().reshape(-1)[::2]
    assert not spaced.is_contiguous()
    want = torch.ops.smoe.grouped_mm_bias_backward(g, off)
    torch.testing.assert_close(torch.ops.smoe.grouped_mm_bias_backward(noncontig(g), spaced), want)


def test_bias_backward_is_bitwise_equal_across_thread_counts():
    off = offsets_from([513, 0, 1000, 7] * 4)
    g = torch.randn(int(off[-1]) + 3, 700)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.smoe.grouped_mm_bias_backward(g, off))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_grouped_mm_with_bias_compiles_without_graph_breaks():
    x, w, off = make([5, 3, 0, 8], 2, 6, 4, torch.float32, transposed=True)
    b = make_bias(4, 4, torch.float32).requires_grad_()

    def fn(b):
        return ops.grouped_mm(x, w, off, b).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    a, c = fn(b), compiled(b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(torch.autograd.grad(a, b)[0], torch.autograd.grad(c, b)[0])


def test_autocast_casts_the_bias_with_the_weights():
    x, w, off = make([3, 4], 1, 8, 5, torch.float32)
    b = make_bias(2, 5, torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.grouped_mm(x, w, off, b)
    assert y.dtype == torch.bfloat16
    want = ops.grouped_mm(x.bfloat16(), w.bfloat16(), off, b.bfloat16())
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    (gb,) = torch.autograd.grad(y.float().sum(), b)
    assert gb.dtype == torch.float32  # the cast's backward returns the parameter's dtype
    torch.testing.assert_close(gb, segment_sum(torch.ones(8, 5), off).float())


def test_bias_rejects_wrong_dtype():
    x, w, off = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match="bias must have w's dtype"):
        ops.grouped_mm(x, w, off, torch.randn(2, 2))


def test_bias_rejects_wrong_shape():
    x, w, off = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match=r"bias must be \[E, d_out\] = \[2, 2\]"):
        ops.grouped_mm(x, w, off, torch.randn(2, 3, dtype=x.dtype))


def test_bias_rejects_another_device():
    x, w, off = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match="bias must be on"):
        ops.grouped_mm(x, w, off, torch.empty(2, 2, dtype=x.dtype, device="meta"))


def test_bias_backward_rejects_bad_offsets():
    g = torch.randn(7, 3)
    with pytest.raises(RuntimeError, match=r"offsets\[E\].*<= grad_out.size\(0\) = 7"):
        torch.ops.smoe.grouped_mm_bias_backward(g, torch.tensor([0, 3, 8]))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.smoe.grouped_mm_bias_backward(g, torch.tensor([0, 5, 4]))
    with pytest.raises(RuntimeError, match="E \\+ 1 >= 1 entries"):
        torch.ops.smoe.grouped_mm_bias_backward(g, torch.tensor([], dtype=torch.int64))


def test_bias_backward_refuses_double_backward():
    x, w, off = make([3, 4], 0, 4, 2)
    b = make_bias(2, 2, torch.float64).requires_grad_()
    y = ops.grouped_mm(x, w, off, b)
    (gb,) = torch.autograd.grad(y, b, torch.ones_like(y).requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gb.sum().backward()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES)
def test_grouped_mm_with_bias_cuda_matches_reference(counts, pad, d_in, d_out, dtype, layout):
    x, w, off = make(counts, pad, d_in, d_out, dtype)
    b = make_bias(len(counts), d_out, dtype, layout)
    want = ref.grouped_mm(x.double(), w.double(), off, b.double())
    got = ops.grouped_mm(x.cuda(), w.cuda(), off.cuda(), b.cuda())
    if dtype == torch.float32:
        assert_close(got.cpu(), want, dtype)
    else:
        assert_low_precision_close(got.cpu(), want, ref.grouped_mm(x, w, off, b))
    g = torch.randn(x.shape[0], d_out, dtype=dtype)
    gb = torch.ops.smoe.grouped_mm_bias_backward(g.cuda(), off.cuda())
    scale = max(1.0, x.shape[0] ** 0.5)
    torch.testing.assert_close(gb.cpu().double(), segment_sum(g, off), atol=0.02 * scale, rtol=0.02)
    if dtype == torch.float32:  # the same row order as the CPU kernel: equal up to fp32 rounding
        assert_close(gb.cpu(), torch.ops.smoe.grouped_mm_bias_backward(g, off), dtype)
