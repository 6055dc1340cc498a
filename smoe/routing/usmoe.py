"""USMoE (Do, Le & Tran 2025, "Sparse Mixture of Experts as Unified Competitive Learning"):
the best token-expert pairs of a group win, whichever axis they compete on.

Spec: specs/usmoe.md. The unified score mixes an expert-side and a token-side score,
``U = α·X + (1 − α)·T`` with ``T = softmax over experts`` and ``X = (2/E)·sigmoid(Z)`` (the
reference code) or the softmax over the group's tokens; then the ``N = round(budget·S)`` largest
``U`` of each group of S tokens are chosen jointly (``smoe.ops.unified_topk``), so a token gets
0..E experts. The combine weight is ``U`` itself. No parameters beyond the router's linear map,
no auxiliary loss: it also plugs into a pretrained MoE's router without training
(``smoe.convert(model, router=...)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe import ops
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext, size_of
from smoe.routing.pairs import (
    from_positions,
    pairs_from_positions,
    plan_from_pairs,
    position_shape,
    to_positions,
)
from smoe.routing.registry import register_router

__all__ = ["USMoERouter", "plan_from_pairs"]  # plan_from_pairs: re-exported from .pairs

_SCORES = ("sigmoid", "token_softmax")
_SELECTIONS = ("joint", "per_token", "per_expert")


class USMoERouter(nn.Module):
    """USMoE's router (specs/usmoe.md §3-§6): unified score, joint top-N per group.

    Args:
        d_model: token width.
        num_experts: E.
        k: the nominal experts per token; ``budget`` defaults to it.
        alpha: α in [0, 1], the weight of the expert-side score X (0.5 in the reference code;
            0 leaves the token-choice softmax).
        expert_score: ``"sigmoid"`` (X = (2/E)·sigmoid(Z), the code's default) or
            ``"token_softmax"`` (X = softmax of Z over the group's tokens, the v1 text's
            reading; padding tokens excluded).
        budget: average experts per token (> 0, fractional allowed): a group of S real tokens
            takes ``round(budget·S)`` pairs; default k.
        group: ``"sequence"`` (each sequence of ``context.batch_shape = (B, S)`` competes on its
            own, the reference's OLMoE plug-in), ``"position"`` (the B tokens at each position
            of the batch compete: the reference's Transformer-XL scratch code, and causal; see
            :mod:`smoe.routing.pairs`), ``"batch"`` (all tokens of the call) or an int group
            size (consecutive tokens; a shorter last group is padded).
        selection: ``"joint"`` (USMoE), ``"per_token"`` (each token its top-``round(budget)``
            of U: token choice when α = 0) or ``"per_expert"`` (each expert its top-C tokens of
            each group, ``C = max(1, round(S·budget/E))``: expert choice when α = 0).
        norm_topk_prob: divide the weights by the sum of U over all experts of the token (the
            reference's option; False there for OLMoE).
        init_scale: router weights ~ truncated normal with std sqrt(init_scale / d_model).

    ``forward(x [T, d_model], context)`` returns a :class:`smoe.Routing` with ``expert`` and
    ``weight`` ``[T, E]`` (-1 / 0 where a pair is not chosen) and its own ``plan``; ``aux`` is
    empty. In incremental decoding (sequences of one token with ``group="sequence"``) the joint
    selection has nothing to compete with: it falls back to per-token top-``round(budget)`` of
    U. Padding tokens (``context.padding_mask`` False) get no expert and do not count in S.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        *,
        alpha: float = 0.5,
        expert_score: str = "sigmoid",
        budget: float | None = None,
        group: str | int = "sequence",
        selection: str = "joint",
        norm_topk_prob: bool = False,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"USMoERouter: d_model must be >= 1, got {d_model}")
        if num_experts < 1 or not 1 <= k <= num_experts:
            raise ValueError(
                f"USMoERouter: need num_experts >= 1 and k in [1, num_experts], got "
                f"num_experts={num_experts}, k={k}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"USMoERouter: alpha must be in [0, 1], got {alpha}")
        if expert_score not in _SCORES:
            raise ValueError(
                f"USMoERouter: expert_score must be one of {_SCORES}, got {expert_score!r}"
            )
        if selection not in _SELECTIONS:
            raise ValueError(
                f"USMoERouter: selection must be one of {_SELECTIONS}, got {selection!r}"
            )
        budget = float(k) if budget is None else budget
        if not 0.0 < budget <= num_experts:
            raise ValueError(
                f"USMoERouter: budget must be in (0, num_experts] = (0, {num_experts}], got "
                f"{budget}"
            )
        sized = isinstance(group, int) and not isinstance(group, bool) and group >= 1
        if not (group in ("sequence", "position", "batch") or sized):
            raise ValueError(
                "USMoERouter: group must be 'sequence', 'position', 'batch' or an int >= 1, got "
                f"{group!r}"
            )
        if not init_scale > 0:
            raise ValueError(f"USMoERouter: init_scale must be > 0, got {init_scale}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.alpha, self.expert_score, self.budget = float(alpha), expert_score, float(budget)
        self.group, self.selection, self.norm_topk_prob = group, selection, bool(norm_topk_prob)
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(self.init_scale / self.d_model)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, alpha={self.alpha}, "
            f"expert_score={self.expert_score!r}, budget={self.budget}, group={self.group!r}, "
            f"selection={self.selection!r}"
        )

    def _groups(self, T: int, context: RoutingContext | None) -> tuple[int, int]:
        """(G, S): groups of S consecutive tokens (the last padded when S does not divide T)."""
        if self.group == "batch":
            return 1, T
        if self.group == "position":  # S groups of B (the tokens in position order)
            B, S = position_shape(context, T, "USMoERouter")
            return S, B
        if self.group == "sequence":
            shape = None if context is None else context.batch_shape
            if shape is None or len(shape) != 2:
                raise ValueError(
                    "USMoERouter: group='sequence' needs context.batch_shape = (B, S), got "
                    f"{shape}; use group='batch' or an int group size for flat tokens"
                )
            B, S = size_of(shape[0]), size_of(shape[1])
            if B * S != T:
                raise ValueError(
                    f"USMoERouter: context.batch_shape {tuple(shape)} does not hold the {T} "
                    "tokens of x"
                )
            return B, S
        S = min(self.group, T) if T else self.group
        return (T + S - 1) // S if T else 0, S

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        G, S = self._groups(T, context)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = ops.gate_linear(x, self.weight)
            real = torch.ones(G * S, dtype=torch.bool, device=x.device)
            if context is not None and context.padding_mask is not None:
                real[:T] = _padding_mask(context.padding_mask, T, x.device)
            real[T:] = False
            by_position = self.group == "position"
            if by_position:  # the batch's S positions are the G groups of B tokens
                batch, positions = S, G
                real = to_positions(real, batch, positions)
                scores = self._unified(to_positions(logits, batch, positions), real, G, S)
                flat = pairs_from_positions(self._select(scores, real, G, S), batch, positions, E)
                unified = from_positions(scores, batch, positions)
            else:
                scores = self._unified(logits, real, G, S)
                flat, unified = self._select(scores, real, G, S), scores[:T]
            plan = plan_from_pairs(flat, T, E)
            if self.norm_topk_prob:
                unified = unified / unified.sum(dim=-1, keepdim=True)
            weight = torch.where(plan.kept, unified, 0.0)
            columns = torch.arange(E, device=x.device, dtype=torch.int32)
            expert = torch.where(plan.kept, columns, -1).to(torch.int32)
        return Routing(expert=expert, weight=weight, logits=logits, aux={}, plan=plan)

    def _unified(self, logits: Tensor, real: Tensor, G: int, S: int) -> Tensor:
        """U [G·S, E] (rows past T: padding of the last group)."""
        T, E = logits.shape
        padded = F.pad(logits, (0, 0, 0, G * S - T))
        token_side = torch.softmax(padded, dim=-1)
        if self.alpha == 0.0:
            return token_side
        if self.expert_score == "sigmoid":
            expert_side = (2.0 / E) * torch.sigmoid(padded)
        else:  # softmax over the group's real tokens, per expert
            masked = padded.masked_fill(~real.unsqueeze(1), -torch.inf).view(G, S, E)
            expert_side = torch.softmax(masked, dim=1).nan_to_num(0.0).view(G * S, E)
        return self.alpha * expert_side + (1.0 - self.alpha) * token_side

    def _select(self, U: Tensor, real: Tensor, G: int, S: int) -> Tensor:
        """The chosen pairs as flat indices t·E + e over the padded tokens, [P] (-1: none)."""
        E = self.num_experts
        if G * S == 0:
            return torch.empty(0, dtype=torch.int64, device=U.device)
        masked = U.masked_fill(~real.unsqueeze(1), -torch.inf)
        per_token = self.selection == "per_token" or (self.group == "sequence" and S == 1)
        if per_token:  # each token its top round(budget) (incremental decoding falls back here)
            n = min(E, max(1, round(self.budget)))
            counts = torch.where(real, n, 0).to(torch.int64)
            idx = ops.unified_topk(masked, n, counts=counts)  # [G·S, n] expert ids
            rows = torch.arange(G * S, device=U.device).unsqueeze(1) * E
            return torch.where(idx >= 0, rows + idx, -1).reshape(-1)
        s_real = real.view(G, S).sum(dim=1)
        if self.selection == "per_expert":  # each expert its top-C tokens of each group
            C = min(S, max(1, round(S * self.budget / E)))
            by_expert = masked.view(G, S, E).transpose(1, 2).reshape(G * E, S)
            cap = torch.round(s_real.double() * self.budget / E).clamp(min=1).to(torch.int64)
            counts = torch.minimum(cap.clamp(max=C), s_real).repeat_interleave(E)
            idx = ops.unified_topk(by_expert, C, counts=counts)  # [G·E, C] token in group
            g = torch.arange(G, device=U.device).repeat_interleave(E).unsqueeze(1)
            e = torch.arange(E, device=U.device).repeat(G).unsqueeze(1)
            # (within each expert: groups ascending, tokens ascending in each: token order)
            return torch.where(idx >= 0, (g * S + idx) * E + e, -1).reshape(-1)
        n = min(S * E, max(1, round(self.budget * S)))
        counts = torch.round(s_real.double() * self.budget).to(torch.int64).clamp(max=n)
        counts = torch.minimum(counts, s_real * E)
        idx = ops.unified_topk(masked.view(G, S * E), n, counts=counts)  # [G, n] pair in group
        base = torch.arange(G, device=U.device).unsqueeze(1) * (S * E)
        return torch.where(idx >= 0, base + idx, -1).reshape(-1)


def _padding_mask(mask: Tensor, T: int, device: torch.device) -> Tensor:
    """``context.padding_mask`` as ``[T]`` bool (True: a real token), checked."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.numel() != T:
        raise ValueError(
            "USMoERouter: context.padding_mask must be a bool tensor with one entry per token "
            f"({T}), got {getattr(mask, 'dtype', type(mask).__name__)} of shape "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )
    if mask.device != device:
        raise ValueError(f"USMoERouter: context.padding_mask is on {mask.device}, x on {device}")
    return mask.reshape(T)


def build_usmoe_router(
    d_model: int,
    num_experts: int,
    k: int = 2,
    *,
    alpha: float = 0.5,
    expert_score: str = "sigmoid",
    budget: float | None = None,
    group: str | int = "sequence",
    selection: str = "joint",
    norm_topk_prob: bool = False,
    init_scale: float = 0.1,
) -> USMoERouter:
    """Registry factory (the budget defaults to k: equal active expert compute)."""
    return USMoERouter(
        d_model,
        num_experts,
        k,
        alpha=alpha,
        expert_score=expert_score,
        budget=budget,
        group=group,
        selection=selection,
        norm_topk_prob=norm_topk_prob,
        init_scale=init_scale,
    )


def _usmoe_causal(router: USMoERouter) -> bool:
    """Grouped by position, a token competes only with tokens at its own position; per-token
    selection of the sigmoid score reads each token alone; the rest see later tokens."""
    if router.group == "position":
        return True
    return router.selection == "per_token" and (
        router.alpha == 0.0 or router.expert_score == "sigmoid"
    )


register_router(
    "usmoe",
    build_usmoe_router,
    description="USMoE (Do et al. 2025): unified token/expert score, the best N pairs of each "
    "sequence win (not causal) or of each position across the batch (causal)",
    selection="unified",
    causal=_usmoe_causal,
)
