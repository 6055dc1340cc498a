"""The fuzz strategies of the expert ops: grouped_mm (with and without a bias), swiglu, expert_mlp,
gather_mm.

expert_mlp's: 1 to 8 experts, token counts that leave experts empty or send every slot to one, a
capacity that drops slots (padding rows past offsets[E]), the gather through a plan or grouped rows
with extra rows past offsets[E], every activation, biases or none, every dtype, non-contiguous x
and each weight contiguous, transposed (transformers' layout), expanded (one expert's weight at
stride 0) or strided; entries with zeros of both signs, ±1 and subnormals (no "large": two products
and an activation in a row would leave the range the values rule is checked in).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

from smoe.ops import MLP_ACTIVATIONS
from tests.fuzz.values import Values, dtypes, layouts, materialize, product_large, values

W_LAYOUTS = ("contiguous", "transposed", "expanded", "strided")


class GroupedMMCase(NamedTuple):
    counts: tuple[int, ...]  # rows of each expert group (E = len(counts))
    pad: int  # rows past offsets[E]
    d_in: int
    d_out: int
    dtype: str
    x_layout: str
    w_layout: str
    x: Values
    w: Values
    bias: Values | None = None  # the optional per-expert bias [E, d_out]


@st.composite
def _grouped_mm_cases(draw) -> GroupedMMCase:
    E = draw(st.integers(1, 16))
    shape = draw(st.sampled_from(["spread", "one", "empty"]))
    if shape == "one":  # every row to one expert
        n, e = draw(st.integers(0, 64)), draw(st.integers(0, E - 1))
        counts = tuple(n if i == e else 0 for i in range(E))
    elif shape == "empty":
        counts = (0,) * E
    else:
        counts = tuple(draw(st.lists(st.integers(0, 8), min_size=E, max_size=E)))
    return GroupedMMCase(
        counts=counts,
        pad=draw(st.integers(0, 4)),
        d_in=draw(st.integers(1, 32)),
        d_out=draw(st.integers(1, 32)),
        dtype=draw(dtypes),
        x_layout=draw(layouts),
        w_layout=draw(st.sampled_from(W_LAYOUTS)),
        x=draw(values()),
        w=draw(values()),
        bias=draw(st.none() | values()),
    )


grouped_mm_cases = _grouped_mm_cases()


def build_weight(E: int, d_in: int, d_out: int, dtype: torch.dtype, layout: str, v: Values):
    """``w [E, d_in, d_out]`` in ``layout``: contiguous; a transposed view of ``[E, d_out, d_in]``
    (transformers' layout); one expert's weight expanded to all E (stride 0); or a strided slice."""
    large = product_large(dtype)
    if layout == "expanded":
        return materialize(v, (1, d_in, d_out), dtype, large).expand(E, d_in, d_out)
    w = materialize(v, (E, d_in, d_out), dtype, large)
    if layout == "transposed":
        return w.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        wide = w.new_zeros(E, d_in, 2 * d_out)
        wide[..., ::2] = w
        return wide[..., ::2]
    return w


class SwigluCase(NamedTuple):
    M: int
    f: int
    dtype: str
    layout: str
    h: Values


swiglu_cases = st.builds(
    SwigluCase,
    M=st.integers(0, 64),
    f=st.integers(1, 32),
    dtype=dtypes,
    layout=layouts,
    h=values(),
)


SMALL_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal", "neg_subnormal")


class ExpertMLPCase(NamedTuple):
    T: int
    E: int
    k: int
    skew: str  # "spread" (random experts), "one" (every slot to experts 0..k-1)
    capacity: int | None
    gather: bool  # through the plan, or grouped rows (then `pad` extra rows past offsets[E])
    pad: int
    d: int
    d_ff: int
    activation: str
    bias: bool
    dtype: str
    x_layout: str
    w_layout: str
    x: Values
    w: Values  # w_in from its seed, w_out from seed + 1, the biases from seed + 2 and + 3


@st.composite
def _expert_mlp_cases(draw) -> ExpertMLPCase:
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.integers(0, 24))
    return ExpertMLPCase(
        T=T,
        E=E,
        k=k,
        skew=draw(st.sampled_from(["spread", "one"])),
        capacity=draw(st.none() | st.integers(1, 6)),
        gather=draw(st.booleans()),
        pad=draw(st.integers(0, 3)),
        d=draw(st.integers(1, 24)),
        d_ff=draw(st.integers(1, 16)),
        activation=draw(st.sampled_from(MLP_ACTIVATIONS)),
        bias=draw(st.booleans()),
        dtype=draw(dtypes),
        x_layout=draw(layouts),
        w_layout=draw(st.sampled_from(W_LAYOUTS)),
        x=draw(values(SMALL_SPECIALS)),
        w=draw(values(SMALL_SPECIALS)),
    )


expert_mlp_cases = _expert_mlp_cases()


class GatherMMCase(NamedTuple):
    T: int
    E: int
    k: int
    skew: str  # "spread" (random experts), "one" (every slot to experts 0..k-1)
    capacity: int | None
    d_in: int
    d_out: int
    bias: bool
    dtype: str
    x_layout: str
    w_layout: str
    x: Values
    w: Values  # the bias from seed + 1


@st.composite
def _gather_mm_cases(draw) -> GatherMMCase:
    """gather_mm's: as expert_mlp's plans (empty experts, one expert taking every slot, capacity
    drops), every dtype and layout, the full value range (one product per output, as grouped_mm)."""
    E = draw(st.integers(1, 8))
    return GatherMMCase(
        T=draw(st.integers(0, 24)),
        E=E,
        k=draw(st.integers(1, min(E, 3))),
        skew=draw(st.sampled_from(["spread", "one"])),
        capacity=draw(st.none() | st.integers(1, 6)),
        d_in=draw(st.integers(1, 32)),
        d_out=draw(st.integers(1, 32)),
        bias=draw(st.booleans()),
        dtype=draw(dtypes),
        x_layout=draw(layouts),
        w_layout=draw(st.sampled_from(W_LAYOUTS)),
        x=draw(values()),
        w=draw(values()),
    )


gather_mm_cases = _gather_mm_cases()
