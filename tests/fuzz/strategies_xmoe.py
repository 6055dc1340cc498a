"""The fuzz strategy of the X-MoE op (cosine_scores, specs/xmoe.md §6-§8): tokens and experts at
scales from 1e-8 to 1e8, zero rows, every dtype and layout, τ around its 1e-4 clamp."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import Values, dtype_of, dtypes, laid_out, materialize


# ---------------------------------------------------------------------------------------------
# X-MoE
# ---------------------------------------------------------------------------------------------
class CosineScoresCase(NamedTuple):
    """cosine_scores on ``h [T, d]`` (laid out per ``layout``), ``proj [d_e, d]``, ``expert_emb
    [N, d_e]``; ``zero_rows`` ("h", "emb", "both", "none") sets some rows exactly to 0."""

    T: int
    N: int
    d_e: int
    d: int
    dtype: str
    normalize_tokens: bool
    tau: float
    eps: float
    layout: str
    zero_rows: str
    h: Values
    proj: Values
    emb: Values


_SCALES = st.sampled_from([1e-8, 1e-4, 1.0, 1e4, 1e8])


def _off_kink(tau: float) -> bool:
    return abs(tau - 1e-4) > 1e-9


@st.composite
def _cosine_scores_cases(draw) -> CosineScoresCase:
    return CosineScoresCase(
        T=draw(st.integers(0, 64)),
        N=draw(st.integers(1, 16)),
        d_e=draw(st.integers(1, 8)),
        d=draw(st.integers(1, 70)),
        dtype=draw(dtypes),
        normalize_tokens=draw(st.booleans()),
        # τ = 1e-4 exactly is the kink of max(τ, 1e-4): no derivative to compare there
        tau=draw(
            st.sampled_from([1e-5, 5e-5, 0.07, 0.3, 2.0]) | st.floats(1e-5, 2.0).filter(_off_kink)
        ),
        eps=draw(st.sampled_from([1e-4, 1e-2])),
        layout=draw(st.sampled_from(["contiguous", "row_strided", "offset", "strided"])),
        zero_rows=draw(st.sampled_from(["none", "h", "emb", "both"])),
        h=Values(draw(st.integers(0, 2**31 - 1)), draw(_SCALES), dup_rows=draw(st.booleans())),
        proj=Values(draw(st.integers(0, 2**31 - 1))),
        emb=Values(draw(st.integers(0, 2**31 - 1)), draw(_SCALES)),
    )


cosine_scores_cases = _cosine_scores_cases()


def _scaled(v: Values, shape: tuple[int, ...], dtype: torch.dtype, zero: bool) -> Tensor:
    # float16 cannot hold 1e4..1e8 (its max is 65504): its largest scale is 1e3
    top = 1e3 if dtype == torch.float16 else math.inf
    x = materialize(v._replace(scale=min(v.scale, top)), shape, dtype, 1.0)
    if zero and x.shape[0]:
        g = torch.Generator().manual_seed(v.seed + 7)
        rows = torch.rand(x.shape[0], generator=g) < 0.3
        rows[int(torch.randint(x.shape[0], (1,), generator=g))] = True
        x[rows] = 0
    return x


def build_cosine_inputs(c: CosineScoresCase) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h, proj, expert_emb, temperature) of a draw; τ is float64 for float64 h, else float32."""
    dt = dtype_of(c.dtype)
    h = _scaled(c.h, (c.T, c.d), dt, c.zero_rows in ("h", "both"))
    proj = materialize(c.proj._replace(scale=1 / math.sqrt(c.d)), (c.d_e, c.d), dt, 1.0)
    emb = _scaled(c.emb, (c.N, c.d_e), dt, c.zero_rows in ("emb", "both"))
    tau = torch.tensor(c.tau, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    return laid_out(h, c.layout), proj, emb, tau
