"""The fuzz strategy of the momentum op (specs/momentum_smoe.md §3-§5): every kind, every dtype of u
with its float32 (float64) state, ranks 0 to 3, strided u and state, sizes past one 8192-element
CPU block, options at and inside their ranges' ends, entries with zeros of both signs, ±1,
subnormals and ±1e4 (§11.9's |u| <= 1e4); Adam's second moment v is >= 0."""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import Values, dtype_of, dtypes, laid_out, layouts, materialize, values

MOMENTUM_LARGE = 1e4
# (robust_a, robust_b): the reference defaults (rho = 0.2, kappa = 1.25), no momentum, and others
ROBUST = [(0.96, 0.04), (1.0, 0.0), (0.5, 0.9), (2.0, 0.3)]


class MomentumCase(NamedTuple):
    T: int
    d: int
    rank: int  # 0: u[0, 0] (T >= 1, else 2); 1: a column of [T, d]; 2: [T, d]; 3: [1, T, d]
    dtype: str
    kind: str
    mu: float
    gamma: float
    sign: float
    beta1: float
    beta2: float
    gamma1: float
    eps: float
    robust: tuple[float, float]
    layout: str  # u's
    state_layout: str  # m's, p's and v's
    u: Values
    m: Values
    p: Values
    v: Values


@st.composite
def _momentum_cases(draw) -> MomentumCase:
    vals = [draw(values()) for _ in range(4)]
    return MomentumCase(
        T=draw(st.integers(0, 40) | st.sampled_from([100, 300])),
        d=draw(st.integers(1, 40)),
        rank=draw(st.integers(0, 3)),
        dtype=draw(dtypes),
        kind=draw(st.sampled_from(["heavy_ball", "adam", "robust"])),
        mu=draw(st.sampled_from([0.0, 0.5, 0.7, 0.99])),
        gamma=draw(st.sampled_from([0.0, 1.0, 2.5])),
        sign=draw(st.sampled_from([-1.0, 1.0])),
        beta1=draw(st.sampled_from([0.0, 0.9])),
        beta2=draw(st.sampled_from([0.0, 0.999])),
        gamma1=draw(st.sampled_from([0.0, 0.8, 1.0])),
        eps=draw(st.sampled_from([1e-8, 1e-3])),
        robust=draw(st.sampled_from(ROBUST)),
        layout=draw(layouts),
        state_layout=draw(layouts),
        u=vals[0],
        m=vals[1],
        p=vals[2],
        v=vals[3],
    )


momentum_cases = _momentum_cases()


def momentum_options(c: MomentumCase) -> dict:
    """The op's keyword options of a draw."""
    return dict(
        kind=c.kind,
        mu=c.mu,
        gamma=c.gamma,
        sign=c.sign,
        beta1=c.beta1,
        beta2=c.beta2,
        gamma1=c.gamma1,
        eps=c.eps,
        robust_a=c.robust[0],
        robust_b=c.robust[1],
    )


def _ranked(x: Tensor, rank: int) -> Tensor:
    """A view of the 2-D ``x`` with the draw's rank (its layout kept where a view can)."""
    if rank == 0 and x.shape[0] >= 1:
        return x[0, 0]
    if rank == 1:
        return x[:, 0]
    if rank == 3:
        return x.unsqueeze(0)
    return x


def build_momentum_inputs(c: MomentumCase) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(u, m, p, v): u in the draw's dtype, the state float32 (float64 for float64 u)."""
    dt = dtype_of(c.dtype)
    state = torch.float64 if dt == torch.float64 else torch.float32

    def make(v: Values, dtype: torch.dtype, layout: str, nonneg: bool = False) -> Tensor:
        x = materialize(v, (c.T, c.d), dtype, MOMENTUM_LARGE)
        return _ranked(laid_out(x.abs() if nonneg else x, layout), c.rank)

    u = make(c.u, dt, c.layout)
    m = make(c.m, state, c.state_layout)
    if c.kind != "adam":
        return u, m, None, None
    return u, m, make(c.p, state, c.state_layout), make(c.v, state, c.state_layout, nonneg=True)
