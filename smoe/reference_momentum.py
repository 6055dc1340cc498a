"""Float64 oracle of the momentum update (specs/momentum_smoe.md §3-§5): MomentumSMoE's heavy
ball, AdamSMoE's first-layer step and Robust MomentumSMoE's update, differentiable by autograd
(the backward's oracle). Re-exported by :mod:`smoe.reference`; library code never imports it."""

from __future__ import annotations

import math

from torch import Tensor

from smoe.ops import MomentumUpdate


def momentum_update(
    u: Tensor,
    m: Tensor,
    p: Tensor | None = None,
    v: Tensor | None = None,
    *,
    kind: str = "heavy_ball",
    mu: float = 0.7,
    gamma: float = 1.0,
    sign: float = -1.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    gamma1: float = 1.0,
    eps: float = 1e-8,
    robust_a: float = 0.96,
    robust_b: float = 0.04,
) -> MomentumUpdate:
    """specs/momentum_smoe.md §3 (heavy ball: m' = μ m + γ u, delta = sign m'), §4 (Adam:
    p' = β1 p + (1 − β1) u, v' = β2 v + (1 − β2) u², delta = sign γ1 p' / sqrt(v' + ε), and m' as
    the heavy ball) and §5 (robust: m' = −u + b m, delta = a m'), all in float64. Returns float64
    tensors; p and v are None unless kind == "adam"."""
    x, mm = u.double(), m.double()
    if kind == "heavy_ball":
        m_new = mu * mm + gamma * x
        return MomentumUpdate(sign * m_new, m_new, None, None)
    if kind == "robust":
        m_new = -x + robust_b * mm
        return MomentumUpdate(robust_a * m_new, m_new, None, None)
    if kind != "adam":
        raise ValueError(f"unknown kind {kind!r}")
    assert p is not None and v is not None
    p_new = beta1 * p.double() + (1 - beta1) * x
    v_new = beta2 * v.double() + (1 - beta2) * x * x
    delta = sign * gamma1 * p_new / (v_new + eps).sqrt()
    return MomentumUpdate(delta, mu * mm + gamma * x, p_new, v_new)


def closed_form_momentum(u: Tensor, t: int, *, mu: float, gamma: float) -> Tensor:
    """§11.3: the heavy-ball state after t + 1 steps on a constant u from m = 0,
    γ u (1 − μ^(t+1)) / (1 − μ), in float64."""
    return gamma * u.double() * (1 - mu ** (t + 1)) / (1 - mu)


def adam_first_step(u: Tensor, *, gamma1: float, beta1: float, beta2: float) -> Tensor:
    """§4, §11.5: AdamSMoE's first step from zero state for |u| ≫ sqrt(ε / (1 − β2)), the
    sign-like γ1 (1 − β1) / sqrt(1 − β2) · sign(u), in float64."""
    return gamma1 * (1 - beta1) / math.sqrt(1 - beta2) * u.double().sign()
