"""Fuzz of gate_linear (the routers' gate GEMM) against smoe.reference.gate_linear on float64
copies of the inputs (exact products): the logits within the float32 (float64) dot-product bound
in every dtype (16-bit inputs give float32 logits, never rounded to 16 bits), gradients of x,
weight and bias in their own dtypes, a bitwise rerun and fake vs real metadata."""

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
from tests.fuzz.strategies_gate import build_gate_inputs, gate_linear_cases
from tests.fuzz.values import fuzz_settings

pytestmark = pytest.mark.fuzz


def _exact(x, w, b=None):
    """The exact logits (float64) of the inputs' values; differentiable, for assert_grads."""
    return ref.gate_linear(x.double(), w.double(), None if b is None else b.double())


@fuzz_settings()
@given(case=gate_linear_cases)
def test_fuzz_gate_linear(case):
    x, w, b = build_gate_inputs(case)
    got = ops.gate_linear(x, w, b)
    want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert got.dtype == want_dtype and got.shape == (case.T, case.E)
    scale = _exact(x.abs(), w.abs(), None if b is None else b.abs())
    assert_values(got, _exact(x, w, b), scale=scale)
    assert_rerun_equal(lambda: ops.gate_linear(x, w, b), got)
    assert_fake_matches(torch.ops.smoe.gate_linear.default, (x, w, b), {}, got)
    inputs = [x, w] if b is None else [x, w, b]
    upstream = torch.randn(case.T, case.E, dtype=want_dtype)
    assert_grads(ops.gate_linear, _exact, inputs, upstream, multilinear=True)
