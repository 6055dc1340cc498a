"""smoe.ops.s2moe_perturb: S2MoE's fused Gaussian perturbation (1 + s_mul n1) x + (mu + s_add n2)
with DSU / token / batch / InstanceNorm statistics, and its backward."""

import pytest
import torch

from smoe import ops
from smoe import reference_s2moe as ref
from tests.helpers import CUDA_DTYPES, DTYPES, assert_close, assert_low_precision_close

# (x shape, statistics shape): DSU "sequence" [B, 1, d], time-major [1, B, d], "token" [T, 1],
# "batch" [1, d], InstanceNorm scalars [], same shape as x (no broadcast), empty tensors
CASES = [
    pytest.param((3, 7, 8), (3, 1, 8), id="sequence"),
    pytest.param((7, 3, 8), (1, 3, 8), id="time-major"),
    pytest.param((21, 8), (21, 1), id="token"),
    pytest.param((21, 8), (1, 8), id="batch"),
    pytest.param((3, 7, 8), (), id="scalars"),
    pytest.param((4, 5), (4, 5), id="elementwise"),
    pytest.param((0, 7, 8), (0, 1, 8), id="empty"),
    pytest.param((2, 5, 3, 4), (2, 1, 1, 4), id="two-dim-run"),
]


def _inputs(shape, stat_shape, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, n1, n2 = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    mu = torch.randn(stat_shape, generator=g).to(dtype)
    s_mul, s_add = (torch.rand(stat_shape, generator=g).to(dtype) + 0.1 for _ in range(2))
    if requires_grad:
        for t in (x, mu, s_mul, s_add):
            t.requires_grad_()
    return x, n1, n2, mu, s_mul, s_add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,stat_shape", CASES)
def test_s2moe_perturb_matches_reference(shape, stat_shape, dtype):
    args = _inputs(shape, stat_shape, dtype)
    got = ops.s2moe_perturb(*args)
    assert got.shape == args[0].shape and got.dtype == dtype
    want64 = ref.s2moe_perturb(*(a.double() for a in args))
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_close(got, want64, ref.s2moe_perturb(*args))
    else:
        assert_close(got, want64.to(dtype))


@pytest.mark.parametrize("shape,stat_shape", CASES)
def test_s2moe_perturb_gradcheck(shape, stat_shape):
    args = _inputs(shape, stat_shape, requires_grad=True)
    assert torch.autograd.gradcheck(ops.s2moe_perturb, args, eps=1e-6, atol=1e-8)


def test_s2moe_perturb_gradients_only_where_asked_and_none_for_noise():
    x, n1, n2, mu, s_mul, s_add = _inputs((3, 7, 8), (3, 1, 8))
    x.requires_grad_()
    out = ops.s2moe_perturb(x, n1, n2, mu, s_mul, s_add)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, 1 + s_mul * n1)
    n1.requires_grad_()
    out = ops.s2moe_perturb(x, n1, n2, mu, s_mul, s_add)
    (gn,) = torch.autograd.grad(out.sum(), n1, allow_unused=True)
    assert gn is None


def test_s2moe_perturb_zero_noise_and_zero_mean_give_x():
    x = torch.randn(2, 9, 4)
    zeros = torch.zeros_like(x)
    out = ops.s2moe_perturb(
        x, zeros, zeros, torch.zeros(2, 1, 4), torch.rand(2, 1, 4), torch.rand(2, 1, 4)
    )
    assert torch.equal(out, x)


def test_s2moe_perturb_noncontiguous_inputs():
    args = _inputs((3, 7, 8), (3, 1, 8), torch.float32)
    x = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    assert torch.equal(ops.s2moe_perturb(x, *args[1:]), ops.s2moe_perturb(*args))


@pytest.mark.parametrize("shape,stat_shape", [CASES[0], CASES[4]])
def test_s2moe_perturb_opcheck(shape, stat_shape):
    for rg in (False, True):
        args = _inputs(shape, stat_shape, requires_grad=rg)
        torch.library.opcheck(torch.ops.smoe.s2moe_perturb.default, args)


def test_s2moe_perturb_backward_opcheck():
    x, n1, n2, mu, s_mul, s_add = _inputs((3, 7, 8), (3, 1, 8))
    g = torch.randn_like(x)
    op = torch.ops.smoe.s2moe_perturb_backward.default
    torch.library.opcheck(op, (g, x, n1, n2, mu, s_mul, s_add, [True, True, True, True]))
    torch.library.opcheck(op, (g, x, n1, n2, mu, s_mul, s_add, [True, False, True, False]))


def test_s2moe_perturb_compiles_without_graph_breaks():
    x, n1, n2, mu, s_mul, s_add = _inputs((3, 7, 8), (3, 1, 8), torch.float32, requires_grad=True)

    def fn(inp):
        return ops.s2moe_perturb(inp, n1, n2, mu, s_mul, s_add).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = fn(x), compiled(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


def test_s2moe_perturb_backward_is_deterministic_across_thread_counts():
    x, n1, n2, mu, s_mul, s_add = _inputs((64, 300, 16), (), torch.float32)
    g = torch.randn_like(x)
    op = torch.ops.smoe.s2moe_perturb_backward.default
    args = (g, x, n1, n2, mu, s_mul, s_add, [True, True, True, True])
    a = op(*args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = op(*args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: (a[0], a[1][:, :3], *a[2:]), RuntimeError, "n1 must have x's shape"),
        (lambda a: (*a[:2], a[2].float(), *a[3:]), RuntimeError, "n2 must have x's dtype"),
        (
            lambda a: (*a[:3], torch.zeros(3, 2, 8, dtype=torch.float64), *a[4:]),
            RuntimeError,
            "mu must broadcast",
        ),
        (
            lambda a: (*a[:3], torch.zeros(3, 8, dtype=torch.float64), *a[4:]),
            RuntimeError,
            "mu must have x's rank",
        ),
        (
            lambda a: (*a[:4], torch.zeros(3, 7, 1, dtype=torch.float64), a[5]),
            RuntimeError,
            "broadcast over the same dims",
        ),
        (
            lambda a: (*a[:4], torch.zeros(1, 7, 8, dtype=torch.float64), a[5]),
            RuntimeError,
            "broadcast over the same dims",
        ),
        (lambda a: (a[0].long(), *a[1:]), RuntimeError, "x must be float"),
    ],
)
def test_s2moe_perturb_rejects_bad_inputs(mutate, error, match):
    args = mutate(_inputs((3, 7, 8), (3, 1, 8)))
    with pytest.raises(error, match=match):
        ops.s2moe_perturb(*args)


def test_s2moe_perturb_rejects_a_broadcast_that_is_not_one_run():
    x, n1, n2, *_ = _inputs((3, 7, 8), ())
    stat = torch.zeros(1, 7, 1, dtype=torch.float64)  # broadcast over dims 0 and 2: two runs
    with pytest.raises(RuntimeError, match="one run of consecutive dims"):
        ops.s2moe_perturb(x, n1, n2, stat, stat, stat)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape,stat_shape", CASES)
def test_s2moe_perturb_cuda_matches_cpu(shape, stat_shape, dtype):
    args = _inputs(shape, stat_shape, dtype)
    cpu = ops.s2moe_perturb(*args)
    gpu = ops.s2moe_perturb(*(a.cuda() for a in args))
    assert_close(gpu.cpu(), cpu)
    g = torch.randn(shape).to(dtype)
    op = torch.ops.smoe.s2moe_perturb_backward.default
    mask = [True, True, True, True]
    want = op(g, *args, mask)
    got = op(g.cuda(), *(a.cuda() for a in args), mask)
    for w, o in zip(want, got):
        torch.testing.assert_close(
            o.cpu().double(),
            w.double(),
            rtol=2e-2,
            atol=2e-2 * max(1.0, w.abs().max().item() if w.numel() else 1.0),
        )


@pytest.mark.cuda
def test_s2moe_perturb_cuda_is_deterministic_and_sync_free():
    args = [a.cuda() for a in _inputs((8, 512, 64), (8, 1, 64), torch.float32)]
    g = torch.randn(8, 512, 64, device="cuda")
    op = torch.ops.smoe.s2moe_perturb_backward.default
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = op(g, *args, [True] * 4), op(g, *args, [True] * 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
