"""Test oracle of ``smoe.ops.unified_topk`` (USMoE's joint top-N): a stable sort per group."""

from __future__ import annotations

import torch
from torch import Tensor


def unified_topk(scores: Tensor, n: int, *, counts: Tensor | None = None) -> Tensor:
    """Per row of ``scores [G, L]``: the first ``counts[g]`` (or ``n``) indices of a stable
    descending sort (ties to the lower index; -inf last), in ascending order, -1 after them."""
    G = scores.shape[0]
    out = torch.full((G, n), -1, dtype=torch.int64)
    order = torch.sort(-scores.double().cpu(), dim=1, stable=True).indices
    for g in range(G):
        c = n if counts is None else int(counts[g])
        out[g, :c] = order[g, :c].sort().values
    return out.to(scores.device)
