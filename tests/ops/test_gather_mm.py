"""smoe::gather_mm: grouped_mm over the rows a plan gathers, against the float64 reference and,
bitwise, the unfused permute -> grouped_mm it replaces (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from smoe import Experts, ops
from smoe import reference as ref
from tests.helpers import (
    CUDA_DTYPES,
    DTYPES,
    assert_close,
    assert_low_precision_close,
    noncontig,
    op_calls,
)

# (T, d_in, d_out, E, k, capacity): 0 tokens, 1 expert, k = E, empty experts (T*k < E), capacity
# drops (token -1 rows inside groups and padding rows past offsets[E]), every slot dropped, and
# enough rows for several row and column blocks per expert.
SHAPES = [
    pytest.param(0, 8, 6, 4, 2, None, id="T0"),
    pytest.param(5, 8, 6, 1, 1, None, id="E1"),
    pytest.param(6, 8, 6, 3, 3, None, id="k=E"),
    pytest.param(2, 8, 6, 9, 2, None, id="empty-experts"),
    pytest.param(13, 8, 6, 4, 2, 3, id="capacity"),
    pytest.param(10, 8, 6, 4, 2, 0, id="all-dropped"),
    pytest.param(700, 64, 300, 2, 2, None, id="T700-multiblock"),
]


def make_case(T, d_in, d_out, E, k, capacity, *, bias=True, transposed=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(T * 31 + E)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    expert = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.int()
    plan = ops.make_plan(expert, E, capacity=capacity)
    if transposed:  # stored [E, out, in] like Experts, handed over as a transposed view
        w = (torch.randn(E, d_out, d_in, generator=g) / d_in**0.5).to(dtype).transpose(1, 2)
    else:
        w = (torch.randn(E, d_in, d_out, generator=g) / d_in**0.5).to(dtype)
    b = torch.randn(E, d_out, generator=g).to(dtype) if bias else None
    return x, plan, w, b


def unfused(x, plan, w, b):
    return ops.grouped_mm(ops.permute(x, plan), w, plan.offsets, b)


@pytest.mark.parametrize("transposed", [True, False], ids=["w-view", "w-rowmajor"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("T,d_in,d_out,E,k,capacity", SHAPES)
def test_gather_mm_matches_reference(T, d_in, d_out, E, k, capacity, bias, transposed):
    x, plan, w, b = make_case(T, d_in, d_out, E, k, capacity, bias=bias, transposed=transposed)
    got = ops.gather_mm(x, plan, w, b)
    assert got.shape == (plan.token.shape[0], d_out)
    assert_close(got, ref.gather_mm(x, plan, w, b))
    used = int(plan.offsets[-1])
    assert torch.all(got[used:] == 0)  # padding rows past offsets[E]: no bias there either


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d_in,d_out,E,k,capacity", SHAPES)
def test_gather_mm_is_bitwise_the_unfused_chain_forward_and_backward(
    T, d_in, d_out, E, k, capacity, dtype
):
    x, plan, w, b = make_case(T, d_in, d_out, E, k, capacity, dtype=dtype)
    leaves = [[t.detach().clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    out_fused = ops.gather_mm(leaves[0][0], plan, leaves[0][1], leaves[0][2])
    out_chain = unfused(*[leaves[1][0], plan, leaves[1][1], leaves[1][2]])
    assert torch.equal(out_fused, out_chain)
    g = torch.randn(out_chain.shape).to(dtype)
    out_fused.backward(g)
    out_chain.backward(g)
    for a, c in zip(leaves[0], leaves[1]):
        assert torch.equal(a.grad, c.grad)
        assert a.grad.stride() == c.grad.stride()  # w's gradient keeps w's (transposed) layout


# (E, d_out): the weight gradient gathers per item into its thread's scratch (many experts, one
# column block), or every row up front (few experts for the threads; several column blocks)
@pytest.mark.parametrize(
    "E,d_out", [(16, 64), (2, 64), (16, 300)], ids=["per-item", "few-experts", "col-blocks"]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_mm_weight_gradient_paths_are_bitwise_the_unfused(E, d_out, threads):
    x, plan, w, _ = make_case(400, 24, d_out, E, 2, None, dtype=torch.float32)
    g = torch.randn(plan.token.shape[0], d_out)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _, gw = torch.ops.smoe.gather_mm_backward.default(
            g, x, plan.token, plan.row, w, plan.offsets, False, True
        )
        _, want = torch.ops.smoe.grouped_mm_backward.default(
            g, ops.permute(x, plan), w, plan.offsets, False, True
        )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(gw, want) and gw.stride() == want.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_mm_low_precision_matches_reference(dtype):
    x, plan, w, b = make_case(300, 32, 40, 4, 2, None, dtype=dtype)
    got = ops.gather_mm(x, plan, w, b)
    assert got.dtype == dtype
    want = ref.gather_mm(x.double(), plan, w.double(), b.double())
    assert_low_precision_close(got, want, ref.gather_mm(x, plan, w, b))


def test_gather_mm_noncontiguous_inputs():
    x, plan, w, b = make_case(50, 16, 12, 4, 2, None)
    rowmajor = w.contiguous()
    want = unfused(x, plan, rowmajor, b)
    assert torch.equal(ops.gather_mm(noncontig(x), plan, rowmajor, noncontig(b)), want)
    wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :16]  # rows strided 32 apart, read as such
    assert wide.stride() == (32, 1)
    assert torch.equal(ops.gather_mm(wide, plan, rowmajor, b), want)


@pytest.mark.parametrize("capacity", [None, 3], ids=["all-kept", "capacity"])
def test_gather_mm_gradcheck(capacity):
    x, plan, w, b = make_case(9, 5, 4, 3, 2, capacity)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.gather_mm(x, plan, w, b), leaves)


def _permute_calls(fn) -> int:
    return op_calls(fn)[1]["smoe::permute"]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gather_min_bytes_permutes_inside_the_op_up_to_it(bias):
    """gather_min_bytes > 0: grouped rows [M, d_in] of at most that many bytes are permuted
    inside the op, then grouped_mm's items run; one byte less, the gathering items. The same bits
    and the same gradients either way (the backward does not depend on it)."""
    x, plan, w, b = make_case(40, 16, 12, 4, 2, 3, bias=bias, dtype=torch.float32)
    rows = plan.token.shape[0] * x.shape[1] * 4

    def leaves():
        return [t.detach().requires_grad_() for t in (x, w, b) if t is not None]

    def op(limit, x, w, b=None):
        return ops.gather_mm(x, plan, w, b, gather_min_bytes=limit)

    with torch.no_grad():
        assert _permute_calls(lambda: op(rows, x, w, b)) == 1
        assert _permute_calls(lambda: op(rows - 1, x, w, b)) == 0
        assert _permute_calls(lambda: op(0, x, w, b)) == 0  # 0: always gathers
    g = torch.randn(plan.token.shape[0], w.shape[2], generator=torch.Generator().manual_seed(5))
    a, c = leaves(), leaves()
    want, got = op(0, *a), op(rows, *c)
    assert torch.equal(got, want)
    for u, v in zip(torch.autograd.grad(got, c, g), torch.autograd.grad(want, a, g)):
        assert torch.equal(u, v)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # rows weigh 2 bytes as run
        assert _permute_calls(lambda: op(rows // 2, x, w, b)) == 1
        assert _permute_calls(lambda: op(rows // 2 - 1, x, w, b)) == 0


@pytest.mark.parametrize("T,d_in,d_out,E,k,capacity", SHAPES)
def test_gather_min_bytes_permute_path_over_the_shape_table(T, d_in, d_out, E, k, capacity):
    x, plan, w, b = make_case(T, d_in, d_out, E, k, capacity)
    x = noncontig(x) if T else x  # an empty x has no strides to vary
    got = ops.gather_mm(x, plan, w, b, gather_min_bytes=1 << 40)
    assert torch.equal(got, unfused(x, plan, w, b))


@pytest.mark.parametrize("gather_min_bytes", [0, 1 << 30], ids=["gather", "permute"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gather_mm_opcheck(bias, requires_grad, gather_min_bytes):
    x, plan, w, b = make_case(11, 6, 5, 3, 2, 4, bias=bias)
    args = [x, plan.token, plan.row, w, plan.offsets, b, gather_min_bytes]
    if requires_grad:
        for i in (0, 3, 5):
            if args[i] is not None:
                args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(torch.ops.smoe.gather_mm.default, tuple(args))


@pytest.mark.parametrize("need_x,need_w", [(True, True), (True, False), (False, True)])
def test_gather_mm_backward_opcheck(need_x, need_w):
    x, plan, w, _ = make_case(11, 6, 5, 3, 2, 4)
    g = torch.randn(plan.token.shape[0], 5, dtype=x.dtype)
    args = (g, x, plan.token, plan.row, w, plan.offsets, need_x, need_w)
    torch.library.opcheck(torch.ops.smoe.gather_mm_backward.default, args)
    gx, gw = torch.ops.smoe.gather_mm_backward.default(*args)
    assert gx.shape == (x.shape if need_x else (0,))
    assert gw.shape == (w.shape if need_w else (0,))


def test_gather_mm_compiles_without_graph_breaks():
    x, plan, w, b = make_case(20, 8, 6, 4, 2, None, dtype=torch.float32)
    x = x.requires_grad_()

    def f(x):
        return ops.gather_mm(x, plan, w, b).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, c = compiled(x), f(x)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(c, x)[0])


def test_gather_mm_is_deterministic_across_threads_and_reruns():
    x, plan, w, b = make_case(900, 64, 300, 4, 2, None, dtype=torch.float32)
    g = torch.randn(plan.token.shape[0], 300)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            out = ops.gather_mm(leaves[0], plan, leaves[1], leaves[2])
            out.backward(g)
            runs.append([out, *(t.grad for t in leaves)])
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], run))


def test_gather_mm_autocast_runs_in_bf16():
    x, plan, w, b = make_case(30, 16, 8, 4, 2, None, dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        out = ops.gather_mm(x, plan, w, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ops.gather_mm(x.bfloat16(), plan, w.bfloat16(), b.bfloat16()))


def test_experts_training_step_gathers_and_keeps_no_grouped_rows():
    """Past the size rule a training step's first GEMM is one gather_mm: the autograd graph keeps
    no [M, d] grouped rows, and output and gradients equal the unfused chain's bitwise."""
    torch.manual_seed(0)
    T, d, E, k = 2304, 64, 8, 8  # grouped rows 2304 * 8 * 64 * 4 B = 4.5 MiB: past the rule
    experts = Experts(E, d, 48, activation="swiglu")  # hidden [M, 96], never [M, d]
    x = torch.randn(T, d, requires_grad=True)
    plan = ops.make_plan(torch.rand(T, E).topk(k, dim=-1).indices.int(), E)
    assert T * k * d * 4 > ops.experts.FUSE_MIN_BYTES
    saved = []
    keep = lambda t: saved.append(t.shape) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = experts(x, plan.offsets, plan=plan)
    assert (T * k, d) not in saved and (T, d) in saved
    y.square().sum().backward()
    grads = [x.grad] + [p.grad for p in experts.parameters()]

    x2 = x.detach().clone().requires_grad_()
    experts.zero_grad()
    y2 = experts(ops.permute(x2, plan), plan.offsets)  # the grouped rows, unfused
    y2.square().sum().backward()
    assert torch.equal(y, y2)
    for a, c in zip(grads, [x2.grad] + [p.grad for p in experts.parameters()]):
        assert torch.equal(a, c)


def test_experts_small_training_step_keeps_permute():
    experts = Experts(4, 8, 6)
    x = torch.randn(10, 8, requires_grad=True)
    plan = ops.make_plan(torch.rand(10, 4).topk(2, dim=-1).indices.int(), 4)
    _, calls = op_calls(lambda: experts(x, plan.offsets, plan=plan))
    assert calls["smoe::permute"] and not calls["smoe::gather_mm"]


def test_size_rules_count_the_dtype_the_ops_run_in_under_autocast():
    """Under torch.autocast the GEMM ops run in bf16, so the 4 MiB rules of gather_mm and
    expert_mlp weigh the rows at 2 bytes, not at float32's 4: rows of 6 MiB in float32 are 3 MiB
    as run, and take the unfused paths; float64 is never cast, so it keeps its own size."""
    from smoe.experts import gathers

    T, d, E, k = 3072, 64, 8, 8  # grouped rows 3072 * 8 * 64: 6 MiB fp32, 3 MiB bf16
    x = torch.randn(T, d)
    plan = ops.make_plan(torch.rand(T, E).topk(k, dim=-1).indices.int(), E)
    w_in = torch.empty(E, d, d)  # hidden [M, d]: the same sizes for expert_mlp's rule
    assert gathers(x, plan) and ops.experts.fuses(x, w_in, plan)
    with torch.autocast("cpu", torch.bfloat16):
        assert ops.experts.run_itemsize(x) == 2
        assert not gathers(x, plan) and not ops.experts.fuses(x, w_in, plan)
        assert gathers(x.double(), plan) and ops.experts.run_itemsize(x.double()) == 8
        assert ops.experts.run_itemsize(plan.token) == 4  # not floating: never cast
    with torch.autocast("cpu", torch.bfloat16, enabled=False):
        assert gathers(x, plan)


def test_gather_mm_rejects_bad_input():
    x, plan, w, b = make_case(10, 8, 6, 4, 2, None, dtype=torch.float32)
    op = torch.ops.smoe.gather_mm.default
    good = [x, plan.token, plan.row, w, plan.offsets, b]

    def bad(i, value, match):
        args = list(good)
        args[i] = value
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    bad(0, x.long(), "gather_mm: x must be float32")
    bad(0, x[None], "gather_mm: x must be 2-D")
    bad(0, x[:7], r"x \(T = row.size\(0\)\) must have 10 rows, got 7")
    bad(1, plan.token.long(), "token must be a 1-D int32 tensor")
    bad(2, plan.row[:, 0], "row must be a 2-D int32 tensor")
    bad(3, w.double(), "w must have x's dtype Float, got Double")
    bad(3, w[0], "w must be 3-D")
    bad(3, w[:, :5], r"w must be \[E, d_in, d_out\] with d_in = 8")
    bad(4, plan.offsets[:-1], r"offsets must have E \+ 1 = 5 entries")
    bad(4, plan.offsets.int(), "offsets must be a 1-D int64 tensor")
    bad(4, torch.tensor([0, 5, 3, 20, 20]), "offsets must be non-decreasing")
    bad(4, torch.tensor([0, 5, 9, 20, 21]), r"offsets\[E\] \(rows in use\) must be <= token")
    bad(5, b[:, :3], r"bias must be \[E, d_out\] = \[4, 6\], got shape \[4, 3\]")
    bad(5, b.double(), "bias must have w's dtype Float, got Double")
    bad(1, torch.full_like(plan.token, 99), r"token entry 0 is 99, outside \[-1, T = 10\)")


def test_gather_mm_backward_rejects_bad_grad():
    x, plan, w, _ = make_case(10, 8, 6, 4, 2, None, dtype=torch.float32)
    op = torch.ops.smoe.gather_mm_backward.default
    g = torch.randn(plan.token.shape[0], 6)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[M, d_out\] = \[20, 6\]"):
        op(g[:, :5], x, plan.token, plan.row, w, plan.offsets, True, True)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[M, d_out\]"):
        op(g.double(), x, plan.token, plan.row, w, plan.offsets, True, True)
    with pytest.raises(RuntimeError, match=r"row entry 0 is 99"):
        op(g, x, plan.token, torch.full_like(plan.row, 99), w, plan.offsets, True, False)
    with pytest.raises(RuntimeError, match="gather_mm_backward: token entry 0 is -7"):
        op(g, x, torch.full_like(plan.token, -7), plan.row, w, plan.offsets, False, True)


def test_gather_mm_refuses_double_backward():
    x, plan, w, b = make_case(6, 4, 3, 2, 2, None)
    x = x.requires_grad_()
    out = ops.gather_mm(x, plan, w.requires_grad_(), b)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gather_mm: double backward is not supported"):
        gx.sum().backward()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("T,d_in,d_out,E,k,capacity", SHAPES)
def test_gather_mm_cuda_matches_cpu(T, d_in, d_out, E, k, capacity, dtype):
    x, plan, w, b = make_case(T, d_in, d_out, E, k, capacity, dtype=dtype)
    g = torch.randn(plan.token.shape[0], d_out).to(dtype)
    cpu = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    cu = [t.detach().cuda().requires_grad_() for t in (x, w, b)]
    plan_cu = ops.Plan(*(t.cuda() for t in plan))
    want = ops.gather_mm(cpu[0], plan, cpu[1], cpu[2])
    got = ops.gather_mm(cu[0], plan_cu, cu[1], cu[2])
    want.backward(g)
    got.backward(g.cuda())
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, c in zip([got, *(t.grad for t in cu)], [want, *(t.grad for t in cpu)]):
        torch.testing.assert_close(a.cpu(), c, atol=tol, rtol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("gather_min_bytes", [0, 1 << 30], ids=["gather", "permute"])
def test_gather_mm_cuda_runs_its_chain_whatever_gather_min_bytes_says(gather_min_bytes):
    x, plan, w, b = make_case(300, 32, 24, 4, 2, None, dtype=torch.float32)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    plan_cu = ops.Plan(*(t.cuda() for t in plan))
    got = ops.gather_mm(x, plan_cu, w, b, gather_min_bytes=gather_min_bytes)
    assert torch.equal(got, unfused(x, plan_cu, w, b))
    with pytest.raises(RuntimeError, match="gather_min_bytes must be >= 0"):
        ops.gather_mm(x, plan_cu, w, b, gather_min_bytes=-1)
