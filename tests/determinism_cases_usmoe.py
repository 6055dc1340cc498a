"""The determinism case of unified_topk (USMoE's joint top-N), joined into
tests/determinism_cases.py's OP_CASES: G = 48 groups of L = 64 tokens x 8 experts (6 CPU work
items of 8 groups), scores on a 0.5 grid (most of them tied) with the last tokens of every third
group -inf (padding), in fp32 and bf16, with n = 128 and with per-group counts in [0, n].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

G, S, E, N = 48, 64, 8, 128  # groups, tokens per group, experts, pairs per group
DTYPES = (torch.float32, torch.bfloat16)
SEED = 4321


def _scores(device: str, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(SEED)
    scores = torch.round(torch.randn(G, S * E, generator=g) * 2) / 2
    scores[::3, -5 * E :] = -torch.inf  # five padding tokens
    return scores.to(device=device, dtype=dtype)


def _counts(device: str) -> Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, N + 1, (G,), generator=g).to(device)


def _unified_topk(device: str) -> dict[str, Tensor]:
    out = {}
    for dtype in DTYPES:
        for counts in (None, _counts(device)):
            idx = torch.ops.smoe.unified_topk.default(_scores(device, dtype), N, counts)
            out[f"indices_{dtype}_{counts is not None}"] = idx
    return out


OP_CASES: dict[str, Callable[[str], dict[str, Tensor]]] = {"unified_topk": _unified_topk}
