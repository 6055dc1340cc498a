"""Bad inputs of gather_mm (grouped_mm over a plan's gathered rows) and its backward: every check
of check_gather_mm / check_gather_mm_backward (csrc/checks_grouped_mm.h), of the fakes and of the
sparse refusal. The token, row and offset values are checked on the CPU (a clear error); on CUDA
the unfused chain's kernels assert on the device (the documented asynchronous assert)."""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    arg,
    on_meta,
    op_cases,
    row,
    set_entry,
    standard_rows,
    value_row,
)

T, E, D_IN, D_OUT = 5, 3, 4, 6
EXPERT = [[0, 1], [1, 2], [0, 2], [1, 0], [2, 1]]
M = 2 * T


# ---- gather_mm ---------------------------------------------------------------------------------
def _good(d):
    p = smoe.make_plan(d.i32(EXPERT), E)
    return {
        "x": d.f(T, D_IN),
        "token": p.token,
        "row": p.row,
        "w": d.f(E, D_IN, D_OUT),
        "offsets": p.offsets,
        "bias": d.f(E, D_OUT),
    }


_DTYPES = {
    "x": ("int32",),
    "token": ("int64",),
    "row": ("int64",),
    "w": ("float64",),
    "offsets": ("int32",),
}

_shared_rows = [  # the forward's checks, which the backward makes too
    row("size", "x T+1 rows", arg("x"), x=lambda d, a: d.f(T + 1, D_IN)),
    row("size", "w d_in+1 rows", arg("w"), w=lambda d, a: d.f(E, D_IN + 1, D_OUT)),
    row("offsets", "offsets E entries", arg("offsets"), offsets=lambda d, a: a["offsets"][:-1]),
    value_row("ids", "token id = T", arg("token"), token=set_entry("token", 0, T)),
    value_row("ids", "token id = -2", arg("token"), token=set_entry("token", 1, -2)),
    value_row(
        "offsets", "offsets non-monotone", arg("offsets"), offsets=lambda d, a: d.i64([0, 5, 3, 10])
    ),
    value_row(
        "offsets", "offsets end past M", arg("offsets"), offsets=lambda d, a: d.i64([0, 3, 6, 11])
    ),
]

_rows = [
    *standard_rows({**_DTYPES, "bias": ("float64",)}),
    *_shared_rows,
    row("size", "bias d_out+1 columns", arg("bias"), bias=lambda d, a: d.f(E, D_OUT + 1)),
    row(
        "config",
        "gather_min_bytes -1",
        arg("gather_min_bytes"),
        gather_min_bytes=lambda d, a: -1,
    ),
    row(
        "meta",
        "meta w d_in+1 rows",
        arg("w"),
        **{n: on_meta(n) for n in ("x", "token", "row", "offsets", "bias")},
        w=lambda d, a: torch.empty(E, D_IN + 1, D_OUT, device="meta"),
    ),
    row("sparse", "x sparse COO", arg("x"), x=lambda d, a: a["x"].to_sparse()),
]


# ---- gather_mm_backward ------------------------------------------------------------------------
def _bwd_good(d):
    a = _good(d)
    del a["bias"]
    return {"grad_out": d.f(M, D_OUT), **a, "need_x": True, "need_w": True}


_bwd_rows = [
    *standard_rows({"grad_out": ("int32", "float64"), **_DTYPES}),
    *_shared_rows,
    row("size", "grad_out M+1 rows", arg("grad_out"), grad_out=lambda d, a: d.f(M + 1, D_OUT)),
    row(
        "size", "grad_out d_out+1 columns", arg("grad_out"), grad_out=lambda d, a: d.f(M, D_OUT + 1)
    ),
    value_row("ids", "row id = M", arg("row"), row=set_entry("row", (0, 0), M)),
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        **{n: on_meta(n) for n in ("x", "token", "row", "w", "offsets")},
        grad_out=lambda d, a: torch.empty(M, device="meta"),
    ),
    row(
        "sparse",
        "grad_out sparse COO",
        arg("grad_out"),
        grad_out=lambda d, a: a["grad_out"].to_sparse(),
    ),
]

CASES = [
    *op_cases("gather_mm", _good, _rows),
    *op_cases("gather_mm_backward", _bwd_good, _bwd_rows),
]
