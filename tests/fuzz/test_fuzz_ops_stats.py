"""Fuzz of router_stats (the auxiliary losses' statistics) and its backward against
smoe.reference.router_stats in float64: both statistics by STYLE.md's rule in float32 (float64
for float64 logits; prob_sum's terms are positive, so its own magnitude bounds its rounding),
rows of only -inf giving lse -inf and NaN probabilities as torch does, the gradient in logits'
dtype against autograd through the reference, a bitwise rerun and fake vs real metadata."""

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
from tests.fuzz.strategies import build_logits
from tests.fuzz.strategies_stats import router_stats_cases
from tests.fuzz.values import Values, dtype_of, fuzz_settings, materialize

pytestmark = pytest.mark.fuzz


def _both(fn):
    """fn(logits) -> (prob_sum, lse) as one vector [E + T], for one upstream gradient."""
    return lambda x: torch.cat(tuple(fn(x)))


@fuzz_settings()
@given(case=router_stats_cases)
def test_fuzz_router_stats(case):
    logits = build_logits(case.T, case.E, case.dtype, case.layout, case.logits)
    want_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    got = ops.router_stats(logits)
    assert got.prob_sum.dtype == got.lse.dtype == want_dtype
    assert got.prob_sum.shape == (case.E,) and got.lse.shape == (case.T,)
    prob_sum64, lse64 = ref.router_stats(logits.double())
    assert_values(got.prob_sum, prob_sum64, scale=prob_sum64.abs().nan_to_num())
    assert_values(got.lse, lse64)
    assert_rerun_equal(lambda: ops.router_stats(logits), got)
    assert_fake_matches(torch.ops.smoe.router_stats.default, (logits,), {}, got)

    dt = dtype_of(case.dtype)
    upstream = materialize(Values(case.logits.seed + 1), (case.E + case.T,), want_dtype, 1.0)
    assert_grads(_both(ops.router_stats), _both(ref.router_stats), [logits], upstream)
    gp, gl = upstream[: case.E].contiguous(), upstream[case.E :].contiguous()
    backward = torch.ops.smoe.router_stats_backward.default
    for args in ((gp, gl, logits), (gp, None, logits), (None, gl, logits)):
        grad = backward(*args)
        assert grad.dtype == dt and grad.shape == (case.T, case.E)
        assert_rerun_equal(lambda args=args: backward(*args), grad)
        assert_fake_matches(backward, args, {}, grad)
