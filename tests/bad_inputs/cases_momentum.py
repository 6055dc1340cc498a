"""Bad inputs of the momentum op (specs/momentum_smoe.md §3-§5, §9): momentum_update and its
backward.

u may have any rank, so a rank row changes one tensor's rank against u's (a shape error naming
that tensor). The good calls use kind='adam', so that p and v (and the backward's grad_p and
grad_v) are real tensors; the rows about p and v for the other kinds switch the kind. NaN or inf
values are not errors (IEEE arithmetic, as for expert data); no overflow rows: the op indexes with
int64.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    Case,
    D,
    Expect,
    Row,
    T,
    arg,
    on_meta,
    op_cases,
    standard_rows,
)

NAN, INF = float("nan"), float("inf")
_OPTIONS = {
    "kind": "adam",
    "mu": 0.7,
    "gamma": 1.0,
    "sign": -1.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "gamma1": 1.0,
    "eps": 1e-8,
    "robust_a": 0.96,
    "robust_b": 0.04,
}


def row(family: str, label: str, pattern: str, *, exc=(RuntimeError,), **changes) -> Row:
    """cases.row under another first parameter name, so that ``kind`` (the op's option) can be
    among the changes."""
    return Row(family, label, Expect(exc, pattern), changes)


def _all_meta(*names: str) -> dict:
    return {n: on_meta(n) for n in names}


def _option_rows(wrapper: bool = False) -> list:
    exc = (ValueError,) if wrapper else (RuntimeError,)
    prefix = "wrapper " if wrapper else ""
    bad = [
        ("kind", "nesterov"),
        ("mu", 1.0),
        ("mu", -0.1),
        ("mu", NAN),
        ("gamma", -1.0),
        ("gamma", INF),
        ("sign", 0.0),
        ("sign", 2.0),
        ("beta1", 1.0),
        ("beta2", -0.5),
        ("beta2", NAN),
        ("gamma1", -1.0),
        ("eps", 0.0),
        ("eps", INF),
        ("robust_a", 0.0),
        ("robust_b", 1.0),
    ]
    if wrapper:  # the wrapper's rows: one per option
        bad = [b for i, b in enumerate(bad) if b[0] not in {x[0] for x in bad[:i]}]
    return [
        row("config", f"{prefix}{name} = {value}", arg(name), exc=exc, **{name: _const(value)})
        for name, value in bad
    ]


def _const(value):
    return lambda d, a: value


def _state_rows(op_rows: bool = True) -> list:
    """p and v: missing for adam, given for the other kinds."""
    exc = (RuntimeError,) if op_rows else (ValueError,)
    prefix = "" if op_rows else "wrapper "
    rows = []
    for name in ("p", "v"):
        rows.append(
            row(
                "config",
                f"{prefix}{name} None for adam",
                arg(name),
                exc=exc,
                **{name: _const(None)},
            )
        )
        for kind in ("heavy_ball", "robust"):
            rows.append(
                row(
                    "config",
                    f"{prefix}{name} given for {kind}",
                    arg(name),
                    exc=exc,
                    kind=_const(kind),
                    **{"p" if name == "v" else "v": _const(None)},
                )
            )
    return rows


# ---- momentum_update -----------------------------------------------------------------------------
def _fwd_good(d):
    return {"u": d.f(T, D), "m": d.f(T, D), "p": d.f(T, D), "v": d.f(T, D).abs(), **_OPTIONS}


_fwd_rows = [
    *standard_rows(
        {
            "u": ("int32", "bool"),
            "m": ("float64", "float16"),
            "p": ("bfloat16",),
            "v": ("float64",),
        }
    ),
    row(
        "dtype",
        "u float16 with float16 state",
        arg("m"),
        u=lambda d, a: a["u"].half(),
        m=lambda d, a: a["m"].half(),
    ),
    row("dtype", "u float64 with float32 state", arg("m"), u=lambda d, a: a["u"].double()),
    row("size", "m [T, D+1]", arg("m"), m=lambda d, a: d.f(T, D + 1)),
    row("size", "p [T+1, D]", arg("p"), p=lambda d, a: d.f(T + 1, D)),
    row("size", "v transposed [D, T]", arg("v"), v=lambda d, a: a["v"].t().contiguous()),
    row("size", "u empty, m not", arg("m"), u=lambda d, a: d.f(0, D)),
    *_option_rows(),
    *_state_rows(),
    row(
        "meta",
        "meta m [T, D+1]",
        arg("m"),
        **_all_meta("u", "p", "v"),
        m=lambda d, a: torch.empty(T, D + 1, device="meta"),
    ),
    row("meta", "meta mu = 1", arg("mu"), **_all_meta("u", "m", "p", "v"), mu=_const(1.0)),
    row("meta", "meta p None for adam", arg("p"), **_all_meta("u", "m", "v"), p=_const(None)),
    row("sparse", "u sparse COO", arg("u"), u=lambda d, a: a["u"].to_sparse()),
    row("sparse", "v sparse COO", arg("v"), v=lambda d, a: a["v"].to_sparse()),
]


def _wrapper_fwd(a):
    return smoe.ops.momentum_update(**a)


_fwd_wrapper_rows = [
    *_option_rows(wrapper=True),
    *_state_rows(op_rows=False),
    row("dtype", "wrapper u int32", arg("u"), u=lambda d, a: a["u"].int()),
    row("size", "wrapper m [T+1, D]", arg("m"), m=lambda d, a: d.f(T + 1, D)),
]


# ---- momentum_update_backward --------------------------------------------------------------------
_BWD = ("grad_delta", "grad_m", "grad_p", "grad_v", "u", "m", "p", "v")


def _bwd_good(d):
    return {n: d.f(T, D).abs() if n == "v" else d.f(T, D) for n in _BWD} | _OPTIONS


def _empty(d, a):
    return torch.empty(0, device=d.device)


_bwd_rows = [
    *standard_rows(
        {
            "grad_delta": ("float64", "int32"),
            "grad_m": ("float16",),
            "grad_p": ("float64",),
            "grad_v": ("bfloat16",),
            "u": ("int32",),
            "m": ("float64",),
        }
    ),
    row("size", "grad_delta [T, D+1]", arg("grad_delta"), grad_delta=lambda d, a: d.f(T, D + 1)),
    row("size", "grad_v [T+1, D]", arg("grad_v"), grad_v=lambda d, a: d.f(T + 1, D)),
    row(
        "size",
        "grad_p [T, D] for heavy_ball",
        arg("grad_p"),
        kind=_const("heavy_ball"),
        p=_const(None),
        v=_const(None),
        grad_v=_empty,
    ),
    row(
        "size",
        "grad_v [T, D] for robust",
        arg("grad_v"),
        kind=_const("robust"),
        p=_const(None),
        v=_const(None),
        grad_p=_empty,
    ),
    row("config", "kind = nesterov", arg("kind"), kind=_const("nesterov")),
    row("config", "eps = 0", arg("eps"), eps=_const(0.0)),
    row("config", "robust_b = -1", arg("robust_b"), robust_b=_const(-1.0)),
    row("config", "v None for adam", arg("v"), v=_const(None)),
    row(
        "meta",
        "meta grad_m [T+1, D]",
        arg("grad_m"),
        **_all_meta(*[n for n in _BWD if n != "grad_m"]),
        grad_m=lambda d, a: torch.empty(T + 1, D, device="meta"),
    ),
    row(
        "sparse",
        "grad_delta sparse COO",
        arg("grad_delta"),
        grad_delta=lambda d, a: a["grad_delta"].to_sparse(),
    ),
]


CASES: list[Case] = [
    *op_cases("momentum_update", _fwd_good, _fwd_rows),
    *op_cases("momentum_update", _fwd_good, _fwd_wrapper_rows, call=_wrapper_fwd),
    *op_cases("momentum_update_backward", _bwd_good, _bwd_rows),
]
