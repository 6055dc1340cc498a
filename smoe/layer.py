"""MoELayer: router + dispatch (plan, permute) + grouped experts + combine."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.experts import Experts, StackedExperts, check_tokens, experts_on_tokens
from smoe.losses import DEFAULT_LOSS_WEIGHTS
from smoe.routing.context import RoutingContext
from smoe.routing.registry import build_router, registered_info


class MoEAux(NamedTuple):
    """Side results of a :class:`MoELayer` forward (all tensors, traceable).

    Fields:
        losses: the router's unweighted auxiliary losses by name (float32 scalars; float64 for
            a float64 layer), e.g. ``"balance"`` and ``"z"`` (top-k), ``"importance"`` and
            ``"load"`` (V-MoE).
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


def _takes_context(router: nn.Module) -> bool:
    """Whether ``router.forward`` accepts a ``context`` argument (all registered routers do)."""
    params = inspect.signature(router.forward).parameters
    return "context" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _check_shared(n: object, d_ff: object, gate: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"MoELayer: shared_experts must be an int >= 0, got {n!r}")
    if d_ff is not None and (isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1):
        raise ValueError(f"MoELayer: shared_d_ff must be None or an int >= 1, got {d_ff!r}")
    if gate not in (None, "sigmoid"):
        raise ValueError(f"MoELayer: shared_gate must be None or 'sigmoid', got {gate!r}")
    if not n and (d_ff is not None or gate is not None):
        raise ValueError("MoELayer: shared_d_ff and shared_gate need shared_experts >= 1")


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer, a drop-in replacement for a dense FFN.

    Args:
        d_model: token width.
        d_ff: hidden width of each expert.
        num_experts: E.
        k: experts per token, handed to a router built by name (a router module decides itself).
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"swiglu"`` (see
            :class:`smoe.Experts`).
        router: a registered router name (:func:`smoe.routing.available_routers`: ``"topk"``,
            ``"switch"``, ``"noisy_topk"``, ``"vmoe"``, ``"expert_choice"``, ...) built with
            :func:`smoe.routing.build_router`, or any module mapping ``(x [T, d_model],
            context=None)`` (or just ``x``) to a :class:`smoe.Routing`. Default ``"topk"``. A
            router that returns its own plan (V-MoE, expert choice) decides the capacity itself.
        router_options: keyword options of a router built by name.
        capacity_factor: if set, each expert takes at most ``ceil(k * T * factor / E)`` slots
            (rank-major dropping); dropped slots contribute 0 (the residual passes). Not allowed
            with a router that builds its own plan.
        bias: per-expert biases.
        renormalize: for the default ``"topk"`` router only (same as
            ``router_options={"renormalize": ...}``).
        layer_index: position in a stack of MoE layers, handed to the router in its context.
        experts: ``"ffn"`` (default: one FFN per expert, :class:`smoe.Experts`) or
            ``"base_stack"`` (each expert ``depth`` BASE-style ``x + FFN(LayerNorm(x))``
            sub-layers, :class:`smoe.experts.StackedExperts`: X-MoE's paper-parity experts,
            specs/xmoe.md §3.1).
        depth: sub-layers per expert with ``experts="base_stack"`` (3 in the X-MoE paper).
        expert_dropout: dropout on the experts' hidden activations, inside each expert
            (MomentumSMoE's reference experts; ``experts="ffn"`` only).
        shared_experts: n >= 0 experts every token goes through besides its routed ones
            (DeepSeek-MoE / V3, Qwen2-MoE): one dense FFN of width ``n * shared_d_ff`` (the
            activation, biases and dropout of the routed experts) run by the same grouped GEMM
            kernels, its output added to the routed mix.
        shared_d_ff: hidden width of each shared expert (default ``d_ff``).
        shared_gate: None (added as is, DeepSeek) or ``"sigmoid"`` (scaled by ``sigmoid(x ·
            w_g)`` per token, a learned ``Linear(d_model, 1)`` without bias: Qwen2-MoE).

    ``forward(x, context=None)`` takes ``[..., d_model]`` and an optional
    :class:`smoe.RoutingContext`, fills in the context's ``batch_shape`` (``x.shape[:-1]``) and
    ``layer_index`` where they are None, and returns ``(y, MoEAux)`` with y shaped like x. No
    host-device sync in forward.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        *,
        activation: str = "gelu",
        router: str | nn.Module | None = None,
        router_options: Mapping[str, Any] | None = None,
        capacity_factor: float | None = None,
        bias: bool = False,
        renormalize: bool = True,
        layer_index: int | None = None,
        experts: str = "ffn",
        depth: int = 3,
        expert_dropout: float = 0.0,
        shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: str | None = None,
    ) -> None:
        super().__init__()
        _check_shared(shared_experts, shared_d_ff, shared_gate)
        if experts not in ("ffn", "base_stack"):
            raise ValueError(f"MoELayer: experts must be 'ffn' or 'base_stack', got {experts!r}")
        if not 0.0 <= expert_dropout < 1.0:  # also refuses NaN
            raise ValueError(f"MoELayer: expert_dropout must be in [0, 1), got {expert_dropout}")
        if expert_dropout and experts != "ffn":
            raise ValueError("MoELayer: expert_dropout applies to experts='ffn' only")
        if depth < 1:
            raise ValueError(f"MoELayer: depth must be >= 1, got {depth}")
        if capacity_factor is not None and not capacity_factor > 0:  # also refuses NaN
            raise ValueError(
                f"MoELayer: capacity_factor must be > 0 or None, got {capacity_factor}"
            )
        self.d_model, self.num_experts, self.capacity_factor = d_model, num_experts, capacity_factor
        self.layer_index = layer_index
        if router is None:
            router = "topk"
        if isinstance(router, str):
            options = dict(router_options or {})
            if router == "topk":
                options.setdefault("renormalize", renormalize)
            elif not renormalize:
                raise ValueError(
                    f"MoELayer: renormalize applies to the default 'topk' router; for {router!r} "
                    "give its options in router_options"
                )
            self.router = build_router(router, d_model, num_experts, k, **options)
        elif isinstance(router, nn.Module):
            if router_options:
                raise ValueError(
                    "MoELayer: router_options only apply to a router given by name, got a "
                    f"{type(router).__name__} module and router_options={dict(router_options)}"
                )
            self.router = router
        else:
            raise TypeError(
                "MoELayer: router must be a registered name (str), an nn.Module or None, got "
                f"{type(router).__name__}"
            )
        if experts == "base_stack":
            self.experts = StackedExperts(
                num_experts, d_model, d_ff, activation, depth=depth, bias=bias
            )
        else:
            self.experts = Experts(
                num_experts, d_model, d_ff, activation, bias=bias, dropout=expert_dropout
            )
        if shared_experts:
            width = shared_experts * (shared_d_ff if shared_d_ff is not None else d_ff)
            self.shared = Experts(1, d_model, width, activation, bias=bias, dropout=expert_dropout)
            if shared_gate == "sigmoid":
                self.shared_gate = nn.Linear(d_model, 1, bias=False)
        if getattr(self.router, "frozen", False) is True:
            self.freeze()

    # Class-level defaults keep layers pickled whole before these attributes existed working.
    layer_index: int | None = None
    _router_takes_context: bool = True
    # (shared and shared_gate are read with getattr: a class attribute would shadow the submodule)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "router":
            # Decided once per router, not per forward (inspect does not trace under compile).
            takes = isinstance(value, nn.Module) and _takes_context(value)
            super().__setattr__("_router_takes_context", takes)

    @property
    def router_name(self) -> str | None:
        """The registry name of the router (None for a router module built by hand)."""
        info = registered_info(self.router)
        return info.name if info is not None else None

    def extra_repr(self) -> str:
        name = f"router_name={self.router_name!r}, " if self.router_name else ""
        return f"{name}capacity_factor={self.capacity_factor}, layer_index={self.layer_index}"

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if getattr(self, "shared", None) is not None:
            self.shared.reset_parameters()
        if getattr(self, "shared_gate", None) is not None:
            self.shared_gate.reset_parameters()

    def freeze(self) -> MoELayer:
        """Stop the router's and the experts' parameters from receiving gradient (X-MoE's frozen
        routing for fine-tuning, specs/xmoe.md §5). The auxiliary losses are still computed and
        still reach the layers below through x. Uses the router's own ``freeze()`` if it has
        one. A router built with ``frozen=True`` makes the layer call this at construction."""
        freeze = getattr(self.router, "freeze", None)
        if callable(freeze):
            freeze()
        else:
            self.router.requires_grad_(False)
        self.experts.requires_grad_(False)
        if getattr(self, "shared", None) is not None:
            self.shared.requires_grad_(False)
        return self

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
        if getattr(layer.router, "frozen", False) is True:
            layer.freeze()
        return layer.to(experts.w_in.device)

    def _shared(self, shared: Experts, flat: Tensor) -> Tensor:
        """The shared experts on every token: one group of all T rows (no host sync)."""
        offsets = torch.arange(2, device=flat.device, dtype=torch.int64) * flat.shape[0]
        out = shared(flat, offsets)
        gate = getattr(self, "shared_gate", None)
        if gate is not None:
            out = out * torch.sigmoid(gate(flat)).to(out.dtype)
        return out

    def _context(self, x: Tensor, context: RoutingContext | None) -> RoutingContext:
        if context is None:
            context = RoutingContext()
        elif not isinstance(context, RoutingContext):
            raise TypeError(
                f"MoELayer: context must be a smoe.RoutingContext or None, got "
                f"{type(context).__name__}"
            )
        if context.batch_shape is None:
            context = context._replace(batch_shape=tuple(x.shape[:-1]))
        if context.layer_index is None and self.layer_index is not None:
            context = context._replace(layer_index=self.layer_index)
        info = registered_info(self.router)
        if info is None:  # a router built by hand declares nothing: trust it
            return context
        if context.causal and not info.is_causal(self.router):
            raise ValueError(
                f"MoELayer: router {info.name!r} as configured is not causal (a token's experts "
                "depend on later tokens) and context.causal is True; use a causal token-choice "
                "router in a decoder"
            )
        if info.needs_sequence and len(context.batch_shape) != 2:
            raise ValueError(
                f"MoELayer: router {info.name!r} needs [B, S] sequences: give x as [B, S, d] or "
                f"context.batch_shape=(B, S), got batch_shape {context.batch_shape}"
            )
        if info.needs_attention and context.attention is None:
            raise ValueError(
                f"MoELayer: router {info.name!r} needs the block's attention probabilities in "
                "context.attention"
            )
        return context

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> tuple[Tensor, MoEAux]:
        check_tokens("MoELayer", "x", x, self.d_model, next(self.experts.parameters()).device)
        flat = x.reshape(-1, self.d_model)
        context = self._context(x, context)
        if self._router_takes_context:
            routing = self.router(flat, context=context)
        else:
            routing = self.router(flat)
        k = routing.expert.shape[1]
        capacity = None
        if self.capacity_factor is not None:
            if context.causal and k > 1:
                raise ValueError(
                    "MoELayer: capacity_factor with k > 1 is not causal (capacity is filled "
                    "rank-major, so later tokens' first choices can take a token's second "
                    "place) and context.causal is True; set capacity_factor=None"
                )
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
        y_sorted = experts_on_tokens(self.experts, flat, plan)
        y = ops.combine(y_sorted, routing.weight.to(y_sorted.dtype), plan)
        if routing.interpolate:
            kept_weight = (routing.weight * plan.kept).sum(dim=-1, keepdim=True)
            y = y + (1.0 - kept_weight).to(flat.dtype) * flat
        shared = getattr(self, "shared", None)
        if shared is not None:
            y = y + self._shared(shared, flat).to(y.dtype)
        load = plan.tokens_per_expert()
        assigned = (routing.expert >= 0).sum()
        # (not 1 - kept / assigned: a call with no assignment, e.g. T = 0, drops nothing)
        dropped = (assigned - load.sum()).float() / assigned.clamp_min(1).float()
        aux = MoEAux(routing.aux, load, dropped)
        return y.reshape(x.shape), aux
