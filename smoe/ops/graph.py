"""Graph ops: the token mixing of Similarity-Aware and Attention-Aware (S)MoE routing.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import _checks_methods
from smoe.ops._common import check_devices, refuse_double_backward

__all__ = ["graph_mix"]

_DEFAULTS = dict(self_coef=1.0, lam=1.0)


# ---------------------------------------------------------------------------------------------
# graph_mix
# ---------------------------------------------------------------------------------------------
def graph_mix(
    x: Tensor,
    A: Tensor,
    *,
    self_coef: float = 1.0,
    lam: float = 1.0,
    cache: Tensor | None = None,
) -> Tensor:
    """Mix per-token routing scores over a graph of the tokens of each sequence.

    Spec: specs/graph_routing.md §2 (the mixing rules), §2.3 (``memory="cache"``), §5 (forward and
    backward). Per batch entry b::

        out[b] = self_coef · x[b] + lam · A[b] @ x'[b],   x' = cat(cache, x, dim=1)  (or x)

    With x the router logits z, ``self_coef=1`` is the product-of-experts mix ("poe") and
    ``self_coef=1-lam`` the geometric ("logits") one; with x the probabilities p, ``1-lam`` is the
    arithmetic ("probs") one. ``lam=0`` drops the graph term: the result is exactly
    ``self_coef · x`` (A and the cache are not read, so non-finite entries there do not leak).

    Args:
        x: [B, S, E] scores of the S tokens of each of B sequences; float32, float16, bfloat16 or
            float64; may be strided.
        A: [B, S, S'] the graph (row-stochastic in the routers, not required here), x's dtype and
            device; S' = S, or C + S with a cache. Columns j < C weigh cached rows.
        self_coef: the weight of each token's own scores, finite.
        lam: the weight of the graph term, finite and >= 0.
        cache: None, or [B, C, E] scores of C earlier tokens (x's dtype and device) that A's first
            C columns refer to; it gets no gradient.

    Returns:
        Tensor: [B, S, E] in x's dtype, contiguous. Sums in float32 (float64 for float64).
        Differentiable w.r.t. x and A (``graph_mix_backward``; double backward is refused).

    Raises:
        ValueError: a non-finite self_coef, or lam < 0 or non-finite. RuntimeError (from the op):
            ranks, shapes (naming the expected one), dtypes or devices of x, A and cache.

    Note:
        Deterministic (every output is summed in a fixed order by one thread, no atomics) and
        independent of the CPU thread count; no host sync on CUDA. The autograd saves A when x
        needs a gradient, x and the cache when A does.
    """
    problem = _checks_methods.graph_option_error(self_coef, lam)
    if problem is not None:
        raise ValueError(f"graph_mix: {problem}")
    return torch.ops.smoe.graph_mix.default(x, A, cache, self_coef=self_coef, lam=lam)


@torch.library.register_fake("smoe::graph_mix")
def _graph_mix_fake(x: Tensor, A: Tensor, cache: Tensor | None = None, **kwargs) -> Tensor:
    kw = _DEFAULTS | kwargs
    check_devices("graph_mix", x=x, A=A, cache=cache)
    _checks_methods.check_graph_mix("graph_mix", x, A, cache, kw["self_coef"], kw["lam"])
    return x.new_empty(x.shape)


def _setup_context_graph_mix(ctx, inputs, keyword_only_inputs, output) -> None:
    x, A, cache = inputs
    ctx.kw = _DEFAULTS | dict(keyword_only_inputs)
    ctx.need_x, ctx.need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.has_cache = cache is not None
    ctx.cache_shape = cache.shape if cache is not None else None
    # grad_x reads A; grad_A reads x and the cache. A's shape is always needed, so A is saved.
    ctx.save_for_backward(A, *((x, cache) if ctx.need_A else ()))


def _backward_graph_mix(ctx, grad):
    if ctx.need_A:
        A, x, cache = ctx.saved_tensors
    else:  # x and the cache are not read: grad stands in for x (same metadata), zeros for cache
        (A,) = ctx.saved_tensors
        x = grad
        cache = grad.new_zeros(()).expand(ctx.cache_shape) if ctx.has_cache else None
    grad_x, grad_A = torch.ops.smoe.graph_mix_backward.default(
        grad, x, A, cache, need_x=ctx.need_x, need_A=ctx.need_A, **ctx.kw
    )
    return grad_x if ctx.need_x else None, grad_A if ctx.need_A else None, None


@torch.library.register_fake("smoe::graph_mix_backward")
def _graph_mix_backward_fake(
    grad: Tensor, x: Tensor, A: Tensor, cache: Tensor | None, **kwargs
) -> tuple[Tensor, Tensor]:
    op = "graph_mix_backward"
    check_devices(op, x=x, grad=grad, A=A, cache=cache)
    kw = dict(need_x=True, need_A=True) | _DEFAULTS | kwargs
    _checks_methods.check_graph_mix_backward(grad, x, A, cache, kw["self_coef"], kw["lam"])
    grad_x = x.new_empty(x.shape) if kw["need_x"] else x.new_empty((0,))
    grad_A = A.new_empty(A.shape) if kw["need_A"] else A.new_empty((0,))
    return grad_x, grad_A


torch.library.register_autograd(
    "smoe::graph_mix", _backward_graph_mix, setup_context=_setup_context_graph_mix
)


refuse_double_backward("graph_mix")
