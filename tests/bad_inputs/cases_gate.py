"""Bad inputs of gate_linear (the routers' gate GEMM) and of its backward: every check of
csrc/checks_gate.h, of the fakes and of the sparse refusal. The good call has x [4, 6] bf16,
weight [3, 6] bf16 and a float32 bias [3] (mixed float dtypes are valid); the backward's, the
float32 logit gradient grad [4, 3] too. Empty edges (no tokens, no experts, d = 0) are defined
rows; the logits are float32 whatever the 16-bit inputs.
"""

from __future__ import annotations

import torch

from tests.bad_inputs.cases import Case, T, arg, defined, on_meta, op_cases, row, standard_rows

D, E = 6, 3


def _good(d):
    return {
        "x": d.f(T, D, dtype=torch.bfloat16),
        "weight": d.f(E, D, dtype=torch.bfloat16),
        "bias": d.f(E),
    }


def _empty_edges_are_valid(d) -> bool:
    """T = 0 gives [0, E], E = 0 gives [T, 0], d = 0 gives the bias broadcast, all float32."""
    op = torch.ops.smoe.gate_linear.default
    no_tokens = op(d.f(0, D, dtype=torch.bfloat16), d.f(E, D, dtype=torch.bfloat16))
    no_experts = op(d.f(T, D), d.f(0, D))
    bias = d.f(E)
    no_features = op(d.f(T, 0), d.f(E, 0), bias)
    return (
        no_tokens.shape == (0, E)
        and no_tokens.dtype == torch.float32
        and no_experts.shape == (T, 0)
        and torch.equal(no_features, bias.expand(T, E))
    )


_rows = [
    *standard_rows(
        {"x": ("int32", "bool"), "weight": ("int64", "bool"), "bias": ("int32", "bool")}
    ),
    row("size", "weight d+1", arg("weight"), weight=lambda d, a: d.f(E, D + 1)),
    row("size", "bias [E+1]", arg("bias"), bias=lambda d, a: d.f(E + 1)),
    row(
        "meta",
        "meta weight d+1",
        arg("weight"),
        x=on_meta("x"),
        weight=lambda d, a: torch.empty(E, D + 1, device="meta"),
        bias=on_meta("bias"),
    ),
    row(
        "meta",
        "meta bias [E+1]",
        arg("bias"),
        x=on_meta("x"),
        weight=on_meta("weight"),
        bias=lambda d, a: torch.empty(E + 1, device="meta"),
    ),
    row("sparse", "x sparse COO", arg("x"), x=lambda d, a: a["x"].to_sparse()),
    row("sparse", "weight sparse COO", arg("weight"), weight=lambda d, a: a["weight"].to_sparse()),
]

_defined = [
    Case(
        "smoe::gate_linear/T = 0, E = 0, d = 0 (valid)",
        "smoe::gate_linear",
        "size",
        _empty_edges_are_valid,
        defined("T = 0 gives [0, E], E = 0 gives [T, 0], d = 0 gives the bias; float32 logits"),
    ),
]


# ---- gate_linear_backward ----------------------------------------------------------------------
def _bwd_good(d):
    good = _good(d)
    return {"grad": d.f(T, E), "x": good["x"], "weight": good["weight"]} | {
        "need_x": True,
        "need_weight": True,
    }


_bwd_rows = [
    *standard_rows(
        {"grad": ("bfloat16", "float64", "int32"), "x": ("int64",), "weight": ("bool",)}
    ),
    row("size", "grad [T+1, E]", arg("grad"), grad=lambda d, a: d.f(T + 1, E)),
    row("size", "grad [T, E+1]", arg("grad"), grad=lambda d, a: d.f(T, E + 1)),
    row("size", "weight d+1", arg("weight"), weight=lambda d, a: d.f(E, D + 1)),
    row(
        "meta",
        "meta grad [T, E+1]",
        arg("grad"),
        grad=lambda d, a: torch.empty(T, E + 1, device="meta"),
        x=on_meta("x"),
        weight=on_meta("weight"),
    ),
    row("sparse", "grad sparse COO", arg("grad"), grad=lambda d, a: a["grad"].to_sparse()),
]


def _bwd_empty_edges_are_valid(d) -> bool:
    """No tokens gives zero weight gradients, no experts zero x gradients, each in its dtype."""
    op = torch.ops.smoe.gate_linear_backward.default
    x, w = d.f(0, D, dtype=torch.bfloat16), d.f(E, D, dtype=torch.bfloat16)
    gx, gw = op(d.f(0, E), x, w, True, True)
    gx2, gw2 = op(d.f(T, 0), d.f(T, D), d.f(0, D), True, True)
    return (
        gx.shape == (0, D)
        and gx.dtype == torch.bfloat16
        and torch.equal(gw, torch.zeros_like(w))
        and torch.equal(gx2, torch.zeros(T, D, device=gx2.device))
        and gw2.shape == (0, D)
    )


_bwd_defined = [
    Case(
        "smoe::gate_linear_backward/T = 0, E = 0 (valid)",
        "smoe::gate_linear_backward",
        "size",
        _bwd_empty_edges_are_valid,
        defined("T = 0 gives a zero weight gradient, E = 0 a zero x gradient"),
    ),
]

CASES: list[Case] = [
    *op_cases("gate_linear", _good, _rows),
    *_defined,
    *op_cases("gate_linear_backward", _bwd_good, _bwd_rows),
    *_bwd_defined,
]
