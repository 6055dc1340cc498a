"""The fuzz strategy of unified_topk (USMoE's joint top-N per group; specs/usmoe.md §8): G = 0..6
groups of L = S·E scores (S tokens of E experts, and L = 257 and 1030: several CUDA tiles), n over
its whole range [0, L], no counts or counts per group (zeros, n, or any in [0, n]), every dtype
and layout, and values with many exact ties (mostly on a 0.5 grid, often at std 0.1 so that most
entries round to one of -0.5, ±0, 0.5), duplicated groups, subnormals, ±large, -inf (padding;
whole groups of it at density 1), and the non-finite overlays +inf (valid, ranks first) and NaN
(an error)."""

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
)

COUNTS = ("none", "none", "random", "zeros", "full")
OVERLAYS = ("none", "none", "none", "pos_inf", "nan")


class UnifiedTopKCase(NamedTuple):
    """unified_topk on ``scores [G, S * E]`` with ``n`` of the ``L`` pairs; ``counts`` "none"
    (None), "random" (each group any count in [0, n]), "zeros" or "full" (n everywhere, as a
    tensor); ``overlay`` "none", "pos_inf" (some entries +inf) or "nan" (one NaN)."""

    G: int
    S: int
    E: int
    n: int
    dtype: str
    layout: str
    scores: Values
    counts: str = "none"
    counts_seed: int = 0
    overlay: str = "none"

    @property
    def L(self) -> int:
        return self.S * self.E


# Ties first: a 0.5 grid three times in four, and a std of 0.1 puts most entries on -0.5/±0/0.5.
_tied_values = st.builds(
    Values,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 1e-3, 10.0]),
    grid=st.sampled_from([True, True, True, False]),
    specials=st.lists(st.sampled_from(SOFTMAX_SPECIALS), max_size=4, unique=True).map(tuple),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    dup_rows=st.booleans(),
)


@st.composite
def _unified_topk_cases(draw) -> UnifiedTopKCase:
    S, E = draw(
        st.sampled_from([(0, 4), (257, 1), (103, 10)])
        | st.tuples(st.integers(1, 16), st.integers(1, 8))
    )
    L = S * E
    return UnifiedTopKCase(
        G=draw(st.integers(0, 6)),
        S=S,
        E=E,
        n=draw(st.integers(0, L) | st.sampled_from([0, L])),
        dtype=draw(dtypes),
        layout=draw(layouts),
        scores=draw(_tied_values),
        counts=draw(st.sampled_from(COUNTS)),
        counts_seed=draw(st.integers(0, 2**31 - 1)),
        overlay=draw(st.sampled_from(OVERLAYS)),
    )


unified_topk_cases = _unified_topk_cases()


def build_usmoe_inputs(c: UnifiedTopKCase) -> tuple[Tensor, Tensor | None]:
    """(scores laid out per ``c.layout``, counts or None) of a draw."""
    dt = dtype_of(c.dtype)
    x = materialize(c.scores, (c.G, c.L), dt, torch.finfo(dt).max)
    if c.overlay != "none" and x.numel():
        g = torch.Generator().manual_seed(c.scores.seed + 3)
        if c.overlay == "nan":
            x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = torch.nan
        else:
            mask = torch.rand(x.shape, generator=g) < 0.2
            mask.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = True
            x[mask] = torch.inf
    counts = None
    if c.counts == "random":
        g = torch.Generator().manual_seed(c.counts_seed)
        counts = torch.randint(0, c.n + 1, (c.G,), generator=g)
    elif c.counts in ("zeros", "full"):
        counts = torch.full((c.G,), 0 if c.counts == "zeros" else c.n, dtype=torch.int64)
    return laid_out(x, c.layout), counts
