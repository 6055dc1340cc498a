"""smoe.ops.unified_topk: USMoE's joint top-N over each group's token-expert scores."""

import pytest
import torch

from smoe import ops
from smoe import reference_usmoe as ref
from tests.helpers import CUDA_DTYPES, DTYPES, noncontig

# (G, L, n)
SHAPES = [
    pytest.param(0, 8, 3, id="G0"),
    pytest.param(1, 1, 1, id="L1"),
    pytest.param(3, 16, 16, id="n=L"),
    pytest.param(3, 16, 0, id="n0"),
    pytest.param(4, 64, 10, id="G4-L64"),
    pytest.param(2, 5000, 300, id="multi-tile"),
    pytest.param(5, 2048, 2047, id="all-but-one"),
]


@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,L,n", SHAPES)
def test_unified_topk_matches_reference(G, L, n, dtype, with_counts):
    scores = torch.randn(G, L).to(dtype)  # 16-bit: many exact ties, broken by index
    counts = torch.randint(0, n + 1, (G,)) if with_counts else None
    got = ops.unified_topk(scores, n, counts=counts)
    assert got.dtype == torch.int64 and got.shape == (G, n)
    assert torch.equal(got, ref.unified_topk(scores, n, counts=counts))


def test_unified_topk_ties_and_signed_zeros_go_to_the_lower_index():
    scores = torch.zeros(2, 10)
    scores[0, 1::2] = -0.0  # -0 and +0 compare equal: index order decides
    scores[1, 7] = 1.0
    assert ops.unified_topk(scores, 3).tolist() == [[0, 1, 2], [0, 1, 7]]


def test_unified_topk_ranks_minus_inf_last():
    scores = torch.tensor([[-torch.inf, -5.0, -torch.inf, -7.0]])
    assert ops.unified_topk(scores, 3).tolist() == [[0, 1, 3]]


def test_unified_topk_selection_properties():
    torch.manual_seed(0)
    scores = torch.randn(6, 400)
    small, large = ops.unified_topk(scores, 40), ops.unified_topk(scores, 90)
    for g in range(6):
        chosen = torch.zeros(400, dtype=torch.bool)
        chosen[small[g]] = True
        # every chosen score >= every score left out (spec §10.4)
        assert scores[g][chosen].min() >= scores[g][~chosen].max()
        # budget monotonicity (§10.5)
        assert set(small[g].tolist()) <= set(large[g].tolist())
    # group isolation (§10.8): changing group 0 changes no other group's selection
    changed = scores.clone()
    changed[0] = torch.randn(400)
    assert torch.equal(ops.unified_topk(changed, 40)[1:], small[1:])


def test_unified_topk_noncontiguous_scores():
    scores = torch.randn(5, 64)
    want = ops.unified_topk(scores, 12)
    assert torch.equal(ops.unified_topk(noncontig(scores), 12), want)
    assert torch.equal(ops.unified_topk(scores.t().contiguous().t(), 12), want)


@pytest.mark.parametrize("with_counts", [False, True])
def test_unified_topk_opcheck(with_counts):
    scores = torch.randn(4, 32)
    counts = torch.tensor([0, 3, 5, 5]) if with_counts else None
    torch.library.opcheck(torch.ops.smoe.unified_topk.default, (scores, 5, counts))
    torch.library.opcheck(torch.ops.smoe.unified_topk.default, (torch.randn(0, 8), 2, None))


def test_unified_topk_compiles_without_graph_breaks():
    scores = torch.randn(3, 40, requires_grad=True)

    def fn(s):
        idx = ops.unified_topk(s, 7)
        return s.gather(1, idx).sum(), idx  # the weights: a differentiable gather outside

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (a, ia), (b, ib) = fn(scores), compiled(scores)
    assert torch.equal(ia, ib)
    (ga,) = torch.autograd.grad(a, scores)
    (gb,) = torch.autograd.grad(b, scores)
    assert torch.equal(ga, gb) and ga.sum().item() == 3 * 7


def test_unified_topk_is_deterministic_across_thread_counts():
    scores = torch.randn(64, 4096).round(decimals=1)  # many ties
    a = ops.unified_topk(scores, 500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = ops.unified_topk(scores, 500)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


def test_unified_topk_rejects_bad_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"n must be in \[0, L\] = \[0, 8\], got 9"):
        ops.unified_topk(x, 9)
    with pytest.raises(RuntimeError, match=r"n must be in \[0, L\]"):
        ops.unified_topk(x, -1)
    with pytest.raises(TypeError, match="n must be an int"):
        ops.unified_topk(x, 2.0)
    with pytest.raises(RuntimeError, match="scores must be 2-D"):
        ops.unified_topk(torch.randn(8), 2)
    with pytest.raises(RuntimeError, match="scores must be float"):
        ops.unified_topk(torch.ones(3, 8, dtype=torch.int64), 2)
    bad = x.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(RuntimeError, match="scores must not be NaN, got NaN in group 1"):
        ops.unified_topk(bad, 2)
    with pytest.raises(RuntimeError, match="scores must not be NaN, got NaN in group 1"):
        ops.unified_topk(bad, 0)  # nothing to select, but the scores are still checked
    with pytest.raises(RuntimeError, match="counts must be int64"):
        ops.unified_topk(x, 2, counts=torch.tensor([1, 1, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"counts must be \[G\] = \[3\]"):
        ops.unified_topk(x, 2, counts=torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match=r"counts must be in \[0, n\] = \[0, 2\], got 3"):
        ops.unified_topk(x, 2, counts=torch.tensor([1, 3, 1]))


@pytest.mark.cuda
@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("G,L,n", SHAPES)
def test_unified_topk_cuda_matches_cpu(G, L, n, dtype, with_counts):
    scores = torch.randn(G, L).to(dtype)
    scores[:, ::7] = 0.0  # exact ties across tiles
    counts = torch.randint(0, n + 1, (G,)) if with_counts else None
    cpu = ops.unified_topk(scores, n, counts=counts)
    gpu = ops.unified_topk(scores.cuda(), n, counts=None if counts is None else counts.cuda())
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.cuda
def test_unified_topk_cuda_is_deterministic_and_sync_free():
    scores = torch.randn(8, 4096 * 16, device="cuda").round(decimals=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = ops.unified_topk(scores, 8192), ops.unified_topk(scores, 8192)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a, b)
