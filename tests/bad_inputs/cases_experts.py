"""Bad inputs of the expert ops: grouped_mm (with and without a bias), swiglu and their backwards.

Offsets must start at 0, be non-decreasing and end at most at M (rows past ``offsets[E]`` are
padding and come out 0, so an end below M is valid and has no row). A non-contiguous ``offsets``
view is supported: its row checks the result equals the contiguous call's.
"""

from __future__ import annotations

from typing import Any

import torch

import smoe
from tests.bad_inputs.cases import (
    ASYNC_ASSERT,
    Case,
    E,
    Expect,
    arg,
    defined,
    error,
    on_meta,
    op_cases,
    row,
    standard_rows,
    value_row,
)

M, D_IN, D_OUT, F = 6, 5, 4, 3
NUM_E, D_MODEL, D_FF = 4, 8, 16  # the Experts module's rows
OFFSETS = [0, 2, 2, 5]  # [E+1]: rows 5.. are padding


def _set_offsets(values):
    return lambda d, a: d.i64(values)


def _noncontig_offsets_match(d):
    x, w = d.f(M, D_IN), d.f(E, D_IN, D_OUT)
    spaced = d.i64([v for o in OFFSETS for v in (o, 99)])[::2]
    assert not spaced.is_contiguous()
    out = smoe.grouped_mm(x, w, spaced)
    return bool(torch.equal(out, smoe.grouped_mm(x, w, spaced.contiguous())))


# ---- grouped_mm --------------------------------------------------------------------------------
def _gmm_good(d):
    return {"x": d.f(M, D_IN), "w": d.f(E, D_IN, D_OUT), "offsets": d.i64(OFFSETS)}


_offset_rows = [
    value_row(
        "offsets", "offsets non-monotone", arg("offsets"), offsets=_set_offsets([0, 3, 2, 5])
    ),
    value_row(
        "offsets", "offsets end past M", arg("offsets"), offsets=_set_offsets([0, 2, 2, M + 1])
    ),
    value_row("offsets", "offsets start at 1", arg("offsets"), offsets=_set_offsets([1, 2, 2, 5])),
    value_row(
        "offsets", "offsets start at -1", arg("offsets"), offsets=_set_offsets([-1, 2, 2, 5])
    ),
    row("offsets", "offsets E entries", arg("offsets"), offsets=_set_offsets([0, 2, 5])),
    row("offsets", "offsets E+2 entries", arg("offsets"), offsets=_set_offsets([0, 2, 2, 5, 6])),
]

_gmm_rows = [
    *standard_rows({"x": ("int32",), "w": ("float64", "int32"), "offsets": ("int32", "float32")}),
    row("size", "w d_in != x d_in", arg("w"), w=lambda d, a: d.f(E, D_IN + 1, D_OUT)),
    *_offset_rows,
    row(
        "grad",
        "offsets float32 requiring grad",
        arg("offsets"),
        offsets=lambda d, a: a["offsets"].float().requires_grad_(),
    ),
    row(
        "meta",
        "meta x 1-D",
        arg("x"),
        x=lambda d, a: torch.empty(M, device="meta"),
        w=lambda d, a: a["w"].to("meta"),
        offsets=lambda d, a: a["offsets"].to("meta"),
    ),
    row(
        "meta",
        "meta w d_in mismatch",
        arg("w"),
        x=lambda d, a: a["x"].to("meta"),
        w=lambda d, a: torch.empty(E, D_IN + 1, D_OUT, device="meta"),
        offsets=lambda d, a: a["offsets"].to("meta"),
    ),
    row("sparse", "w sparse COO", arg("w"), w=lambda d, a: a["w"].to_sparse()),
]

_gmm_defined = [
    Case(
        "smoe::grouped_mm/offsets non-contiguous view",
        "smoe::grouped_mm",
        "layout",
        _noncontig_offsets_match,
        defined("a strided offsets view gives the contiguous call's result"),
    )
]


# ---- grouped_mm with a bias ---------------------------------------------------------------------
def _gmm_bias_good(d):
    return {**_gmm_good(d), "bias": d.f(E, D_OUT)}


_gmm_bias_rows = [
    *standard_rows({"bias": ("float64", "int32")}),
    row("size", "bias E+1 rows", arg("bias"), bias=lambda d, a: d.f(E + 1, D_OUT)),
    row("size", "bias d_out+1 columns", arg("bias"), bias=lambda d, a: d.f(E, D_OUT + 1)),
    row(
        "meta",
        "meta bias d_out+1 columns",
        arg("bias"),
        **{n: on_meta(n) for n in ("x", "w", "offsets")},
        bias=lambda d, a: torch.empty(E, D_OUT + 1, device="meta"),
    ),
    row("sparse", "bias sparse COO", arg("bias"), bias=lambda d, a: a["bias"].to_sparse()),
]


# ---- grouped_mm_bias_backward ------------------------------------------------------------------
# (the sparse grad_out row is grouped_mm_backward's too)
_grad_out_sparse = row(
    "sparse",
    "grad_out sparse COO",
    arg("grad_out"),
    grad_out=lambda d, a: a["grad_out"].to_sparse(),
)


def _gmm_bias_bwd_good(d):
    return {"grad_out": d.f(M, D_OUT), "offsets": d.i64(OFFSETS)}


_gmm_bias_bwd_rows = [
    *standard_rows({"grad_out": ("int32",), "offsets": ("int32", "float32")}),
    # the offsets' values (their length sets E here, so any length >= 1 is valid)
    *[r for r in _offset_rows if "entries" not in r.label],
    row("offsets", "offsets empty", arg("offsets"), offsets=_set_offsets([])),
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        offsets=on_meta("offsets"),
        grad_out=lambda d, a: torch.empty(M, device="meta"),
    ),
    _grad_out_sparse,
]


# ---- grouped_mm_backward -----------------------------------------------------------------------
def _gmm_bwd_good(d):
    return {"grad_out": d.f(M, D_OUT), **_gmm_good(d), "need_x": True, "need_w": True}


_gmm_bwd_rows = [
    *standard_rows(
        {
            "grad_out": ("int32", "float64"),
            "x": ("int32",),
            "w": ("float64",),
            "offsets": ("int32",),
        }
    ),
    row("size", "grad_out M+1 rows", arg("grad_out"), grad_out=lambda d, a: d.f(M + 1, D_OUT)),
    row(
        "size", "grad_out d_out+1 columns", arg("grad_out"), grad_out=lambda d, a: d.f(M, D_OUT + 1)
    ),
    *_offset_rows,
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        **{n: on_meta(n) for n in ("x", "w", "offsets")},
        grad_out=lambda d, a: torch.empty(M, device="meta"),
    ),
    _grad_out_sparse,
]


# ---- swiglu ------------------------------------------------------------------------------------
def _swiglu_good(d):
    return {"h": d.f(M, 2 * F)}


_swiglu_rows = [
    *standard_rows({"h": ("int32", "bool")}),
    row("size", "h odd columns", arg("h"), h=lambda d, a: d.f(M, 2 * F + 1)),
    row("meta", "meta h 1-D", arg("h"), h=lambda d, a: torch.empty(M, device="meta")),
    row(
        "meta",
        "meta h odd columns",
        arg("h"),
        h=lambda d, a: torch.empty(M, 2 * F + 1, device="meta"),
    ),
    row("sparse", "h sparse COO", arg("h"), h=lambda d, a: a["h"].to_sparse()),
]

_swiglu_wrapper_rows = [
    row(
        "size",
        "wrapper h odd columns",
        arg("h"),
        exc=(ValueError,),
        h=lambda d, a: d.f(M, 2 * F + 1),
    ),
]


# ---- swiglu_backward ---------------------------------------------------------------------------
def _swiglu_bwd_good(d):
    return {"grad_out": d.f(M, F), "h": d.f(M, 2 * F)}


_swiglu_bwd_rows = [
    *standard_rows({"grad_out": ("int32", "float64"), "h": ("int32",)}),
    row("size", "grad_out M+1 rows", arg("grad_out"), grad_out=lambda d, a: d.f(M + 1, F)),
    row("size", "grad_out f+1 columns", arg("grad_out"), grad_out=lambda d, a: d.f(M, F + 1)),
    row("size", "h odd columns", arg("h"), h=lambda d, a: d.f(M, 2 * F + 1)),
    row(
        "meta",
        "meta grad_out 1-D",
        arg("grad_out"),
        grad_out=lambda d, a: torch.empty(M, device="meta"),
        h=lambda d, a: a["h"].to("meta"),
    ),
    row("sparse", "h sparse COO", arg("h"), h=lambda d, a: a["h"].to_sparse()),
]


# ---- the Experts module ------------------------------------------------------------------------
def _case(label: str, kind: str, fn, expect: Expect, **kw: Any) -> Case:
    return Case(f"Experts/{label}", "Experts", kind, fn, expect, **kw)


def _experts(d, **kw: Any) -> smoe.Experts:
    return smoe.Experts(NUM_E, D_MODEL, D_FF, **kw).to(d.device)


def _offsets(d, values=(0, 2, 2, 5, 6)):
    return torch.tensor(values, dtype=torch.int64, device=d.device)


_experts_cases = [
    _case(
        "activation unknown",
        "config",
        lambda d: _experts(d, activation="bogus"),
        error(arg("activation"), ValueError),
    ),
    _case(
        "num_experts = 0",
        "config",
        lambda d: smoe.Experts(0, D_MODEL, D_FF),
        error(arg("num_experts"), ValueError),
    ),
    _case(
        "d_model = 0",
        "config",
        lambda d: smoe.Experts(NUM_E, 0, D_FF),
        error(arg("d_model"), ValueError),
    ),
    _case(
        "d_ff = -1",
        "config",
        lambda d: smoe.Experts(NUM_E, D_MODEL, -1),
        error(arg("d_ff"), ValueError),
    ),
    _case(
        "x_sorted width != d_model",
        "size",
        lambda d: _experts(d)(d.f(6, D_MODEL + 1), _offsets(d)),
        error(arg("x_sorted"), ValueError),
    ),
    _case(
        "x_sorted int32",
        "dtype",
        lambda d: _experts(d)(
            torch.ones(6, D_MODEL, dtype=torch.int32, device=d.device), _offsets(d)
        ),
        error(arg("x_sorted"), TypeError),
    ),
    _case(
        "offsets E entries",
        "offsets",
        lambda d: _experts(d)(d.f(6, D_MODEL), _offsets(d, (0, 2, 5, 6))),
        error(arg("offsets")),
    ),
    _case(
        "offsets int32",
        "dtype",
        lambda d: _experts(d)(d.f(6, D_MODEL), _offsets(d).int()),
        error(arg("offsets")),
    ),
    _case(
        "offsets non-monotone",
        "offsets",
        lambda d: _experts(d)(d.f(6, D_MODEL), _offsets(d, (0, 3, 2, 5, 6))),
        error(arg("offsets")),
        cuda_expect=ASYNC_ASSERT,
    ),
    _case(
        "x_sorted on the other device",
        "device",
        lambda d: _experts(d)(d.f(6, D_MODEL).to(d.other), _offsets(d)),
        error(arg("x_sorted"), ValueError),
    ),
]


CASES: list[Case] = [
    *op_cases("grouped_mm", _gmm_good, _gmm_rows),
    *_gmm_defined,
    *op_cases("grouped_mm", _gmm_bias_good, _gmm_bias_rows),
    *op_cases("grouped_mm_backward", _gmm_bwd_good, _gmm_bwd_rows),
    *op_cases("grouped_mm_bias_backward", _gmm_bias_bwd_good, _gmm_bias_bwd_rows),
    *op_cases("swiglu", _swiglu_good, _swiglu_rows),
    *op_cases("swiglu", _swiglu_good, _swiglu_wrapper_rows, call=lambda a: smoe.swiglu(a["h"])),
    *op_cases("swiglu_backward", _swiglu_bwd_good, _swiglu_bwd_rows),
    *_experts_cases,
]
