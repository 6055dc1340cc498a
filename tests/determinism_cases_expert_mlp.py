"""The determinism cases of the ops that gather their rows through a plan, joined into
tests/determinism_cases.py's OP_CASES: T = 3000 tokens, E = 8, k = 2, d = 64, through a plan with
dropped slots (capacity 700: padding rows past offsets[E]), in fp32 (3 row blocks of 256 per
expert), bf16 and fp16.

- expert_mlp (each expert's whole MLP per row block): a hidden of 384 (GELU) or 768 (SwiGLU)
  columns, through the plan and on 6000 grouped rows in uneven groups (one empty, 100 padding
  rows), with and without biases.
- gather_mm and its backward: 384 output columns (two column blocks per row block), with a bias;
  the backward's input gradient sums each token's rows, its weight gradient gathers per expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SEED = 9012
T, E, K, D, F = 3000, 8, 2, 64, 384
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [900, 0, 1100, 300, 700, 1000, 1200, 700]  # grouped rows per expert; 100 rows of padding


def _randn(*shape: int, salt: int, device: str, dtype=torch.float32, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(SEED + salt)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _plan(device: str):
    g = torch.Generator().manual_seed(SEED)
    expert = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :K].int().to(device)
    offsets, token, _, row, _ = torch.ops.smoe.make_plan.default(expert, E, capacity=700)
    return offsets, token, row


def _expert_mlp(device: str) -> dict[str, Tensor]:
    offsets, token, row = _plan(device)
    grouped = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], device=device)
    op = torch.ops.smoe.expert_mlp.default
    out = {}
    for dtype in DTYPES:
        x = _randn(T, D, salt=1, device=device, dtype=dtype)
        rows = _randn(T * K, D, salt=2, device=device, dtype=dtype)
        for act, n_in in (("swiglu", 2 * F), ("gelu", F)):
            w_in = _randn(E, n_in, D, salt=3, device=device, dtype=dtype, scale=0.1).transpose(1, 2)
            w_out = _randn(E, D, F, salt=4, device=device, dtype=dtype, scale=0.1).transpose(1, 2)
            biased = act == "swiglu"
            b_in = _randn(E, n_in, salt=5, device=device, dtype=dtype) if biased else None
            b_out = _randn(E, D, salt=6, device=device, dtype=dtype) if biased else None
            out[f"plan_{act}_{dtype}"] = op(x, token, row, offsets, w_in, b_in, w_out, b_out, act)
            out[f"rows_{act}_{dtype}"] = op(
                rows, None, None, grouped, w_in, b_in, w_out, b_out, act
            )
    return out


def _gather_mm_inputs(device: str, dtype: torch.dtype):
    x = _randn(T, D, salt=1, device=device, dtype=dtype)
    w = _randn(E, F, D, salt=3, device=device, dtype=dtype, scale=0.1).transpose(1, 2)
    return x, w


def _gather_mm(device: str) -> dict[str, Tensor]:
    offsets, token, row = _plan(device)
    out = {}
    for dtype in DTYPES:
        x, w = _gather_mm_inputs(device, dtype)
        b = _randn(E, F, salt=5, device=device, dtype=dtype)
        out[str(dtype)] = torch.ops.smoe.gather_mm.default(x, token, row, w, offsets, b)
    return out


def _gather_mm_backward(device: str) -> dict[str, Tensor]:
    offsets, token, row = _plan(device)
    out = {}
    for dtype in DTYPES:
        x, w = _gather_mm_inputs(device, dtype)
        g = _randn(token.shape[0], F, salt=7, device=device, dtype=dtype)
        gx, gw = torch.ops.smoe.gather_mm_backward.default(g, x, token, row, w, offsets, True, True)
        out[f"x_{dtype}"], out[f"w_{dtype}"] = gx, gw
    return out


OP_CASES: dict[str, Callable[[str], dict[str, Tensor]]] = {
    "expert_mlp": _expert_mlp,
    "gather_mm": _gather_mm,
    "gather_mm_backward": _gather_mm_backward,
}
