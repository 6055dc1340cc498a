"""Bad inputs of expert_mlp (each expert's whole MLP): through a plan (token and row) and on
grouped rows, with biases. The token and offset values are checked on the CPU (a clear error); on
CUDA the unfused chain's kernels assert on the device (the documented asynchronous assert)."""

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

T, E, D, F = 5, 3, 4, 3  # tokens, experts, d_model, d_ff (w_in has 2F columns: swiglu)
EXPERT = [[0, 1], [1, 2], [0, 2], [1, 0], [2, 1]]


def _good(d):
    p = smoe.make_plan(d.i32(EXPERT), E)
    return {
        "x": d.f(T, D),
        "token": p.token,
        "row": p.row,
        "offsets": p.offsets,
        "w_in": d.f(E, D, 2 * F),
        "b_in": d.f(E, 2 * F),
        "w_out": d.f(E, F, D),
        "b_out": d.f(E, D),
        "activation": "swiglu",
    }


def _grouped(d):  # no plan: x holds the grouped rows
    a = _good(d)
    return {**a, "x": d.f(T * 2, D), "token": None, "row": None}


_rows = [
    *standard_rows(
        {
            "x": ("int32",),
            "token": ("int64",),
            "row": ("int64",),
            "offsets": ("int32",),
            "w_in": ("float64",),
            "b_in": ("float64",),
            "w_out": ("float64",),
            "b_out": ("float64",),
        }
    ),
    row("config", "activation unknown", arg("activation"), activation=lambda d, a: "silu"),
    row("config", "activation gelu on a swiglu w_in", arg("w_in"), activation=lambda d, a: "gelu"),
    row("config", "fuse_min_bytes -1", arg("fuse_min_bytes"), fuse_min_bytes=lambda d, a: -1),
    row("size", "w_in d+1 rows", arg("w_in"), w_in=lambda d, a: d.f(E, D + 1, 2 * F)),
    row("size", "w_out E+1 experts", arg("w_out"), w_out=lambda d, a: d.f(E + 1, F, D)),
    row("size", "b_in 2F+1 columns", arg("b_in"), b_in=lambda d, a: d.f(E, 2 * F + 1)),
    row("size", "b_out E+1 rows", arg("b_out"), b_out=lambda d, a: d.f(E + 1, D)),
    row("size", "row T+1 tokens", arg("row"), row=lambda d, a: torch.cat([a["row"], a["row"][:1]])),
    row("size", "token without row", arg("row"), row=lambda d, a: None),
    row("offsets", "offsets E entries", arg("offsets"), offsets=lambda d, a: a["offsets"][:-1]),
    value_row("ids", "token id = T", arg("token"), token=set_entry("token", 0, T)),
    value_row("ids", "token id = -2", arg("token"), token=set_entry("token", 1, -2)),
    value_row(
        "offsets", "offsets non-monotone", arg("offsets"), offsets=lambda d, a: d.i64([0, 5, 3, 10])
    ),
    value_row(
        "offsets", "offsets end past M", arg("offsets"), offsets=lambda d, a: d.i64([0, 3, 6, 11])
    ),
    row(
        "meta",
        "meta w_in d+1 rows",
        arg("w_in"),
        **{n: on_meta(n) for n in ("x", "token", "row", "offsets", "b_in", "w_out", "b_out")},
        w_in=lambda d, a: torch.empty(E, D + 1, 2 * F, device="meta"),
    ),
    row("sparse", "w_in sparse COO", arg("w_in"), w_in=lambda d, a: a["w_in"].to_sparse()),
]

_grouped_rows = [
    row("rank", "grouped x 1-D", arg("x"), x=lambda d, a: a["x"][:, 0]),
    value_row(
        "offsets",
        "grouped offsets end past M",
        arg("offsets"),
        offsets=lambda d, a: d.i64([0, 3, 6, 11]),
    ),
]

_wrapper_rows = [
    row(
        "config",
        "wrapper activation unknown",
        arg("activation"),
        exc=(ValueError,),
        activation=lambda d, a: "silu",
    ),
]


def _wrapper(a):
    plan = smoe.ops.Plan(a["offsets"], a["token"], a["token"], a["row"], a["row"] >= 0)
    return smoe.ops.expert_mlp(
        a["x"],
        a["offsets"],
        a["w_in"],
        a["w_out"],
        b_in=a["b_in"],
        b_out=a["b_out"],
        activation=a["activation"],
        plan=plan,
        fused=True,
    )


CASES = [
    *op_cases("expert_mlp", _good, _rows),
    *op_cases("expert_mlp", _grouped, _grouped_rows),
    *op_cases("expert_mlp", _good, _wrapper_rows, call=_wrapper),
]
