"""The fuzz strategy of gate_linear (the routers' gate GEMM): T = 0..200 tokens around the bf16
micro-kernel's thresholds (16 tokens, 64-row tiles), d = 1..80 (odd d takes the float32 path) and
256, E = 1..40 and 300 (two 256-column blocks), every dtype of x with weight in x's dtype or
float32 (a master weight under autocast), a bias or none, every layout of x and weight, and values
with zeros, subnormals, ±large (product-safe) and duplicated rows."""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import (
    Values,
    dtype_of,
    dtypes,
    laid_out,
    layouts,
    materialize,
    product_large,
    values,
)


class GateLinearCase(NamedTuple):
    """gate_linear on ``x [T, d]`` (``dtype``, ``x_layout``) and ``weight [E, d]`` (``w_dtype``,
    ``w_layout``), with a bias ``[E]`` in ``w_dtype`` when ``bias``."""

    T: int
    d: int
    E: int
    dtype: str
    w_dtype: str
    bias: bool
    x_layout: str
    w_layout: str
    x: Values
    w: Values


@st.composite
def _gate_linear_cases(draw) -> GateLinearCase:
    dtype = draw(dtypes)
    return GateLinearCase(
        T=draw(st.sampled_from([0, 1, 15, 16, 64, 65, 130]) | st.integers(0, 200)),
        d=draw(st.integers(1, 80) | st.sampled_from([2, 256])),
        E=draw(st.integers(1, 40) | st.sampled_from([1, 300])),
        dtype=dtype,
        w_dtype=draw(st.sampled_from([dtype, dtype, "float32"])),
        bias=draw(st.booleans()),
        x_layout=draw(layouts),
        w_layout=draw(layouts),
        x=draw(values()),
        w=draw(values()),
    )


gate_linear_cases = _gate_linear_cases()


def build_gate_inputs(c: GateLinearCase) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x, weight, bias or None) of a draw, laid out per the draw."""
    dt, wt = dtype_of(c.dtype), dtype_of(c.w_dtype)
    # "large" keeps every product sum (logits over d, gradients over T or E, for an upstream of
    # std 1) finite in the narrowest of the float32 compute and the inputs' dtypes
    both64 = dt == wt == torch.float64
    large = product_large(torch.float64 if both64 else torch.float32) / max(c.T, c.d, c.E)
    large = min(large, torch.finfo(dt).max, torch.finfo(wt).max)
    x = laid_out(materialize(c.x, (c.T, c.d), dt, large), c.x_layout)
    w = laid_out(materialize(c.w, (c.E, c.d), wt, large), c.w_layout)
    b = None
    if c.bias:
        g = torch.Generator().manual_seed(c.w.seed + 1)
        b = torch.randn(c.E, generator=g).to(wt)
    return x, w, b
