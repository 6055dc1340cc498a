"""Fuzz of gather_mm against the float64 reference (values), and bitwise against the unfused
permute -> grouped_mm it replaces (values and every gradient, through both directions' ops), a
bitwise rerun, and fake vs real metadata of the op and its backward."""

import pytest
import torch
from hypothesis import given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_bitwise_equal,
    assert_fake_matches,
    assert_rerun_equal,
    assert_values,
)
from tests.fuzz.strategies import build_weight
from tests.fuzz.strategies_experts import gather_mm_cases
from tests.fuzz.values import Values, dtype_of, fuzz_settings, laid_out, materialize, product_large

pytestmark = pytest.mark.fuzz


@fuzz_settings()
@given(case=gather_mm_cases)
def test_gather_mm_fuzz(case):
    dt, E, k = dtype_of(case.dtype), case.E, case.k
    g = torch.Generator().manual_seed(case.x.seed)
    if case.skew == "one":
        expert = torch.arange(k, dtype=torch.int32).expand(case.T, k).contiguous()
    else:
        expert = torch.rand(case.T, E, generator=g).argsort(dim=-1)[:, :k].int().contiguous()
    plan = ops.make_plan(expert, E, capacity=case.capacity)
    large = product_large(dt)
    x = laid_out(materialize(case.x, (case.T, case.d_in), dt, large), case.x_layout)
    w = build_weight(E, case.d_in, case.d_out, dt, case.w_layout, case.w)
    b = None
    if case.bias:
        b = materialize(case.w._replace(seed=case.w.seed + 1), (E, case.d_out), dt, large)

    def run(x=x, w=w, b=b):
        return ops.gather_mm(x, plan, w, b)

    def chain(x=x, w=w, b=b):
        return ops.grouped_mm(ops.permute(x, plan), w, plan.offsets, b)

    got = run()
    assert got.dtype == dt and got.shape == (plan.token.shape[0], case.d_out)
    assert_bitwise_equal(got, chain())
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = ref.gather_mm(x.double(), plan, w.double(), wide(b))
    absb = None if b is None else b.double().abs()
    scale = ref.gather_mm(x.double().abs(), plan, w.double().abs(), absb)
    assert_values(got, ref64, ref.gather_mm(x, plan, w, b), scale=scale)
    assert_rerun_equal(run, got)
    op_args = (x, plan.token, plan.row, w, plan.offsets, b)
    assert_fake_matches(torch.ops.smoe.gather_mm.default, op_args, {}, got)

    # gradients: bitwise those of the chain, for every subset the backward op is asked for
    upstream = materialize(Values(case.x.seed + 7), tuple(got.shape), dt, 1.0)
    inputs = (x, w) if b is None else (x, w, b)
    mine = [t.detach().requires_grad_() for t in inputs]
    theirs = [t.detach().requires_grad_() for t in inputs]
    assert_bitwise_equal(
        torch.autograd.grad(run(*mine), mine, upstream),
        torch.autograd.grad(chain(*theirs), theirs, upstream),
    )
    backward = torch.ops.smoe.gather_mm_backward.default
    for need in [(True, True), (True, False), (False, True)]:
        args = (upstream, x, plan.token, plan.row, w, plan.offsets, *need)
        grad = backward(*args)
        assert_rerun_equal(lambda args=args: backward(*args), grad)
        assert_fake_matches(backward, args, {}, grad)
