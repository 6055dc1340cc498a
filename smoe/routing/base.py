"""The one result every router returns, consumed by the shared dispatch path."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import Plan


class Routing(NamedTuple):
    """What a router decided for T tokens.

    Fields:
        expert: ``[T, k]`` int32 expert of each slot, -1 for "no assignment".
        weight: ``[T, k]`` combine weight of each slot, float32 (float64 for float64 input).
        logits: ``[T, E]`` clean router logits in weight's dtype (for diagnostics and losses).
        aux: unweighted auxiliary losses by name (e.g. ``"balance"``, ``"z"``, ``"importance"``,
            ``"load"``), float32 scalars; :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS` weighs them.
        plan: the dispatch plan, when the router builds it itself (V-MoE's per-group capacity,
            expert choice); None lets the layer call :func:`smoe.make_plan` on ``expert``.
        interpolate: False (default): the layer outputs ``Σ_j weight_j FFN_j(x)``. True: it
            outputs ``Σ_j weight_j FFN_j(x) + (1 − Σ_j weight_j) x`` over the kept slots, the
            BASE/tmoe interpolation ``α FFN(x) + (1 − α) x`` at k = 1 (X-MoE's
            ``mix="interpolate"``); the caller still adds its own residual.
    """

    expert: Tensor
    weight: Tensor
    logits: Tensor
    aux: dict[str, Tensor]
    plan: Plan | None = None
    interpolate: bool = False


def gate_dtype(x: Tensor) -> torch.dtype:
    """The dtype routers compute their gate in: at least float32 (16-bit inputs are upcast, as
    Switch's "selective precision" asks), float64 stays float64 (gradcheck, reference runs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Float32Buffers:
    """Mixin of an ``nn.Module`` whose buffers named in ``keep_float32`` stay float32 through
    ``.half()`` / ``.bfloat16()`` / ``.to(dtype)`` of a model (balancing state: bf16 would drop
    updates of 1e-3 on a bias of 0.5 and count inexactly past 256)."""

    keep_float32: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.keep_float32:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self
