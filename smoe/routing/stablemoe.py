"""The fastmoe "StableMoE" gate of the S2MoE / USMoE papers (a baseline, not Dai et al. 2022's
two-stage StableMoE)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.losses import xmoe_community_balance_loss
from smoe.routing.base import Routing, gate_dtype
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

# specs/s2moe.md §8: the community gate's constants.
_INIT_GAIN = 0.32
_NORM_EPS = 1e-4


class StableMoECommunityRouter(nn.Module):
    """fastmoe's ``CustomNaiveGate_Balance_StableMoE``, the "StableMoE" baseline rows of the
    S2MoE and USMoE papers (specs/s2moe.md §8; its sibling, the "XMoE" gate, is
    :class:`smoe.routing.xmoe.XMoERouter` with ``variant="fastmoe_community"``, specs/xmoe.md
    §11).

    Expert embeddings E ``[N, d]`` in the token space (no projection), orthogonal at init
    (gain 0.32) and never rescaled; the scores are ``s_{t,i} = x_t · e_i / max(‖e_i‖, 1e-4)``,
    the experts unit-normalised and the token *not*, computed in float32 (float64 for float64
    input, also under autocast). A non-finite score takes the smallest finite score of its row
    (0 if none; the fastmoe gate takes the smallest of the whole batch, which would make a
    token's routing depend on the others). Then the top-k experts by s and, as weights, the
    softmax over the k raw selected scores (no temperature).

    Auxiliary loss (unweighted, in ``Routing.aux``): ``"stablemoe_community_balance"``, the
    formula of the XMoE community gate (:func:`smoe.xmoe_community_balance_loss`: P =
    softmax(s/0.3), f over the T·k slots, 1/k at balance). Its default weight is 0: the runs
    that report this router build the gate with ``g_balance=False``.

    No capacity of its own, no freezing stage, no distillation, no temperature: unlike Dai et
    al.'s StableMoE, nothing here changes over training. Routing is per token (causal).

    Args:
        d_model: token width d (also the width of E).
        num_experts: N.
        k: experts per token (2 in those scripts).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    # A process group for global-batch loss statistics (smoe.parallel.shard_experts with
    # global_stats=True sets it; see smoe.losses). None: this rank's tokens.
    stats_group: Any = None

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__()
        _check_options(d_model, num_experts, k)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.expert_emb = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """E orthogonal with gain 0.32 (rows orthogonal when N <= d, columns otherwise)."""
        with torch.no_grad():
            nn.init.orthogonal_(self.expert_emb, gain=_INIT_GAIN)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing` with float32 weights and logits
        (the raw scores s; float64 for float64 x).

        ``context`` is accepted for the common router interface and not used: routing is per
        token (causal). Mutates nothing; no host sync.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            dt = gate_dtype(x)
            emb = self.expert_emb.to(dt)
            unit = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
            scores = _finite_rows(ops.gate_linear(x, unit))
            weight, expert = ops.topk_softmax(scores, self.k, renormalize=True)
            balance = xmoe_community_balance_loss(
                scores, expert, self.num_experts, stats_group=self.stats_group
            )
        return Routing(
            expert=expert,
            weight=weight,
            logits=scores,
            aux={"stablemoe_community_balance": balance},
        )


def _finite_rows(scores: Tensor) -> Tensor:
    """Each non-finite score replaced by the smallest finite score of its row (0 for a row with
    none), without gradient through the fill and without a host sync."""
    finite = torch.isfinite(scores)
    lowest = torch.where(finite, scores, math.inf).amin(dim=-1, keepdim=True).detach()
    fill = torch.where(torch.isfinite(lowest), lowest, 0.0)
    return torch.where(finite, scores, fill)


def _check_options(d_model: int, num_experts: int, k: int) -> None:
    if d_model < 1:
        raise ValueError(f"StableMoECommunityRouter: d_model must be >= 1, got {d_model}")
    if num_experts < 1:
        raise ValueError(f"StableMoECommunityRouter: num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(
            f"StableMoECommunityRouter: k must be in [1, num_experts={num_experts}], got {k}"
        )


register_router(
    "stablemoe_community",
    StableMoECommunityRouter,
    description="fastmoe's 'StableMoE' gate (S2MoE/USMoE baselines): unit experts, raw token",
    aux_losses=("stablemoe_community_balance",),
    aux_weights={"stablemoe_community_balance": 0.0},
)
