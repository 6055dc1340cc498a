"""Router auxiliary losses: plain torch compositions (cheap), returned unweighted."""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance_loss(
    logits: Tensor, expert: Tensor, num_experts: int, *, first_choice_only: bool = False
) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e`` (specs/classic_routers.md §2).

    Args:
        logits: ``[T, E]`` router logits (P is the mean of their softmax).
        expert: ``[T, k]`` chosen experts before capacity dropping (-1 entries are ignored).
        num_experts: E.
        first_choice_only: False (default) counts all k choices divided by T, the convention of
            ST-MoE's code and transformers' ``load_balancing_loss_func`` (uniform routing gives k);
            True counts first choices only, as GShard / fairseq / Tutel (uniform gives 1).

    Returns:
        A float32 scalar; multiply by the coefficient alpha (1e-2 in Switch) yourself.
    """
    T = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = (expert[:, :1] if first_choice_only else expert).reshape(-1)
    # Counts by scatter-add of ones (exact in fp32 below 2^24 per expert); -1 entries add 0.
    # A one_hot would materialise [T, k, E] int64.
    valid = (chosen >= 0).float()
    counts = probs.new_zeros(num_experts).scatter_add_(0, chosen.clamp_min(0).long(), valid)
    f = counts / max(T, 1)
    p = probs.sum(dim=0) / max(T, 1)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(h_t)^2`` in float32 (specs/classic_routers.md §3)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse * lse).sum() / max(logits.shape[0], 1)
