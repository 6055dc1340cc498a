"""The fuzz strategy of s2moe_perturb (S2MoE's Gaussian perturbation, specs/s2moe.md §2.2, §5):
x of rank 1 to 4 with the statistics (mu, s_mul, s_add) broadcast over one run of consecutive
dims, drawn from the named patterns (DSU "sequence" [B, 1, d], time-major [1, B, d], "token"
[T, 1], "batch" [1, d], a two-dim run [B, 1, 1, d], elementwise) or any run of any rank; each
statistic maybe one value (InstanceNorm's scalars: shape [] or all ones of x's rank); empty
tensors (a zero size anywhere), size-1 dims of x; every dtype; non-contiguous x, noise and
statistics; entries with zeros of both signs, ±1, subnormals and ±sqrt(finfo.max) (its products
with the noise and the upstream stay finite in float32 and float64), zero noise, and the
overlays +-inf and NaN in x (IEEE arithmetic, no error); any output_mask of the backward op."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from tests.fuzz.values import SPECIALS, Values, dtype_of, dtypes, materialize, values

# Layouts of an N-D tensor (tests/fuzz/values.py's are 2-D only).
ND_LAYOUTS = ("contiguous", "transposed", "strided", "offset")
# The statistics' entries: no "large" in s_mul and s_add (their product with a large x would
# leave the range the rule is checked in; mu and x take it).
STAT_SPECIALS = ("zero", "neg_zero", "one", "neg_one", "subnormal", "neg_subnormal")
OVERLAYS = ("none", "none", "none", "inf", "nan")

# name -> (rank of x, the run [p, q) of dims the statistics are broadcast over)
PATTERNS = {
    "sequence": (3, (1, 2)),  # DSU per (sample, feature): x [B, S, d], stats [B, 1, d]
    "time_major": (3, (0, 1)),  # fastmoe's [S, B, d]: stats [1, B, d]
    "token": (2, (1, 2)),  # per token: x [T, d], stats [T, 1]
    "batch": (2, (0, 1)),  # per feature: x [T, d], stats [1, d]
    "two_dim_run": (4, (1, 3)),  # x [B, S1, S2, d], stats [B, 1, 1, d]
}


class S2MoECase(NamedTuple):
    """s2moe_perturb on ``x`` of ``shape`` with the statistics broadcast over the dims
    ``[run[0], run[1])`` (an empty run: elementwise, x's shape); ``scalar`` marks mu, s_mul,
    s_add given as one value (shape [] if ``scalar_rank0``, else all ones of x's rank)."""

    shape: tuple[int, ...]
    run: tuple[int, int]
    scalar: tuple[bool, bool, bool]
    dtype: str
    x: Values
    mu: Values
    s: Values  # s_mul from its seed, s_add from seed + 1
    noise_seed: int
    scalar_rank0: bool = True
    zero_noise: bool = False
    layout: str = "contiguous"  # x's
    noise_layout: str = "contiguous"
    stat_layout: str = "contiguous"
    overlay: str = "none"  # in x: "none", "inf" (some ±inf) or "nan" (one NaN)
    mask: tuple[bool, bool, bool, bool] = (True, True, True, True)
    pattern: str = "any"  # the name of the draw's shape pattern (for reading a failure)

    @property
    def stat_shape(self) -> tuple[int, ...]:
        p, q = self.run
        return tuple(1 if p <= i < q else n for i, n in enumerate(self.shape))


# s_mul and s_add (a std, or InstanceNorm's alpha, beta): |normal| * scale + 0.1, scale <= 3.
_s_values = st.builds(
    Values,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    grid=st.booleans(),
    specials=st.lists(st.sampled_from(STAT_SPECIALS), max_size=3, unique=True).map(tuple),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    dup_rows=st.booleans(),
)


def _size(hi: int) -> st.SearchStrategy[int]:
    """A dim: mostly 1..hi, sometimes exactly 1 or 0 (empty)."""
    return st.integers(1, hi) | st.sampled_from([1, 1, 0])


@st.composite
def _shape_and_run(draw) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    name = draw(st.sampled_from([*PATTERNS, "elementwise", "any", "any"]))
    if name in PATTERNS:
        rank, run = PATTERNS[name]
    else:
        rank = draw(st.integers(1, 4))
        run = (rank, rank)
        if name == "any":
            p = draw(st.integers(0, rank))
            run = (p, draw(st.integers(p, rank)))
    # at most ~4000 elements: sums over a run of up to 40 (ranks 1-3), 36 (rank 4)
    caps = {1: (64,), 2: (48, 24), 3: (5, 40, 16), 4: (3, 6, 6, 8)}[rank]
    shape = tuple(draw(_size(c)) for c in caps)
    return name, shape, run


@st.composite
def _s2moe_cases(draw) -> S2MoECase:
    name, shape, run = draw(_shape_and_run())
    scalar = draw(
        st.sampled_from([(False,) * 3, (False,) * 3, (True,) * 3])
        | st.tuples(st.booleans(), st.booleans(), st.booleans())
    )
    return S2MoECase(
        shape=shape,
        run=run,
        scalar=scalar,
        dtype=draw(dtypes),
        x=draw(values(SPECIALS)),
        mu=draw(values(SPECIALS)),
        s=draw(_s_values),
        noise_seed=draw(st.integers(0, 2**31 - 1)),
        scalar_rank0=draw(st.booleans()),
        zero_noise=draw(st.sampled_from([False, False, False, True])),
        layout=draw(st.sampled_from(ND_LAYOUTS)),
        noise_layout=draw(st.sampled_from(ND_LAYOUTS)),
        stat_layout=draw(st.sampled_from(ND_LAYOUTS)),
        overlay=draw(st.sampled_from(OVERLAYS)),
        mask=draw(st.tuples(*[st.booleans()] * 4)),
        pattern=name,
    )


s2moe_cases = _s2moe_cases()


def laid_out_nd(t: Tensor, layout: str) -> Tensor:
    """The same values as ``t`` (any rank) in another memory layout: "transposed" (all dims
    reversed in memory), "strided" (a step of 2 along the last dim), "offset" (a window of a
    larger buffer: storage offset, every stride larger)."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "strided":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "offset":
        big = t.new_zeros(*(n + 1 for n in t.shape))
        window = tuple(slice(1, 1 + n) for n in t.shape)
        big[window] = t
        return big[window]
    raise ValueError(f"unknown layout {layout!r}")


def large_of(dtype: torch.dtype) -> float:
    """The "large" magnitude of x and mu: sqrt(finfo.max). Its products with the noise (|n| < 6),
    s_mul (< 20) and a unit upstream, summed over up to 4000 terms, stay finite in float32 and
    float64; in fp16 they may overflow to inf, as the float64 result rounded to fp16 does."""
    return math.sqrt(torch.finfo(dtype).max)


def _stat(c: S2MoECase, v: Values, i: int, dt: torch.dtype, positive: bool) -> Tensor:
    """Statistic ``i`` (mu, s_mul, s_add) of a draw. ``positive`` (a std): |normal| + 0.1, the
    entries equal to a special value (0, ±1, ±subnormal) kept as they are."""
    if c.scalar[i]:
        shape = () if c.scalar_rank0 else (1,) * len(c.shape)
    else:
        shape = c.stat_shape
    t = materialize(v, shape, dt, large_of(dt)).double()
    if positive:
        special = (t == 0) | (t.abs() == 1) | (t.abs() < torch.finfo(dt).smallest_normal)
        t = torch.where(special, t, t.abs() + 0.1)
    return laid_out_nd(t.to(dt), c.stat_layout)


def build_s2moe_inputs(c: S2MoECase) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x, n1, n2, mu, s_mul, s_add) of a draw, each in its drawn layout."""
    dt = dtype_of(c.dtype)
    x = materialize(c.x, c.shape, dt, large_of(dt))
    if c.overlay != "none" and x.numel():
        g = torch.Generator().manual_seed(c.x.seed + 3)
        if c.overlay == "nan":
            x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = torch.nan
        else:
            mask = torch.rand(x.shape, generator=g) < 0.2
            sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(dt)
            x = torch.where(mask, sign * torch.inf, x)
    g = torch.Generator().manual_seed(c.noise_seed)
    n1, n2 = (torch.randn(c.shape, generator=g, dtype=torch.float64).to(dt) for _ in range(2))
    if c.zero_noise:
        n1, n2 = torch.zeros_like(n1), torch.zeros_like(n2)
    noise = [laid_out_nd(n, c.noise_layout) for n in (n1, n2)]
    s_mul = _stat(c, c.s, 1, dt, positive=True)
    s_add = _stat(c, c.s._replace(seed=c.s.seed + 1), 2, dt, positive=True)
    return laid_out_nd(x, c.layout), *noise, _stat(c, c.mu, 0, dt, False), s_mul, s_add
