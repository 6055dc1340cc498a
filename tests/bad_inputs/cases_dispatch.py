"""Bad inputs of the dispatch ops: make_plan, permute, combine and their backwards."""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    INT32_MAX,
    Case,
    D,
    E,
    K,
    T,
    arg,
    on_meta,
    op_cases,
    row,
    set_entry,
    standard_rows,
    value_row,
)

EXPERT = [[0, 1], [2, 0], [1, 2], [0, 2]]  # [T, K]
M = T * K
HUGE_T = 2**30 + 1  # HUGE_T * K >= 2^31


def _cat_first(name):
    return lambda d, a: torch.cat([a[name], a[name][:1]])


def _huge(name, rows=HUGE_T):
    return lambda d, a: d.huge(rows, a[name])


def _plan(d):
    return smoe.make_plan(d.i32(EXPERT), E)


# ---- make_plan ---------------------------------------------------------------------------------
def _plan_good(d):
    return {"expert": d.i32(EXPERT), "num_experts": E, "capacity": 2, "priority": d.f(T)}


_plan_rows = [
    *standard_rows({"expert": ("int64", "float32"), "priority": ("int32",)}),
    row("dtype", "num_experts float", arg("num_experts"), num_experts=lambda d, a: 3.0),
    row("dtype", "capacity float", arg("capacity"), capacity=lambda d, a: 1.5),
    row("size", "num_experts = 0", arg("num_experts"), num_experts=lambda d, a: 0),
    row("size", "num_experts = -1", arg("num_experts"), num_experts=lambda d, a: -1),
    row("size", "num_experts = 2^31", arg("num_experts"), num_experts=lambda d, a: 2**31),
    row("size", "priority [T+1]", arg("priority"), priority=lambda d, a: d.f(T + 1)),
    row("size", "priority [T, k+1]", arg("priority"), priority=lambda d, a: d.f(T, K + 1)),
    row("capacity", "capacity = -1", arg("capacity"), capacity=lambda d, a: -1),
    value_row("ids", "expert id = E", arg("expert"), expert=set_entry("expert", (1, 1), E)),
    value_row("ids", "expert id = -2", arg("expert"), expert=set_entry("expert", (2, 0), -2)),
    value_row(
        "ids", "expert id = 2^31-1", arg("expert"), expert=set_entry("expert", (3, 1), INT32_MAX)
    ),
    value_row(
        "nan", "priority NaN", arg("priority"), priority=set_entry("priority", 2, float("nan"))
    ),
    row(
        "grad",
        "expert float32 requiring grad",
        arg("expert"),
        expert=lambda d, a: a["expert"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta expert 1-D",
        arg("expert"),
        expert=lambda d, a: torch.zeros(T, dtype=torch.int32, device="meta"),
        priority=lambda d, a: None,
    ),
    row(
        "meta",
        "meta expert int64",
        arg("expert"),
        expert=lambda d, a: a["expert"].to("meta", torch.int64),
        priority=lambda d, a: None,
    ),
    row("sparse", "expert sparse COO", arg("expert"), expert=lambda d, a: a["expert"].to_sparse()),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 view)",
        arg("expert"),
        expert=_huge("expert"),
        priority=lambda d, a: None,
    ),
]


def _wrapper_plan(a):
    return smoe.make_plan(
        a["expert"], a["num_experts"], capacity=a["capacity"], group_size=a.get("group_size")
    )


_plan_wrapper_rows = [
    row(
        "size",
        "wrapper num_experts = 0",
        arg("num_experts"),
        exc=(ValueError,),
        num_experts=lambda d, a: 0,
    ),
    row(
        "capacity",
        "wrapper capacity = -1",
        arg("capacity"),
        exc=(ValueError,),
        capacity=lambda d, a: -1,
    ),
    row(
        "capacity",
        "wrapper group_size = 0",
        arg("group_size"),
        exc=(ValueError,),
        group_size=lambda d, a: 0,
    ),
    value_row(
        "ids",
        "wrapper grouped, expert id = E",
        arg("expert"),
        group_size=lambda d, a: 2,
        expert=set_entry("expert", (1, 1), E),
    ),
]


# ---- permute -----------------------------------------------------------------------------------
def _permute_good(d):
    p = _plan(d)
    return {"x": d.f(T, D), "token": p.token, "row": p.row}


_permute_rows = [
    *standard_rows({"x": ("int32", "bool"), "token": ("int64", "float32"), "row": ("int64",)}),
    row("size", "x T+1 rows", arg("x"), x=lambda d, a: d.f(T + 1, D)),
    value_row("ids", "token id = T", arg("token"), token=set_entry("token", 3, T)),
    value_row("ids", "token id = -2", arg("token"), token=set_entry("token", 0, -2)),
    value_row("ids", "token id = 2^31-1", arg("token"), token=set_entry("token", 5, INT32_MAX)),
    row(
        "grad",
        "token float32 requiring grad",
        arg("token"),
        token=lambda d, a: a["token"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta x 1-D",
        arg("x"),
        x=lambda d, a: torch.empty(T, device="meta"),
        token=lambda d, a: a["token"].to("meta"),
        row=lambda d, a: a["row"].to("meta"),
    ),
    row("sparse", "x sparse COO", arg("x"), x=lambda d, a: a["x"].to_sparse()),
    row(
        "overflow",
        "M >= 2^31 rows of token (stride-0 view)",
        arg("token"),
        token=_huge("token", 2**31),
    ),
    row("overflow", "T*k >= 2^31 (stride-0 views)", arg("row"), x=_huge("x"), row=_huge("row")),
]


# ---- permute_backward --------------------------------------------------------------------------
def _permute_bwd_good(d):
    return {"grad_out": d.f(M, D), "row": _plan(d).row}


_permute_bwd_rows = [
    *standard_rows({"grad_out": ("int32",), "row": ("int64", "float32")}),
    value_row("ids", "row id = M", arg("row"), row=set_entry("row", (1, 0), M)),
    value_row("ids", "row id = -2", arg("row"), row=set_entry("row", (0, 1), -2)),
    value_row("ids", "row id = 2^31-1", arg("row"), row=set_entry("row", (2, 1), INT32_MAX)),
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        grad_out=lambda d, a: torch.empty(M, device="meta"),
        row=lambda d, a: a["row"].to("meta"),
    ),
    row(
        "sparse",
        "grad_out sparse COO",
        arg("grad_out"),
        grad_out=lambda d, a: a["grad_out"].to_sparse(),
    ),
    row("overflow", "T*k >= 2^31 (stride-0 view)", arg("row"), row=_huge("row")),
]


# ---- combine -----------------------------------------------------------------------------------
def _combine_good(d):
    p = _plan(d)
    return {
        "y_sorted": d.f(M, D),
        "weight": d.f(T, K),
        "token": p.token,
        "slot": p.slot,
        "row": p.row,
    }


_combine_rows = [
    *standard_rows(
        {
            "y_sorted": ("int32",),
            "weight": ("int32", "float64"),
            "token": ("int64",),
            "slot": ("int64",),
            "row": ("int64", "float32"),
        }
    ),
    row("size", "weight [T, k+1]", arg("weight"), weight=lambda d, a: d.f(T, K + 1)),
    row("size", "slot M-1 entries", arg("slot"), slot=lambda d, a: a["slot"][1:]),
    row("size", "y_sorted M+1 rows", arg("y_sorted"), y_sorted=lambda d, a: d.f(M + 1, D)),
    value_row("ids", "row id = M", arg("row"), row=set_entry("row", (1, 0), M)),
    value_row("ids", "row id = -2", arg("row"), row=set_entry("row", (0, 1), -2)),
    value_row("ids", "row id = 2^31-1", arg("row"), row=set_entry("row", (3, 0), INT32_MAX)),
    row(
        "grad",
        "row float32 requiring grad",
        arg("row"),
        row=lambda d, a: a["row"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta y_sorted 1-D",
        arg("y_sorted"),
        y_sorted=lambda d, a: torch.empty(M, device="meta"),
        **{n: on_meta(n) for n in ("weight", "token", "slot", "row")},
    ),
    row("sparse", "weight sparse COO", arg("weight"), weight=lambda d, a: a["weight"].to_sparse()),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 views)",
        arg("row"),
        row=_huge("row"),
        weight=_huge("weight"),
    ),
    row(
        "overflow",
        "M >= 2^31 plan rows (stride-0 views)",
        arg("token"),
        y_sorted=_huge("y_sorted", 2**31),
        token=_huge("token", 2**31),
        slot=_huge("slot", 2**31),
    ),
]


# ---- combine_backward --------------------------------------------------------------------------
def _combine_bwd_good(d):
    return {"grad_out": d.f(T, D), **_combine_good(d)}


_combine_bwd_rows = [
    *standard_rows(
        {
            "grad_out": ("int32", "float64"),
            "y_sorted": ("int32",),
            "weight": ("float64",),
            "token": ("int64",),
            "slot": ("int64",),
            "row": ("int64",),
        }
    ),
    row("size", "grad_out T+1 rows", arg("grad_out"), grad_out=lambda d, a: d.f(T + 1, D)),
    row("size", "grad_out d+1 columns", arg("grad_out"), grad_out=lambda d, a: d.f(T, D + 1)),
    value_row("ids", "token id = T", arg("token"), token=set_entry("token", 2, T)),
    value_row("ids", "slot id = T*k", arg("slot"), slot=set_entry("slot", 2, M)),
    value_row("ids", "slot id = -2", arg("slot"), slot=set_entry("slot", 4, -2)),
    value_row("ids", "row id = M", arg("row"), row=set_entry("row", (1, 0), M)),
    value_row("ids", "row id = 2^31-1", arg("row"), row=set_entry("row", (2, 0), INT32_MAX)),
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        grad_out=lambda d, a: torch.empty(T, device="meta"),
        **{n: on_meta(n) for n in ("y_sorted", "weight", "token", "slot", "row")},
    ),
    row(
        "sparse",
        "grad_out sparse COO",
        arg("grad_out"),
        grad_out=lambda d, a: a["grad_out"].to_sparse(),
    ),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 views)",
        arg("row"),
        grad_out=_huge("grad_out"),
        row=_huge("row"),
        weight=_huge("weight"),
    ),
]


CASES: list[Case] = [
    *op_cases("make_plan", _plan_good, _plan_rows),
    *op_cases("make_plan", _plan_good, _plan_wrapper_rows, call=_wrapper_plan),
    *op_cases("permute", _permute_good, _permute_rows),
    *op_cases("permute_backward", _permute_bwd_good, _permute_bwd_rows),
    *op_cases("combine", _combine_good, _combine_rows),
    *op_cases("combine_backward", _combine_bwd_good, _combine_bwd_rows),
]
