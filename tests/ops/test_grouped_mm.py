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


def offsets_from(counts, dev="cpu"):
    return torch.tensor(
        [0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64, device=dev
    )


# (group sizes, padding rows, d_in, d_out)
CASES = [
    pytest.param([0, 0], 0, 4, 3, id="M0"),
    pytest.param([5], 0, 8, 6, id="E1"),
    pytest.param([3, 0, 4, 1], 0, 5, 7, id="empty-group"),
    pytest.param([3, 2, 4], 5, 6, 4, id="padding-rows"),
    pytest.param([17, 1, 0, 33], 3, 16, 9, id="odd-sizes"),
    pytest.param([40] * 12, 0, 8, 8, id="many-groups"),
    pytest.param([300, 200], 0, 32, 48, id="big-groups"),
]


def make(counts, pad, d_in, d_out, dtype=torch.float64, transposed=False):
    M = sum(counts) + pad
    x = torch.randn(M, d_in, dtype=dtype)
    w = (
        torch.randn(len(counts), d_out, d_in, dtype=dtype).transpose(1, 2)
        if transposed
        else (torch.randn(len(counts), d_in, d_out, dtype=dtype))
    )
    return x, w, offsets_from(counts)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES)
def test_grouped_mm_matches_reference(counts, pad, d_in, d_out, dtype, transposed):
    x, w, off = make(counts, pad, d_in, d_out, dtype, transposed)
    got = ops.grouped_mm(x, w, off)
    assert got.shape == (x.shape[0], d_out) and got.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        want64 = ref.grouped_mm(x.double(), w.double(), off)
        assert_low_precision_close(got, want64, ref.grouped_mm(x, w, off))
    else:
        assert_close(got, ref.grouped_mm(x, w, off), dtype)
    assert (got[sum(counts) :] == 0).all()


def test_grouped_mm_transposed_weight_needs_no_copy_and_matches():
    base = torch.randn(3, 7, 5)  # [E, d_out, d_in], transformers' layout
    w = base.transpose(1, 2)
    x, off = torch.randn(10, 5), offsets_from([4, 0, 6])
    torch.testing.assert_close(ops.grouped_mm(x, w, off), ops.grouped_mm(x, w.contiguous(), off))
    w.requires_grad_()
    base.requires_grad_()
    (g,) = torch.autograd.grad(ops.grouped_mm(x, base.transpose(1, 2), off).sum(), base)
    assert g.is_contiguous()  # computed straight into the [E, d_out, d_in] layout


def test_grouped_mm_noncontiguous_x():
    x, w, off = make([4, 5], 1, 6, 3, torch.float32)
    torch.testing.assert_close(ops.grouped_mm(noncontig(x), w, off), ops.grouped_mm(x, w, off))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES[:5])
def test_grouped_mm_gradcheck(counts, pad, d_in, d_out, transposed):
    x, w, off = make(counts, pad, d_in, d_out, transposed=transposed)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, off), (x, w))


def test_grouped_mm_backward_matches_reference_on_many_groups():
    # exercises the parallel (expert, column block) weight-gradient path
    x, w, off = make([40] * 12, 0, 8, 8)
    x.requires_grad_()
    w.requires_grad_()
    g = torch.randn(x.shape[0], 8, dtype=torch.float64)
    a = torch.autograd.grad(ops.grouped_mm(x, w, off), (x, w), g)
    b = torch.autograd.grad(ref.grouped_mm(x, w, off), (x, w), g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES[:5])
def test_grouped_mm_opcheck(counts, pad, d_in, d_out, transposed, requires_grad):
    x, w, off = make(counts, pad, d_in, d_out, transposed=transposed)
    x.requires_grad_(requires_grad)
    w.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.smoe.grouped_mm.default, (x, w, off))
    g = torch.randn(x.shape[0], d_out, dtype=x.dtype)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            torch.ops.smoe.grouped_mm_backward.default, (g, x.detach(), w.detach(), off, *need)
        )


def test_grouped_mm_compile_without_graph_breaks():
    x, w, off = make([5, 3, 0, 8], 2, 6, 4, torch.float32, transposed=True)
    x.requires_grad_()

    def fn(x):
        return ops.grouped_mm(torch.relu(x), w, off).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    a, b = fn(x), compiled(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


def test_grouped_mm_is_deterministic():
    x, w, off = make([300, 20, 500, 0, 77], 0, 64, 32, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    runs = [torch.autograd.grad(ops.grouped_mm(x, w, off).sin().sum(), (x, w)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_16bit_thin_groups_take_wide_column_items(dtype, bias):
    # 1-3 rows per expert (decoding) in 16 bits: items of up to 1024 output columns instead of
    # 256, so d_out = 2600 runs as column blocks 1024 + 1024 + 552; values, bias, thread counts
    counts, d_in, d_out = [1, 0, 3, 2], 64, 2600
    x, w, off = make(counts, 2, d_in, d_out, dtype, transposed=True)
    b = torch.randn(len(counts), d_out, dtype=dtype) if bias else None
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ops.grouped_mm(x, w, off, b))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    want64 = ref.grouped_mm(x.double(), w.double(), off, None if b is None else b.double())
    assert_low_precision_close(outs[0], want64, ref.grouped_mm(x, w, off, b))
    assert (outs[0][sum(counts) :] == 0).all()


def test_grouped_mm_rejects_bad_offsets():
    x, w, _ = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.grouped_mm(x, w, torch.tensor([0, 5, 4]))
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0"):
        ops.grouped_mm(x, w, torch.tensor([1, 3, 7]))
    with pytest.raises(RuntimeError, match=r"offsets\[E\].*must be <= x.size\(0\) = 7"):
        ops.grouped_mm(x, w, torch.tensor([0, 3, 8]))
    with pytest.raises(RuntimeError, match="offsets must have E \\+ 1 = 3"):
        ops.grouped_mm(x, w, torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="offsets must be a 1-D int64"):
        ops.grouped_mm(x, w, torch.tensor([0, 3, 7], dtype=torch.int32))


def test_grouped_mm_rejects_bad_shapes_and_dtypes():
    x, w, off = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match="w must have x's dtype"):
        ops.grouped_mm(x, w.float(), off)
    with pytest.raises(RuntimeError, match="d_in = 4"):
        ops.grouped_mm(x, w[:, :3], off)
    with pytest.raises(RuntimeError, match="w must be 3-D"):
        ops.grouped_mm(x, w[0], off)
    with pytest.raises(RuntimeError, match="x must be float"):
        ops.grouped_mm(x.long(), w, off)


@pytest.mark.cuda
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("counts,pad,d_in,d_out", CASES)
def test_grouped_mm_cuda_matches_cpu(counts, pad, d_in, d_out, dtype, transposed):
    x, w, off = make(counts, pad, d_in, d_out, dtype, transposed)
    want = ref.grouped_mm(x.double(), w.double(), off)
    w_gpu = w.transpose(1, 2).contiguous().cuda().transpose(1, 2) if transposed else w.cuda()
    got = ops.grouped_mm(x.cuda(), w_gpu, off.cuda())
    if dtype == torch.float32:
        assert_close(got.cpu(), want, dtype)
    else:
        assert_low_precision_close(got.cpu(), want, ref.grouped_mm(x, w, off))
    g = torch.randn(x.shape[0], d_out, dtype=dtype)
    gx_c, gw_c = torch.ops.smoe.grouped_mm_backward(
        g.double(), x.double(), w.double(), off, True, True
    )
    gx_g, gw_g = torch.ops.smoe.grouped_mm_backward(
        g.cuda(), x.cuda(), w.cuda(), off.cuda(), True, True
    )
    scale = max(1.0, x.shape[0] ** 0.5)
    torch.testing.assert_close(gx_g.cpu().double(), gx_c, atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(gw_g.cpu().double(), gw_c, atol=0.05 * scale, rtol=0.05)


def test_grouped_mm_backward_rejects_bad_grad():
    x, w, off = make([3, 4], 0, 4, 2)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[M, d_out\] = \[7, 2\]"):
        torch.ops.smoe.grouped_mm_backward(torch.randn(7, 3, dtype=x.dtype), x, w, off, True, True)
