"""Bad inputs of topk_sigmoid (DeepSeek-V3's router) and its backward: every check of
csrc/checks_sigmoid.h and of the CPU glue (csrc/cpu/topk_sigmoid.cpp).

NaN logits and a non-finite selection_bias are errors naming the argument (CPU: RuntimeError;
CUDA: the documented asynchronous device assert). ±inf logits are valid (s = 1 or 0): a defined
row checks them. The good call has E = 4 experts in n_group = 2 groups, one group kept, k = 2.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    INT32_MAX,
    Case,
    K,
    T,
    arg,
    defined,
    op_cases,
    row,
    standard_rows,
    value_row,
)

E4 = 4  # experts of the good call (E = 3 of the other tables has no group split)
NAN, INF = float("nan"), float("inf")


def _with(a, name, r, c, value):
    t = a[name].clone()
    t[r, c] = value
    return t


def _bias(d, value, n=E4):
    return torch.full((n,), value, device=d.device)


# ---- topk_sigmoid ------------------------------------------------------------------------------
def _good(d):
    return {
        "logits": d.f(T, E4),
        "k": K,
        "selection_bias": None,
        "n_group": 2,
        "topk_group": 1,
        "renormalize": True,
        "scale": 2.5,
    }


def _infinite_logits_are_valid(d) -> bool:
    """±inf logits give s = 1 and 0: the +inf expert first with weight scale, the -inf one
    last with weight 0, and a zero gradient at both."""
    logits = torch.tensor([[-INF, 0.0, INF, 1.0]] * T, device=d.device)
    w, ex = torch.ops.smoe.topk_sigmoid.default(logits, E4, n_group=2, topk_group=2, scale=2.0)
    g = torch.ops.smoe.topk_sigmoid_backward.default(torch.ones_like(w), logits, ex, True, 2.0)
    return bool(
        ex[:, 0].eq(2).all()
        and ex[:, -1].eq(0).all()
        and w[:, 0].eq(2.0).all()
        and w[:, -1].eq(0.0).all()
        and g[:, [0, 2]].eq(0).all()
        and g.isfinite().all()
    )


_rows = [
    *standard_rows({"logits": ("int32", "bool")}),
    row("dtype", "k float", arg("k"), k=lambda d, a: 1.5),
    row("dtype", "n_group float", arg("n_group"), n_group=lambda d, a: 2.0),
    row("dtype", "scale str", arg("scale"), scale=lambda d, a: "2"),
    row(
        "size",
        "logits E=0",
        arg("logits"),
        logits=lambda d, a: d.f(T, 0),
        k=lambda d, a: 1,
        n_group=lambda d, a: 1,
    ),
    row("config", "n_group = 0", arg("n_group"), n_group=lambda d, a: 0),
    row("config", "n_group = -2", arg("n_group"), n_group=lambda d, a: -2),
    row("config", "n_group = 3 (does not divide E)", arg("n_group"), n_group=lambda d, a: 3),
    row("config", "n_group = E+4", arg("n_group"), n_group=lambda d, a: E4 + 4),
    row("config", "topk_group = 0", arg("topk_group"), topk_group=lambda d, a: 0),
    row("config", "topk_group > n_group", arg("topk_group"), topk_group=lambda d, a: 3),
    row("size", "k = 0", arg("k"), k=lambda d, a: 0),
    row("size", "k = -1", arg("k"), k=lambda d, a: -1),
    row("size", "k > topk_group * E / n_group", arg("k"), k=lambda d, a: 3),
    row("size", "k > E", arg("k"), k=lambda d, a: E4 + 1, topk_group=lambda d, a: 2),
    row("config", "scale NaN", arg("scale"), scale=lambda d, a: NAN),
    row("config", "scale +inf", arg("scale"), scale=lambda d, a: INF),
    row("config", "scale -inf", arg("scale"), scale=lambda d, a: -INF),
    value_row(
        "nan", "logits NaN", arg("logits"), logits=lambda d, a: _with(a, "logits", 1, 0, NAN)
    ),
    row(
        "nan",
        "logits NaN past a valid row",
        arg("logits") + r".*\brow 3\b",
        logits=lambda d, a: _with(a, "logits", 3, 3, NAN),
        devices=("cpu",),
    ),
    # selection_bias: float32 [E] on logits' device, finite
    row(
        "dtype",
        "selection_bias float64",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, 0.0).double(),
    ),
    row(
        "dtype",
        "selection_bias float16",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, 0.0).half(),
    ),
    row(
        "rank",
        "selection_bias [1, E]",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, 0.0)[None],
    ),
    row(
        "size",
        "selection_bias [E+1]",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, 0.0, E4 + 1),
    ),
    row(
        "device",
        "selection_bias on the other device",
        arg("selection_bias"),
        selection_bias=lambda d, a: torch.zeros(E4, device=d.other),
    ),
    value_row(
        "nan",
        "selection_bias NaN",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, NAN),
    ),
    value_row(
        "nan",
        "selection_bias +inf",
        arg("selection_bias"),
        selection_bias=lambda d, a: _bias(d, INF),
    ),
    row(
        "meta", "meta logits 1-D", arg("logits"), logits=lambda d, a: torch.empty(T, device="meta")
    ),
    row(
        "meta",
        "meta n_group = 3",
        arg("n_group"),
        logits=lambda d, a: a["logits"].to("meta"),
        n_group=lambda d, a: 3,
    ),
    row(
        "meta",
        "meta k > topk_group * E / n_group",
        arg("k"),
        logits=lambda d, a: a["logits"].to("meta"),
        k=lambda d, a: 3,
    ),
    row("sparse", "logits sparse COO", arg("logits"), logits=lambda d, a: a["logits"].to_sparse()),
    row(
        "overflow",
        "T*k >= 2^31 (stride-0 view)",
        arg("logits"),
        logits=lambda d, a: d.huge(2**30 + 1, a["logits"]),
    ),
]


def _wrapper(a):
    kw = {name: a[name] for name in ("n_group", "topk_group", "renormalize", "scale")}
    return smoe.topk_sigmoid(a["logits"], a["k"], selection_bias=a["selection_bias"], **kw)


_wrapper_rows = [
    row("dtype", "wrapper k bool", arg("k"), exc=(TypeError,), k=lambda d, a: True),
    row("dtype", "wrapper k float", arg("k"), exc=(TypeError,), k=lambda d, a: 2.0),
    row(
        "dtype", "wrapper n_group float", arg("n_group"), exc=(TypeError,), n_group=lambda d, a: 2.0
    ),
    row(
        "dtype",
        "wrapper topk_group bool",
        arg("topk_group"),
        exc=(TypeError,),
        topk_group=lambda d, a: True,
    ),
]


# ---- topk_sigmoid_backward ---------------------------------------------------------------------
def _bwd_good(d):
    return {
        "grad_weight": d.f(T, K),
        "logits": d.f(T, E4),
        "expert": d.i32([[0, 1], [2, 3], [1, 0], [3, 2]]),
        "renormalize": True,
        "scale": 2.5,
    }


def _expert_value(v):
    return lambda d, a: _with(a, "expert", 1, 1, v)


_bwd_rows = [
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
        expert=lambda d, a: torch.zeros(T, E4 + 1, dtype=torch.int32, device=d.device),
        grad_weight=lambda d, a: d.f(T, E4 + 1),
    ),
    row(
        "size",
        "expert k = 0 columns",
        arg("expert"),
        expert=lambda d, a: torch.zeros(T, 0, dtype=torch.int32, device=d.device),
        grad_weight=lambda d, a: d.f(T, 0),
    ),
    row(
        "size",
        "grad_weight T-1 rows, expert T-1 rows",
        arg("expert"),
        expert=lambda d, a: a["expert"][1:],
        grad_weight=lambda d, a: a["grad_weight"][1:],
    ),
    value_row("ids", "expert id = E", arg("expert"), expert=_expert_value(E4)),
    value_row("ids", "expert id = -2", arg("expert"), expert=_expert_value(-2)),
    value_row("ids", "expert id = -1", arg("expert"), expert=_expert_value(-1)),
    value_row("ids", "expert id = 2^31-1", arg("expert"), expert=_expert_value(INT32_MAX)),
    row("config", "scale NaN", arg("scale"), scale=lambda d, a: NAN),
    row("config", "scale -inf", arg("scale"), scale=lambda d, a: -INF),
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


_defined = [
    Case(
        "smoe::topk_sigmoid/logits +-inf (valid)",
        "smoe::topk_sigmoid",
        "nan",
        _infinite_logits_are_valid,
        defined("±inf logits give s = 1 and 0; the +inf expert first, weight = scale, grad 0"),
    )
]


CASES: list[Case] = [
    *op_cases("topk_sigmoid", _good, _rows),
    *_defined,
    *op_cases("topk_sigmoid", _good, _wrapper_rows, call=_wrapper),
    *op_cases("topk_sigmoid_backward", _bwd_good, _bwd_rows),
]
