"""Fuzz of the dispatch ops (make_plan, permute, combine) and their backwards against
smoe.reference: index outputs exact, values by STYLE.md's rule, gradients, a bitwise rerun, fake vs
real metadata."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_bitwise_equal,
    assert_fake_matches,
    assert_grads,
    assert_index_equal,
    assert_rerun_equal,
    assert_values,
)
from tests.fuzz.strategies import (
    MakePlanCase,
    Priority,
    Routes,
    Values,
    build_expert,
    build_plan,
    build_priority,
    combine_cases,
    dtype_of,
    laid_out,
    make_plan_cases,
    materialize,
    permute_cases,
    product_large,
)
from tests.fuzz.values import fuzz_settings

pytestmark = pytest.mark.fuzz


def upstream(seed: int, shape, dtype: torch.dtype) -> torch.Tensor:
    return materialize(Values(seed + 1), shape, dtype, 1.0)


@fuzz_settings()
@given(case=make_plan_cases)
# Found by the fuzz: float64 priorities were rounded to float32, so 0 and a subnormal (or 1e300
# and 1e301) tied and the lower token kept its place (fixed: csrc/checks.h priority_as_float).
@example(
    case=MakePlanCase(
        T=2,
        E=1,
        k=1,
        capacity=1,
        group_size=None,
        routes=Routes(0, pattern="one"),
        priority=Priority(
            "token", "float64", Values(2, specials=("zero", "subnormal"), density=1.0)
        ),
    )
)
def test_make_plan_fuzz(case):
    expert = laid_out(build_expert(case.T, case.E, case.k, case.routes), case.layout)
    prio = None if case.priority is None else build_priority(case.T, case.k, case.priority)
    options = dict(capacity=case.capacity, priority=prio, group_size=case.group_size)

    def run():
        return ops.make_plan(expert, case.E, **options)

    got, want = run(), ref.make_plan(expert, case.E, **options)
    for name in got._fields:
        assert_index_equal(getattr(got, name), getattr(want, name), name)
    assert_rerun_equal(run, got)
    op = torch.ops.smoe.make_plan.default
    kwargs = dict(capacity=case.capacity, priority=prio)
    assert_fake_matches(op, (expert, case.E), kwargs, op(expert, case.E, **kwargs))


@fuzz_settings()
@given(case=permute_cases)
def test_permute_fuzz(case):
    plan, _k = build_plan(case.plan)
    dt = dtype_of(case.dtype)
    x = materialize(case.x, (case.plan.T, case.d), dt, torch.finfo(dt).max)
    x = laid_out(x, case.layout)

    def run():
        return ops.permute(x, plan)

    got = run()
    assert_bitwise_equal(got, ref.permute(x, plan))  # a gather: exact, signed zeros included
    assert_rerun_equal(run, got)
    assert_fake_matches(torch.ops.smoe.permute.default, (x, plan.token, plan.row), {}, got)

    g = upstream(case.x.seed, tuple(got.shape), dt)
    backward = torch.ops.smoe.permute_backward.default
    grad = backward(g, plan.row)
    assert_rerun_equal(lambda: backward(g, plan.row), grad)
    assert_fake_matches(backward, (g, plan.row), {}, grad)
    assert_grads(
        lambda x: ops.permute(x, plan),
        lambda x: ref.permute(x, plan),
        [x],
        g,
        multilinear=True,
    )


@fuzz_settings()
@given(case=combine_cases)
def test_combine_fuzz(case):
    plan, k = build_plan(case.plan)
    dt, T, M = dtype_of(case.dtype), case.plan.T, plan.token.shape[0]
    large = product_large(dt)
    y = laid_out(materialize(case.y, (M, case.d), dt, large), case.y_layout)
    w = laid_out(materialize(case.weight, (T, k), dt, large), case.weight_layout)

    def run():
        return ops.combine(y, w, plan)

    got = run()
    ref64 = ref.combine(y.double(), w.double(), plan)
    scale = ref.combine(y.double().abs(), w.double().abs(), plan)
    assert got.dtype == dt
    assert_values(got, ref64, ref.combine(y, w, plan), scale=scale)
    assert_rerun_equal(run, got)
    args = (y, w, plan.token, plan.slot, plan.row)
    assert_fake_matches(torch.ops.smoe.combine.default, args, {}, got)

    g = upstream(case.y.seed, (T, case.d), dt)
    backward = torch.ops.smoe.combine_backward.default
    grad = backward(g, *args)
    assert_rerun_equal(lambda: backward(g, *args), grad)
    assert_fake_matches(backward, (g, *args), {}, grad)
    assert_grads(
        lambda y, w: ops.combine(y, w, plan),
        lambda y, w: ref.combine(y, w, plan),
        [y, w],
        g,
        multilinear=True,
    )
