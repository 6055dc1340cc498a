"""The determinism case of gate_linear (the routers' gate GEMM), joined into
tests/determinism_cases.py's OP_CASES: T = 4100 tokens (64 full row tiles of the bf16
micro-kernel path and a tail of 4), d = 96, E = 300 experts (two column blocks), with a bias, in
bf16 (the micro-kernel where it runs) and fp32 (torch.linear), and the gradients of x, weight and
bias.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

T, D, E = 4100, 96, 300
DTYPES = (torch.float32, torch.bfloat16)
SEED = 9876


def _randn(*shape: int, salt: int, device: str, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(SEED + salt)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _gate_linear(device: str) -> dict[str, Tensor]:
    out = {}
    for dtype in DTYPES:
        x = _randn(T, D, salt=0, device=device, dtype=dtype).requires_grad_()
        w = (_randn(E, D, salt=1, device=device, dtype=dtype) / 8).requires_grad_()
        b = _randn(E, salt=2, device=device, dtype=dtype).requires_grad_()
        logits = torch.ops.smoe.gate_linear.default(x, w, b)
        logits.backward(_randn(T, E, salt=3, device=device, dtype=logits.dtype))
        out |= {f"logits_{dtype}": logits.detach(), f"grad_x_{dtype}": x.grad}
        out |= {f"grad_w_{dtype}": w.grad, f"grad_b_{dtype}": b.grad}
    return out


OP_CASES: dict[str, Callable[[str], dict[str, Tensor]]] = {"gate_linear": _gate_linear}
