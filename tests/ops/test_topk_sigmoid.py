"""smoe.ops.topk_sigmoid: DeepSeek-V3's sigmoid, group-limited top-k with a selection bias."""

import pytest
import torch

from smoe import ops
from smoe import reference_sigmoid as ref
from tests.helpers import (
    CUDA_DTYPES,
    DTYPES,
    assert_close,
    assert_low_precision_close,
    noncontig,
    spaced_logits,
)

# (T, E, k, n_group, topk_group)
SHAPES = [
    pytest.param(0, 4, 2, 1, 1, id="T0"),
    pytest.param(1, 1, 1, 1, 1, id="E1"),
    pytest.param(7, 4, 4, 1, 1, id="kE"),
    pytest.param(7, 8, 2, 4, 2, id="groups4-keep2"),
    pytest.param(33, 16, 5, 4, 2, id="groups4-keep2-k5"),
    pytest.param(5, 64, 8, 8, 4, id="deepseek-like"),
    pytest.param(9, 16, 3, 16, 4, id="one-expert-groups"),
    pytest.param(6, 40, 33, 1, 1, id="k33-multipass"),
    pytest.param(4, 40, 33, 40, 34, id="topk_group34-multipass"),
    pytest.param(3, 8, 8, 2, 2, id="kE-groups"),
]


def _bias(E: int, on: bool):
    return torch.randn(E) * 0.3 if on else None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,n_group,topk_group", SHAPES)
def test_topk_sigmoid_matches_reference(T, E, k, n_group, topk_group, dtype, renormalize, bias):
    logits = (torch.randn(T, E) * 2).to(dtype)
    b = _bias(E, bias)
    kw = dict(
        selection_bias=b, n_group=n_group, topk_group=topk_group, renormalize=renormalize, scale=2.5
    )
    weight, expert = ops.topk_sigmoid(logits, k, **kw)
    rw, re = ref.topk_sigmoid(logits, k, **kw)
    assert weight.dtype == dtype and expert.dtype == torch.int32
    assert weight.shape == (T, k) and expert.shape == (T, k)
    assert torch.equal(expert, re)
    if dtype in (torch.float16, torch.bfloat16):
        low = ref.topk_sigmoid(logits, k, **kw).weight
        assert_low_precision_close(weight, ref.topk_sigmoid(logits.double(), k, **kw).weight, low)
    else:
        assert_close(weight, rw)


def test_topk_sigmoid_matches_transformers_deepseek_v3_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(
        hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(std=0.2)
    h = torch.randn(50, 32)
    logits, hf_weight, hf_expert = router(h)
    got = ops.topk_sigmoid(
        logits, 4, selection_bias=router.e_score_correction_bias, n_group=4, topk_group=2,
        renormalize=True, scale=2.5,
    )  # fmt: skip
    # transformers' topk(sorted=False) lists the same experts in another order
    order = hf_expert.argsort(dim=1)
    want_e, want_w = hf_expert.gather(1, order), hf_weight.gather(1, order)
    order = got.expert.long().argsort(dim=1)
    assert torch.equal(got.expert.long().gather(1, order), want_e)
    torch.testing.assert_close(got.weight.gather(1, order), want_w)


def test_topk_sigmoid_noncontiguous():
    logits = torch.randn(9, 8)
    want = ops.topk_sigmoid(logits, 3, n_group=4, topk_group=2, renormalize=True)
    for x in (noncontig(logits), logits.t().contiguous().t()):
        got = ops.topk_sigmoid(x, 3, n_group=4, topk_group=2, renormalize=True)
        assert torch.equal(got.expert, want.expert) and torch.equal(got.weight, want.weight)


@pytest.mark.parametrize("k", [3, 34])  # single-pass and multi-pass selection
def test_topk_sigmoid_ties_go_to_lower_index(k):
    logits = torch.zeros(2, 40)
    logits[0, [1, 2, 4]] = 1.0
    _, expert = ops.topk_sigmoid(logits, k)
    rest = [e for e in range(40) if e not in (1, 2, 4)]
    assert expert[0].tolist() == [1, 2, 4] + rest[: k - 3]
    assert expert[1].tolist() == list(range(k))


def test_topk_sigmoid_groups_limit_the_choice():
    # group 0 = experts 0..3 holds the single best expert, group 1 the two next-best: with one
    # group kept, group 1 wins on its top-2 sum and expert 0 is never chosen.
    logits = torch.tensor([[4.0, -5, -5, -5, 3.0, 3.0, -5, -5]])
    _, expert = ops.topk_sigmoid(logits, 2, n_group=2, topk_group=1)
    assert expert.tolist() == [[4, 5]]
    _, expert = ops.topk_sigmoid(logits, 2)  # without groups the best expert is chosen
    assert expert.tolist() == [[0, 4]]


def test_topk_sigmoid_bias_selects_but_never_weighs():
    logits = torch.randn(40, 8)
    bias = torch.zeros(8)
    bias[7] = 10.0
    w, e = ops.topk_sigmoid(logits, 2, selection_bias=bias)
    assert (e[:, 0] == 7).all()
    torch.testing.assert_close(w, torch.sigmoid(logits.gather(1, e.long())))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    "T,E,k,n_group,topk_group", [(0, 4, 2, 1, 1), (1, 1, 1, 1, 1), (6, 8, 3, 4, 2), (4, 4, 4, 2, 2)]
)
def test_topk_sigmoid_gradcheck(T, E, k, n_group, topk_group, renormalize):
    logits = spaced_logits(T, E).requires_grad_()

    def fn(x):
        kw = dict(n_group=n_group, topk_group=topk_group, renormalize=renormalize, scale=1.7)
        return ops.topk_sigmoid(x, k, **kw).weight

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "T,E,k,n_group,topk_group", [(0, 4, 2, 1, 1), (7, 8, 2, 4, 2), (3, 1, 1, 1, 1)]
)
def test_topk_sigmoid_opcheck(T, E, k, n_group, topk_group, requires_grad):
    logits = spaced_logits(T, E).requires_grad_(requires_grad)
    op = torch.ops.smoe.topk_sigmoid.default
    for renormalize in (True, False):
        kw = dict(n_group=n_group, topk_group=topk_group, renormalize=renormalize, scale=2.0)
        torch.library.opcheck(op, (logits, k), kw)
        torch.library.opcheck(op, (logits, k, torch.randn(E)), kw)


def test_topk_sigmoid_backward_opcheck():
    logits = spaced_logits(6, 8)
    _, expert = ops.topk_sigmoid(logits, 2, n_group=4, topk_group=2)
    g = torch.randn(6, 2, dtype=torch.float64)
    op = torch.ops.smoe.topk_sigmoid_backward.default
    torch.library.opcheck(op, (g, logits, expert, True, 2.5))
    torch.library.opcheck(op, (g, logits, expert, False, 1.0))


def test_topk_sigmoid_compiles_without_graph_breaks():
    logits = torch.randn(12, 8, requires_grad=True)
    bias = torch.randn(8)

    def fn(x):
        w, e = ops.topk_sigmoid(
            x, 2, selection_bias=bias, n_group=4, topk_group=2, renormalize=True, scale=2.0
        )
        return (w * w).sum(), e

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (a, ea), (b, eb) = fn(logits), compiled(logits)
    assert torch.equal(ea, eb)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)


def test_topk_sigmoid_is_deterministic_across_thread_counts():
    logits = torch.randn(3000, 64)
    kw = dict(n_group=8, topk_group=4, renormalize=True)
    a = ops.topk_sigmoid(logits, 8, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = ops.topk_sigmoid(logits, 8, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)


def test_topk_sigmoid_rejects_bad_options():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="k must be in \\[1, topk_group \\* E / n_group\\]"):
        ops.topk_sigmoid(x, 5, n_group=4, topk_group=2)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_sigmoid(x, 0)
    with pytest.raises(RuntimeError, match="n_group must be >= 1 and divide E = 8, got 3"):
        ops.topk_sigmoid(x, 1, n_group=3)
    with pytest.raises(RuntimeError, match="topk_group must be in \\[1, n_group\\]"):
        ops.topk_sigmoid(x, 1, n_group=4, topk_group=5)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        ops.topk_sigmoid(x, 1, scale=float("inf"))
    with pytest.raises(TypeError, match="n_group must be an int"):
        ops.topk_sigmoid(x, 1, n_group=2.0)


def test_topk_sigmoid_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="logits must be float"):
        ops.topk_sigmoid(torch.ones(3, 4, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.topk_sigmoid(torch.randn(2, 3, 4), 1)
    logits = torch.randn(4, 3)
    logits[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="logits must not be NaN, got NaN in row 2"):
        ops.topk_sigmoid(logits, 1)
    with pytest.raises(RuntimeError, match="selection_bias must be float32"):
        ops.topk_sigmoid(torch.randn(3, 4), 1, selection_bias=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="selection_bias must be \\[E\\] = \\[4\\]"):
        ops.topk_sigmoid(torch.randn(3, 4), 1, selection_bias=torch.zeros(5))
    with pytest.raises(RuntimeError, match="topk_sigmoid: selection_bias must be finite"):
        ops.topk_sigmoid(torch.randn(3, 4), 1, selection_bias=torch.tensor([0, 0, float("inf"), 0]))


def test_topk_sigmoid_accepts_infinite_logits():
    logits = torch.tensor([[float("-inf"), 0.0, float("inf")]], requires_grad=True)
    w, e = ops.topk_sigmoid(logits, 2, renormalize=True)
    assert e.tolist() == [[2, 1]] and torch.isfinite(w).all()
    (g,) = torch.autograd.grad(w.sum() + w[0, 0], logits)
    assert torch.isfinite(g).all()


@pytest.mark.cuda
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,E,k,n_group,topk_group", SHAPES)
def test_topk_sigmoid_cuda_matches_cpu(T, E, k, n_group, topk_group, dtype, renormalize):
    logits = (torch.randn(T, E) * 2).to(dtype)
    bias = torch.randn(E) * 0.3
    kw = dict(n_group=n_group, topk_group=topk_group, renormalize=renormalize, scale=2.5)
    cpu = ops.topk_sigmoid(logits, k, selection_bias=bias, **kw)
    gpu = ops.topk_sigmoid(logits.cuda(), k, selection_bias=bias.cuda(), **kw)
    assert torch.equal(gpu.expert.cpu(), cpu.expert)  # random logits: no near-ties
    assert_close(gpu.weight.cpu(), cpu.weight)
    lg = logits.cuda().requires_grad_()
    g = torch.randn(T, k, dtype=dtype)
    (gg,) = torch.autograd.grad(ops.topk_sigmoid(lg, k, **kw).weight, lg, g.cuda())
    lc = logits.clone().requires_grad_()
    (gc,) = torch.autograd.grad(ops.topk_sigmoid(lc, k, **kw).weight, lc, g)
    assert_close(gg.cpu(), gc)


@pytest.mark.cuda
def test_topk_sigmoid_cuda_is_deterministic_and_sync_free():
    logits = torch.randn(4096, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.1
    kw = dict(selection_bias=bias, n_group=8, topk_group=4, renormalize=True, scale=2.5)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = ops.topk_sigmoid(logits, 8, **kw), ops.topk_sigmoid(logits, 8, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)
