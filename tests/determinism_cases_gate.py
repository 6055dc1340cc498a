"""The determinism case of gate_linear (the routers' gate GEMM), joined into
tests/determinism_cases.py's OP_CASES: T = 4100 tokens (64 full row tiles of the bf16
micro-kernel path and a tail of 4), d = 96, E = 300 experts (two column blocks), with a bias, in
bf16 (the micro-kernel where it runs) and fp32 (torch.linear), and the gradients of x, weight and
bias; its backward op alone at the same shape (bf16: the micro-kernel's split-gradient GEMMs, two
weight-gradient column items), with each gradient asked for alone too. Also router_stats (the
auxiliary losses' statistics) at T = 4100, E = 300 (17 of the CPU's 256-row blocks, 129 of
CUDA's 32-row blocks, each added in order), bf16 and fp32, with its gradient, and its backward
op with either gradient alone.
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


def _gate_linear_backward(device: str) -> dict[str, Tensor]:
    out = {}
    op = torch.ops.smoe.gate_linear_backward.default
    for dtype in DTYPES:
        x = _randn(T, D, salt=0, device=device, dtype=dtype)
        w = _randn(E, D, salt=1, device=device, dtype=dtype) / 8
        grad = _randn(T, E, salt=3, device=device, dtype=torch.float32)
        gx, gw = op(grad, x, w, True, True)
        out |= {f"grad_x_{dtype}": gx, f"grad_w_{dtype}": gw}
        out |= {f"grad_x_alone_{dtype}": op(grad, x, w, True, False)[0]}
        out |= {f"grad_w_alone_{dtype}": op(grad, x, w, False, True)[1]}
    return out


def _router_stats(device: str) -> dict[str, Tensor]:
    out = {}
    for dtype in DTYPES:
        logits = (_randn(T, E, salt=4, device=device, dtype=dtype) * 3).requires_grad_()
        prob_sum, lse = torch.ops.smoe.router_stats.default(logits)
        gp, gl = _randn(E, salt=5, device=device, dtype=torch.float32), lse.detach().cos()
        torch.autograd.backward((prob_sum, lse), (gp, gl))
        out |= {f"prob_sum_{dtype}": prob_sum.detach(), f"lse_{dtype}": lse.detach()}
        out |= {f"grad_{dtype}": logits.grad}
    return out


def _router_stats_backward(device: str) -> dict[str, Tensor]:
    out = {}
    op = torch.ops.smoe.router_stats_backward.default
    for dtype in DTYPES:
        logits = _randn(T, E, salt=4, device=device, dtype=dtype) * 3
        gp = _randn(E, salt=5, device=device, dtype=torch.float32)
        gl = _randn(T, salt=6, device=device, dtype=torch.float32)
        out |= {f"grad_{dtype}": op(gp, gl, logits)}
        out |= {f"grad_prob_sum_alone_{dtype}": op(gp, None, logits)}
        out |= {f"grad_lse_alone_{dtype}": op(None, gl, logits)}
    return out


OP_CASES: dict[str, Callable[[str], dict[str, Tensor]]] = {
    "gate_linear": _gate_linear,
    "gate_linear_backward": _gate_linear_backward,
    "router_stats": _router_stats,
    "router_stats_backward": _router_stats_backward,
}
