"""Bad inputs of the Sinkhorn op (specs/sinkhorn_ssr.md §7): sinkhorn and its backward.

Non-finite scores are an error on the CPU (one pass over S = scores / eps); on CUDA checking
them would cost a host sync, so they give NaN outputs there (smoe.ops.sinkhorn's docstring): those
rows, and the backward's ``iters_done`` range (read on the host only on the CPU; CUDA clamps it to
max_iter on the device), run on the CPU only. No overflow rows: the op indexes with int64.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    Case,
    E,
    T,
    arg,
    on_meta,
    op_cases,
    row,
    standard_rows,
)

NAN, INF = float("nan"), float("inf")
ITERS = 3


def _all_meta(*names: str) -> dict:
    return {n: on_meta(n) for n in names}


# ---- sinkhorn ------------------------------------------------------------------------------------
def _fwd_good(d):
    return {
        "scores": d.f(T, E),
        "eps": 0.5,
        "max_iter": ITERS,
        "tol": 0.0,
        "row_mass": 1.0,
        "col_mass": None,
        "check_every": 1,
    }


def _with_value(value: float):
    def change(d, a):
        s = a["scores"].clone()
        s[1, 2] = value
        return s

    return change


_fwd_rows = [
    *standard_rows({"scores": ("int32", "bool")}),
    row("size", "scores E = 0", "at least one expert column", scores=lambda d, a: d.f(T, 0)),
    row("eps", "eps = 0", arg("eps"), eps=lambda d, a: 0.0),
    row("eps", "eps = -1", arg("eps"), eps=lambda d, a: -1.0),
    row("eps", "eps NaN", arg("eps"), eps=lambda d, a: NAN),
    row("eps", "eps inf", arg("eps"), eps=lambda d, a: INF),
    row("config", "max_iter = 0", arg("max_iter"), max_iter=lambda d, a: 0),
    row("config", "max_iter = -1", arg("max_iter"), max_iter=lambda d, a: -1),
    row("config", "tol = -1", arg("tol"), tol=lambda d, a: -1.0),
    row("config", "tol NaN", arg("tol"), tol=lambda d, a: NAN),
    row("config", "check_every = 0", arg("check_every"), check_every=lambda d, a: 0),
    row("config", "row_mass = 0", arg("row_mass"), row_mass=lambda d, a: 0.0),
    row("config", "row_mass inf", arg("row_mass"), row_mass=lambda d, a: INF),
    row("config", "col_mass = -1", arg("col_mass"), col_mass=lambda d, a: -1.0),
    row("config", "col_mass NaN", arg("col_mass"), col_mass=lambda d, a: NAN),
    row(
        "config",
        "masses disagree (T row_mass != E col_mass)",
        r"same mass: T \* row_mass",
        col_mass=lambda d, a: 1.0,
    ),
    row("nan", "scores NaN", arg("scores"), devices=("cpu",), scores=_with_value(NAN)),
    row("nan", "scores +inf", arg("scores"), devices=("cpu",), scores=_with_value(INF)),
    row("nan", "scores -inf", arg("scores"), devices=("cpu",), scores=_with_value(-INF)),
    row(
        "nan",
        "scores / eps overflows",
        arg("scores"),
        devices=("cpu",),
        scores=lambda d, a: torch.full((T, E), 3e38, device=d.device),
        eps=lambda d, a: 1e-3,
    ),
    row(
        "meta",
        "meta scores 1-D",
        arg("scores"),
        scores=lambda d, a: torch.empty(T, device="meta"),
    ),
    row(
        "meta",
        "meta max_iter = 0",
        arg("max_iter"),
        **_all_meta("scores"),
        max_iter=lambda d, a: 0,
    ),
    row("sparse", "scores sparse COO", arg("scores"), scores=lambda d, a: a["scores"].to_sparse()),
]


def _wrapper_fwd(a):
    return smoe.ops.sinkhorn(
        a["scores"],
        eps=a["eps"],
        max_iter=a["max_iter"],
        tol=a["tol"],
        row_mass=a["row_mass"],
        col_mass=a["col_mass"],
        check_every=a["check_every"],
    )


_V = (ValueError,)
_fwd_wrapper_rows = [
    row("eps", "wrapper eps = 0", arg("eps"), exc=_V, eps=lambda d, a: 0.0),
    row("eps", "wrapper eps NaN", arg("eps"), exc=_V, eps=lambda d, a: NAN),
    row("config", "wrapper max_iter = 0", arg("max_iter"), exc=_V, max_iter=lambda d, a: 0),
    row("config", "wrapper tol = -1", arg("tol"), exc=_V, tol=lambda d, a: -1.0),
    row(
        "config", "wrapper check_every = 0", arg("check_every"), exc=_V, check_every=lambda d, a: 0
    ),
    row("config", "wrapper row_mass = -1", arg("row_mass"), exc=_V, row_mass=lambda d, a: -1.0),
    row("config", "wrapper col_mass = 0", arg("col_mass"), exc=_V, col_mass=lambda d, a: 0.0),
    row("dtype", "wrapper scores int32", arg("scores"), scores=lambda d, a: a["scores"].int()),
]


# ---- sinkhorn_backward ---------------------------------------------------------------------------
_BWD = ("grad_log_plan", "grad_f", "grad_g", "scores", "f_hist", "g_hist", "iters_done")


def _bwd_good(d):
    scores = d.f(T, E)
    out = torch.ops.smoe.sinkhorn.default(scores, eps=0.5, max_iter=ITERS)
    return {
        "grad_log_plan": d.f(T, E),
        "grad_f": d.f(T),
        "grad_g": d.f(E),
        "scores": scores,
        "f_hist": out[6],
        "g_hist": out[7],
        "iters_done": out[3],
        "eps": 0.5,
    }


_bwd_rows = [
    *standard_rows(
        {
            "grad_log_plan": ("float64", "int32"),
            "grad_f": ("float16",),
            "grad_g": ("float64",),
            "scores": ("int32",),
            "f_hist": ("bfloat16",),
            "g_hist": ("float64",),
        }
    ),
    # iters_done is 0-dim: its rows are written out (standard_rows' rank-1 indexes a dimension)
    row(
        "dtype",
        "iters_done int32",
        arg("iters_done"),
        iters_done=lambda d, a: a["iters_done"].int(),
    ),
    row(
        "dtype",
        "iters_done float32",
        arg("iters_done"),
        iters_done=lambda d, a: a["iters_done"].float(),
    ),
    row("rank", "iters_done 1-D", arg("iters_done"), iters_done=lambda d, a: a["iters_done"][None]),
    row(
        "device",
        "iters_done on the other device",
        arg("iters_done"),
        iters_done=lambda d, a: a["iters_done"].to(d.other),
    ),
    row(
        "size",
        "grad_log_plan [T, E+1]",
        arg("grad_log_plan"),
        grad_log_plan=lambda d, a: d.f(T, E + 1),
    ),
    row("size", "grad_f [T+1]", arg("grad_f"), grad_f=lambda d, a: d.f(T + 1)),
    row("size", "g_hist fewer rows than f_hist", arg("g_hist"), g_hist=lambda d, a: d.f(1, E)),
    row(
        "ids",
        "iters_done > max_iter",
        arg("iters_done"),
        devices=("cpu",),
        iters_done=lambda d, a: torch.tensor(ITERS + 1, device=d.device),
    ),
    row(
        "ids",
        "iters_done = -1",
        arg("iters_done"),
        devices=("cpu",),
        iters_done=lambda d, a: torch.tensor(-1, device=d.device),
    ),
    row("eps", "eps = 0", arg("eps"), eps=lambda d, a: 0.0),
    row(
        "meta",
        "meta grad_g [E+1]",
        arg("grad_g"),
        **_all_meta(*[n for n in _BWD if n != "grad_g"]),
        grad_g=lambda d, a: torch.empty(E + 1, device="meta"),
    ),
    row(
        "sparse",
        "grad_log_plan sparse COO",
        arg("grad_log_plan"),
        grad_log_plan=lambda d, a: a["grad_log_plan"].to_sparse(),
    ),
]


CASES: list[Case] = [
    *op_cases("sinkhorn", _fwd_good, _fwd_rows),
    *op_cases("sinkhorn", _fwd_good, _fwd_wrapper_rows, call=_wrapper_fwd),
    *op_cases("sinkhorn_backward", _bwd_good, _bwd_rows),
]
