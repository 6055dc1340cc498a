"""The one result every router returns, consumed by the shared dispatch path."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from smoe.ops import Plan


class Routing(NamedTuple):
    """What a router decided for T tokens.

    Fields:
        expert: ``[T, k]`` int32 expert of each slot, -1 for "no assignment".
        weight: ``[T, k]`` float32 combine weight of each slot.
        logits: ``[T, E]`` float32 clean router logits (for diagnostics and losses).
        aux: unweighted auxiliary losses by name (e.g. ``"balance"``, ``"z"``, ``"importance"``,
            ``"load"``), float32 scalars; :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS` weighs them.
        plan: the dispatch plan, when the router builds it itself (V-MoE's per-group capacity,
            expert choice); None lets the layer call :func:`smoe.make_plan` on ``expert``.
    """

    expert: Tensor
    weight: Tensor
    logits: Tensor
    aux: dict[str, Tensor]
    plan: Plan | None = None
