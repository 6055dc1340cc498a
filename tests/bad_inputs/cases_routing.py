"""Bad inputs of the routing ops: topk_softmax, expert_choice and their backwards.

NaN / +inf logits, and a row of only -inf (no expert has a probability), are errors naming
``logits`` (CPU: RuntimeError; CUDA: the documented asynchronous device assert). -inf entries in
a row that also has a finite value are valid (a masked expert) and have no row here.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    INT32_MAX,
    Case,
    E,
    K,
    T,
    arg,
    op_cases,
    row,
    standard_rows,
    value_row,
)

NAN, INF = float("nan"), float("inf")


def _with(d, a, name, r, c, value):
    t = a[name].clone()
    t[r, c] = value
    return t


def _all_neg_inf(d, a):
    t = a["logits"].clone()
    t[1] = -INF
    return t


# ---- topk_softmax ------------------------------------------------------------------------------
def _topk_good(d):
    return {"logits": d.f(T, E), "k": K, "renormalize": True}


_topk_rows = [
    *standard_rows({"logits": ("int32", "bool")}),
    row("dtype", "k float", arg("k"), k=lambda d, a: 1.5),
    row("size", "logits E=0", arg("logits"), logits=lambda d, a: d.f(T, 0), k=lambda d, a: 1),
    row("size", "k > E", arg("k"), k=lambda d, a: E + 1),
    row("size", "k = 0", arg("k"), k=lambda d, a: 0),
    row("size", "k = -1", arg("k"), k=lambda d, a: -1),
    value_row(
        "nan", "logits NaN", arg("logits"), logits=lambda d, a: _with(d, a, "logits", 1, 0, NAN)
    ),
    value_row(
        "nan", "logits +inf", arg("logits"), logits=lambda d, a: _with(d, a, "logits", 2, 1, INF)
    ),
    value_row("nan", "logits row of only -inf", arg("logits"), logits=_all_neg_inf),
    # selection_bias (aux-loss-free balancing): float32 [E] on logits' device, finite
    row(
        "dtype",
        "selection_bias float64",
        arg("selection_bias"),
        selection_bias=lambda d, a: torch.zeros(E, dtype=torch.float64, device=d.device),
    ),
    row(
        "size",
        "selection_bias [E+1]",
        arg("selection_bias"),
        selection_bias=lambda d, a: torch.zeros(E + 1, device=d.device),
    ),
    row(
        "device",
        "selection_bias on the other device",
        arg("selection_bias"),
        selection_bias=lambda d, a: torch.zeros(E, device=d.other),
    ),
    value_row(
        "nan",
        "selection_bias NaN",
        arg("selection_bias"),
        selection_bias=lambda d, a: torch.full((E,), NAN, device=d.device),
    ),
    row(
        "meta", "meta logits 1-D", arg("logits"), logits=lambda d, a: torch.empty(T, device="meta")
    ),
    row(
        "meta",
        "meta k > E",
        arg("k"),
        logits=lambda d, a: a["logits"].to("meta"),
        k=lambda d, a: E + 1,
    ),
    row("sparse", "logits sparse COO", arg("logits"), logits=lambda d, a: a["logits"].to_sparse()),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 view)",
        arg("logits"),
        logits=lambda d, a: d.huge(2**30 + 1, a["logits"]),
    ),
]


def _wrapper_topk(a):
    return smoe.topk_softmax(a["logits"], a["k"], renormalize=a["renormalize"])


_topk_wrapper_rows = [
    row("dtype", "wrapper k bool", arg("k"), exc=(TypeError,), k=lambda d, a: True),
    row("dtype", "wrapper k float", arg("k"), exc=(TypeError,), k=lambda d, a: 2.0),
    row("size", "wrapper k > E", arg("k"), exc=(ValueError,), k=lambda d, a: E + 1),
]


# ---- topk_softmax_backward ---------------------------------------------------------------------
def _topk_bwd_good(d):
    logits = d.f(T, E)
    return {
        "grad_weight": d.f(T, K),
        "logits": logits,
        "expert": d.i32([[0, 1], [2, 0], [1, 2], [0, 2]]),
        "renormalize": True,
    }


def _expert_value(v):
    return lambda d, a: _with(d, a, "expert", 1, 1, v)


_topk_bwd_rows = [
    *standard_rows(
        {
            "grad_weight": ("int32", "float64"),
            "logits": ("int32",),
            "expert": ("int64", "float32"),
        }
    ),
    row("size", "grad_weight [T, k+1]", arg("grad_weight"), grad_weight=lambda d, a: d.f(T, K + 1)),
    row(
        "size",
        "expert T+1 rows",
        arg("expert"),
        expert=lambda d, a: torch.cat([a["expert"], a["expert"][:1]]),
    ),
    row(
        "size",
        "expert k > E columns",
        arg("expert"),
        expert=lambda d, a: torch.zeros(T, E + 1, dtype=torch.int32, device=d.device),
        grad_weight=lambda d, a: d.f(T, E + 1),
    ),
    value_row("ids", "expert id = E", arg("expert"), expert=_expert_value(E)),
    value_row("ids", "expert id = -2", arg("expert"), expert=_expert_value(-2)),
    value_row("ids", "expert id = -1", arg("expert"), expert=_expert_value(-1)),
    value_row("ids", "expert id = 2^31-1", arg("expert"), expert=_expert_value(INT32_MAX)),
    row(
        "grad",
        "expert float32 requiring grad",
        arg("expert"),
        expert=lambda d, a: a["expert"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta grad_weight 1-D",
        arg("grad_weight"),
        grad_weight=lambda d, a: torch.empty(T, device="meta"),
        logits=lambda d, a: a["logits"].to("meta"),
        expert=lambda d, a: a["expert"].to("meta"),
    ),
    row(
        "sparse",
        "grad_weight sparse COO",
        arg("grad_weight"),
        grad_weight=lambda d, a: a["grad_weight"].to_sparse(),
    ),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 views)",
        arg("logits") + "|" + arg("expert"),
        logits=lambda d, a: d.huge(2**30 + 1, a["logits"]),
        expert=lambda d, a: d.huge(2**30 + 1, a["expert"]),
        grad_weight=lambda d, a: d.huge(2**30 + 1, a["grad_weight"]),
    ),
]


# ---- expert_choice -----------------------------------------------------------------------------
def _ec_good(d):
    return {"logits": d.f(T, E), "capacity": 2, "group_size": None}


_ec_rows = [
    *standard_rows({"logits": ("int32", "bool")}),
    row("dtype", "capacity float", arg("capacity"), capacity=lambda d, a: 1.5),
    row("dtype", "group_size float", arg("group_size"), group_size=lambda d, a: 1.5),
    row("size", "logits E=0", arg("logits"), logits=lambda d, a: d.f(T, 0)),
    row("capacity", "capacity = -1", arg("capacity"), capacity=lambda d, a: -1),
    row("capacity", "group_size = 0", arg("group_size"), group_size=lambda d, a: 0),
    row("capacity", "group_size = -2", arg("group_size"), group_size=lambda d, a: -2),
    value_row(
        "nan", "logits NaN", arg("logits"), logits=lambda d, a: _with(d, a, "logits", 1, 0, NAN)
    ),
    value_row(
        "nan", "logits +inf", arg("logits"), logits=lambda d, a: _with(d, a, "logits", 2, 1, INF)
    ),
    value_row("nan", "logits row of only -inf", arg("logits"), logits=_all_neg_inf),
    row(
        "meta", "meta logits 1-D", arg("logits"), logits=lambda d, a: torch.empty(T, device="meta")
    ),
    row(
        "meta",
        "meta capacity = -1",
        arg("capacity"),
        logits=lambda d, a: a["logits"].to("meta"),
        capacity=lambda d, a: -1,
    ),
    row("sparse", "logits sparse COO", arg("logits"), logits=lambda d, a: a["logits"].to_sparse()),
    row(
        "overflow",
        "T*E >= 2^31 (stride-0 view)",
        arg("logits"),
        logits=lambda d, a: d.huge(2**30 + 1, a["logits"]),
    ),
]


def _wrapper_ec(a):
    return smoe.expert_choice(a["logits"], a["capacity"], group_size=a["group_size"])


_ec_wrapper_rows = [
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
]


# ---- expert_choice_backward --------------------------------------------------------------------
def _ec_bwd_good(d):
    return {
        "grad_weight": d.f(T, E),
        "logits": d.f(T, E),
        "row": d.i32([[0, -1, 4], [1, 2, -1], [-1, 3, 5], [-1, -1, -1]]),
    }


_ec_bwd_rows = [
    *standard_rows(
        {"grad_weight": ("int32", "float64"), "logits": ("int32",), "row": ("int64", "float32")}
    ),
    row("size", "grad_weight [T, E+1]", arg("grad_weight"), grad_weight=lambda d, a: d.f(T, E + 1)),
    row("size", "row T+1 rows", arg("row"), row=lambda d, a: torch.cat([a["row"], a["row"][:1]])),
    row(
        "size",
        "row E+1 columns",
        arg("row"),
        row=lambda d, a: torch.zeros(T, E + 1, dtype=torch.int32, device=d.device),
    ),
    row(
        "grad",
        "row float32 requiring grad",
        arg("row"),
        row=lambda d, a: a["row"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta grad_weight 1-D",
        arg("grad_weight"),
        grad_weight=lambda d, a: torch.empty(T, device="meta"),
        logits=lambda d, a: a["logits"].to("meta"),
        row=lambda d, a: a["row"].to("meta"),
    ),
    row(
        "sparse",
        "grad_weight sparse COO",
        arg("grad_weight"),
        grad_weight=lambda d, a: a["grad_weight"].to_sparse(),
    ),
    row(
        "overflow",
        "T*E >= 2^31 (stride-0 views)",
        arg("logits"),
        grad_weight=lambda d, a: d.huge(2**30 + 1, a["grad_weight"]),
        logits=lambda d, a: d.huge(2**30 + 1, a["logits"]),
        row=lambda d, a: d.huge(2**30 + 1, a["row"]),
    ),
]


CASES: list[Case] = [
    *op_cases("topk_softmax", _topk_good, _topk_rows),
    *op_cases("topk_softmax", _topk_good, _topk_wrapper_rows, call=_wrapper_topk),
    *op_cases("topk_softmax_backward", _topk_bwd_good, _topk_bwd_rows),
    *op_cases("expert_choice", _ec_good, _ec_rows),
    *op_cases("expert_choice", _ec_good, _ec_wrapper_rows, call=_wrapper_ec),
    *op_cases("expert_choice_backward", _ec_bwd_good, _ec_bwd_rows),
]
