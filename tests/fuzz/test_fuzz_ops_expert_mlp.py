"""Fuzz of expert_mlp against the float64 reference (values), the unfused chain permute ->
grouped_mm -> activation -> grouped_mm (``expert_mlp(fused=False)``: values in the same dtype;
gradients bitwise, since the op's backward recomputes through that chain), a bitwise rerun, and
fake vs real metadata."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import assert_fake_matches, assert_rerun_equal, assert_values
from tests.fuzz.strategies import build_weight
from tests.fuzz.strategies_experts import ExpertMLPCase, expert_mlp_cases
from tests.fuzz.values import Values, dtype_of, fuzz_settings, laid_out, materialize

pytestmark = pytest.mark.fuzz


def _abs_activation(name: str, h: torch.Tensor) -> torch.Tensor:
    """A bound on |act| and on how much it amplifies h's rounding: (|gate| + 1) |up| for SwiGLU,
    |h| + 1 for the others (their slopes are at most ~1.13)."""
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return (gate.abs() + 1) * up.abs()
    return h.abs() + 1


_BIG = Values(seed=0, scale=10.0, grid=False, specials=(), density=0.0, dup_rows=False)


@fuzz_settings()
@given(case=expert_mlp_cases)
# a draw whose fp16 values overflow (-inf, and NaN from inf) in the op and in the unfused fp16
# chain alike, where the float64 reference is finite (found by a 400-example run)
@example(
    case=ExpertMLPCase(
        T=3, E=1, k=1, skew="spread", capacity=None, gather=False, pad=0, d=1, d_ff=12,
        activation="swiglu", bias=False, dtype="float16", x_layout="contiguous",
        w_layout="contiguous", x=_BIG, w=_BIG,
    )
)  # fmt: skip
def test_expert_mlp_fuzz(case):
    dt, E, k = dtype_of(case.dtype), case.E, case.k
    n_in = 2 * case.d_ff if case.activation == "swiglu" else case.d_ff
    g = torch.Generator().manual_seed(case.x.seed)
    if case.skew == "one":
        expert = torch.arange(k, dtype=torch.int32).expand(case.T, k).contiguous()
    else:
        expert = torch.rand(case.T, E, generator=g).argsort(dim=-1)[:, :k].int().contiguous()
    plan = ops.make_plan(expert, E, capacity=case.capacity)
    x = laid_out(materialize(case.x, (case.T, case.d), dt, 1.0), case.x_layout)
    w_in = build_weight(E, case.d, n_in, dt, case.w_layout, case.w)
    w_out = build_weight(
        E, case.d_ff, case.d, dt, case.w_layout, case.w._replace(seed=case.w.seed + 1)
    )
    b_in = b_out = None
    if case.bias:
        b_in = materialize(case.w._replace(seed=case.w.seed + 2), (E, n_in), dt, 1.0)
        b_out = materialize(case.w._replace(seed=case.w.seed + 3), (E, case.d), dt, 1.0)
    rows = ops.permute(x, plan)
    if not case.gather and case.pad:
        rows = torch.cat([rows, materialize(Values(case.x.seed + 5), (case.pad, case.d), dt, 1.0)])
    args = (x, plan) if case.gather else (rows, None)

    def mlp(x, w_in, w_out, b_in, b_out, plan_or_none, fused):
        kw = dict(b_in=b_in, b_out=b_out, activation=case.activation, fused=fused)
        return ops.expert_mlp(x, plan.offsets, w_in, w_out, plan=plan_or_none, **kw)

    def run(x=args[0], w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out):
        return mlp(x, w_in, w_out, b_in, b_out, args[1], True)

    def chain(x=rows, w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out):
        """The unfused chain on the grouped rows: grouped_mm -> activation -> grouped_mm."""
        return mlp(x, w_in, w_out, b_in, b_out, None, False)

    got = run()
    assert got.dtype == dt and got.shape == (rows.shape[0], case.d)
    used = int(plan.offsets[-1])
    assert torch.all(got[used:] == 0)
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = ref.expert_mlp(
        rows.double(),
        plan.offsets,
        w_in.double(),
        w_out.double(),
        b_in=wide(b_in),
        b_out=wide(b_out),
        activation=case.activation,
    )
    # the rounding of a sum of products scales with the sum of their magnitudes, twice over
    h_abs = ref.grouped_mm(
        rows.double().abs(),
        w_in.double().abs(),
        plan.offsets,
        None if b_in is None else b_in.double().abs(),
    )
    scale = ref.grouped_mm(
        _abs_activation(case.activation, h_abs),
        w_out.double().abs(),
        plan.offsets,
        None if b_out is None else b_out.double().abs(),
    )
    assert_values(got, ref64, chain(), scale=scale)
    assert_rerun_equal(run, got)
    token, row = (plan.token, plan.row) if case.gather else (None, None)
    op_args = (args[0], token, row, plan.offsets, w_in, b_in, w_out, b_out, case.activation)
    assert_fake_matches(torch.ops.smoe.expert_mlp.default, op_args, {}, got)

    # gradients: bitwise those of the unfused chain (the backward recomputes through it)
    upstream = materialize(Values(case.x.seed + 7), tuple(got.shape), dt, 1.0)
    leaves = [t.detach().requires_grad_() for t in (args[0], w_in, w_out)]
    chain_leaves = [t.detach().requires_grad_() for t in (x, w_in, w_out)]
    if case.bias:
        leaves += [b_in.detach().requires_grad_(), b_out.detach().requires_grad_()]
        chain_leaves += [b_in.detach().requires_grad_(), b_out.detach().requires_grad_()]
    mine = torch.autograd.grad(run(*leaves), leaves, upstream)

    def chain_from_x(x, *weights):
        return chain(ops.permute(x, plan) if case.gather else x, *weights)

    if not case.gather:
        chain_leaves[0] = rows.detach().requires_grad_()
    theirs = torch.autograd.grad(chain_from_x(*chain_leaves), chain_leaves, upstream)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        assert bool(same.all()), f"gradient {i} differs from the unfused chain's"
