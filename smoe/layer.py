"""MoELayer: router + dispatch (plan, permute) + grouped experts + combine."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor, nn

from smoe import ops
from smoe.experts import Experts
from smoe.losses import DEFAULT_LOSS_WEIGHTS
from smoe.routing.topk import TopKRouter


class MoEAux(NamedTuple):
    """Side results of a :class:`MoELayer` forward (all tensors, traceable).

    Fields:
        losses: the router's unweighted auxiliary losses by name (float32 scalars), e.g.
            ``"balance"`` and ``"z"`` (top-k), ``"importance"`` and ``"load"`` (V-MoE).
        tokens_per_expert: ``[E]`` int64 kept assignments per expert (after capacity).
        dropped_fraction: fraction of the router's assignments dropped by the capacity.
    """

    losses: dict[str, Tensor]
    tokens_per_expert: Tensor
    dropped_fraction: Tensor

    def loss(self, weights: Mapping[str, float] | None = None) -> Tensor:
        """The weighted auxiliary loss to add to the task loss.

        Args:
            weights: coefficient per loss name; names not given take
                :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS` (ST-MoE's and V-MoE's values).
        """
        coef = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
        total = self.dropped_fraction.new_zeros(())
        for name, value in self.losses.items():
            if name not in coef:
                raise KeyError(f"MoEAux.loss: no weight for the auxiliary loss {name!r}")
            total = total + coef[name] * value
        return total


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer, a drop-in replacement for a dense FFN.

    Args:
        d_model: token width.
        d_ff: hidden width of each expert.
        num_experts: E.
        k: experts per token (ignored when ``router`` is given: the router decides).
        activation: ``"gelu"`` or ``"swiglu"``.
        router: any module mapping ``[T, d_model]`` to a :class:`smoe.Routing`; default
            :class:`TopKRouter` with ``renormalize``. A router that returns its own plan
            (:class:`VMoERouter`, :class:`ExpertChoiceRouter`) decides the capacity itself.
        capacity_factor: if set, each expert takes at most ``ceil(k * T * factor / E)`` slots
            (rank-major dropping); dropped slots contribute 0 (the residual passes). Not allowed
            with a router that builds its own plan.
        bias: per-expert biases.
        renormalize: for the default router.

    ``forward(x)`` takes ``[..., d_model]`` and returns ``(y, MoEAux)`` with y shaped like x.
    No host-device sync in forward.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        *,
        activation: str = "gelu",
        router: nn.Module | None = None,
        capacity_factor: float | None = None,
        bias: bool = False,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(
                f"MoELayer: capacity_factor must be > 0 or None, got {capacity_factor}"
            )
        self.d_model, self.num_experts, self.capacity_factor = d_model, num_experts, capacity_factor
        self.router = (
            router
            if router is not None
            else TopKRouter(d_model, num_experts, k, renormalize=renormalize)
        )
        self.experts = Experts(num_experts, d_model, d_ff, activation, bias=bias)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()

    @classmethod
    def from_dense(cls, ffn: nn.Module, num_experts: int, k: int = 2, **kwargs) -> MoELayer:
        """Upcycle a dense FFN into an MoE layer whose experts all start as copies of it."""
        experts = Experts.from_dense(ffn, num_experts)
        layer = cls(
            experts.d_model,
            experts.d_ff,
            num_experts,
            k,
            activation=experts.activation,
            bias=experts.b_in is not None,
            **kwargs,
        )
        layer.experts = experts
        return layer.to(experts.w_in.device)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer: x must end in d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat)
        k = routing.expert.shape[1]
        capacity = None
        if self.capacity_factor is not None:
            capacity = max(
                1, math.ceil(k * flat.shape[0] * self.capacity_factor / self.num_experts)
            )
        plan = routing.plan
        if plan is None:
            plan = ops.make_plan(routing.expert, self.num_experts, capacity=capacity)
        elif capacity is not None:
            raise ValueError(
                "MoELayer: capacity_factor must be None when the router builds its own plan "
                f"({type(self.router).__name__}: set the capacity on the router)"
            )
        x_sorted = ops.permute(flat, plan)
        y_sorted = self.experts(x_sorted, plan.offsets)
        y = ops.combine(y_sorted, routing.weight.to(y_sorted.dtype), plan)
        load = plan.tokens_per_expert()
        assigned = (routing.expert >= 0).sum()
        dropped = 1.0 - load.sum().float() / assigned.clamp_min(1).float()
        aux = MoEAux(routing.aux, load, dropped)
        return y.reshape(x.shape), aux
