"""Bad inputs of unified_topk (USMoE's joint top-N per group): every check of csrc/checks_usmoe.h,
of the CPU glue (csrc/cpu/unified_topk.cpp), of the fake and of the Python wrapper.

NaN scores and counts outside [0, n] are errors naming the argument (CPU: RuntimeError; CUDA: the
documented asynchronous device assert). ±inf scores are valid (-inf is padding and ranks last):
defined rows check them, and the empty edges (n = 0, G = 0). The good call has G = 4 groups of
L = 6 scores, n = 3, counts [0, 1, 3, 2]. The indices are int64, so no shape overflows them: the
op has no overflow row.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import Case, T, arg, defined, op_cases, row, standard_rows, value_row

L, N = 6, 3  # scores per group and n of the good call (G = T = 4 groups)
NAN, INF = float("nan"), float("inf")


def _with(a, name, r, c, value):
    t = a[name].clone()
    t[r, c] = value
    return t


def _counts_value(v):
    def change(d, a):
        t = a["counts"].clone()
        t[1] = v
        return t

    return change


def _good(d):
    return {"scores": d.f(T, L), "n": N, "counts": d.i64([0, 1, 3, 2])}


def _infinite_scores_are_valid(d) -> bool:
    """+inf ranks first and -inf last (ties to the lower index); a group of only -inf (all
    padding) takes its lowest indices."""
    scores = torch.tensor([[-INF, 0.0, INF, 1.0, -INF, INF]] * 2 + [[-INF] * L], device=d.device)
    idx = torch.ops.smoe.unified_topk.default(scores, 4)
    want = [[1, 2, 3, 5]] * 2 + [[0, 1, 2, 3]]
    return idx.cpu().tolist() == want and idx.dtype == torch.int64


def _empty_edges_are_valid(d) -> bool:
    """n = 0 gives [G, 0], G = 0 gives [0, n] (with counts [0]), n = L takes every index."""
    op = torch.ops.smoe.unified_topk.default
    none = op(d.f(T, L), 0)
    empty = op(d.f(0, L), N, d.i64([]).reshape(0))
    full = op(d.f(T, L), L, d.i64([L, 0, 1, L]))
    return (
        none.shape == (T, 0)
        and empty.shape == (0, N)
        and full[0].tolist() == list(range(L))
        and full[1].eq(-1).all().item()
        and full[3].tolist() == list(range(L))
    )


_rows = [
    *standard_rows({"scores": ("int32", "bool"), "counts": ("int32", "float32")}),
    row("dtype", "n float", arg("n"), n=lambda d, a: 1.5),
    row("size", "n = -1", arg("n"), n=lambda d, a: -1),
    row("size", "n = L+1", arg("n"), n=lambda d, a: L + 1),
    row("size", "n > L = 0", arg("n"), scores=lambda d, a: d.f(T, 0), counts=lambda d, a: None),
    row("size", "counts [G+1]", arg("counts"), counts=lambda d, a: d.i64([0, 1, 3, 2, 1])),
    row("size", "counts [G-1]", arg("counts"), counts=lambda d, a: a["counts"][1:]),
    value_row("ids", "counts value = n+1", arg("counts"), counts=_counts_value(N + 1)),
    value_row("ids", "counts value = -1", arg("counts"), counts=_counts_value(-1)),
    value_row("ids", "counts value = 2^63-1", arg("counts"), counts=_counts_value(2**63 - 1)),
    value_row(  # checked before the empty-scores early return (the CUDA glue skipped it)
        "ids",
        "counts value = 1 > n = L = 0",
        arg("counts"),
        scores=lambda d, a: d.f(T, 0),
        n=lambda d, a: 0,
        counts=_counts_value(1),
    ),
    value_row(
        "nan", "scores NaN", arg("scores"), scores=lambda d, a: _with(a, "scores", 1, 0, NAN)
    ),
    value_row(
        "nan",
        "scores NaN in a group of count 0",
        arg("scores"),
        scores=lambda d, a: _with(a, "scores", 0, 2, NAN),
    ),
    row(
        "nan",
        "scores NaN past a valid group",
        arg("scores") + r".*\bgroup 3\b",
        scores=lambda d, a: _with(a, "scores", 3, 5, NAN),
        devices=("cpu",),
    ),
    row(
        "meta", "meta scores 1-D", arg("scores"), scores=lambda d, a: torch.empty(T, device="meta")
    ),
    row(
        "meta",
        "meta n > L",
        arg("n"),
        scores=lambda d, a: a["scores"].to("meta"),
        counts=lambda d, a: a["counts"].to("meta"),
        n=lambda d, a: L + 1,
    ),
    row(
        "meta",
        "meta counts int32",
        arg("counts"),
        scores=lambda d, a: a["scores"].to("meta"),
        counts=lambda d, a: a["counts"].to("meta", torch.int32),
    ),
    row(
        "meta",
        "meta counts [G+1]",
        arg("counts"),
        scores=lambda d, a: a["scores"].to("meta"),
        counts=lambda d, a: torch.zeros(T + 1, dtype=torch.int64, device="meta"),
    ),
    row("sparse", "scores sparse COO", arg("scores"), scores=lambda d, a: a["scores"].to_sparse()),
    row("sparse", "counts sparse COO", arg("counts"), counts=lambda d, a: a["counts"].to_sparse()),
    row(
        "grad",
        "counts float32 requiring grad",
        arg("counts"),
        counts=lambda d, a: a["counts"].float().requires_grad_(),
    ),
]


def _wrapper(a):
    return smoe.ops.unified_topk(a["scores"], a["n"], counts=a["counts"])


_wrapper_rows = [
    row("dtype", "wrapper n bool", arg("n"), exc=(TypeError,), n=lambda d, a: True),
    row("dtype", "wrapper n float", arg("n"), exc=(TypeError,), n=lambda d, a: 2.0),
    row("dtype", "wrapper n tensor", arg("n"), exc=(TypeError,), n=lambda d, a: d.i64(2)),
    row(
        "dtype",
        "wrapper counts list",
        arg("counts"),
        exc=(RuntimeError, TypeError),
        counts=lambda d, a: [0, 1, 3, 2],
    ),
]


_defined = [
    Case(
        "smoe::unified_topk/scores +-inf (valid)",
        "smoe::unified_topk",
        "nan",
        _infinite_scores_are_valid,
        defined(
            "+inf ranks first, -inf (padding) last; an all -inf group takes its lowest indices"
        ),
    ),
    Case(
        "smoe::unified_topk/n = 0, G = 0, n = L (valid)",
        "smoe::unified_topk",
        "size",
        _empty_edges_are_valid,
        defined("n = 0 gives [G, 0], G = 0 gives [0, n], n = L takes every index up to the count"),
    ),
]


CASES: list[Case] = [
    *op_cases("unified_topk", _good, _rows),
    *_defined,
    *op_cases("unified_topk", _good, _wrapper_rows, call=_wrapper),
]
