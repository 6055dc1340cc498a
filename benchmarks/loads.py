"""The load patterns of the benchmarks: forced expert assignments (balanced, skewed, degenerate)
or none (natural), as a logit bias that a :class:`PatternRouter` adds to a real router's logits,
so that every contender routes the same tokens to the same experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops
from smoe.losses import router_z_loss, switch_balance_loss
from smoe.routing import Routing, TopKRouter

LOADS = ("balanced", "natural", "skewed", "degenerate")
FORCE = 100.0  # logit bias that forces a choice; |clean logits| stay far below it


def pattern_experts(load: str, T: int, E: int, k: int, generator: torch.Generator) -> Tensor:
    """The forced assignment ``[T, k]`` int64 of a load pattern (``natural`` has none).

    - balanced: exactly T·k/E slots per expert (token t takes experts (k·π(t) + j) mod E);
    - skewed: expert 0 is one of the k choices of half the tokens, every other choice uniform
      among the remaining experts (with k = 2, E = 8: expert 0 gets 1/4 of all slots, 2x its fair
      share; at E = 64, k = 8: 4x);
    - degenerate: every token picks experts 0..k-1 (all tokens on the same k experts; with
      k = 1 literally one expert).
    """
    if load == "balanced":
        perm = torch.randperm(T, generator=generator)
        return (perm[:, None] * k + torch.arange(k)) % E
    if load == "degenerate":
        return torch.arange(k).expand(T, k).clone()
    if load == "skewed":
        scores = torch.rand(T, E, generator=generator)
        hot = torch.zeros(T, dtype=torch.bool)
        hot[torch.randperm(T, generator=generator)[: T // 2]] = True
        scores[:, 0] = torch.where(hot, 2.0, -1.0)  # in the top-k of hot tokens, never of others
        return scores.topk(k, dim=1).indices
    raise ValueError(f"unknown forced load pattern {load!r}")


def pattern_bias(load: str, T: int, E: int, k: int, seed: int = 0) -> Tensor | None:
    """``[T, E]`` float32 logit bias forcing ``load``'s assignment (None for ``natural``).

    The chosen experts get +FORCE, so the selection is the pattern's while the renormalised
    top-k weights stay the softmax of the clean logits (an equal shift cancels).
    """
    if load == "natural":
        return None
    g = torch.Generator().manual_seed(seed)
    idx = pattern_experts(load, T, E, k, g)
    return torch.zeros(T, E).scatter_(1, idx, FORCE)


class PatternRouter(nn.Module):
    """TopKRouter's computation (float32 linear gate, ``topk_softmax``, balance and z losses)
    with a fixed ``[T, E]`` bias on the selection logits that forces a load pattern.

    Composes the wrapped :class:`TopKRouter` (its ``weight`` is the gate), so it costs what the
    real router costs plus one ``[T, E]`` add. ``bias=None`` is exactly TopKRouter (eval mode).
    """

    def __init__(self, router: TopKRouter, bias: Tensor | None) -> None:
        super().__init__()
        self.router = router
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.router.weight

    def reset_parameters(self) -> None:
        self.router.reset_parameters()

    def forward(self, x: Tensor) -> Routing:
        r = self.router
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), r.weight.float())
            selection = logits if self.bias is None else logits + self.bias
            weight, expert = ops.topk_softmax(selection, r.k, renormalize=r.renormalize)
            aux = {
                "balance": switch_balance_loss(logits, expert, r.num_experts),
                "z": router_z_loss(logits),
            }
        return Routing(expert=expert, weight=weight, logits=logits, aux=aux)
