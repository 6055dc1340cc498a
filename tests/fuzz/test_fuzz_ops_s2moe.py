"""Fuzz of s2moe_perturb (S2MoE's Gaussian perturbation) and its backward against
smoe.reference_s2moe: values by STYLE.md's rule against float64 math on the same (rounded)
inputs, with each output's scale the sum of its terms' magnitudes (a sum that cancels keeps its
terms' rounding error), and infinities and NaN where the reference has them; float64-oracle
gradients of x and the statistics (sums over the dims they are broadcast over), none for the
noise; the backward op under every output_mask equal to its full-mask outputs; bitwise reruns;
fake vs real metadata of both ops."""

import pytest
import torch
from hypothesis import example, given

from smoe import ops
from smoe import reference_s2moe as ref
from tests.fuzz.properties import (
    abs_grads,
    assert_bitwise_equal,
    assert_fake_matches,
    assert_grads,
    assert_rerun_equal,
    assert_values,
)
from tests.fuzz.strategies_s2moe import S2MoECase, build_s2moe_inputs, laid_out_nd, s2moe_cases
from tests.fuzz.values import Values, dtype_of, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz

FULL = [True, True, True, True]


def _case(shape, run, scalar=(False, False, False), dtype="float32", **kw) -> S2MoECase:
    """An explicit draw for the @examples: seeds fixed, everything else as given."""
    base = dict(x=Values(1), mu=Values(2), s=Values(3), noise_seed=4)
    return S2MoECase(shape=shape, run=run, scalar=scalar, dtype=dtype, **{**base, **kw})


def assert_nonfinite_where_reference(got: torch.Tensor, ref64: torch.Tensor) -> None:
    """NaN and ±inf exactly where the float64 result, rounded to got's dtype, has them (the
    values rule's bound is infinite at such entries, so it cannot tell)."""
    want = ref64.to(got.dtype)
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = f(got) != f(want)
        if differ.any():
            i = tuple(differ.nonzero()[0].tolist())
            raise AssertionError(f"{name} differs from the reference first at {i}: {got[i]!r}")


@fuzz_settings()
@given(case=s2moe_cases)
# The named statistics patterns of the spec, each once in a non-float32 dtype or layout.
@example(case=_case((3, 7, 8), (1, 2), layout="transposed", pattern="sequence"))
@example(case=_case((7, 3, 8), (0, 1), dtype="bfloat16", layout="strided", pattern="time_major"))
@example(case=_case((21, 8), (1, 2), dtype="float16", noise_layout="offset", pattern="token"))
@example(case=_case((21, 8), (0, 1), dtype="float64", stat_layout="transposed", pattern="batch"))
@example(case=_case((3, 7, 8), (3, 3), scalar=(True, True, True), scalar_rank0=True))
@example(case=_case((3, 7, 8), (3, 3), scalar=(True, True, True), scalar_rank0=False))
@example(case=_case((4, 5), (2, 2), dtype="bfloat16", pattern="elementwise"))
@example(case=_case((0, 7, 8), (1, 2), pattern="sequence"))
@example(case=_case((3, 0, 8), (1, 2), scalar=(True, False, True), pattern="sequence"))
@example(case=_case((2, 5, 3, 4), (1, 3), stat_layout="offset", pattern="two_dim_run"))
# A size-1 dim of x inside the run (not broadcast there), and statistics that mix one value with
# the run; +-inf in x (0 * inf = NaN only through zero noise, as in float64).
@example(case=_case((4, 1, 6, 3), (0, 3), scalar=(False, True, False), overlay="inf"))
@example(case=_case((5, 9), (1, 2), zero_noise=True, overlay="inf", dtype="float16"))
def test_s2moe_perturb_fuzz(case):
    args = build_s2moe_inputs(case)
    x, n1, n2, mu, s_mul, s_add = args
    dt = dtype_of(case.dtype)
    op = torch.ops.smoe.s2moe_perturb.default

    def run():
        return op(*args)

    got = run()
    assert got.shape == x.shape and got.dtype == dt and got.is_contiguous()
    wide = [a.double() for a in args]
    ref64 = ref.s2moe_perturb(*wide)
    x64, n164, n264, mu64, sm64, sa64 = wide
    scale = x64.abs() * (1 + sm64.abs() * n164.abs()) + mu64.abs() + sa64.abs() * n264.abs()
    scale = scale.nan_to_num(nan=torch.inf)  # NaN in x (the bound is infinite there)
    assert_values(got, ref64, ref.s2moe_perturb(*args), scale=scale)
    assert_nonfinite_where_reference(got, ref64)
    assert_rerun_equal(run, got)
    assert_fake_matches(op, args, {}, got)
    assert_bitwise_equal(ops.s2moe_perturb(*args), got)

    # the backward op: full mask, then the drawn mask (the same tensors where asked, else [0])
    g = laid_out_nd(materialize(Values(case.x.seed + 1), case.shape, dt, 1.0), case.layout)
    backward = torch.ops.smoe.s2moe_perturb_backward.default
    full = backward(g, *args, FULL)
    for out, like in zip(full, (x, mu, s_mul, s_add)):
        assert out.shape == like.shape and out.dtype == dt and out.is_contiguous()
    mask = list(case.mask)
    masked = backward(g, *args, mask)
    for i, (m, f) in enumerate(zip(masked, full)):
        if mask[i]:
            assert_bitwise_equal(m, f)
        else:
            assert m.shape == (0,) and m.dtype == dt, f"output {i} not asked for: {m.shape}"
    assert_rerun_equal(lambda: backward(g, *args, mask), masked)
    assert_fake_matches(backward, (g, *args, mask), {}, masked)
    assert_fake_matches(backward, (g, *args, FULL), {}, full)

    # gradients through autograd (the backward op) vs autograd through the float64 reference;
    # the scales: the same gradients with every factor in absolute value
    def op_fn(x, mu, s_mul, s_add):
        return ops.s2moe_perturb(x, n1, n2, mu, s_mul, s_add)

    def ref_fn(x, mu, s_mul, s_add):
        return ref.s2moe_perturb(x, n1, n2, mu, s_mul, s_add)

    def abs_fn(x, mu, s_mul, s_add):
        return ref.s2moe_perturb(x, n164.abs(), n264.abs(), mu, s_mul, s_add)

    inputs = [x, mu, s_mul, s_add]
    # (NaN in a scale, from NaN in x or 0 * inf: the bound there is infinite)
    scales = [
        s.nan_to_num(nan=torch.inf) for s in abs_grads(abs_fn, wide[:1] + wide[3:], g.double())
    ]
    assert_grads(op_fn, ref_fn, inputs, g, scales=scales)

    # the noise gets no gradient, even when it requires one
    leaves = [t.detach().requires_grad_() for t in args]
    out = ops.s2moe_perturb(*leaves)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    assert grads[1] is None and grads[2] is None
    for i in (0, 3, 4, 5):
        assert_bitwise_equal(grads[i], full[(0, None, None, 1, 2, 3)[i]])
