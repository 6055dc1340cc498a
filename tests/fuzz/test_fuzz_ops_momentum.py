"""Fuzz of the momentum op (momentum_update) and its backward against
smoe.reference.momentum_update: values by STYLE.md's rule against float64 math on the same
(rounded) inputs, with each output's scale the sum of its terms' magnitudes (a sum that cancels
keeps its terms' rounding error); float64-oracle gradients through every output; a bitwise rerun;
fake vs real metadata of both ops."""

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
from tests.fuzz.strategies_momentum import (
    build_momentum_inputs,
    momentum_cases,
    momentum_options,
)
from tests.fuzz.values import Values, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz


def _scales(c, u, m, p, v):
    """Magnitude scales of (delta, m', p', v') in float64 (None: no cancellation)."""
    u, m = u.double().abs(), m.double().abs()
    if c.kind == "heavy_ball":
        s = c.mu * m + c.gamma * u
        return s, s, None, None
    if c.kind == "robust":
        s = u + c.robust[1] * m
        return c.robust[0] * s, s, None, None
    x = u.double()
    ps = c.beta1 * p.double().abs() + (1 - c.beta1) * x
    r = (c.beta2 * v.double() + (1 - c.beta2) * x * x + c.eps).sqrt()
    return c.gamma1 * ps / r, c.mu * m + c.gamma * u, ps, None


def _grad_scales(c, u, p, v, ups):
    """Magnitude scales of the input gradients (grad_u, grad_m[, grad_p, grad_v]): the terms of
    cpu/momentum_kernel.h's backward in absolute value."""
    gd, gm = ups[0].double().abs(), ups[1].double().abs()
    if c.kind != "adam":
        cd, cu, cm = (c.robust[0], 1.0, c.robust[1]) if c.kind == "robust" else (1, c.gamma, c.mu)
        g = gm + cd * gd
        return [cu * g, cm * g]
    gp, gv = ups[2].double().abs(), ups[3].double().abs()
    x = u.double()
    ps = c.beta1 * p.double().abs() + (1 - c.beta1) * x.abs()
    r = (c.beta2 * v.double() + (1 - c.beta2) * x * x + c.eps).sqrt()
    t = gd * c.gamma1 / r
    gp_s = gp + t
    gv_s = gv + 0.5 * t * ps / r**2
    gu = (1 - c.beta1) * gp_s + 2 * (1 - c.beta2) * x.abs() * gv_s + c.gamma * gm
    return [gu, c.mu * gm, c.beta1 * gp_s, c.beta2 * gv_s]


@fuzz_settings()
@given(case=momentum_cases)
def test_momentum_update_fuzz(case):
    u, m, p, v = build_momentum_inputs(case)
    kw = momentum_options(case)
    adam = case.kind == "adam"
    state = m.dtype

    def run():
        return ops.momentum_update(u, m, p, v, **kw)

    got = run()
    assert got.delta.shape == u.shape and got.delta.dtype == u.dtype
    assert got.m.shape == u.shape and got.m.dtype == state
    assert (got.p is None) == (got.v is None) == (not adam)
    want = ref.momentum_update(u, m, p, v, **kw)  # float64 on the same inputs
    s_delta, s_m, s_p, s_v = _scales(case, u, m, p, v)
    assert_values(got.delta, want.delta, want.delta.to(u.dtype), scale=s_delta)
    assert_values(got.m, want.m, scale=s_m)
    if adam:
        assert_values(got.p, want.p, scale=s_p)
        assert_values(got.v, want.v, scale=s_v)
        assert (got.v >= 0).all(), "a negative second moment"
    assert_rerun_equal(run, got)
    op = torch.ops.smoe.momentum_update.default
    raw = op(u, m, p, v, **kw)
    assert_fake_matches(op, (u, m, p, v), kw, raw)

    # gradients of all outputs at once: packed, the delta part's upstream rounded to u's dtype so
    # that the op and the reference pull back the same values
    n, k = u.numel(), 4 if adam else 2
    seed = case.u.seed
    ups = [materialize(Values(seed + i), (max(n, 1),), state, 1.0)[:n] for i in range(1, k + 1)]
    ups[0] = ups[0].to(u.dtype).to(state)
    upstream = torch.cat(ups)

    def pack(*outs):
        return torch.cat([o.reshape(-1).to(upstream.dtype) for o in outs if o is not None])

    def op_fn(*a):
        return pack(*ops.momentum_update(*a, **kw))

    def ref_fn(*a):
        return pack(*ref.momentum_update(*a, **kw))

    inputs = [t for t in (u, m, p, v) if t is not None]
    scales = _grad_scales(case, u, p, v, [g.reshape(u.shape) for g in ups])
    assert_grads(op_fn, ref_fn, inputs, upstream, scales=scales)

    # the backward op itself: a bitwise rerun and its fake kernel
    backward = torch.ops.smoe.momentum_update_backward.default
    g = [x.reshape(u.shape) for x in ups]
    g[0] = g[0].to(u.dtype)
    empty = m.new_empty(0)
    gp, gv = (g[2], g[3]) if adam else (empty, empty)
    args = (g[0], g[1], gp, gv, u, m, p, v)
    grads = backward(*args, **kw)
    assert_rerun_equal(lambda: backward(*args, **kw), grads)
    assert_fake_matches(backward, args, kw, grads)
    assert grads[0].dtype == u.dtype and all(x.dtype == state for x in grads[1:])
