"""Test oracle of ``smoe.ops.topk_sigmoid`` (DeepSeek-V3's router): plain torch in float64."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops.routing import TopK


def topk_sigmoid(
    logits: Tensor,
    k: int,
    *,
    selection_bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = False,
    scale: float = 1.0,
) -> TopK:
    """s = sigmoid(logits); rank = s + bias; keep the topk_group best of n_group consecutive
    groups (group score: the sum of its two best ranks, its best for one-expert groups); top-k of
    rank (ties to the lower index, by a stable sort); weight = s at the chosen experts, divided
    by their sum + 1e-20 when renormalize, times scale. transformers' DeepseekV3TopkRouter
    computes the same (it breaks ties by torch.topk's order)."""
    s = torch.sigmoid(logits.double())
    rank = s if selection_bias is None else s + selection_bias.double()
    T, E = rank.shape
    topk_group = n_group if topk_group is None else topk_group
    if n_group > 1:
        G = E // n_group
        grouped = rank.reshape(T, n_group, G)
        score = grouped.topk(min(2, G), dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept = torch.sort(-score, dim=-1, stable=True).indices[:, :topk_group]
        mask = torch.zeros(T, n_group, dtype=torch.bool).scatter(1, kept, True)
        rank = rank.masked_fill(~mask.repeat_interleave(G, dim=1), -torch.inf)
    expert = torch.sort(-rank, dim=-1, stable=True).indices[:, :k]
    weight = s.gather(1, expert)
    if renormalize:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    weight = weight * scale
    return TopK(weight.to(logits.dtype), expert.to(torch.int32))
