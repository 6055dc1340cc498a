"""Bad inputs of s2moe_perturb (S2MoE's Gaussian perturbation, specs/s2moe.md §5) and its backward:
every check of csrc/checks_s2moe.h (dtypes and devices of n1, n2 and the statistics against x,
x's rank, n1/n2 of x's shape, statistics broadcast over one run of consecutive dims, the same for
all three), of the glue (the backward's grad; float64 refused on CUDA), of the fakes and of the
schema (output_mask: bool[4]).

The good calls: x [T, 7, D] with DSU statistics [T, 1, D]. NaN and ±inf in x, the noise or the
statistics are IEEE arithmetic, not errors (a defined row); so are empty tensors. No overflow
rows: the kernels index with int64. A statistic of one element is one value whatever its shape
(a defined row: the output keeps x's shape, as the fakes say).
"""

from __future__ import annotations

import torch

from tests.bad_inputs.cases import (
    Case,
    D,
    T,
    arg,
    defined,
    on_meta,
    op_cases,
    row,
    standard_rows,
)

S = 7  # the good calls' sequence length (the dim the statistics are broadcast over)
NAN, INF = float("nan"), float("inf")
_STATS = ("mu", "s_mul", "s_add")
_FWD = ("x", "n1", "n2", *_STATS)


def _fwd_good(d):
    return {
        "x": d.f(T, S, D),
        "n1": d.f(T, S, D),
        "n2": d.f(T, S, D),
        "mu": d.f(T, 1, D),
        "s_mul": d.f(T, 1, D).abs(),
        "s_add": d.f(T, 1, D).abs(),
    }


def _bwd_good(d):
    return {"grad": d.f(T, S, D), **_fwd_good(d), "output_mask": [True, True, True, True]}


def _f(d, *shape: int) -> torch.Tensor:
    """Dev.f for any shape, 0-dim included."""
    return torch.randn(shape, device=d.device)


def _shape(*shape: int):
    return lambda d, a: _f(d, *shape)


def _all_meta(names, **changes):
    return {**{n: on_meta(n) for n in names}, **changes}


def _meta(*shape: int, dtype=torch.float32):
    return lambda d, a: torch.empty(*shape, device="meta", dtype=dtype)


def _rank0(names):
    return {n: (lambda d, a: _f(d)) for n in names}


def _shared_rows(op_names: tuple[str, ...]) -> list:
    """Rows of the checks both ops run (checks_s2moe.h), on x [T, S, D]."""
    return [
        row("dtype", "x float64, the others float32", arg("n1"), x=lambda d, a: a["x"].double()),
        row(
            "dtype",
            "all float64 (CUDA: CPU only)",
            r"\bfloat64\b",
            devices=("cuda",),
            **{n: (lambda d, a, n=n: a[n].double()) for n in op_names},
        ),
        row("size", "n1 [T, S, D+1]", arg("n1"), n1=_shape(T, S, D + 1)),
        row("size", "n2 transposed [D, S, T]", arg("n2"), n2=_shape(D, S, T)),
        row("size", "mu [T, 2, D]: not broadcastable", arg("mu"), mu=_shape(T, 2, D)),
        row("size", "s_mul [T, S, D+1]", arg("s_mul"), s_mul=_shape(T, S, D + 1)),
        row("size", "mu [T, D]: rank 2 of 3", arg("mu"), mu=_shape(T, D)),
        row("size", "mu [D]: trailing broadcast", arg("mu"), mu=_shape(D)),
        row(
            "size",
            "mu s_mul s_add [1, S, 1]: two runs",
            arg("mu") + r".*\bone run\b",
            **{n: _shape(1, S, 1) for n in _STATS},
        ),
        row("size", "s_mul [T, S, 1]: another run than mu's", arg("s_mul"), s_mul=_shape(T, S, 1)),
        row("size", "s_add [1, S, D]: time-major run", arg("s_add"), s_add=_shape(1, S, D)),
        row(
            "size",
            "mu s_mul s_add [T, S, D] (elementwise) with s_add [T, 1, D]",
            arg("s_add"),
            mu=_shape(T, S, D),
            s_mul=_shape(T, S, D),
        ),
        row(
            "size",
            "mu 0 where x has 1: [T, 0, D] for x [T, 1, D]",
            arg("mu"),
            **{n: _shape(T, 1, D) for n in op_names if n not in _STATS},
            mu=_shape(T, 0, D),
        ),
        row("rank", "x 0-dim (everything 0-dim)", arg("x"), **_rank0(op_names)),
        row("sparse", "x sparse COO", arg("x"), x=lambda d, a: a["x"].to_sparse()),
        row("sparse", "n2 sparse COO", arg("n2"), n2=lambda d, a: a["n2"].to_sparse()),
        row("sparse", "s_add sparse COO", arg("s_add"), s_add=lambda d, a: a["s_add"].to_sparse()),
    ]


# ---- s2moe_perturb ------------------------------------------------------------------------------
_fwd_rows = [
    *standard_rows(
        {
            "x": ("int32", "bool"),
            "n1": ("float64",),
            "n2": ("float16",),
            "mu": ("float64",),
            "s_mul": ("bfloat16",),
            "s_add": ("int64",),
        }
    ),
    *_shared_rows(_FWD),
    row("meta", "meta x int32", arg("x"), **_all_meta(_FWD, x=_meta(T, S, D, dtype=torch.int32))),
    row("meta", "meta n1 [T, S, D+1]", arg("n1"), **_all_meta(_FWD, n1=_meta(T, S, D + 1))),
    row(
        "meta",
        "meta s_mul float16",
        arg("s_mul"),
        **_all_meta(_FWD, s_mul=_meta(T, 1, D, dtype=torch.float16)),
    ),
    row(
        "grad",
        "mu float64 requiring grad",
        arg("mu"),
        mu=lambda d, a: a["mu"].double().requires_grad_(),
    ),
    row("dtype", "x a list", arg("x"), x=lambda d, a: [1.0] * D),
]


# ---- s2moe_perturb_backward ---------------------------------------------------------------------
_BWD = ("grad", *_FWD)

_bwd_rows = [
    *standard_rows(
        {
            "grad": ("float64", "int32"),
            "x": ("int32",),
            "n1": ("float16",),
            "n2": ("bfloat16",),
            # (no device row here: the backward's fake does not check the statistics' device,
            # see the CUDA-only rows below)
        }
    ),
    *[
        r
        for r in standard_rows({"mu": ("bfloat16",), "s_mul": ("float64",), "s_add": ("int32",)})
        if r.kind != "device"
    ],
    *_shared_rows(_BWD),
    row("size", "grad [T, S, D+1]", arg("grad"), grad=_shape(T, S, D + 1)),
    row("size", "grad [T, 1, D]", arg("grad"), grad=_shape(T, 1, D)),
    row("sparse", "grad sparse COO", arg("grad"), grad=lambda d, a: a["grad"].to_sparse()),
    row(
        "meta",
        "meta n1 float16",
        arg("n1"),
        **_all_meta(_BWD, n1=_meta(T, S, D, dtype=torch.float16)),
    ),
    row(
        "config",
        "output_mask of 3",
        r"\bfixed-size array of size 4\b",  # torch's schema conversion, before the op
        output_mask=lambda d, a: [True, True, True],
    ),
    row(
        "config",
        "output_mask of 5",
        r"\bfixed-size array of size 4\b",
        output_mask=lambda d, a: [True] * 5,
    ),
    row("config", "output_mask None", arg("output_mask"), output_mask=lambda d, a: None),
    row(
        "config",
        "output_mask a tensor",
        arg("output_mask"),
        output_mask=lambda d, a: torch.ones(4, dtype=torch.bool),
    ),
    *[
        row(
            "device",
            f"{n} on the other device",
            arg(n),
            devices=("cuda",),
            **{n: (lambda d, a, n=n: a[n].to(d.other))},
        )
        for n in _STATS
    ],
]


# ---- defined behaviour ---------------------------------------------------------------------------
def _one_value_statistics(d) -> bool:
    """A one-element statistic is one value whatever its shape ([], [1], all ones of x's rank,
    or of a higher rank): the output keeps x's shape and equals the float64 result; its gradient
    has the statistic's shape."""
    op = torch.ops.smoe.s2moe_perturb.default
    x, n1, n2 = (d.f(T, S, D) for _ in range(3))
    ok = True
    for shape in ((), (1,), (1, 1, 1), (1, 1, 1, 1)):
        mu, s_mul, s_add = (_f(d, *shape) for _ in range(3))
        out = op(x, n1, n2, mu, s_mul, s_add)
        x64, n164, n264 = x.double(), n1.double(), n2.double()
        want = ((1 + s_mul.item() * n164) * x64 + (mu.item() + s_add.item() * n264)).float()
        grads = torch.ops.smoe.s2moe_perturb_backward.default(
            torch.ones_like(x), x, n1, n2, mu, s_mul, s_add, [True] * 4
        )
        ok &= out.shape == x.shape and torch.allclose(out, want, atol=1e-5)
        ok &= all(g.shape == shape for g in grads[1:])
        ok &= torch.allclose(grads[1].sum(), torch.tensor(float(x.numel()), device=d.device))
    return bool(ok)


def _empty_inputs(d) -> bool:
    """x with a zero size: an empty output; the statistics' gradients are zeros of their shapes
    (also when the statistics themselves are not empty, e.g. [T, 1, D] over S = 0)."""
    fwd = torch.ops.smoe.s2moe_perturb.default
    bwd = torch.ops.smoe.s2moe_perturb_backward.default
    ok = True
    for shape, stat in (((0, S, D), (0, 1, D)), ((T, 0, D), (T, 1, D)), ((T, S, 0), ())):
        x, n1, n2 = (_f(d, *shape) for _ in range(3))
        stats = [_f(d, *stat) for _ in range(3)]
        ok &= fwd(x, n1, n2, *stats).shape == shape
        grads = bwd(_f(d, *shape), x, n1, n2, *stats, [True] * 4)
        ok &= grads[0].shape == shape
        ok &= all(g.shape == stat and not g.any() for g in grads[1:])
    return bool(ok)


def _non_finite_values(d) -> bool:
    """NaN and ±inf in x, the noise or the statistics are IEEE arithmetic: no error, and the
    entries they reach are the float64 result's (1 + s_mul n1 = 0 at an infinite x: NaN)."""
    x = torch.tensor([[1.0, INF, -INF, NAN], [2.0, 3.0, INF, 1.0]], device=d.device)
    n1 = torch.tensor([[NAN, 0.0, -1.0, 1.0], [1.0, INF, 0.0, 1.0]], device=d.device)
    n2 = torch.ones(2, 4, device=d.device)
    mu = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, NAN]], device=d.device)
    s = torch.ones(2, 4, device=d.device)
    out = torch.ops.smoe.s2moe_perturb.default(x, n1, n2, mu, s, s)
    want = (1 + s.double() * n1.double()) * x.double() + (mu.double() + s.double() * n2.double())
    return torch.equal(out.isnan(), want.isnan()) and torch.equal(
        out.nan_to_num(0.0), want.float().nan_to_num(0.0)
    )


def _noise_gets_no_gradient(d) -> bool:
    """Noise that requires grad gets none (None), x and the statistics theirs."""
    from smoe import ops

    a = {n: t.requires_grad_() for n, t in _fwd_good(d).items()}
    out = ops.s2moe_perturb(*(a[n] for n in _FWD))
    grads = torch.autograd.grad(out.sum(), [a[n] for n in _FWD], allow_unused=True)
    return grads[1] is None and grads[2] is None and all(g is not None for g in grads[3:])


def _defined(name: str, kind: str, fn, description: str) -> Case:
    return Case(
        f"smoe::s2moe_perturb/{name}", "smoe::s2moe_perturb", kind, fn, defined(description)
    )


_defined_rows = [
    _defined(
        "one-element statistics of any shape (valid)",
        "size",
        _one_value_statistics,
        "one value each ([], [1], all ones, rank above x's): x's shape out",
    ),
    _defined(
        "empty x (valid)",
        "size",
        _empty_inputs,
        "empty output; zero statistics' gradients of their shapes",
    ),
    _defined(
        "NaN and inf values (valid)",
        "nan",
        _non_finite_values,
        "IEEE arithmetic: NaN and inf where the float64 result has them",
    ),
    _defined(
        "noise requiring grad (valid)",
        "grad",
        _noise_gets_no_gradient,
        "the noise gets no gradient (None)",
    ),
]


CASES: list[Case] = [
    *op_cases("s2moe_perturb", _fwd_good, _fwd_rows),
    *_defined_rows,
    *op_cases("s2moe_perturb_backward", _bwd_good, _bwd_rows),
]
