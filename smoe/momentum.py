"""MomentumSMoE, AdamSMoE and Robust MomentumSMoE across a stack of MoE layers (issue 23).

Spec: specs/momentum_smoe.md §2-§7. A :class:`MomentumMoE` wraps one :class:`smoe.MoELayer`; a
stack creates a :class:`MomentumState` of zeros after its embeddings at every forward and hands it
from MoE layer to MoE layer (dense layers pass it unchanged). Each wrapped layer computes
``u = dropout(moe(h_in))`` and one fused :func:`smoe.ops.momentum_update` step, and returns the
``delta`` its block adds to the residual stream in place of ``u``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from smoe.ops.momentum import KINDS, momentum_update, robust_coefficients
from smoe.routing.context import RoutingContext

__all__ = ["MomentumMoE", "MomentumState"]


class MomentumState(NamedTuple):
    """The state a momentum stack carries from one MoE layer to the next.

    Fields:
        m: the heavy-ball (or Robust Momentum) buffer, the activations' shape.
        p, v: Adam's first and second moments (``kind="adam"`` only; None otherwise).

    float32 for float32/float16/bfloat16 activations (specs/momentum_smoe.md §10), float64 for
    float64. Created per forward, part of the autograd graph, never a parameter or a buffer.
    """

    m: Tensor
    p: Tensor | None = None
    v: Tensor | None = None

    @staticmethod
    def zeros(x: Tensor, kind: str) -> MomentumState:
        """The state of a stack's first MoE layer: zeros shaped like ``x`` (§2)."""
        if kind not in KINDS:
            raise ValueError(f"MomentumState.zeros: kind must be one of {KINDS}, got {kind!r}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = torch.zeros(x.shape, dtype=dtype, device=x.device)
        if kind != "adam":
            return MomentumState(m)
        return MomentumState(m, torch.zeros_like(m), torch.zeros_like(m))


def _check_unit(name: str, x: float) -> None:
    if not 0.0 <= x < 1.0:
        raise ValueError(f"MomentumMoE: {name} must be in [0, 1), got {x}")


def _check_nonneg(name: str, x: float) -> None:
    if not 0.0 <= x < math.inf:
        raise ValueError(f"MomentumMoE: {name} must be finite and >= 0, got {x}")


def _check_index(name: str, x: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"MomentumMoE: {name} must be an int >= 0, got {x!r}")


class MomentumMoE(nn.Module):
    """An MoE layer of a momentum stack: MomentumSMoE, AdamSMoE or Robust MomentumSMoE.

    Spec: specs/momentum_smoe.md §3 (heavy ball), §4 (Adam), §5 (robust), §10 (dropout first).

    Args:
        moe: the wrapped layer, a :class:`smoe.MoELayer` (any module mapping ``(x, context)`` to
            ``(y, aux)`` with y shaped like x).
        kind: ``"heavy_ball"`` (MomentumSMoE), ``"adam"`` (AdamSMoE: an Adam step at the first
            ``adam_layers`` MoE layers, which also update m, heavy ball after them) or
            ``"robust"`` (Robust MomentumSMoE: the layer reads the look-ahead
            ``y = h + c·a·m_prev``, then ``m = -u + b·m_prev``, ``delta = a·m``).
        moe_index: this layer's position among the stack's MoE layers (0 = the first).
        mu, gamma: heavy ball ``m = mu·m_prev + gamma·u``; mu in [0, 1), gamma >= 0 (0.7, 1.0:
            the shipped scripts).
        sign: ``delta = sign·m`` (heavy ball) or ``sign·gamma1·p/sqrt(v + eps)`` (Adam); -1 is the
            reference ``x - m``, +1 with mu = 0, gamma = 1 is plain SMoE exactly.
        beta1, beta2, gamma1, eps: Adam's decay rates in [0, 1), step >= 0 and eps > 0 (inside
            the sqrt, no bias correction).
        adam_layers: how many first MoE layers take the Adam step (>= 0; ``kind="adam"`` only).
        rho, kappa, lipschitz: Robust Momentum's rate, condition number (> 1) and Lipschitz
            constant; a, b, c from :func:`smoe.ops.robust_coefficients` (``kind="robust"``).
        dropout: on u, before the update (the reference order).

    ``forward(h, state, context=None)`` returns ``(delta, new_state, aux)``: the block adds
    ``delta`` (h's shape and dtype) where a plain layer adds u; aux is the wrapped layer's.

    Raises:
        ValueError: an option out of range or an unknown kind (the message names it).
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        moe: nn.Module,
        *,
        kind: str = "heavy_ball",
        moe_index: int = 0,
        mu: float = 0.7,
        gamma: float = 1.0,
        sign: float = -1.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        gamma1: float = 1.0,
        eps: float = 1e-8,
        adam_layers: int = 1,
        rho: float = 0.2,
        kappa: float = 1.25,
        lipschitz: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(moe, nn.Module):
            raise TypeError(f"MomentumMoE: moe must be an nn.Module, got {type(moe).__name__}")
        if kind not in KINDS:
            raise ValueError(f"MomentumMoE: kind must be one of {KINDS}, got {kind!r}")
        _check_index("moe_index", moe_index)
        _check_index("adam_layers", adam_layers)
        _check_unit("mu", mu)
        _check_nonneg("gamma", gamma)
        if sign not in (1.0, -1.0):
            raise ValueError(f"MomentumMoE: sign must be -1 or +1, got {sign}")
        _check_unit("beta1", beta1)
        _check_unit("beta2", beta2)
        _check_nonneg("gamma1", gamma1)
        if not 0.0 < eps < math.inf:
            raise ValueError(f"MomentumMoE: eps must be finite and > 0, got {eps}")
        _check_unit("dropout", dropout)
        try:  # validated for every kind, so that a bad option never waits for a kind switch
            coef = robust_coefficients(rho, kappa, lipschitz)
        except ValueError as e:
            message = str(e).replace("robust_coefficients", "MomentumMoE", 1)
            raise ValueError(message.replace(": L must", ": lipschitz must", 1)) from None
        self.moe, self.kind, self.moe_index = moe, kind, moe_index
        self.mu, self.gamma, self.sign = float(mu), float(gamma), float(sign)
        self.beta1, self.beta2, self.gamma1, self.eps = beta1, beta2, gamma1, eps
        self.adam_layers, self.rho, self.kappa, self.lipschitz = adam_layers, rho, kappa, lipschitz
        self.robust = coef
        self.drop = nn.Dropout(dropout)

    @property
    def step_kind(self) -> str:
        """The op kind this layer runs: Adam's later layers take the heavy-ball step."""
        if self.kind == "adam" and self.moe_index >= self.adam_layers:
            return "heavy_ball"
        return self.kind

    def extra_repr(self) -> str:
        extra = {
            "heavy_ball": f"mu={self.mu}, gamma={self.gamma}, sign={self.sign}",
            "adam": (
                f"mu={self.mu}, gamma={self.gamma}, sign={self.sign}, beta1={self.beta1}, "
                f"beta2={self.beta2}, gamma1={self.gamma1}, adam_layers={self.adam_layers}"
            ),
            "robust": f"rho={self.rho}, kappa={self.kappa}, lipschitz={self.lipschitz}",
        }[self.kind]
        return f"kind={self.kind!r}, moe_index={self.moe_index}, {extra}"

    def initial_state(self, x: Tensor) -> MomentumState:
        """Zeros for the stack's first MoE layer (:meth:`MomentumState.zeros` of this kind)."""
        return MomentumState.zeros(x, self.kind)

    def _check_state(self, h: Tensor, state: Any) -> None:
        if not isinstance(state, MomentumState):
            raise TypeError(
                f"MomentumMoE: state must be a MomentumState, got {type(state).__name__}"
            )
        if state.m.shape != h.shape:
            raise ValueError(
                f"MomentumMoE: state.m must have h's shape {tuple(h.shape)}, got "
                f"{tuple(state.m.shape)}"
            )
        if self.kind == "adam" and (state.p is None or state.v is None):
            raise ValueError("MomentumMoE: state.p and state.v must be given when kind='adam'")

    def forward(
        self, h: Tensor, state: MomentumState, context: RoutingContext | None = None
    ) -> tuple[Tensor, MomentumState, Any]:
        self._check_state(h, state)
        if self.kind == "robust":  # the look-ahead point the router and experts read (§5)
            a, b, c = self.robust
            h = h + (c * a * state.m).to(h.dtype)
        u, aux = self.moe(h, context)
        u = self.drop(u)
        kind = self.step_kind
        if kind == "robust":
            out = momentum_update(u, state.m, kind="robust", robust_a=a, robust_b=b)
            return out.delta, MomentumState(out.m), aux
        if kind == "heavy_ball":
            out = momentum_update(u, state.m, mu=self.mu, gamma=self.gamma, sign=self.sign)
            return out.delta, MomentumState(out.m, state.p, state.v), aux
        out = momentum_update(
            u,
            state.m,
            state.p,
            state.v,
            kind="adam",
            mu=self.mu,
            gamma=self.gamma,
            sign=self.sign,
            beta1=self.beta1,
            beta2=self.beta2,
            gamma1=self.gamma1,
            eps=self.eps,
        )
        return out.delta, MomentumState(out.m, out.p, out.v), aux
