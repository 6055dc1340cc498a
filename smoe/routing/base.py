"""The one result every router returns, consumed by the shared dispatch path."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Routing(NamedTuple):
    """What a router decided for T tokens.

    Fields:
        expert: ``[T, k]`` int32 expert of each slot, -1 for "no assignment".
        weight: ``[T, k]`` float32 combine weight of each slot.
        logits: ``[T, E]`` float32 clean router logits (for diagnostics and losses).
        aux: unweighted auxiliary losses by name (e.g. ``"balance"``, ``"z"``), float32 scalars.
    """

    expert: Tensor
    weight: Tensor
    logits: Tensor
    aux: dict[str, Tensor]
