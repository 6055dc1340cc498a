import pytest
import torch

from smoe import ops
from smoe import reference as ref
from tests.helpers import CUDA_DTYPES, DTYPES, assert_close, noncontig
from tests.ops.test_make_plan import random_experts

# (T, k, E, d, capacity)
CASES = [
    pytest.param(0, 2, 4, 8, None, id="T0"),
    pytest.param(1, 1, 1, 5, None, id="T1-E1"),
    pytest.param(7, 2, 4, 3, None, id="T7-k2"),
    pytest.param(7, 4, 4, 6, None, id="kE"),
    pytest.param(13, 3, 16, 4, None, id="empty-experts"),
    pytest.param(33, 2, 5, 17, 6, id="capacity-drops"),
    pytest.param(20, 2, 4, 9, 0, id="all-dropped"),
]


def setup(T, k, E, d, capacity, dtype=torch.float64):
    ex = random_experts(T, k, E)
    plan = ops.make_plan(ex, E, capacity=capacity)
    x = torch.randn(T, d, dtype=dtype)
    y_sorted = torch.randn(T * k, d, dtype=dtype)
    weight = torch.rand(T, k, dtype=dtype)
    return plan, x, y_sorted, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,d,capacity", CASES)
def test_permute_matches_reference(T, k, E, d, capacity, dtype):
    plan, x, _, _ = setup(T, k, E, d, capacity, dtype)
    got = ops.permute(x, plan)
    assert got.shape == (T * k, d) and got.dtype == dtype
    assert torch.equal(got, ref.permute(x, plan))  # a copy: exact in every dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,d,capacity", CASES)
def test_combine_matches_reference(T, k, E, d, capacity, dtype):
    plan, _, y_sorted, weight = setup(T, k, E, d, capacity, dtype)
    got = ops.combine(y_sorted, weight, plan)
    assert got.shape == (T, d) and got.dtype == dtype
    assert_close(got, ref.combine(y_sorted.double(), weight.double(), plan), dtype)


# The CPU gathers prefetch rows of up to 1 KiB and leave longer ones to the hardware (two loops):
# rows on each side of that limit in every dtype, with dropped slots, forward and backward.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [128, 300])
def test_gathers_match_reference_on_both_sides_of_the_prefetch_limit(d, dtype):
    plan, x, y_sorted, weight = setup(40, 3, 6, d, 15, dtype)
    x.requires_grad_(True)
    y_sorted.requires_grad_(True)
    weight.requires_grad_(True)
    xs, y = ops.permute(x, plan), ops.combine(y_sorted, weight, plan)
    g_xs, g_y = torch.randn_like(xs), torch.randn_like(y)
    got = torch.autograd.grad((xs, y), (x, y_sorted, weight), (g_xs, g_y))
    x64, ys64, w64 = (t.detach().double().requires_grad_(True) for t in (x, y_sorted, weight))
    xs_ref, y_ref = ref.permute(x64, plan), ref.combine(ys64, w64, plan)
    want = torch.autograd.grad((xs_ref, y_ref), (x64, ys64, w64), (g_xs.double(), g_y.double()))
    assert torch.equal(xs, xs_ref.to(dtype))
    assert_close(y, y_ref, dtype)
    for a, b in zip(got, want):
        assert_close(a, b, dtype)


def test_permute_then_combine_with_unit_weights_sums_each_token_k_times():
    plan, x, _, _ = setup(10, 3, 5, 4, None)
    y = ops.combine(ops.permute(x, plan), torch.ones(10, 3, dtype=x.dtype), plan)
    torch.testing.assert_close(y, 3 * x)


def test_permute_combine_noncontiguous_inputs():
    plan, x, y_sorted, weight = setup(12, 2, 4, 6, 5)
    assert torch.equal(ops.permute(noncontig(x), plan), ops.permute(x, plan))
    a = ops.combine(noncontig(y_sorted), weight.t().contiguous().t(), plan)
    assert torch.equal(a, ops.combine(y_sorted, weight, plan))


@pytest.mark.parametrize("T,k,E,d,capacity", CASES)
def test_permute_combine_gradcheck(T, k, E, d, capacity):
    plan, x, y_sorted, weight = setup(T, k, E, d, capacity)
    x.requires_grad_()
    y_sorted.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.permute(a, plan), (x,))
    assert torch.autograd.gradcheck(lambda a, w: ops.combine(a, w, plan), (y_sorted, weight))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("T,k,E,d,capacity", CASES)
def test_permute_combine_opcheck(T, k, E, d, capacity, requires_grad):
    plan, x, y_sorted, weight = setup(T, k, E, d, capacity)
    for t in (x, y_sorted, weight):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.smoe.permute.default, (x, plan.token, plan.row))
    torch.library.opcheck(
        torch.ops.smoe.combine.default, (y_sorted, weight, plan.token, plan.slot, plan.row)
    )


def test_backward_ops_opcheck():
    plan, x, y_sorted, weight = setup(9, 2, 3, 5, 5)
    g_sorted, g_tok = torch.randn_like(y_sorted), torch.randn_like(x)
    torch.library.opcheck(torch.ops.smoe.permute_backward.default, (g_sorted, plan.row))
    torch.library.opcheck(
        torch.ops.smoe.combine_backward.default,
        (g_tok, y_sorted, weight, plan.token, plan.slot, plan.row),
    )


def test_permute_combine_compile_without_graph_breaks():
    plan, x, y_sorted, weight = setup(16, 2, 4, 8, 7)
    x.requires_grad_()
    weight.requires_grad_()

    def fn(x, w):
        return ops.combine(ops.permute(x, plan) * 2.0, w, plan).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = fn(x, weight), compiled(x, weight)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (x, weight))
    gb = torch.autograd.grad(b, (x, weight))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_permute_combine_backward_is_bitwise_deterministic():
    plan, x, y_sorted, weight = setup(500, 4, 16, 64, None, torch.float32)
    grads = []
    for _ in range(2):
        xs, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = ops.combine(ops.permute(xs, plan).sin(), w, plan)
        grads.append(torch.autograd.grad(out.sum(), (xs, w)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_permute_rejects_bad_plan_tensors():
    plan, x, y_sorted, weight = setup(6, 2, 3, 4, None)
    with pytest.raises(RuntimeError, match="token must be a 1-D int32"):
        torch.ops.smoe.permute(x, plan.token.long(), plan.row)
    with pytest.raises(RuntimeError, match="row must be a 2-D int32"):
        torch.ops.smoe.permute(x, plan.token, plan.row.flatten())
    with pytest.raises(RuntimeError, match=r"x \(T = row.size\(0\)\) must have 6 rows, got 5"):
        torch.ops.smoe.permute(x[:5], plan.token, plan.row)
    # token's length M is free (expert choice's plans have E * C rows, not T * k)
    assert torch.ops.smoe.permute(x, plan.token[:10], plan.row).shape == (10, x.shape[1])
    with pytest.raises(RuntimeError, match="x must be float"):
        torch.ops.smoe.permute(x.long(), plan.token, plan.row)


def test_combine_rejects_bad_inputs():
    plan, x, y_sorted, weight = setup(6, 2, 3, 4, None)
    with pytest.raises(RuntimeError, match="weight must have y_sorted's dtype"):
        ops.combine(y_sorted, weight.float(), plan)
    with pytest.raises(RuntimeError, match="weight must have row's shape"):
        ops.combine(y_sorted, weight[:, :1].contiguous(), plan)
    with pytest.raises(RuntimeError, match=r"y_sorted \(M = token.size\(0\)\) must have 12 rows"):
        ops.combine(y_sorted[:11], weight, plan)
    with pytest.raises(RuntimeError, match="slot must have as many entries as token"):
        torch.ops.smoe.combine(y_sorted, weight, plan.token, plan.slot[:11], plan.row)
    with pytest.raises(RuntimeError, match="slot must be a 1-D int32"):
        torch.ops.smoe.combine(y_sorted, weight, plan.token, plan.slot.long(), plan.row)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,k,E,d,capacity", CASES)
def test_permute_combine_cuda_matches_cpu(T, k, E, d, capacity, dtype):
    plan, x, y_sorted, weight = setup(T, k, E, d, capacity, dtype)
    gplan = ops.Plan(*(t.cuda() for t in plan))
    assert torch.equal(ops.permute(x.cuda(), gplan).cpu(), ops.permute(x, plan))
    assert_close(
        ops.combine(y_sorted.cuda(), weight.cuda(), gplan).cpu(),
        ops.combine(y_sorted, weight, plan),
    )
    g = torch.randn(T, d, dtype=dtype)
    gys_c, gw_c = torch.ops.smoe.combine_backward(
        g, y_sorted, weight, plan.token, plan.slot, plan.row
    )
    gys_g, gw_g = torch.ops.smoe.combine_backward(
        g.cuda(), y_sorted.cuda(), weight.cuda(), gplan.token, gplan.slot, gplan.row
    )
    assert_close(gys_g.cpu(), gys_c)
    assert_close(gw_g.cpu(), gw_c)
    gx_c = torch.ops.smoe.permute_backward(y_sorted, plan.row)
    assert_close(torch.ops.smoe.permute_backward(y_sorted.cuda(), gplan.row).cpu(), gx_c)


def test_combine_backward_rejects_bad_grad():
    plan, x, y_sorted, weight = setup(6, 2, 3, 4, None)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[T, d\] = \[6, 4\]"):
        torch.ops.smoe.combine_backward(
            torch.randn(5, 4, dtype=x.dtype), y_sorted, weight, plan.token, plan.slot, plan.row
        )


# Index values are checked on the CPU: a bad plan is an error naming the argument, never a read
# past the end (a silent wrong result) or a segfault.
@pytest.mark.parametrize("bad", [6, -2, 2**30, 2**31 - 1])
def test_permute_rejects_out_of_range_token(bad):
    plan, x, _, _ = setup(6, 2, 4, 3, None)
    token = plan.token.clone()
    token[1] = bad
    with pytest.raises(
        RuntimeError, match=rf"permute: token entry 1 is {bad}, outside \[-1, T = 6\)"
    ):
        torch.ops.smoe.permute(x, token, plan.row)


@pytest.mark.parametrize("bad", [12, -2, 2**30])
def test_combine_rejects_out_of_range_row(bad):
    plan, _, y_sorted, weight = setup(6, 2, 4, 3, None)
    row = plan.row.clone()
    row[2, 1] = bad
    with pytest.raises(
        RuntimeError, match=rf"combine: row entry 5 is {bad}, outside \[-1, M = 12\)"
    ):
        torch.ops.smoe.combine(y_sorted, weight, plan.token, plan.slot, row)


def test_backward_ops_reject_out_of_range_indices():
    plan, _, y_sorted, weight = setup(6, 2, 4, 3, None)
    grad_sorted, grad = (
        torch.randn(12, 3, dtype=torch.float64),
        torch.randn(6, 3, dtype=torch.float64),
    )
    row = plan.row.clone()
    row[0, 0] = 12
    with pytest.raises(RuntimeError, match=r"permute_backward: row entry 0 is 12, outside \[-1, M"):
        torch.ops.smoe.permute_backward(grad_sorted, row)
    args = [grad, y_sorted, weight, plan.token, plan.slot, plan.row]
    for i, (name, bound) in {3: ("token", "T = 6"), 4: ("slot", "T\\*k = 12")}.items():
        bad = args[i].clone()
        bad[0] = 2**30
        with pytest.raises(
            RuntimeError,
            match=rf"combine_backward: {name} entry 0 is {2**30}, outside \[-1, {bound}\)",
        ):
            torch.ops.smoe.combine_backward(*args[:i], bad, *args[i + 1 :])
