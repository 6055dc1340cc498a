"""The fuzz strategy of expert_mlp (each expert's whole MLP per row block): 1 to 8 experts, token
counts that leave experts empty or send every slot to one, a capacity that drops slots (padding
rows past offsets[E]), the gather through a plan or grouped rows with extra rows past offsets[E],
every activation, biases or none, every dtype, non-contiguous x and each weight contiguous,
transposed (transformers' layout), expanded (one expert's weight at stride 0) or strided; entries
with zeros of both signs, ±1 and subnormals (no "large": two products and an activation in a row
would leave the range the values rule is checked in)."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st

from smoe.ops import MLP_ACTIVATIONS
from tests.fuzz.values import Values, dtypes, layouts, values

SMALL_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal", "neg_subnormal")
W_LAYOUTS = ("contiguous", "transposed", "expanded", "strided")


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
