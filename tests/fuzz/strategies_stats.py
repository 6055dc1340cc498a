"""The fuzz strategy of router_stats (the auxiliary losses' statistics): T = 0..600 tokens (past
the CPU's 256-row and CUDA's 32-row blocks of prob_sum), E = 1..48 (past the 16-lane sums), every
dtype and layout, softmax specials (-inf entries, rows of only -inf) among zeros, subnormals and
±large values."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st

from tests.fuzz.values import SOFTMAX_SPECIALS, Values, dtypes, layouts, values


class RouterStatsCase(NamedTuple):
    T: int
    E: int
    dtype: str
    layout: str
    logits: Values


@st.composite
def _router_stats_cases(draw) -> RouterStatsCase:
    return RouterStatsCase(
        T=draw(st.integers(0, 64) | st.sampled_from([255, 256, 257, 600])),
        E=draw(st.integers(1, 16) | st.integers(17, 48)),
        dtype=draw(dtypes),
        layout=draw(layouts),
        logits=draw(values(SOFTMAX_SPECIALS)),
    )


router_stats_cases = _router_stats_cases()
