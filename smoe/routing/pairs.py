"""Routings given as chosen (token, expert) pairs, and the "position" grouping of the routers
that choose jointly over a group of tokens (expert choice, USMoE).

A router whose tokens compete in a group (an expert takes its best tokens, or the best pairs of
the group win) is not causal when the group is a sequence: a token's experts depend on later
tokens. Grouped by *position* instead (the B tokens at one position of a ``[B, S]`` batch compete;
USMoE's Transformer-XL scratch code does this, specs/usmoe.md §5), a token's experts depend only
on tokens at its own position of other sequences, whose prefixes end there too: nothing after it.
Such a router may run in a decoder, in training and in batched generation (each step's B tokens
are one group), at the price of coupling the sequences of a batch (a token's routing depends on
which other sequences share its batch, as with batch norm).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe import ops
from smoe.ops.dispatch import Plan
from smoe.routing.context import RoutingContext, size_of

__all__ = [
    "from_positions",
    "pairs_from_positions",
    "plan_from_pairs",
    "position_shape",
    "to_positions",
]


def plan_from_pairs(flat: Tensor, num_tokens: int, num_experts: int) -> Plan:
    """The dispatch plan of chosen (token, expert) pairs, given as flat indices ``t·E + e``
    (``[P]`` int64, -1 for none), in the expert-choice layout: ``M = P`` rows (padding past
    ``offsets[E]``), tokens ascending within each expert when ``flat`` is ascending, ``slot =
    t·E + e``, ``row`` and ``kept`` ``[T, E]``. One ``make_plan`` (a stable counting sort of the
    pairs by expert) and index maps; deterministic, no host sync."""
    T, E = num_tokens, num_experts
    valid = flat >= 0
    expert = torch.where(valid, flat % E, -1).to(torch.int32).unsqueeze(1)
    pairs = ops.make_plan(expert, E)  # its "tokens" are pair indices
    taken = pairs.token >= 0
    chosen = flat[pairs.token.clamp_min(0).long()]
    token = torch.where(taken, chosen // E, -1).to(torch.int32)
    slot = torch.where(taken, chosen, -1).to(torch.int32)
    # row[t, e] = the sorted row of pair (t, e); invalid pairs write to a discarded extra entry
    row = torch.full((T * E + 1,), -1, dtype=torch.int32, device=flat.device)
    row.scatter_(0, torch.where(valid, flat, T * E), pairs.row[:, 0])
    row = row[: T * E].view(T, E)
    return Plan(pairs.offsets, token, slot, row, row >= 0)


def position_shape(context: RoutingContext | None, T: int, who: str) -> tuple[int, int]:
    """``(B, S)`` of the ``[B, S]`` batch whose positions form the groups, checked against the
    ``T`` tokens routed."""
    shape = None if context is None else context.batch_shape
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"{who}: grouping by 'position' needs context.batch_shape = (B, S), got {shape}"
        )
    B, S = size_of(shape[0]), size_of(shape[1])
    if B * S != T:
        raise ValueError(f"{who}: context.batch_shape {tuple(shape)} does not hold the {T} tokens")
    return B, S


def to_positions(t: Tensor, B: int, S: int) -> Tensor:
    """Rows of a ``[B·S, ...]`` tensor in position order (row ``s·B + b`` is token ``b·S + s``):
    each position's B tokens become consecutive, one group of B."""
    return t.reshape(B, S, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def from_positions(t: Tensor, B: int, S: int) -> Tensor:
    """The inverse of :func:`to_positions`."""
    return t.reshape(S, B, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def pairs_from_positions(flat: Tensor, B: int, S: int, E: int) -> Tensor:
    """Flat pair indices ``t'·E + e`` over position-ordered tokens (-1: none) as ``t·E + e``
    over the original tokens, ascending (so each expert lists its tokens in order)."""
    t_pos = flat.div(E, rounding_mode="floor")
    b, s = t_pos % B, t_pos.div(B, rounding_mode="floor")
    mapped = torch.where(flat >= 0, (b * S + s) * E + flat % E, -1)
    return mapped.sort().values
