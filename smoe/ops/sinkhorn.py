"""Sinkhorn ops: entropic optimal transport between tokens and experts (SSR, S-BASE).

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks_routing
from smoe.ops._common import acc_dtype, check_devices, refuse_double_backward

__all__ = ["Sinkhorn", "sinkhorn"]


# ---------------------------------------------------------------------------------------------
# sinkhorn
# ---------------------------------------------------------------------------------------------
class Sinkhorn(NamedTuple):
    """The result of :func:`sinkhorn`, float32 (float64 for float64 scores).

    Fields:
        log_plan: ``[T, E]`` log of the transport plan Π.
        f: ``[T]`` row potential (log u) after the last iteration.
        g: ``[E]`` column potential (log v) after the last iteration.
        iters_done: int64 0-dim tensor, the iterations run (``max_iter`` unless ``tol`` stopped
            earlier).
        row_err: 0-dim, L2 norm of ``Π 1 − row_mass``.
        col_err: 0-dim, L2 norm of ``Πᵀ 1 − col_mass``.
    """

    log_plan: Tensor
    f: Tensor
    g: Tensor
    iters_done: Tensor
    row_err: Tensor
    col_err: Tensor


def sinkhorn(
    scores: Tensor,
    *,
    eps: float,
    max_iter: int = 100,
    tol: float = 0.0,
    row_mass: float = 1.0,
    col_mass: float | None = None,
    check_every: int = 10,
) -> Sinkhorn:
    """Entropy-regularised optimal transport of tokens to experts, in the log domain.

    Spec: specs/sinkhorn_ssr.md §3, §7, §8. Solves ``max ⟨Π, C⟩ − eps ⟨Π, log Π⟩`` subject to
    ``Π 1 = row_mass`` (every token ships ``row_mass``) and ``Πᵀ 1 = col_mass`` (every expert
    receives ``col_mass``; None: ``T · row_mass / E``) with ``C = scores``. With ``S = C / eps``
    and ``f = 0``, each iteration computes ``g = log col_mass − logsumexp_t(S + f)`` then
    ``f = log row_mass − logsumexp_e(S + g)``; ``log Π = f + S + g``. So after every iteration
    the rows carry their mass exactly (up to rounding) and ``col_err`` measures convergence.

    SSR uses ``(row_mass, col_mass) = (1, T/E)`` (the defaults), S-BASE ``(1/T, 1/E)``.

    Everything is computed in float32 (float64 for float64 scores on the CPU); the column
    reductions go over fixed chunks of tokens joined in a fixed order (no atomics), so results are
    bitwise reproducible and independent of the thread count.

    Args:
        scores: ``[T, E]`` compatibility C (logits or probabilities), float32/float16/bfloat16
            (float64 on CPU); rows may be strided. Must be finite (checked on CPU; on CUDA
            non-finite scores give NaN, as checking would cost a host sync).
        eps: entropic regularisation ξ > 0 (smaller: closer to a hard assignment, slower).
        max_iter: iterations (>= 1). Each costs two passes over ``[T, E]``.
        tol: 0 (default): run exactly ``max_iter`` iterations, no host sync. > 0: every
            ``check_every`` iterations compute both residual norms and stop when both are
            <= tol; on CUDA each check is a device→host sync (the op's only one). The norms are
            absolute: in float32, column sums of ``col_mass`` carry a rounding floor of about
            ``4e-7 · col_mass · √E``, so a tol below it runs to ``max_iter``.
        row_mass: mass of each token (> 0).
        col_mass: mass of each expert (> 0); ``T · row_mass`` must equal ``E · col_mass``.
        check_every: iterations between tolerance checks (>= 1).

    Returns:
        Sinkhorn: ``log_plan [T, E]``, ``f [T]``, ``g [E]``, ``iters_done``, ``row_err``,
        ``col_err``. Differentiable w.r.t. scores through ``log_plan``, ``f`` and ``g``: the
        backward (``sinkhorn_backward``) runs reverse mode through the unrolled iterations,
        recomputing each from the stored per-iteration potentials (memory O(max_iter · (T + E))).
        ``iters_done``, ``row_err`` and ``col_err`` carry no gradient. At T = 0: an empty plan,
        ``iters_done`` 0, zero potentials and residuals.

    Raises:
        ValueError: eps, max_iter, tol, masses or check_every out of range (named).
        RuntimeError (from the op): shapes, dtypes, devices, non-finite scores on CPU.
    """
    if not 0.0 < eps < math.inf:
        raise ValueError(f"sinkhorn: eps must be finite and > 0, got {eps}")
    if max_iter < 1:
        raise ValueError(f"sinkhorn: max_iter must be >= 1, got {max_iter}")
    if not 0.0 <= tol < math.inf:
        raise ValueError(f"sinkhorn: tol must be finite and >= 0, got {tol}")
    if check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be >= 1, got {check_every}")
    if not 0.0 < row_mass < math.inf:
        raise ValueError(f"sinkhorn: row_mass must be finite and > 0, got {row_mass}")
    if col_mass is not None and not 0.0 < col_mass < math.inf:
        raise ValueError(f"sinkhorn: col_mass must be finite and > 0, got {col_mass}")
    out = torch.ops.smoe.sinkhorn.default(
        scores,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        row_mass=row_mass,
        col_mass=col_mass,
        check_every=check_every,
    )
    return Sinkhorn(*out[:6])


@torch.library.register_fake("smoe::sinkhorn")
def _sinkhorn_fake(
    scores: Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float = 0.0,
    row_mass: float = 1.0,
    col_mass: float | None = None,
    check_every: int = 10,
) -> tuple[Tensor, ...]:
    _checks_routing.check_sinkhorn(scores, eps, max_iter, tol, row_mass, col_mass, check_every)
    T, E = scores.shape
    dt = acc_dtype(scores)
    new = scores.new_empty
    return (
        new((T, E), dtype=dt),
        new((T,), dtype=dt),
        new((E,), dtype=dt),
        new((), dtype=torch.int64),
        new((), dtype=dt),
        new((), dtype=dt),
        new((max_iter, T), dtype=dt),
        new((max_iter, E), dtype=dt),
    )


def _setup_context_sinkhorn(ctx, inputs, keyword_only_inputs, output) -> None:
    (scores,) = inputs
    ctx.eps = keyword_only_inputs["eps"]
    _, _, _, iters_done, row_err, col_err, f_hist, g_hist = output
    ctx.mark_non_differentiable(iters_done, row_err, col_err, f_hist, g_hist)
    ctx.save_for_backward(scores, f_hist, g_hist, iters_done)


def _backward_sinkhorn(ctx, grad_log_plan, grad_f, grad_g, *_unused):
    scores, f_hist, g_hist, iters_done = ctx.saved_tensors
    T, E = scores.shape
    dt = acc_dtype(scores)
    zeros = scores.new_zeros
    grad_log_plan = zeros((T, E), dtype=dt) if grad_log_plan is None else grad_log_plan
    grad_f = zeros((T,), dtype=dt) if grad_f is None else grad_f
    grad_g = zeros((E,), dtype=dt) if grad_g is None else grad_g
    grad = torch.ops.smoe.sinkhorn_backward.default(
        grad_log_plan.contiguous(),
        grad_f.contiguous(),
        grad_g.contiguous(),
        scores,
        f_hist,
        g_hist,
        iters_done,
        ctx.eps,
    )
    return (grad,)


@torch.library.register_fake("smoe::sinkhorn_backward")
def _sinkhorn_backward_fake(
    grad_log_plan: Tensor,
    grad_f: Tensor,
    grad_g: Tensor,
    scores: Tensor,
    f_hist: Tensor,
    g_hist: Tensor,
    iters_done: Tensor,
    eps: float,
) -> Tensor:
    op = "sinkhorn_backward"
    check_devices(
        op,
        scores=scores,
        grad_log_plan=grad_log_plan,
        grad_f=grad_f,
        grad_g=grad_g,
        f_hist=f_hist,
        g_hist=g_hist,
        iters_done=iters_done,
    )
    _checks_routing.check_sinkhorn_backward(
        grad_log_plan, grad_f, grad_g, scores, f_hist, g_hist, iters_done, eps
    )
    T, E = scores.shape
    return scores.new_empty((T, E))


torch.library.register_autograd(
    "smoe::sinkhorn", _backward_sinkhorn, setup_context=_setup_context_sinkhorn
)


refuse_double_backward("sinkhorn")
