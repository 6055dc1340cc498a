"""RoutingContext: what a router may need beyond the flat tokens ``x [T, d]``.

Routers that only score tokens ignore it. The ones still to come need more: graph-of-tokens routing
needs the ``[B, S]`` structure and the block's attention probabilities, USMoE and expert choice
group per sequence, MomentumSMoE carries state across the layers of a stack, Selective Sinkhorn
needs the training step. :class:`smoe.MoELayer` fills in the batch shape and its layer index and
hands the context to its router, so that no new router has to change the layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RoutingContext(NamedTuple):
    """Optional side information for a router (every field may be None).

    A NamedTuple, so ``torch.compile(fullgraph=True)`` traces it; derive a variant with
    ``ctx._replace(step=...)``.

    Fields:
        batch_shape: the leading shape of the layer's input ``x [..., d]`` (``(B, S)`` for a
            sequence model): tokens ``x.reshape(-1, d)`` are in that row-major order.
            :class:`smoe.MoELayer` fills it in when it is None.
        attention: ``[B, H, S, S]`` (or ``[B, S, S]``) attention probabilities of the block the
            MoE layer sits in, for attention-aware routing.
        causal: True when the layer sits in an autoregressive decoder: a router must then not
            let a token's routing depend on later tokens (expert choice does; the registry
            records which routers are safe).
        layer_index: position of the MoE layer in its stack (state carried across layers).
        step: the training step (schedules, e.g. Selective Sinkhorn).
        padding_mask: ``batch_shape`` bool, True for real tokens and False for padding.
    """

    batch_shape: tuple[int, ...] | None = None
    attention: Tensor | None = None
    causal: bool = False
    layer_index: int | None = None
    step: int | None = None
    padding_mask: Tensor | None = None


def size_of(n) -> int:
    """One entry of ``batch_shape`` as a size: ``int(n)``, except a symbolic size (a
    ``torch.SymInt`` under ``torch.compile(dynamic=True)`` or ``torch.export``), which stays
    symbolic: ``int()`` would specialise the traced graph to this one token count."""
    return n if isinstance(n, torch.SymInt) else int(n)
