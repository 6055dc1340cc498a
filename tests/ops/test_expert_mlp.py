"""smoe::expert_mlp: each expert's whole MLP per row block, against the float64 reference and the
unfused chain (permute -> grouped_mm -> activation -> grouped_mm) it replaces."""

from __future__ import annotations

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
    op_calls,
)

ACTS = ops.MLP_ACTIVATIONS

# (T, d, d_ff, E, k, capacity): 0 tokens, 1 expert, k = E, empty experts (T*k < E), capacity
# padding (token -1 rows inside groups), and enough rows for several row blocks per expert.
SHAPES = [
    pytest.param(0, 8, 6, 4, 2, None, id="T0"),
    pytest.param(5, 8, 6, 1, 1, None, id="E1"),
    pytest.param(6, 8, 6, 3, 3, None, id="k=E"),
    pytest.param(2, 8, 6, 9, 2, None, id="empty-experts"),
    pytest.param(13, 8, 6, 4, 2, 3, id="capacity"),
    pytest.param(40, 16, 12, 4, 2, None, id="T40"),
    pytest.param(700, 64, 128, 2, 2, None, id="T700-multiblock"),  # 2-3 row blocks per expert
]


def make_case(T, d, d_ff, E, k, capacity, act, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = 2 * d_ff if act == "swiglu" else d_ff
    x = torch.randn(T, d, generator=g).to(dtype)
    scores = torch.rand(T, E, generator=g)
    expert = scores.topk(k, dim=-1).indices.int()
    plan = ops.make_plan(expert, E, capacity=capacity)
    # weights stored [E, out, in] like Experts, handed over as transposed views
    w_in = (torch.randn(E, n_in, d, generator=g) / d**0.5).to(dtype).transpose(1, 2)
    w_out = (torch.randn(E, d, d_ff, generator=g) / d_ff**0.5).to(dtype).transpose(1, 2)
    b_in = torch.randn(E, n_in, generator=g).to(dtype) if bias else None
    b_out = torch.randn(E, d, generator=g).to(dtype) if bias else None
    return x, plan, w_in, w_out, b_in, b_out


def unfused(x, plan, w_in, w_out, b_in, b_out, act):
    """The chain the op replaces: permute -> grouped_mm -> activation -> grouped_mm."""
    kw = dict(b_in=b_in, b_out=b_out, activation=act, plan=plan, fused=False)
    return ops.expert_mlp(x, plan.offsets, w_in, w_out, **kw)


def call(x, plan, w_in, w_out, b_in, b_out, act, *, gather=True):
    """The op, through the plan (gather) or on the rows permute grouped."""
    rows, p = (x, plan) if gather else (ops.permute(x, plan), None)
    kw = dict(b_in=b_in, b_out=b_out, activation=act, plan=p, fused=True)
    return ops.expert_mlp(rows, plan.offsets, w_in, w_out, **kw)


@pytest.mark.parametrize("gather", [True, False], ids=["plan", "grouped"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("T,d,d_ff,E,k,capacity", SHAPES)
def test_expert_mlp_matches_reference(T, d, d_ff, E, k, capacity, act, bias, gather):
    x, plan, w_in, w_out, b_in, b_out = make_case(T, d, d_ff, E, k, capacity, act, bias)
    got = call(x, plan, w_in, w_out, b_in, b_out, act, gather=gather)
    want = ref.expert_mlp(
        x, plan.offsets, w_in, w_out, b_in=b_in, b_out=b_out, activation=act, plan=plan
    )
    assert got.shape == (plan.token.shape[0], d)
    assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_expert_mlp_dtypes_match_reference_and_the_unfused_chain(act, dtype):
    x, plan, w_in, w_out, b_in, b_out = make_case(300, 32, 24, 4, 2, None, act, True, dtype)
    got = call(x, plan, w_in, w_out, b_in, b_out, act)
    assert got.dtype == dtype
    want = ref.expert_mlp(
        x, plan.offsets, w_in, w_out, b_in=b_in, b_out=b_out, activation=act, plan=plan
    )
    chain = unfused(x, plan, w_in, w_out, b_in, b_out, act)
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_close(got, want.double(), chain)
    else:
        assert_close(got, want, dtype)
        assert_close(got, chain, dtype)


def test_expert_mlp_rows_past_offsets_are_zero():
    x, plan, w_in, w_out, b_in, b_out = make_case(13, 8, 6, 4, 2, 3, "gelu", True)
    used = int(plan.offsets[-1])
    assert used < plan.token.shape[0]  # capacity dropped some slots: padding rows at the end
    fused = call(x, plan, w_in, w_out, b_in, b_out, "gelu")
    assert torch.all(fused[used:] == 0)
    grouped = torch.cat([ops.permute(x, plan), torch.randn(5, 8, dtype=x.dtype)])
    out = ops.expert_mlp(
        grouped, plan.offsets, w_in, w_out, b_in=b_in, b_out=b_out, activation="gelu", fused=True
    )
    assert out.shape[0] == plan.token.shape[0] + 5
    assert torch.all(out[used:] == 0)
    assert torch.equal(fused[:used], out[:used])


def _ran_the_op(fn) -> bool:
    return op_calls(fn)[1]["smoe::expert_mlp"] > 0


@pytest.mark.parametrize("T,fuses", [(40, False), (1200, True)])
def test_expert_mlp_fuses_by_default_only_past_the_size_rule(T, fuses):
    x, plan, w_in, w_out, b_in, b_out = make_case(
        T, 64, 512, 4, 2, None, "swiglu", False, torch.float32
    )
    assert (T * 2 * 1024 * 4 > ops.experts.FUSE_MIN_BYTES) == fuses
    run = lambda: ops.expert_mlp(x, plan.offsets, w_in, w_out, plan=plan)  # noqa: E731
    assert _ran_the_op(run) == fuses
    assert not _ran_the_op(
        lambda: ops.expert_mlp(x, plan.offsets, w_in, w_out, plan=plan, fused=False)
    )
    torch.testing.assert_close(run(), unfused(x, plan, w_in, w_out, None, None, "swiglu"))


def test_expert_mlp_noncontiguous_inputs():
    x, plan, w_in, w_out, b_in, b_out = make_case(50, 16, 12, 4, 2, None, "swiglu", True)
    want = call(x, plan, w_in, w_out, b_in, b_out, "swiglu")
    w_in_c, w_out_c = w_in.contiguous(), w_out.contiguous()  # [E, in, out] row-major, too
    got = call(noncontig(x), plan, w_in_c, w_out_c, noncontig(b_in), noncontig(b_out), "swiglu")
    assert_close(got, want)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gather", [True, False], ids=["plan", "grouped"])
def test_expert_mlp_gradcheck(act, gather):
    x, plan, w_in, w_out, b_in, b_out = make_case(9, 5, 4, 3, 2, None, act, True)
    if act == "relu":  # keep the hidden away from the kink, where finite differences lie
        b_in = b_in + torch.sign(b_in) * 2
    leaves = [t.detach().requires_grad_() for t in (x, w_in, w_out, b_in, b_out)]

    def f(x, w_in, w_out, b_in, b_out):
        return call(x, plan, w_in, w_out, b_in, b_out, act, gather=gather)

    assert torch.autograd.gradcheck(f, leaves)


def test_expert_mlp_gradients_match_the_unfused_chain():
    x, plan, w_in, w_out, b_in, b_out = make_case(
        60, 12, 8, 4, 2, 20, "swiglu", True, torch.float32
    )
    g = torch.randn(plan.token.shape[0], 12)
    a = [t.detach().requires_grad_() for t in (x, w_in, w_out, b_in, b_out)]
    b = [t.detach().requires_grad_() for t in (x, w_in, w_out, b_in, b_out)]
    ga = torch.autograd.grad(call(a[0], plan, a[1], a[2], a[3], a[4], "swiglu"), a, g)
    gb = torch.autograd.grad(unfused(b[0], plan, b[1], b[2], b[3], b[4], "swiglu"), b, g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def _nested_grouped_mm_calls(fn) -> int:
    """How many smoe::grouped_mm calls fn made (the chain inside the op makes two)."""
    return op_calls(fn)[1]["smoe::grouped_mm"]


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("gather", [True, False], ids=["plan", "grouped"])
def test_fuse_min_bytes_runs_the_chain_inside_the_op_up_to_it(gather, act):
    """fuse_min_bytes > 0: a hidden [M, n_in] of at most that many bytes runs the unfused chain
    inside the op (bitwise the chain's result and gradients), one byte less the fused items."""
    x, plan, w_in, w_out, b_in, b_out = make_case(40, 16, 12, 4, 2, 3, act, True, torch.float32)
    rows = x if gather else ops.permute(x, plan)
    token, row = (plan.token, plan.row) if gather else (None, None)
    hidden = plan.token.shape[0] * w_in.shape[2] * 4
    params = [t.detach().requires_grad_() for t in (rows, w_in, b_in, w_out, b_out)]

    def op(limit):
        r, wi, bi, wo, bo = params
        return torch.ops.smoe.expert_mlp.default(r, token, row, plan.offsets, wi, bi, wo, bo, act,
                                                 limit)  # fmt: skip

    g = torch.randn(plan.token.shape[0], w_out.shape[2], generator=torch.Generator().manual_seed(3))
    chain_p = [t.detach().requires_grad_() for t in params]
    p = plan if gather else None
    want = ops.expert_mlp(chain_p[0], plan.offsets, chain_p[1], chain_p[3], b_in=chain_p[2],
                          b_out=chain_p[4], activation=act, plan=p, fused=False)  # fmt: skip
    want_grads = torch.autograd.grad(want, chain_p, g)
    fused = op(0).detach()
    with torch.no_grad():
        assert _nested_grouped_mm_calls(lambda: op(hidden)) == 2
        assert _nested_grouped_mm_calls(lambda: op(hidden - 1)) == 0
        assert _nested_grouped_mm_calls(lambda: op(0)) == 0  # 0: always fused
        assert torch.equal(op(hidden - 1), fused)
    got = op(hidden)
    assert torch.equal(got, want)
    for u, v in zip(torch.autograd.grad(got, params, g), want_grads):
        assert torch.equal(u, v)


@pytest.mark.parametrize("T,d,d_ff,E,k,capacity", SHAPES)
def test_fuse_min_bytes_chain_is_the_unfused_chain_over_the_shape_table(T, d, d_ff, E, k, capacity):
    x, plan, w_in, w_out, b_in, b_out = make_case(T, d, d_ff, E, k, capacity, "swiglu", True)
    x = noncontig(x) if T else x  # an empty x has no strides to vary
    got = torch.ops.smoe.expert_mlp.default(x, plan.token, plan.row, plan.offsets, w_in, b_in,
                                            w_out, b_out, "swiglu", 1 << 40)  # fmt: skip
    assert torch.equal(got, unfused(x, plan, w_in, w_out, b_in, b_out, "swiglu"))


def test_fuse_min_bytes_under_autocast_counts_the_autocast_dtype():
    """Under torch.autocast the op runs in bf16: the rule counts 2 bytes per hidden entry."""
    x, plan, w_in, w_out, _, _ = make_case(40, 16, 12, 4, 2, None, "swiglu", False, torch.float32)
    hidden_bf16 = plan.token.shape[0] * w_in.shape[2] * 2

    def op(limit):
        return torch.ops.smoe.expert_mlp.default(x, plan.token, plan.row, plan.offsets, w_in, None,
                                                 w_out, None, "swiglu", limit)  # fmt: skip

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert op(hidden_bf16).dtype == torch.bfloat16
        assert _nested_grouped_mm_calls(lambda: op(hidden_bf16)) == 2
        assert _nested_grouped_mm_calls(lambda: op(hidden_bf16 - 1)) == 0


@pytest.mark.parametrize("fuse_min_bytes", [0, 1 << 30], ids=["fused", "chain"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("gather", [True, False], ids=["plan", "grouped"])
def test_expert_mlp_opcheck(gather, requires_grad, fuse_min_bytes):
    x, plan, w_in, w_out, b_in, b_out = make_case(11, 6, 4, 3, 2, None, "swiglu", True)
    if not gather:
        x = ops.permute(x, plan)
    args = [x, plan.token if gather else None, plan.row if gather else None, plan.offsets]
    args += [w_in, b_in, w_out, b_out, "swiglu", fuse_min_bytes]
    if requires_grad:
        for i in (0, 4, 5, 6, 7):
            args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(torch.ops.smoe.expert_mlp.default, tuple(args))


def test_expert_mlp_compiles_without_graph_breaks():
    x, plan, w_in, w_out, b_in, b_out = make_case(
        20, 8, 6, 4, 2, None, "swiglu", False, torch.float32
    )
    x = x.requires_grad_()

    def f(x):
        return call(x, plan, w_in, w_out, None, None, "swiglu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = compiled(x), f(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


def test_expert_mlp_is_deterministic_across_threads():
    x, plan, w_in, w_out, b_in, b_out = make_case(
        900, 64, 48, 4, 2, None, "swiglu", True, torch.float32
    )
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            outs.append(call(x, plan, w_in, w_out, b_in, b_out, "swiglu"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_expert_mlp_autocast_runs_in_bf16():
    x, plan, w_in, w_out, b_in, b_out = make_case(
        30, 16, 8, 4, 2, None, "swiglu", True, torch.float32
    )
    with torch.autocast("cpu", torch.bfloat16):
        out = call(x, plan, w_in, w_out, b_in, b_out, "swiglu")
    assert out.dtype == torch.bfloat16
    bf = [t.bfloat16() for t in (x, w_in, w_out, b_in, b_out)]
    assert torch.equal(out, call(bf[0], plan, bf[1], bf[2], bf[3], bf[4], "swiglu"))


def test_expert_mlp_rejects_bad_input():
    x, plan, w_in, w_out, b_in, b_out = make_case(
        10, 8, 6, 4, 2, None, "swiglu", True, torch.float32
    )
    op = torch.ops.smoe.expert_mlp.default
    good = [x, plan.token, plan.row, plan.offsets, w_in, b_in, w_out, b_out, "swiglu"]

    def bad(i, value, match):
        args = list(good)
        args[i] = value
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    with pytest.raises(ValueError, match="activation must be one of"):
        ops.expert_mlp(x, plan.offsets, w_in, w_out, activation="silu", plan=plan)
    bad(8, "silu", "activation must be one of")
    bad(8, "gelu", r"w_in must have d_ff = 6 output columns for activation 'gelu'")
    bad(0, x.long(), "x must be float32")
    bad(0, x[None], "x must be 2-D")
    bad(4, w_in.double(), "w_in must have x's dtype")
    bad(6, w_out[0], "w_out must be 3-D")
    bad(4, w_in[:, :5], r"w_in must be \[E, d, n_in\] with d = 8")
    bad(6, w_out[:3], "w_out must have E = 4 experts")
    bad(3, plan.offsets[:-1], "offsets must have E \\+ 1 = 5 entries")
    bad(3, plan.offsets.int(), "offsets must be a 1-D int64 tensor")
    bad(2, None, "token and row come together")
    bad(1, plan.token.long(), "token must be a 1-D int32 tensor")
    bad(5, b_in[:, :3], r"b_in must be \[E, n_in\] = \[4, 12\], got shape \[4, 3\]")
    bad(7, b_out.double(), "b_out must have w_out's dtype Float, got Double")
    bad(1, torch.full_like(plan.token, 99), r"token entry 0 is 99, outside \[-1, T = 10\)")
    bad(3, torch.tensor([0, 5, 3, 20, 20]), "offsets must be non-decreasing")
    bad(
        3,
        torch.tensor([0, 5, 9, 20, 21]),
        r"offsets\[E\] \(rows in use\) must be <= token.size\(0\) = 20",
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_expert_mlp_cuda_matches_cpu(act, dtype):
    x, plan, w_in, w_out, b_in, b_out = make_case(300, 32, 24, 4, 2, 200, act, True, dtype)
    want = call(x, plan, w_in, w_out, b_in, b_out, act)
    cu = [t.cuda() for t in (x, w_in, w_out, b_in, b_out)]
    plan_cu = ops.Plan(*(t.cuda() for t in plan))
    got = call(cu[0], plan_cu, cu[1], cu[2], cu[3], cu[4], act)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("fuse_min_bytes", [0, 1 << 30], ids=["fused", "chain"])
def test_expert_mlp_cuda_runs_its_chain_whatever_fuse_min_bytes_says(fuse_min_bytes):
    x, plan, w_in, w_out, b_in, b_out = make_case(
        300, 32, 24, 4, 2, None, "swiglu", True, torch.float32
    )
    p = ops.Plan(*(t.cuda() for t in plan))
    xc, wi, wo, bi, bo = (t.cuda() for t in (x, w_in, w_out, b_in, b_out))
    args = (xc, p.token, p.row, p.offsets, wi, bi, wo, bo, "swiglu")
    got = torch.ops.smoe.expert_mlp.default(*args, fuse_min_bytes)
    assert torch.equal(got, unfused(xc, p, wi, wo, bi, bo, "swiglu"))
    with pytest.raises(RuntimeError, match="fuse_min_bytes must be >= 0"):
        torch.ops.smoe.expert_mlp.default(*args, -1)
