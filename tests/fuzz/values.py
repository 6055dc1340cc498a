"""Values and layouts of the fuzz suite's tensors, and its hypothesis settings.

A draw names its tensors by a :class:`Values` (a seed and what to overlay), so a shrunk failure
can be written down as an explicit ``@example``; :func:`materialize` builds the tensor and
:func:`laid_out` puts the same values in another memory layout.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor


def fuzz_settings(ci_examples: int = 25) -> settings:
    """Per-test settings: ``ci_examples`` under the ci profile; the dev profile's count
    (SMOE_HYPOTHESIS=dev); SMOE_FUZZ_EXAMPLES=N overrides both (long dev runs)."""
    env = os.environ.get("SMOE_FUZZ_EXAMPLES")
    if env:
        return settings(max_examples=int(env))
    if os.environ.get("SMOE_HYPOTHESIS", "ci") == "ci":
        return settings(max_examples=ci_examples)
    return settings()


# ---------------------------------------------------------------------------------------------
# values and layouts
# ---------------------------------------------------------------------------------------------
DTYPES = ("float64", "float32", "float16", "bfloat16")
LAYOUTS = ("contiguous", "strided", "transposed", "row_strided", "offset")
SPECIALS = (
    "zero",
    "neg_zero",
    "one",
    "neg_one",
    "subnormal",
    "neg_subnormal",
    "large",
    "neg_large",
)


class Values(NamedTuple):
    """How to fill a tensor: ``seed`` for the normal part (std ``scale``), rounded to a 0.5 grid
    if ``grid``; a ``density`` fraction of entries replaced by ``specials``; rows copied from
    earlier rows if ``dup_rows``."""

    seed: int
    scale: float = 1.0
    grid: bool = False
    specials: tuple[str, ...] = ()
    density: float = 0.0
    dup_rows: bool = False


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def product_large(dtype: torch.dtype) -> float:
    """The "large" magnitude for an op that sums up to 64 products of two such values."""
    return math.sqrt(torch.finfo(dtype).max / 64)


def _special(name: str, dtype: torch.dtype, large: float) -> float:
    tiny = torch.finfo(dtype).smallest_normal / 8  # a subnormal in every float dtype
    return {
        "zero": 0.0,
        "neg_zero": -0.0,
        "one": 1.0,
        "neg_one": -1.0,
        "subnormal": tiny,
        "neg_subnormal": -tiny,
        "large": large,
        "neg_large": -large,
        "neg_inf": -math.inf,
    }[name]


def materialize(v: Values, shape: tuple[int, ...], dtype: torch.dtype, large: float) -> Tensor:
    """The tensor ``v`` describes (contiguous, CPU); the same draw for every dtype."""
    g = torch.Generator().manual_seed(v.seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * v.scale
    if v.grid:
        x = torch.round(x * 2) / 2
    if v.specials and x.numel():
        pool = torch.tensor([_special(s, dtype, large) for s in v.specials], dtype=torch.float64)
        mask = torch.rand(shape, generator=g) < v.density
        pick = torch.randint(len(pool), shape, generator=g)
        x = torch.where(mask, pool[pick], x)
    if v.dup_rows and x.dim() >= 1 and x.shape[0] > 1:
        src = torch.randint(0, x.shape[0], (x.shape[0],), generator=g)
        x = x[torch.minimum(src, torch.arange(x.shape[0]))]
    return x.to(dtype)


def laid_out(t: Tensor, layout: str) -> Tensor:
    """The same values as the 2-D ``t`` in another memory layout (a view into a larger buffer)."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "strided":  # every row strided (a column step of 2)
        wide = t.new_zeros(rows, 2 * cols)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "transposed":  # column-major
        return t.t().contiguous().t()
    if layout == "row_strided":  # every other row of a buffer
        wide = t.new_zeros(2 * rows, cols)
        wide[::2] = t
        return wide[::2]
    if layout == "offset":  # a window of a larger buffer: storage offset, row stride > cols
        big = t.new_zeros(rows + 1, cols + 3)
        big[1:, 2 : 2 + cols] = t
        return big[1:, 2 : 2 + cols]
    raise ValueError(f"unknown layout {layout!r}")


@st.composite
def values(draw, specials: tuple[str, ...] = SPECIALS) -> Values:
    return Values(
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1.0, 1e-3, 10.0])),
        grid=draw(st.booleans()),
        specials=tuple(draw(st.lists(st.sampled_from(specials), max_size=4, unique=True))),
        density=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        dup_rows=draw(st.booleans()),
    )


dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)
SOFTMAX_SPECIALS = (*SPECIALS, "neg_inf")
