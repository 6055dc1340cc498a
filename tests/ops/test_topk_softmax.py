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
    spaced_logits,
)

# (T, E, k)
SHAPES = [
    pytest.param(0, 4, 2, id="T0-E4-k2"),
    pytest.param(1, 1, 1, id="T1-E1-k1"),
    pytest.param(7, 4, 2, id="T7-E4-k2"),
    pytest.param(7, 4, 4, id="T7-E4-kE"),
    pytest.param(64, 16, 1, id="T64-E16-k1"),
    pytest.param(33, 16, 5, id="T33-E16-k5"),
    pytest.param(5, 64, 8, id="T5-E64-k8"),
    pytest.param(6, 40, 33, id="T6-E40-k33-multipass"),  # k above the single-pass buffer
]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_topk_softmax_matches_reference(T, E, k, dtype, renormalize):
    logits = (torch.randn(T, E) * 2).to(dtype)
    weight, expert = ops.topk_softmax(logits, k, renormalize=renormalize)
    rw, re = ref.topk_softmax(logits, k, renormalize=renormalize)
    assert weight.dtype == dtype and expert.dtype == torch.int32
    assert weight.shape == (T, k) and expert.shape == (T, k)
    assert torch.equal(expert, re)
    if dtype in (torch.float16, torch.bfloat16):
        low = ref.topk_softmax(logits, k, renormalize=renormalize).weight
        r64 = ref.topk_softmax(logits.double(), k, renormalize=renormalize).weight
        assert_low_precision_close(weight, r64, low)
    else:
        assert_close(weight, rw)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_noncontiguous(renormalize):
    logits = torch.randn(9, 6)
    strided = noncontig(logits)
    transposed = logits.t().contiguous().t()
    for x in (strided, transposed):
        got = ops.topk_softmax(x, 3, renormalize=renormalize)
        want = ops.topk_softmax(logits, 3, renormalize=renormalize)
        assert torch.equal(got.expert, want.expert) and torch.equal(got.weight, want.weight)


@pytest.mark.parametrize("k", [3, 34])  # single-pass and multi-pass selection
def test_topk_softmax_ties_go_to_lower_index(k):
    logits = torch.zeros(2, 40)
    logits[0, [1, 2, 4]] = 1.0
    _, expert = ops.topk_softmax(logits, k)
    assert (
        expert[0, :3].tolist() == [1, 2, 4]
        and expert[0, 3:].tolist() == [e for e in range(40) if e not in (1, 2, 4)][: k - 3]
    )
    assert expert[1].tolist() == list(range(k))


def test_topk_softmax_renormalize_equals_softmax_over_selected_logits():
    logits = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    w, e = ops.topk_softmax(logits, 3, renormalize=True)
    w2 = torch.softmax(torch.gather(logits, 1, e.long()), dim=-1)
    torch.testing.assert_close(w, w2)
    g = torch.randn_like(w)
    (a,) = torch.autograd.grad((w * g).sum(), logits)
    (b,) = torch.autograd.grad((w2 * g).sum(), logits)
    torch.testing.assert_close(a, b)


def test_topk_softmax_weights_are_probabilities_without_renormalize():
    logits = torch.randn(10, 5, dtype=torch.float64)
    w, e = ops.topk_softmax(logits, 2, renormalize=False)
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, e.long()))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (6, 5, 2), (4, 4, 4)])
def test_topk_softmax_gradcheck(T, E, k, renormalize):
    logits = spaced_logits(T, E).requires_grad_()
    fn = lambda x: ops.topk_softmax(x, k, renormalize=renormalize).weight  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (7, 4, 2), (7, 4, 4), (3, 1, 1)])
def test_topk_softmax_opcheck(T, E, k, requires_grad):
    logits = spaced_logits(T, E).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.smoe.topk_softmax.default, (logits, k), {"renormalize": True})
    torch.library.opcheck(torch.ops.smoe.topk_softmax.default, (logits, k), {"renormalize": False})


def test_topk_softmax_backward_opcheck():
    logits = spaced_logits(6, 5)
    _, expert = ops.topk_softmax(logits, 2)
    g = torch.randn(6, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.smoe.topk_softmax_backward.default, (g, logits, expert, True))


def test_topk_softmax_compiles_without_graph_breaks():
    logits = torch.randn(12, 8, requires_grad=True)

    def fn(x):
        w, e = ops.topk_softmax(x, 2)
        return (w * w).sum(), e

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (a, ea), (b, eb) = fn(logits), compiled(logits)
    assert torch.equal(ea, eb)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)


def test_topk_softmax_is_deterministic():
    logits = torch.randn(300, 32)
    a, b = ops.topk_softmax(logits, 4), ops.topk_softmax(logits, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)


def test_topk_softmax_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_softmax(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_softmax(torch.randn(3, 4), 0)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.smoe.topk_softmax(torch.randn(3, 4), 5)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_softmax(torch.randn(3, 4), 1.5)


def test_topk_softmax_rejects_bad_dtype_and_rank():
    with pytest.raises(RuntimeError, match="logits must be float"):
        ops.topk_softmax(torch.ones(3, 4, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.topk_softmax(torch.randn(2, 3, 4), 1)
    with pytest.raises(RuntimeError, match="at least one expert"):
        torch.ops.smoe.topk_softmax(torch.randn(3, 0), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_softmax_rejects_nan_logits(bad):
    logits = torch.randn(4, 3)
    logits[2, 1] = bad
    with pytest.raises(RuntimeError, match="logits must be finite.*row 2"):
        ops.topk_softmax(logits, 1)


def test_topk_softmax_accepts_minus_inf_masks():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    w, e = ops.topk_softmax(logits, 2)
    assert e.tolist() == [[2, 0]] and torch.isfinite(w).all()


@pytest.mark.cuda
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_topk_softmax_cuda_matches_cpu(T, E, k, dtype, renormalize):
    logits = (torch.randn(T, E) * 2).to(dtype)
    cpu = ops.topk_softmax(logits, k, renormalize=renormalize)
    gpu = ops.topk_softmax(logits.cuda(), k, renormalize=renormalize)
    assert torch.equal(gpu.expert.cpu(), cpu.expert)
    assert_close(gpu.weight.cpu(), cpu.weight)
    lg = logits.cuda().requires_grad_()
    g = torch.randn(T, k, dtype=dtype)
    (gg,) = torch.autograd.grad(
        ops.topk_softmax(lg, k, renormalize=renormalize).weight, lg, g.cuda()
    )
    lc = logits.clone().requires_grad_()
    (gc,) = torch.autograd.grad(ops.topk_softmax(lc, k, renormalize=renormalize).weight, lc, g)
    assert_close(gg.cpu(), gc)


@pytest.mark.cuda
def test_topk_softmax_cuda_is_deterministic_and_sync_free():
    logits = torch.randn(4096, 64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = ops.topk_softmax(logits, 8), ops.topk_softmax(logits, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)
