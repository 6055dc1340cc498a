"""The fuzz strategy of the graph op (graph_mix; specs/graph_routing.md §2, §5): every dtype, batch
B in 0..3, sequences S of 0..40 tokens (and 70, 130: past the CPU tiles), E = 1..40 experts (and
130), no cache or C = 0..20 cached rows, every memory layout of x, A and the cache, options at
their ranges' ends (lam = 0 drops the graph term; self_coef < 0 is the logits mix with lam > 1),
and three kinds of graph: row-stochastic (softmax rows), causal row-stochastic (zeros past the
diagonal) and raw (any values, with zeros of both signs, ±1, subnormals and ±large)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import Values, dtype_of, dtypes, laid_out, layouts, materialize, values

GRAPHS = ("softmax", "causal", "raw")


class GraphCase(NamedTuple):
    B: int
    S: int
    E: int
    C: int | None  # cached rows; None: no cache
    dtype: str
    self_coef: float
    lam: float
    graph: str
    x_layout: str
    a_layout: str
    cache_layout: str
    x: Values
    a: Values
    cache: Values


@st.composite
def _graph_cases(draw) -> GraphCase:
    return GraphCase(
        B=draw(st.integers(0, 3)),
        S=draw(st.integers(0, 40) | st.sampled_from([70, 130])),
        E=draw(st.integers(1, 40) | st.just(130)),
        C=draw(st.none() | st.integers(0, 20)),
        dtype=draw(dtypes),
        self_coef=draw(st.sampled_from([1.0, 0.0, 0.5, -0.5])),
        lam=draw(st.sampled_from([1.0, 0.0, 0.5, 2.5])),
        graph=draw(st.sampled_from(GRAPHS)),
        x_layout=draw(layouts),
        a_layout=draw(layouts),
        cache_layout=draw(layouts),
        x=draw(values()),
        a=draw(values()),
        cache=draw(values()),
    )


graph_cases = _graph_cases()


def graph_large(dtype: torch.dtype) -> float:
    """The "large" magnitude: a sum of up to ~200 products of two such values, times lam <= 2.5,
    stays finite (in the float32 accumulator, and in float64)."""
    return math.sqrt(torch.finfo(dtype).max / 2048)


def graph_options(c: GraphCase) -> dict:
    return dict(self_coef=c.self_coef, lam=c.lam)


def _batched(x: Tensor, B: int, R: int, layout: str) -> Tensor:
    """The [B * R, N] ``x`` as [B, R, N] in the draw's layout (a view splitting dim 0)."""
    return laid_out(x, layout).view(B, R, x.shape[1])


def _graph(c: GraphCase, dt: torch.dtype) -> Tensor:
    """A [B * S, C + S]: a softmax over the raw draw's rows (causal: token i sees j <= C + i)."""
    Sp = c.S + (c.C or 0)
    raw = materialize(c.a, (c.B * c.S, Sp), torch.float64, graph_large(dt))
    if c.graph == "raw":
        return raw.to(dt)
    logits = raw.clamp(-30.0, 30.0)  # the large specials as strong preferences, not overflow
    if c.graph == "causal" and raw.numel():
        i = torch.arange(c.S).repeat(c.B)[:, None]
        logits = logits.masked_fill(torch.arange(Sp)[None, :] > (c.C or 0) + i, -math.inf)
    return torch.softmax(logits, dim=-1).to(dt)


def build_graph_inputs(c: GraphCase) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x [B, S, E], A [B, S, C + S], cache [B, C, E] or None) in the draw's dtype and layouts."""
    dt = dtype_of(c.dtype)
    large = graph_large(dt)
    x = _batched(materialize(c.x, (c.B * c.S, c.E), dt, large), c.B, c.S, c.x_layout)
    A = _batched(_graph(c, dt), c.B, c.S, c.a_layout)
    if c.C is None:
        return x, A, None
    cache = materialize(c.cache, (c.B * c.C, c.E), dt, large)
    return x, A, _batched(cache, c.B, c.C, c.cache_layout)
