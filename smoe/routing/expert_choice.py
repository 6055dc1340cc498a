"""Expert-choice routing (Zhou et al. 2022): every expert picks its top-C tokens.

Spec: specs/classic_routers.md §5. Perfect load balance by construction, no auxiliary loss; a
token may be processed by 0..E experts. Not causal when a group holds consecutive tokens of a
sequence: whether a token is chosen depends on the later tokens of its group, so such a router
must not be used in autoregressive decoder blocks (the choice at training time cannot be
reproduced one token at a time at inference). ``group_size="position"`` groups the B tokens at
each position of a ``[B, S]`` batch instead, which is causal (:mod:`smoe.routing.pairs`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.ops.dispatch import Plan
from smoe.routing.base import Routing
from smoe.routing.context import RoutingContext
from smoe.routing.pairs import (
    from_positions,
    pairs_from_positions,
    plan_from_pairs,
    position_shape,
    to_positions,
)
from smoe.routing.registry import register_router


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert per group: ``min(S, ceil(S * c / E))`` (specs/classic_routers.md §5).

    Args:
        num_tokens: S, the tokens of one routing group.
        num_experts: E.
        capacity_factor: c, the average number of experts per token (2 in the paper).

    Raises:
        ValueError: ``capacity_factor <= 0`` or ``num_experts < 1``.
    """
    if num_experts < 1:
        raise ValueError(f"expert_choice_capacity: num_experts must be >= 1, got {num_experts}")
    if not capacity_factor > 0:
        raise ValueError(
            f"expert_choice_capacity: capacity_factor must be > 0, got {capacity_factor}"
        )
    # sym_min: a symbolic token count (torch.compile(dynamic=True), torch.export) stays symbolic
    return torch.sym_min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


class ExpertChoiceRouter(nn.Module):
    """Linear gate + softmax over experts (float32), then each expert takes its top-C tokens.

    Spec: specs/classic_routers.md §5. The combine weight of a chosen (token, expert) pair is the
    token's softmax probability for that expert. Tokens are routed in consecutive groups of
    ``group_size`` (None: all tokens of a call form one group); in each group every expert takes
    exactly :func:`expert_choice_capacity` tokens (the last, shorter group: as many as the full
    group's capacity allows, at most its size).

    Args:
        d_model: token width.
        num_experts: E.
        capacity_factor: c, average experts per token (paper default 2); c = E makes every
            expert take every token (a dense soft MoE).
        group_size: tokens per routing group (consecutive tokens), None (all tokens of the
            call) or ``"position"``: the B tokens at each position of ``context.batch_shape =
            (B, S)`` form a group, so a token competes only with tokens at its own position of
            the other sequences (causal). Each expert then takes C = ``capacity(B)`` tokens at
            every position: with B < E/c sequences (C rounds up to 1) every expert takes every
            token, dense compute.
        init_scale: router weights ~ truncated normal with std sqrt(init_scale / d_model).

    ``forward(x [T, d_model])`` returns a :class:`Routing` whose ``expert`` and ``weight`` are
    ``[T, E]`` (column e: expert e if it chose the token, else -1 / weight 0) and whose ``plan``
    is the op's. ``aux`` is empty: expert choice needs no balancing loss. Not causal unless
    grouped by position (see the module docstring). No host sync.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        group_size: int | str | None = None,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        expert_choice_capacity(1, num_experts, capacity_factor)  # validates both
        if d_model < 1:
            raise ValueError(f"ExpertChoiceRouter: d_model must be >= 1, got {d_model}")
        if not init_scale > 0:
            raise ValueError(f"ExpertChoiceRouter: init_scale must be > 0, got {init_scale}")
        sized = isinstance(group_size, int) and not isinstance(group_size, bool)
        if not (group_size is None or group_size == "position" or (sized and group_size >= 1)):
            raise ValueError(
                "ExpertChoiceRouter: group_size must be an int >= 1, None or 'position', got "
                f"{group_size!r}"
            )
        self.d_model, self.num_experts = d_model, num_experts
        self.capacity_factor, self.group_size, self.init_scale = (
            capacity_factor,
            group_size,
            init_scale,
        )
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(self.init_scale / self.d_model)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, "
            f"capacity_factor={self.capacity_factor}, group_size={self.group_size}"
        )

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a full group of a call with ``num_tokens`` tokens (with
        ``group_size="position"``, ``num_tokens`` is the batch size B: one position's group)."""
        if self.group_size is None or self.group_size == "position":
            S = num_tokens
        else:
            S = torch.sym_min(self.group_size, num_tokens)
        return expert_choice_capacity(S, self.num_experts, self.capacity_factor)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> Routing:
        """Route ``x [T, d_model]``; returns :class:`Routing` with its plan.

        Weights are float32 (float64 for float64 x).

        ``context`` is read only with ``group_size="position"`` (its ``batch_shape``).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = ops.gate_linear(x, self.weight)
            if self.group_size == "position":
                weight, plan = self._by_position(logits, context)
            else:
                weight, plan = ops.expert_choice(
                    logits, self.capacity(x.shape[0]), group_size=self.group_size
                )
            columns = torch.arange(self.num_experts, device=x.device, dtype=torch.int32)
            expert = torch.where(plan.kept, columns, -1).to(torch.int32)
        return Routing(expert=expert, weight=weight, logits=logits, aux={}, plan=plan)

    def _by_position(self, logits: Tensor, context: RoutingContext | None) -> tuple[Tensor, Plan]:
        """The op over the tokens in position order (groups of B), mapped back to token order."""
        T, E = logits.shape
        B, S = position_shape(context, T, "ExpertChoiceRouter")
        weight, plan = ops.expert_choice(
            to_positions(logits, B, S), self.capacity(B), group_size=torch.sym_max(B, 1)
        )
        rows = torch.arange(plan.token.shape[0], device=logits.device, dtype=plan.offsets.dtype)
        expert = torch.searchsorted(plan.offsets[1:], rows, right=True)  # the row's expert
        flat = torch.where(plan.token >= 0, plan.token.long() * E + expert, -1)
        return from_positions(weight, B, S), plan_from_pairs(
            pairs_from_positions(flat, B, S, E), T, E
        )


def build_expert_choice_router(
    d_model: int,
    num_experts: int,
    k: int = 2,
    *,
    capacity_factor: float | None = None,
    group_size: int | str | None = None,
    init_scale: float = 0.1,
) -> ExpertChoiceRouter:
    """Registry factory: ``capacity_factor`` defaults to k (equal active expert compute with a
    top-k router; the paper's c = 2 when k = 2)."""
    c = float(k) if capacity_factor is None else capacity_factor
    return ExpertChoiceRouter(
        d_model, num_experts, capacity_factor=c, group_size=group_size, init_scale=init_scale
    )


register_router(
    "expert_choice",
    build_expert_choice_router,
    description="Expert choice (Zhou et al. 2022): each expert takes its top-C tokens; causal only "
    'with group_size="position"',
    selection="expert_choice",
    causal=lambda router: router.group_size == "position",
)
