"""The fuzz strategy of the Sinkhorn op (specs/sinkhorn_ssr.md): sizes around the 256-row
reduction chunk, every dtype and layout, ξ from near-hard to near-uniform, fixed iterations or a
tolerance, SSR and S-BASE marginals, scores with zeros, ties, subnormals and ±1e4 entries."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import Values, dtype_of, dtypes, laid_out, layouts, materialize, values

# Entries of the scores: no infinities (the op refuses them); "large" is 1e4 (|ℓ| ~ 1e4, §10.10).
SINKHORN_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal", "neg_subnormal", "large")
SINKHORN_LARGE = 1e4


class SinkhornCase(NamedTuple):
    T: int
    E: int
    dtype: str
    eps: float
    max_iter: int
    tol: float
    check_every: int
    marginals: str  # "ssr" (1, T/E), "sbase" (1/T, 1/E) or "half" (0.5, None)
    layout: str
    scores: Values


@st.composite
def _sinkhorn_cases(draw) -> SinkhornCase:
    return SinkhornCase(
        T=draw(st.integers(0, 70) | st.sampled_from([255, 256, 257, 600])),
        E=draw(st.integers(1, 16)),
        dtype=draw(dtypes),
        eps=draw(st.sampled_from([0.05, 0.3, 1.0, 10.0])),
        max_iter=draw(st.integers(1, 30)),
        tol=draw(st.sampled_from([0.0, 0.0, 1e-3, 1e-1])),
        check_every=draw(st.integers(1, 10)),
        marginals=draw(st.sampled_from(["ssr", "sbase", "half"])),
        layout=draw(layouts),
        scores=draw(values(SINKHORN_SPECIALS)),
    )


sinkhorn_cases = _sinkhorn_cases()


def sinkhorn_masses(c: SinkhornCase) -> tuple[float, float | None]:
    """(row_mass, col_mass) of a draw."""
    if c.marginals == "sbase" and c.T:
        return 1.0 / c.T, 1.0 / c.E
    if c.marginals == "half":
        return 0.5, None
    return 1.0, None


def build_sinkhorn_scores(c: SinkhornCase) -> Tensor:
    x = materialize(c.scores, (c.T, c.E), dtype_of(c.dtype), SINKHORN_LARGE)
    return laid_out(x, c.layout)
