"""Bad inputs of router_stats (the auxiliary losses' statistics) and its backward: every check of
csrc/checks_stats.h, of the fakes and of the sparse refusal. The good call has float32 logits
[4, 3]; the backward's, float32 gradients of prob_sum [3] and lse [4]. No tokens, NaN and rows of
only -inf are defined rows (NaN propagates as in torch.softmax and torch.logsumexp: the losses are
not where a router refuses its logits; topk_softmax is).
"""

from __future__ import annotations

import math

import torch

from tests.bad_inputs.cases import Case, E, T, arg, defined, on_meta, op_cases, row, standard_rows

NAN, INF = float("nan"), float("inf")


# ---- router_stats ------------------------------------------------------------------------------
def _good(d):
    return {"logits": d.f(T, E)}


def _edges_are_defined(d) -> bool:
    """T = 0 gives prob_sum zeros [E] and lse [0]; a NaN row gives NaN (its lse and every
    prob_sum entry); a row of only -inf gives lse -inf; float32 for 16-bit logits."""
    op = torch.ops.smoe.router_stats.default
    p0, l0 = op(d.f(0, E, dtype=torch.bfloat16))
    logits = torch.tensor([[0.0, 1.0, -INF], [-INF, -INF, -INF]], device=d.device)
    _, lse = op(logits)
    nan_sum, nan_lse = op(torch.tensor([[0.0, NAN, 1.0]], device=d.device))
    return (
        torch.equal(p0, torch.zeros(E, device=p0.device))
        and p0.dtype == l0.dtype == torch.float32
        and l0.shape == (0,)
        and abs(lse[0].item() - math.log(1 + math.e)) < 1e-6
        and lse[1].item() == -INF
        and bool(nan_sum.isnan().all())
        and bool(nan_lse.isnan().all())
    )


_rows = [
    *standard_rows({"logits": ("int32", "bool")}),
    row("size", "logits E = 0", arg("logits"), logits=lambda d, a: d.f(T, 0)),
    row(
        "meta",
        "meta logits E = 0",
        arg("logits"),
        logits=lambda d, a: torch.empty(T, 0, device="meta"),
    ),
    row("sparse", "logits sparse COO", arg("logits"), logits=lambda d, a: a["logits"].to_sparse()),
]

_defined = [
    Case(
        "smoe::router_stats/T = 0, NaN, rows of -inf (valid)",
        "smoe::router_stats",
        "nan",
        _edges_are_defined,
        defined("T = 0 gives zeros; NaN propagates; a row of only -inf has lse -inf"),
    ),
]


# ---- router_stats_backward ---------------------------------------------------------------------
def _bwd_good(d):
    return {"grad_prob_sum": d.f(E), "grad_lse": d.f(T), "logits": d.f(T, E)}


def _bwd_edges_are_defined(d) -> bool:
    """No gradient given gives zeros; T = 0 gives [0, E]; float64 logits take float64 gradients."""
    op = torch.ops.smoe.router_stats_backward.default
    none = op(None, None, d.f(T, E))
    empty = op(d.f(E), d.f(0), d.f(0, E, dtype=torch.bfloat16))
    wide = op(d.f(E, dtype=torch.float64), None, d.f(T, E, dtype=torch.float64))
    return (
        torch.equal(none, torch.zeros(T, E, device=none.device))
        and empty.shape == (0, E)
        and empty.dtype == torch.bfloat16
        and wide.dtype == torch.float64
    )


_bwd_rows = [
    *standard_rows(
        {
            "grad_prob_sum": ("float16", "float64", "int32"),
            "grad_lse": ("bfloat16", "float64"),
            "logits": ("int64",),
        }
    ),
    row("size", "grad_prob_sum [E+1]", arg("grad_prob_sum"), grad_prob_sum=lambda d, a: d.f(E + 1)),
    row("size", "grad_lse [T+1]", arg("grad_lse"), grad_lse=lambda d, a: d.f(T + 1)),
    row("size", "logits E = 0", arg("logits"), logits=lambda d, a: d.f(T, 0)),
    row(
        "meta",
        "meta grad_lse [T+1]",
        arg("grad_lse"),
        grad_prob_sum=on_meta("grad_prob_sum"),
        grad_lse=lambda d, a: torch.empty(T + 1, device="meta"),
        logits=on_meta("logits"),
    ),
    row("sparse", "logits sparse COO", arg("logits"), logits=lambda d, a: a["logits"].to_sparse()),
]

_bwd_defined = [
    Case(
        "smoe::router_stats_backward/no gradient, T = 0, float64 (valid)",
        "smoe::router_stats_backward",
        "size",
        _bwd_edges_are_defined,
        defined("no gradient gives zeros, T = 0 gives [0, E], in logits' dtype"),
    ),
]

CASES: list[Case] = [
    *op_cases("router_stats", _good, _rows),
    *_defined,
    *op_cases("router_stats_backward", _bwd_good, _bwd_rows),
    *_bwd_defined,
]
