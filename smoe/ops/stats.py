"""The auxiliary losses' statistics: ``router_stats`` (one pass over the router logits for the
balance losses' mean probabilities and the z-loss's logsumexp).

One section per op in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks_routing
from smoe.ops._common import acc_dtype, check_devices

__all__ = ["RouterStats", "router_stats"]


# ---------------------------------------------------------------------------------------------
# router_stats
# ---------------------------------------------------------------------------------------------
class RouterStats(NamedTuple):
    """``prob_sum [E]``: the sum over tokens of each expert's softmax probability; ``lse [T]``:
    each token's logsumexp. float32 (float64 for float64 logits)."""

    prob_sum: Tensor
    lse: Tensor


def router_stats(logits: Tensor) -> RouterStats:
    """The statistics of the router's auxiliary losses, in one pass over ``logits``.

    ``prob_sum[e] = Σ_t softmax(logits_t)_e`` is T times the mean probability ``P_e`` of the
    Switch / GShard balance loss (specs/classic_routers.md §2); ``lse[t] = logsumexp(logits_t)``
    is what ST-MoE's z-loss squares (§3). Where the losses would run a softmax, a column sum and a
    logsumexp (three passes forward, three backward), this op reads the logits once each way.

    Args:
        logits: ``[T, E]`` float router logits (E >= 1), any strides; 16-bit values are read
            exactly, the math is float32 (float64 for float64 logits).

    Returns:
        RouterStats: ``prob_sum [E]``, ``lse [T]`` in float32 (float64 for float64 logits).
        Differentiable in ``logits`` (twice: under ``create_graph`` the backward runs as ATen
        ops).

    Note:
        Deterministic: ``prob_sum`` adds fixed blocks of rows in order (256 rows on CPU, 32 on
        CUDA), so its bits do not depend on the thread count. A NaN in a row makes its lse and
        probabilities NaN; a row of only -inf has lse -inf (as ``torch.logsumexp``) and NaN
        probabilities (as ``torch.softmax``). No host sync.
    """
    prob_sum, lse = torch.ops.smoe.router_stats.default(logits)
    return RouterStats(prob_sum, lse)


@torch.library.register_fake("smoe::router_stats")
def _router_stats_fake(logits: Tensor) -> tuple[Tensor, Tensor]:
    _checks_routing.check_router_stats(logits)
    dt = acc_dtype(logits)
    T, E = logits.shape
    return logits.new_empty((E,), dtype=dt), logits.new_empty((T,), dtype=dt)


def _setup_context_router_stats(ctx, inputs, output) -> None:
    (logits,) = inputs
    ctx.set_materialize_grads(False)  # an unused statistic's gradient stays None: no zeros
    ctx.save_for_backward(logits)


def _backward_router_stats(ctx, grad_prob_sum: Tensor | None, grad_lse: Tensor | None):
    (logits,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_prob_sum is None and grad_lse is None):
        return None
    if torch.is_grad_enabled():
        # create_graph (a double backward): the same formula as ATen ops, which autograd can
        # differentiate again (the op below has no backward of its own)
        p = torch.softmax(logits.to(acc_dtype(logits)), dim=-1)
        inner = torch.zeros_like(p) if grad_lse is None else grad_lse.unsqueeze(1).expand_as(p)
        if grad_prob_sum is not None:
            inner = inner + grad_prob_sum - (p @ grad_prob_sum).unsqueeze(1)
        return (p * inner).to(logits.dtype)
    return torch.ops.smoe.router_stats_backward.default(grad_prob_sum, grad_lse, logits)


torch.library.register_autograd(
    "smoe::router_stats", _backward_router_stats, setup_context=_setup_context_router_stats
)


# ---------------------------------------------------------------------------------------------
# router_stats_backward
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("smoe::router_stats_backward")
def _router_stats_backward_fake(
    grad_prob_sum: Tensor | None, grad_lse: Tensor | None, logits: Tensor
) -> Tensor:
    op = "router_stats_backward"
    check_devices(op, logits=logits, grad_prob_sum=grad_prob_sum, grad_lse=grad_lse)
    _checks_routing.check_router_stats_backward(grad_prob_sum, grad_lse, logits)
    T, E = logits.shape
    return logits.new_empty((T, E))
