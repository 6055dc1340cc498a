"""Momentum ops: the fused state update of MomentumSMoE, AdamSMoE and Robust MomentumSMoE.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd; and the
Robust Momentum coefficients (specs/momentum_smoe.md §5) the modules pass to the op.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks_methods
from smoe.ops._common import acc_dtype, check_devices, refuse_double_backward

__all__ = [
    "KINDS",
    "MomentumUpdate",
    "RobustCoefficients",
    "momentum_update",
    "robust_coefficients",
]

KINDS = _checks_methods.MOMENTUM_KINDS
_DEFAULTS = dict(
    kind="heavy_ball",
    mu=0.7,
    gamma=1.0,
    sign=-1.0,
    beta1=0.9,
    beta2=0.999,
    gamma1=1.0,
    eps=1e-8,
    robust_a=0.96,
    robust_b=0.04,
)


# ---------------------------------------------------------------------------------------------
# momentum_update
# ---------------------------------------------------------------------------------------------
class MomentumUpdate(NamedTuple):
    """The result of :func:`momentum_update`: ``delta`` (u's shape and dtype), the new state ``m``
    and, for ``kind="adam"`` only, ``p`` and ``v`` (u's shape, the state dtype; else None)."""

    delta: Tensor
    m: Tensor
    p: Tensor | None
    v: Tensor | None


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
    """One momentum step of an SMoE layer: the new state and the residual update ``delta``.

    Spec: specs/momentum_smoe.md §3 (heavy ball), §4 (Adam), §5 (Robust Momentum), §9 (backward),
    §10 (state dtype). Elementwise over u's shape:

    - ``kind="heavy_ball"``: ``m' = mu m + gamma u``, ``delta = sign m'`` (the layer computes
      ``x + delta``; ``sign=-1`` is the reference ``x - m``, ``sign=+1`` with ``mu=0, gamma=1`` is
      plain SMoE ``x + u`` exactly).
    - ``kind="adam"``: ``p' = beta1 p + (1-beta1) u``, ``v' = beta2 v + (1-beta2) u²``,
      ``delta = sign gamma1 p' / sqrt(v' + eps)`` (eps inside the sqrt, no bias correction), and
      also ``m' = mu m + gamma u``.
    - ``kind="robust"``: ``m' = -u + robust_b m``, ``delta = robust_a m'`` (the look-ahead input
      ``LN(x) + c a m`` is the module's; see :func:`robust_coefficients` for a, b, c).

    Args:
        u: the SMoE output, any shape, float32/float16/bfloat16 (float64 on CPU); may be strided.
        m: the momentum state, u's shape, float32 (float64 for float64 u).
        p: Adam's first moment (u's shape, m's dtype), required for ``kind="adam"``, else None.
        v: Adam's second moment (likewise; >= 0), required for ``kind="adam"``, else None.
        kind: "heavy_ball", "adam" or "robust".
        mu: heavy-ball momentum in [0, 1). gamma: step on u, >= 0. sign: -1 or +1.
        beta1, beta2: Adam's decay rates in [0, 1). gamma1: Adam's step, >= 0. eps: > 0.
        robust_a: the Robust Momentum step a > 0. robust_b: its momentum factor b in [0, 1).

    Returns:
        MomentumUpdate: ``delta`` (u's shape and dtype), ``m`` and, for Adam, ``p``, ``v`` (u's
        shape, the state dtype; None otherwise). Math in float32 (float64 for float64 u);
        differentiable w.r.t. u, m, p and v (``momentum_update_backward``; double backward is
        refused).

    Raises:
        ValueError: an unknown kind, an option out of range, p or v missing for Adam or given for
            another kind (named). RuntimeError (from the op): dtypes, shapes or devices.

    Note:
        Deterministic and independent of the CPU thread count; no host sync on CUDA. The linear
        kinds save nothing for the backward; Adam saves u, p and v.
    """
    problem = _checks_methods.momentum_option_error(
        dict(kind=kind, mu=mu, gamma=gamma, sign=sign, beta1=beta1, beta2=beta2, gamma1=gamma1,
             eps=eps, robust_a=robust_a, robust_b=robust_b)
    )  # fmt: skip
    if problem is not None:
        raise ValueError(f"momentum_update: {problem}")
    adam = kind == "adam"
    for name, t in (("p", p), ("v", v)):
        if adam and t is None:
            raise ValueError(f"momentum_update: {name} must be given when kind='adam'")
        if not adam and t is not None:
            raise ValueError(f"momentum_update: {name} must be None unless kind='adam'")
    delta, m_out, p_out, v_out = torch.ops.smoe.momentum_update.default(
        u,
        m,
        p,
        v,
        kind=kind,
        mu=mu,
        gamma=gamma,
        sign=sign,
        beta1=beta1,
        beta2=beta2,
        gamma1=gamma1,
        eps=eps,
        robust_a=robust_a,
        robust_b=robust_b,
    )
    return MomentumUpdate(delta, m_out, p_out if adam else None, v_out if adam else None)


def _outputs(u: Tensor, adam: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    state = acc_dtype(u)
    extra = u.shape if adam else (0,)
    return (
        u.new_empty(u.shape),
        u.new_empty(u.shape, dtype=state),
        u.new_empty(extra, dtype=state),
        u.new_empty(extra, dtype=state),
    )


@torch.library.register_fake("smoe::momentum_update")
def _momentum_update_fake(
    u: Tensor, m: Tensor, p: Tensor | None = None, v: Tensor | None = None, **kwargs
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_devices("momentum_update", u=u, m=m, p=p, v=v)
    adam = _checks_methods.check_momentum_update("momentum_update", u, m, p, v, _DEFAULTS | kwargs)
    return _outputs(u, adam)


def _setup_context_momentum_update(ctx, inputs, keyword_only_inputs, output) -> None:
    u, m, p, v = inputs
    ctx.kw = _DEFAULTS | dict(keyword_only_inputs)
    ctx.adam = ctx.kw["kind"] == "adam"
    ctx.shape, ctx.dtype, ctx.device = u.shape, u.dtype, u.device
    if ctx.adam:  # the only kind whose gradients depend on the inputs' values
        ctx.save_for_backward(u, p, v)
    else:
        ctx.mark_non_differentiable(output[2], output[3])


def _backward_momentum_update(ctx, grad_delta, grad_m, grad_p, grad_v):
    shape = ctx.shape
    state = torch.float64 if ctx.dtype == torch.float64 else torch.float32  # acc_dtype of u
    extra = shape if ctx.adam else (0,)

    def zeros(size, dtype):
        return torch.zeros(size, dtype=dtype, device=ctx.device)

    grad_delta = zeros(shape, ctx.dtype) if grad_delta is None else grad_delta
    grad_m = zeros(shape, state) if grad_m is None else grad_m
    grad_p = zeros(extra, state) if grad_p is None else grad_p
    grad_v = zeros(extra, state) if grad_v is None else grad_v
    if ctx.adam:
        u, p, v = ctx.saved_tensors
    else:  # the linear kinds read neither u nor m: grad_delta stands in for u (same metadata)
        u, p, v = grad_delta, None, None
    # m is never read: grad_m (m's shape, dtype and device) stands in for it
    grads = torch.ops.smoe.momentum_update_backward.default(
        grad_delta, grad_m, grad_p, grad_v, u, grad_m, p, v, **ctx.kw
    )
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


@torch.library.register_fake("smoe::momentum_update_backward")
def _momentum_update_backward_fake(
    grad_delta: Tensor,
    grad_m: Tensor,
    grad_p: Tensor,
    grad_v: Tensor,
    u: Tensor,
    m: Tensor,
    p: Tensor | None,
    v: Tensor | None,
    **kwargs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "momentum_update_backward"
    grads = dict(grad_delta=grad_delta, grad_m=grad_m, grad_p=grad_p, grad_v=grad_v)
    check_devices(op, u=u, **grads, m=m, p=p, v=v)
    adam = _checks_methods.check_momentum_update_backward(
        grad_delta, grad_m, grad_p, grad_v, u, m, p, v, _DEFAULTS | kwargs
    )
    return _outputs(u, adam)


torch.library.register_autograd(
    "smoe::momentum_update",
    _backward_momentum_update,
    setup_context=_setup_context_momentum_update,
)


refuse_double_backward("momentum_update")


# ---------------------------------------------------------------------------------------------
# Robust Momentum coefficients
# ---------------------------------------------------------------------------------------------
class RobustCoefficients(NamedTuple):
    """Robust Momentum's step ``a``, momentum factor ``b`` and look-ahead factor ``c``."""

    a: float
    b: float
    c: float


def robust_coefficients(rho: float, kappa: float, L: float = 1.0) -> RobustCoefficients:
    """The Robust Momentum Method's coefficients (Cyrus et al. 2018; specs/momentum_smoe.md §5).

    ``a = κ (1−ρ)² (1+ρ) / L``, ``b = κ ρ³ / (κ − 1)``, ``c = ρ³ / ((κ−1) (1−ρ)² (1+ρ))``; the
    defaults of the reference code, ρ = 0.2, κ = 1.25, give a = 0.96, b = 0.04, c ≈ 0.041667.

    Args:
        rho: the rate ρ in [0, 1); the method's range is [1 − 1/√κ, 1 − 1/κ].
        kappa: the condition-number-like κ > 1.
        L: the Lipschitz constant, > 0.

    Raises:
        ValueError: κ <= 1 (b and c divide by κ − 1), ρ outside [0, 1), L not finite and > 0.

    Warns:
        UserWarning: ρ outside [1 − 1/√κ, 1 − 1/κ] (§10).
    """
    if not 1.0 < kappa < math.inf:
        raise ValueError(f"robust_coefficients: kappa must be finite and > 1, got {kappa}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"robust_coefficients: rho must be in [0, 1), got {rho}")
    if not 0.0 < L < math.inf:
        raise ValueError(f"robust_coefficients: L must be finite and > 0, got {L}")
    lo, hi = 1.0 - 1.0 / math.sqrt(kappa), 1.0 - 1.0 / kappa
    if not lo - 1e-12 <= rho <= hi + 1e-12:
        warnings.warn(
            f"robust_coefficients: rho = {rho} is outside the Robust Momentum range "
            f"[1 - 1/sqrt(kappa), 1 - 1/kappa] = [{lo:.6g}, {hi:.6g}] for kappa = {kappa}",
            stacklevel=2,
        )
    a = kappa * (1.0 - rho) ** 2 * (1.0 + rho) / L
    b = kappa * rho**3 / (kappa - 1.0)
    c = rho**3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
    return RobustCoefficients(a, b, c)
