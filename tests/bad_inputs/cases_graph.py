"""Bad inputs of the graph op (specs/graph_routing.md §2, §5): graph_mix and its backward.

The good calls use a cache (C = 2 rows), so that every row about the cache and about A's C + S
columns has a real tensor to change. NaN or inf values are not errors (IEEE arithmetic, as for
expert data); the defined rows document that lam = 0 drops the graph term, so a NaN in A or the
cache does not reach the output then. No overflow rows: the op indexes with int64.
"""

from __future__ import annotations

import torch

import smoe
from tests.bad_inputs.cases import (
    Case,
    E,
    T,
    arg,
    defined,
    on_meta,
    op_cases,
    row,
    standard_rows,
)

NAN, INF = float("nan"), float("inf")
B, C = 2, 2  # batch entries and cached rows of the good call


def _const(value):
    return lambda d, a: value


def _all_meta(*names: str) -> dict:
    return {n: on_meta(n) for n in names}


def _option_rows(wrapper: bool = False) -> list:
    exc = (ValueError,) if wrapper else (RuntimeError,)
    prefix = "wrapper " if wrapper else ""
    bad = [("self_coef", NAN), ("self_coef", INF), ("lam", -1.0), ("lam", NAN), ("lam", INF)]
    return [
        row("config", f"{prefix}{name} = {value}", arg(name), exc=exc, **{name: _const(value)})
        for name, value in bad
    ]


# ---- graph_mix -----------------------------------------------------------------------------------
def _fwd_good(d):
    A = torch.softmax(d.f(B, T, C + T), dim=-1)
    return {"x": d.f(B, T, E), "A": A, "cache": d.f(B, C, E), "self_coef": 1.0, "lam": 1.0}


def _size_rows(prefix: str = "") -> list:
    return [
        row("size", f"{prefix}A [B+1, S, S']", arg("A"), A=lambda d, a: d.f(B + 1, T, C + T)),
        row("size", f"{prefix}A [B, S+1, S']", arg("A"), A=lambda d, a: d.f(B, T + 1, C + T)),
        row("size", f"{prefix}A [B, S, S'+1]", arg("A"), A=lambda d, a: d.f(B, T, C + T + 1)),
        row("size", f"{prefix}A [B, S, S] with a cache", arg("A"), A=lambda d, a: d.f(B, T, T)),
        row("size", f"{prefix}A [B, S, C+S] without a cache", arg("A"), cache=_const(None)),
        row(
            "size", f"{prefix}cache [B, C, E+1]", arg("cache"), cache=lambda d, a: d.f(B, C, E + 1)
        ),
        row(
            "size", f"{prefix}cache [B+1, C, E]", arg("cache"), cache=lambda d, a: d.f(B + 1, C, E)
        ),
    ]


_fwd_rows = [
    *standard_rows({"x": ("int32", "bool"), "A": ("float64", "float16"), "cache": ("bfloat16",)}),
    row("dtype", "x float16, A and cache float32", arg("A"), x=lambda d, a: a["x"].half()),
    *_size_rows(),
    *_option_rows(),
    row(
        "meta",
        "meta A [B, S+1, S']",
        arg("A"),
        **_all_meta("x", "cache"),
        A=lambda d, a: torch.empty(B, T + 1, C + T, device="meta"),
    ),
    row("meta", "meta lam = -1", arg("lam"), **_all_meta("x", "A", "cache"), lam=_const(-1.0)),
    row(
        "meta",
        "meta cache float16",
        arg("cache"),
        **_all_meta("x", "A"),
        cache=lambda d, a: torch.empty(B, C, E, dtype=torch.float16, device="meta"),
    ),
    row("sparse", "x sparse COO", arg("x"), x=lambda d, a: a["x"].to_sparse()),
    row("sparse", "A sparse COO", arg("A"), A=lambda d, a: a["A"].to_sparse()),
]


def _wrapper_fwd(a):
    return smoe.ops.graph_mix(**a)


_fwd_wrapper_rows = [
    *_option_rows(wrapper=True),
    row("dtype", "wrapper x int32", arg("x"), x=lambda d, a: a["x"].int()),
    *_size_rows("wrapper "),
]


def _nan_graph_at_lam0(d, name: str) -> bool:
    """lam = 0: out is self_coef x exactly, whatever A and the cache hold."""
    a = _fwd_good(d)
    a[name] = torch.full_like(a[name], NAN)
    out = smoe.ops.graph_mix(**(a | {"self_coef": 0.5, "lam": 0.0}))
    return bool(torch.equal(out, 0.5 * a["x"]))


def _defined_case(label: str, fn, description: str) -> Case:
    target = "smoe::graph_mix"
    return Case(f"{target}/{label}", target, "nan", fn, defined(description))


_defined_cases = [
    _defined_case(
        "A NaN at lam = 0 (defined)",
        lambda d: _nan_graph_at_lam0(d, "A"),
        "lam = 0 drops the graph term: out = self_coef x exactly",
    ),
    _defined_case(
        "cache NaN at lam = 0 (defined)",
        lambda d: _nan_graph_at_lam0(d, "cache"),
        "lam = 0 drops the graph term: out = self_coef x exactly",
    ),
]


# ---- graph_mix_backward --------------------------------------------------------------------------
def _bwd_good(d):
    a = _fwd_good(d)
    return {"grad": d.f(B, T, E), **a, "need_x": True, "need_A": True}


_bwd_rows = [
    *standard_rows({"grad": ("float64", "int32"), "x": ("int32",), "A": ("bfloat16",)}),
    row("size", "grad [B, S, E+1]", arg("grad"), grad=lambda d, a: d.f(B, T, E + 1)),
    row("size", "grad [B, S+1, E]", arg("grad"), grad=lambda d, a: d.f(B, T + 1, E)),
    row("size", "A [B, S, S'-1]", arg("A"), A=lambda d, a: d.f(B, T, C + T - 1)),
    row("size", "cache [B, C, E-1]", arg("cache"), cache=lambda d, a: d.f(B, C, E - 1)),
    row("config", "lam = -1", arg("lam"), lam=_const(-1.0)),
    row("config", "self_coef = inf", arg("self_coef"), self_coef=_const(INF)),
    row(
        "config",
        "lam = NaN, need_A only",
        arg("lam"),
        lam=_const(NAN),
        need_x=_const(False),
    ),
    row(
        "meta",
        "meta grad [B+1, S, E]",
        arg("grad"),
        **_all_meta("x", "A", "cache"),
        grad=lambda d, a: torch.empty(B + 1, T, E, device="meta"),
    ),
    row("sparse", "grad sparse COO", arg("grad"), grad=lambda d, a: a["grad"].to_sparse()),
]


CASES: list[Case] = [
    *op_cases("graph_mix", _fwd_good, _fwd_rows),
    *op_cases("graph_mix", _fwd_good, _fwd_wrapper_rows, call=_wrapper_fwd),
    *_defined_cases,
    *op_cases("graph_mix_backward", _bwd_good, _bwd_rows),
]
