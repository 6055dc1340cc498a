"""X-MoE hypersphere routing (Chi et al. 2022) and the fastmoe "XMoE" gate of the S2MoE / USMoE /
CompeteSMoE / MomentumSMoE papers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.losses import xmoe_balance_loss, xmoe_community_balance_loss
from smoe.routing.base import Routing, gate_dtype
from smoe.routing.context import RoutingContext
from smoe.routing.registry import register_router

GATES = ("softmax", "sigmoid")
VARIANTS = ("paper", "fastmoe_community")
MIXES = ("gate", "interpolate")

# specs/xmoe.md §3.6 (paper) and §11 (fastmoe community gate).
_TEMPERATURE_INIT = {"softmax": 0.3, "sigmoid": 0.07}
_EXPERT_NORM = {"paper": 0.1, "fastmoe_community": 1.5}
_COMMUNITY_ROUTING_DIM = 8


class XMoERouter(nn.Module):
    """X-MoE: route on the cosine between a low-dimensional projection of the token and expert
    embeddings on a hypersphere, with a learnable temperature (specs/xmoe.md §3-§5, §11).

    ``s = cos(W h, e_i)`` via :func:`smoe.ops.cosine_scores`, then the top-k experts by s. Gate
    values, computed in float32 (float64 for float64 input, also under autocast):

    - ``gate="softmax"``, k = 1: ``softmax(s/τ)`` over all N experts at the chosen one (Eq. 8);
    - ``gate="softmax"``, k > 1: the softmax of ``s/τ`` over the k selected (CR Sec 2.2);
    - ``gate="sigmoid"``: ``σ(s_k/τ)`` per selected expert, not renormalised.

    No Gumbel-sampled second expert (torchscale's top-2 policy). The layer output is
    ``g · FFN(h)`` (the caller owns the residual); ``mix="interpolate"`` gives the tmoe/BASE form
    ``α · FFN(h) + (1 − α) · h`` with α the gate value (at k > 1, ``Σ_j g_j FFN_j(h) + (1 − Σ_j
    g_j) h`` over the kept slots; a token dropped by capacity passes as h, as in tmoe).

    Auxiliary loss (unweighted, in ``Routing.aux``): ``"xmoe_balance"``, Eq. 9,
    ``N Σ_i f_i P_i`` with ``P`` the mean of ``softmax(s/τ0)`` (τ0 = the initial τ, fixed) and
    ``f`` the top-1 fractions (no gradient through f). Its default weight α = 0.01 comes from
    MoEC's WMT17 script (``--moe-gate-loss-wt 0.01``) and the X-MoE fine-tuning ablation, which is
    best at 1e-2 (CR Table 6); the paper gives none for pre-training (specs/xmoe.md §4).

    ``variant="fastmoe_community"`` (specs/xmoe.md §11) reproduces the "XMoE" baseline rows of the
    S2MoE, USMoE, CompeteSMoE and MomentumSMoE papers: d_e = 8 for every N, W with nn.Linear's
    init, E orthogonal (gain 0.32) and rescaled to norm 1.5 each forward, the token *not*
    normalised, no temperature, the softmax over the k raw selected scores; its loss
    ``"xmoe_community_balance"`` (P = softmax(s/0.3), f over the T·k slots: 1/k at balance)
    has default weight 0, as in those runs.

    Args:
        d_model: token width d.
        num_experts: N.
        k: experts per token (the paper uses 1; CR Table 7 also 2).
        gate: ``"softmax"`` or ``"sigmoid"`` (paper variant only).
        routing_dim: d_e; None gives ``max(1, N // 2)`` (the N/2 rule of CR Table 5), or 8 for the
            community variant.
        variant: ``"paper"`` or ``"fastmoe_community"``.
        expert_norm: the norm every row of E is re-projected to (under no_grad, once per
            training forward); None gives 0.1 (paper, CR Sec 3.1) or 1.5 (community). Scores are
            invariant to it; it only changes optimisation speed.
        temperature_init: initial τ (stored directly, used as ``max(τ, 1e-4)``) and the fixed
            balance τ0; None gives 0.3 (softmax) or 0.07 (sigmoid). Paper variant only.
        mix: ``"gate"`` (``g · FFN``) or ``"interpolate"`` (see above).
        frozen: build frozen (see :meth:`freeze`); a :class:`smoe.MoELayer` built with it also
            freezes its experts (specs/xmoe.md §5).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    # A process group for global-batch loss statistics (smoe.parallel.shard_experts with
    # global_stats=True sets it; see smoe.losses). None: this rank's tokens.
    stats_group: Any = None

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        *,
        gate: str = "softmax",
        routing_dim: int | None = None,
        variant: str = "paper",
        expert_norm: float | None = None,
        temperature_init: float | None = None,
        mix: str = "gate",
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"XMoERouter: d_model must be >= 1, got {d_model}")
        _check_options(num_experts, k, gate, routing_dim, variant, expert_norm, temperature_init)
        if mix not in MIXES:
            raise ValueError(f"XMoERouter: mix must be one of {MIXES}, got {mix!r}")
        self.community = variant == "fastmoe_community"
        if routing_dim is None:
            routing_dim = _COMMUNITY_ROUTING_DIM if self.community else max(1, num_experts // 2)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.gate, self.variant, self.mix, self.routing_dim = gate, variant, mix, routing_dim
        self.expert_norm = _EXPERT_NORM[variant] if expert_norm is None else float(expert_norm)
        self.temperature_init = (
            _TEMPERATURE_INIT[gate] if temperature_init is None else float(temperature_init)
        )
        self.proj = nn.Parameter(torch.empty(routing_dim, d_model))
        self.expert_emb = nn.Parameter(torch.empty(num_experts, routing_dim))
        if self.community:
            # No temperature: logits are the raw scores. Not in the state dict.
            self.register_buffer("temperature", torch.ones(()), persistent=False)
        else:
            self.temperature = nn.Parameter(torch.tensor(self.temperature_init))
            self.register_buffer("balance_temperature", torch.tensor(self.temperature_init))
        self.frozen = False
        self.reset_parameters()
        if frozen:
            self.freeze()

    def reset_parameters(self) -> None:
        """W ~ N(0, 0.02), no bias (paper; nn.Linear's init for the community variant); E
        orthogonal with rows at ``expert_norm`` (community: gain 0.32, rescaled at the first
        training forward); τ = τ0 = ``temperature_init``."""
        with torch.no_grad():
            if self.community:
                nn.init.kaiming_uniform_(self.proj, a=math.sqrt(5))
                nn.init.orthogonal_(self.expert_emb, gain=0.32)
            else:
                nn.init.normal_(self.proj, mean=0.0, std=0.02)
                nn.init.orthogonal_(self.expert_emb)
                self._project_experts()
                self.temperature.fill_(self.temperature_init)
                self.balance_temperature.fill_(self.temperature_init)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"routing_dim={self.routing_dim}, gate={self.gate!r}, variant={self.variant!r}, "
            f"mix={self.mix!r}, expert_norm={self.expert_norm}, frozen={self.frozen}"
        )

    def freeze(self) -> XMoERouter:
        """Stop W, E and τ from receiving gradient (X-MoE fine-tuning, specs/xmoe.md §5); the
        balance loss is still computed (it then reaches only the layers below, through h).
        :meth:`smoe.MoELayer.freeze` also freezes the experts."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self

    def _project_experts(self) -> None:
        e = self.expert_emb
        wide = e.to(torch.promote_types(e.dtype, torch.float32))
        norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
        # Rows already on the sphere (within a few ulps of E's dtype) are left bit for bit:
        # rescaling them again would move them by rounding at every forward (found in fp16:
        # two identical training forwards gave different bits).
        off = (norm / self.expert_norm - 1.0).abs() > 4 * torch.finfo(e.dtype).eps
        scale = torch.where(off, self.expert_norm / norm.clamp_min(1e-4), 1.0)
        e.copy_((wide * scale).to(e.dtype))

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing` (float32 weights and logits
        ``s/τ``, float64 for float64 x).

        In training mode the rows of E are first re-projected to ``expert_norm`` in place
        (no_grad); eval mode mutates nothing. ``context`` is accepted for the common router
        interface and not used: routing is per token (causal).
        """
        if self.training:
            with torch.no_grad():
                self._project_experts()
        with torch.autocast(device_type=x.device.type, enabled=False):
            dt = gate_dtype(x)
            # A copy of E, so that the next forward's in-place projection never touches a tensor
            # this graph saved for backward.
            emb = self.expert_emb.to(dt, copy=True)
            cos, logits = ops.cosine_scores(
                x.to(dt),
                self.proj.to(dt),
                emb,
                self.temperature,
                normalize_tokens=not self.community,
            )
            if self.gate == "sigmoid":
                expert = ops.topk_softmax(logits, self.k).expert
                weight = torch.sigmoid(torch.gather(logits, 1, expert.long()))
            else:
                # k = 1 (paper): the probability over all N; k > 1: softmax over the k selected.
                renorm = self.k > 1 or self.community
                weight, expert = ops.topk_softmax(logits, self.k, renormalize=renorm)
            N = self.num_experts
            if self.community:
                balance = xmoe_community_balance_loss(cos, expert, N, stats_group=self.stats_group)
                aux = {"xmoe_community_balance": balance}
            else:
                tau0 = self.balance_temperature
                balance = xmoe_balance_loss(cos, expert, N, tau0, stats_group=self.stats_group)
                aux = {"xmoe_balance": balance}
        return Routing(
            expert=expert,
            weight=weight,
            logits=logits,
            aux=aux,
            interpolate=self.mix == "interpolate",
        )


def _check_options(
    num_experts: int,
    k: int,
    gate: str,
    routing_dim: int | None,
    variant: str,
    expert_norm: float | None,
    temperature_init: float | None,
) -> None:
    if num_experts < 1:
        raise ValueError(f"XMoERouter: num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"XMoERouter: k must be in [1, num_experts={num_experts}], got {k}")
    if gate not in GATES:
        raise ValueError(f"XMoERouter: gate must be one of {GATES}, got {gate!r}")
    if variant not in VARIANTS:
        raise ValueError(f"XMoERouter: variant must be one of {VARIANTS}, got {variant!r}")
    if routing_dim is not None and routing_dim < 1:
        raise ValueError(f"XMoERouter: routing_dim must be >= 1 or None, got {routing_dim}")
    if expert_norm is not None and not (expert_norm > 0 and math.isfinite(expert_norm)):
        raise ValueError(f"XMoERouter: expert_norm must be finite and > 0, got {expert_norm}")
    if temperature_init is not None and not (
        temperature_init > 0 and math.isfinite(temperature_init)
    ):
        raise ValueError(
            f"XMoERouter: temperature_init must be finite and > 0, got {temperature_init}"
        )
    if variant == "fastmoe_community" and (gate != "softmax" or temperature_init is not None):
        raise ValueError(
            "XMoERouter: variant='fastmoe_community' has no temperature and a softmax gate; "
            f"got gate={gate!r}, temperature_init={temperature_init}"
        )


register_router(
    "xmoe",
    XMoERouter,
    description="X-MoE (Chi et al. 2022): cosine routing in a low-dim space, learnable temperature",
    aux_losses=("xmoe_balance",),
    aux_weights={"xmoe_balance": 1e-2},
)
register_router(
    "xmoe_community",
    XMoERouter,
    description="fastmoe's 'XMoE' gate (S2MoE/USMoE baselines): unnormalised token, d_e = 8",
    aux_losses=("xmoe_community_balance",),
    aux_weights={"xmoe_community_balance": 0.0},
    defaults={"variant": "fastmoe_community"},
)
