"""Fuzz of the graph op (graph_mix) and its backward against smoe.reference.graph_mix: values by
STYLE.md's rule against float64 math on the same (rounded) inputs, with each output's scale the
sum of its terms' magnitudes (a sum that cancels keeps its terms' rounding error); float64-oracle
gradients w.r.t. x and A; a bitwise rerun; fake vs real metadata of both ops (every need_x /
need_A combination of the backward)."""

import pytest
import torch
from hypothesis import given

from smoe import ops
from smoe import reference as ref
from tests.fuzz.properties import (
    assert_fake_matches,
    assert_grads,
    assert_rerun_equal,
    assert_values,
)
from tests.fuzz.strategies_graph import build_graph_inputs, graph_cases, graph_options
from tests.fuzz.values import Values, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz


def _stacked(x, cache):
    return x if cache is None else torch.cat([cache, x], dim=1)


def _scales(c, x, A, cache, g):
    """Magnitude scales in float64 of out, grad_x and grad_A: |self_coef| |x| + lam |A| |x'|,
    |self_coef| |g| + lam |A_cur|^T |g| and lam |g| |x'|^T (zero terms at lam = 0)."""
    ax, aA, ag = x.double().abs(), A.double().abs(), g.double().abs()
    axp = _stacked(ax, None if cache is None else cache.double().abs())
    C = A.shape[2] - A.shape[1]
    lam = c.lam
    out = abs(c.self_coef) * ax + lam * torch.bmm(aA, axp)
    gx = abs(c.self_coef) * ag + lam * torch.bmm(aA[:, :, C:].transpose(1, 2), ag)
    gA = lam * torch.bmm(ag, axp.transpose(1, 2))
    return out, gx, gA


@fuzz_settings()
@given(case=graph_cases)
def test_graph_mix_fuzz(case):
    x, A, cache = build_graph_inputs(case)
    kw = graph_options(case)

    def run():
        return ops.graph_mix(x, A, cache=cache, **kw)

    got = run()
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    want = ref.graph_mix(x, A, cache=cache, **kw)  # float64 on the same inputs
    seed = case.x.seed
    g = materialize(Values(seed + 1), tuple(x.shape), x.dtype, 1.0)
    s_out, s_gx, s_gA = _scales(case, x, A, cache, g)
    assert_values(got, want, want.to(x.dtype), scale=s_out)
    if case.lam == 0:  # §8.1: the baseline exactly, whatever A holds
        assert torch.equal(got, (case.self_coef * x.double()).to(x.dtype))
    assert_rerun_equal(run, got)
    op = torch.ops.smoe.graph_mix.default
    assert_fake_matches(op, (x, A, cache), kw, op(x, A, cache, **kw))

    def op_fn(x, A):
        return ops.graph_mix(x, A, cache=cache, **kw)

    def ref_fn(x, A):
        return ref.graph_mix(x, A, cache=cache, **kw)

    assert_grads(op_fn, ref_fn, [x, A], g, scales=[s_gx, s_gA])

    # the backward op itself: a bitwise rerun and its fake kernel, for each output it can skip
    backward = torch.ops.smoe.graph_mix_backward.default
    for need_x, need_A in [(True, True), (True, False), (False, True)]:
        bkw = kw | dict(need_x=need_x, need_A=need_A)
        args = (g, x, A, cache)
        grads = backward(*args, **bkw)
        assert_rerun_equal(lambda args=args, bkw=bkw: backward(*args, **bkw), grads)
        assert_fake_matches(backward, args, bkw, grads)
        assert grads[0].shape == (x.shape if need_x else (0,))
        assert grads[1].shape == (A.shape if need_A else (0,))
