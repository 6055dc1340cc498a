"""The fuzz strategy of topk_sigmoid (DeepSeek-V3's router): E = n_group x G experts with groups of
one expert up to 36, topk_group and k over their whole ranges (past the 32-entry single-pass
selection of experts and of groups), every dtype and layout, renormalize, scale (0, negative,
large), an optional float32 selection bias with ties, logits with zeros, ties, duplicated rows,
subnormals, ±finfo.max (sigmoid saturates to 1.0 in fp32 from |ℓ| ~ 17), -inf, and the
non-finite overlays +inf (valid, s = 1) and NaN (an error)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import (
    SOFTMAX_SPECIALS,
    Values,
    dtype_of,
    dtypes,
    laid_out,
    layouts,
    materialize,
    values,
)

# Bias entries: finite (the op refuses others), small enough that 1 ulp of s + bias stays < 1e-6.
BIAS_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal")
SCALES = (1.0, 2.5, 0.0, -0.5, 1e-3, 50.0)


class TopKSigmoidCase(NamedTuple):
    """topk_sigmoid on ``logits [T, n_group * G]``; ``bias`` None or the ``[E]`` float32
    selection bias; ``overlay`` "none", "pos_inf" (some entries +inf) or "nan" (one NaN)."""

    T: int
    n_group: int
    G: int  # experts per group
    topk_group: int
    k: int
    dtype: str
    renormalize: bool
    scale: float
    layout: str
    logits: Values
    bias: Values | None = None
    overlay: str = "none"

    @property
    def E(self) -> int:
        return self.n_group * self.G


_bias_values = st.builds(
    Values,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 0.1, 1.0]),
    grid=st.booleans(),
    specials=st.lists(st.sampled_from(BIAS_SPECIALS), max_size=3, unique=True).map(tuple),
    density=st.sampled_from([0.0, 0.5, 1.0]),
)


@st.composite
def _topk_sigmoid_cases(draw) -> TopKSigmoidCase:
    n_group = draw(st.integers(1, 8) | st.just(40))
    G = draw(st.integers(1, 8) | st.just(36)) if n_group <= 8 else draw(st.integers(1, 2))
    topk_group = draw(st.integers(1, n_group))
    reach = topk_group * G
    return TopKSigmoidCase(
        T=draw(st.integers(0, 64)),
        n_group=n_group,
        G=G,
        topk_group=topk_group,
        k=draw(st.integers(1, reach) | st.just(reach)),
        dtype=draw(dtypes),
        renormalize=draw(st.booleans()),
        scale=draw(st.sampled_from(SCALES)),
        layout=draw(layouts),
        logits=draw(values(SOFTMAX_SPECIALS)),
        bias=draw(st.none() | _bias_values),
        overlay=draw(st.sampled_from(["none", "none", "none", "pos_inf", "nan"])),
    )


topk_sigmoid_cases = _topk_sigmoid_cases()


def build_sigmoid_inputs(c: TopKSigmoidCase) -> tuple[Tensor, Tensor | None]:
    """(logits laid out per ``c.layout``, selection bias or None) of a draw."""
    dt = dtype_of(c.dtype)
    x = materialize(c.logits, (c.T, c.E), dt, torch.finfo(dt).max)
    if c.overlay != "none" and x.numel():
        g = torch.Generator().manual_seed(c.logits.seed + 3)
        if c.overlay == "nan":
            x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = torch.nan
        else:
            mask = torch.rand(x.shape, generator=g) < 0.2
            mask.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = True
            x[mask] = torch.inf
    bias = None if c.bias is None else materialize(c.bias, (c.E,), torch.float32, 1.0)
    return laid_out(x, c.layout), bias
