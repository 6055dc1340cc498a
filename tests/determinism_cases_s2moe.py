"""The determinism cases of s2moe_perturb and its backward (S2MoE's Gaussian perturbation), joined
into tests/determinism_cases.py's OP_CASES: x [16, 256, 64] with DSU "sequence" statistics
[16, 1, 64] (16 CPU work items of one sample), "token" statistics of x [4096, 64] ([4096, 1]: 16
work items of 256 tokens), "batch" statistics [1, 64] (one sum over 4096 tokens per feature) and
scalars (16 work items of 16384 elements, whose partial sums are added in index order), in fp32
and bf16; the backward with every output asked for and with grad_x and grad_s_mul only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SEED = 5678
DTYPES = (torch.float32, torch.bfloat16)
# pattern -> (x's shape, the statistics' shape)
SHAPES = {
    "sequence": ((16, 256, 64), (16, 1, 64)),
    "token": ((4096, 64), (4096, 1)),
    "batch": ((4096, 64), (1, 64)),
    "scalars": ((16, 256, 64), ()),
}


def _inputs(pattern: str, device: str, dtype: torch.dtype) -> list[Tensor]:
    """(x, n1, n2, mu, s_mul, s_add) from a fixed seed: s_mul and s_add > 0 (a std)."""
    shape, stat = SHAPES[pattern]
    g = torch.Generator().manual_seed(SEED)
    x, n1, n2, mu = (torch.randn(s, generator=g) for s in (shape, shape, shape, stat))
    s_mul, s_add = (torch.rand(stat, generator=g) + 0.1 for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (x, n1, n2, mu, s_mul, s_add)]


def _s2moe_perturb(device: str) -> dict[str, Tensor]:
    out = {}
    for pattern in SHAPES:
        for dtype in DTYPES:
            args = _inputs(pattern, device, dtype)
            out[f"out_{pattern}_{dtype}"] = torch.ops.smoe.s2moe_perturb.default(*args)
    return out


def _s2moe_perturb_backward(device: str) -> dict[str, Tensor]:
    out = {}
    names = ("x", "mu", "s_mul", "s_add")
    for pattern in SHAPES:
        for dtype in DTYPES:
            args = _inputs(pattern, device, dtype)
            g = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(SEED + 1))
            g = g.to(device=device, dtype=dtype)
            for mask in ([True] * 4, [True, False, True, False]):
                grads = torch.ops.smoe.s2moe_perturb_backward.default(g, *args, mask)
                tag = "".join("1" if m else "0" for m in mask)
                out |= {f"grad_{n}_{pattern}_{dtype}_{tag}": t for n, t in zip(names, grads)}
    return out


OP_CASES: dict[str, Callable[[str], dict[str, Tensor]]] = {
    "s2moe_perturb": _s2moe_perturb,
    "s2moe_perturb_backward": _s2moe_perturb_backward,
}
