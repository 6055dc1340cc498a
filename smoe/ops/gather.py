"""gather_mm: :func:`smoe.ops.grouped_mm` over the rows a plan gathers, without materialising them.

One section in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import _checks
from smoe.ops._common import check_devices, refuse_double_backward
from smoe.ops.dispatch import Plan
from smoe.ops.experts import weight_grad_like

__all__ = ["gather_mm"]


def gather_mm(
    x: Tensor, plan: Plan, w: Tensor, bias: Tensor | None = None, *, gather_min_bytes: int = 0
) -> Tensor:
    """``grouped_mm(permute(x, plan), w, plan.offsets, bias)`` in one op: the grouped rows
    ``x[plan.token[r]]`` are read through the plan, never materialised.

    Args:
        x: ``[T, d_in]`` tokens (any row stride).
        plan: a :class:`smoe.ops.Plan` of x's T tokens.
        w: ``[E, d_in, d_out]``, x's dtype; a transposed view of ``[E, d_out, d_in]`` is used
            without a copy.
        bias: optional ``[E, d_out]`` per-expert bias, w's dtype.
        gather_min_bytes: where the grouped rows ``[M, d_in]`` take at most this many bytes (in
            x's dtype, or autocast's), the CPU op permutes them and runs grouped_mm's items
            instead (the same bits; the backward is the same). 0 (default): always gathers.
            :class:`smoe.Experts` passes ``ops.experts.FUSE_MIN_BYTES`` on a symbolic token
            count, where the rule cannot be decided when traced.

    Returns:
        ``[M, d_out]`` (M = ``plan.token.shape[0]``) grouped by ``plan.offsets``: row r is
        ``x[plan.token[r]] @ w[e] (+ bias[e])`` (a dropped slot's row reads 0), rows past
        ``offsets[E]`` are 0. Bitwise :func:`grouped_mm` of :func:`permute`'s output.

    Note:
        CPU: each (expert, row block) task copies its rows of x into a thread's scratch and makes
        grouped_mm's own GEMM calls; the weight gradient gathers them again, per expert. So
        neither the forward nor the autograd graph holds the ``[M, d_in]`` grouped rows (k times
        x's size): a training step writes and reads that much less memory and keeps x, which the
        graph holds anyway, instead. The input gradient is the unfused one (the grouped rows'
        gradient, then :func:`permute`'s backward sums per token in a fixed order). CUDA: the
        unfused chain on the device (permute -> grouped_mm), no host sync; a bad plan or offsets
        value trips those ops' asynchronous device asserts, under their names. Deterministic.
    """
    return torch.ops.smoe.gather_mm.default(
        x, plan.token, plan.row, w, plan.offsets, bias, gather_min_bytes
    )


@torch.library.register_fake("smoe::gather_mm")
def _gather_mm_fake(x, token, row, w, offsets, bias=None, gather_min_bytes=0):
    check_devices("gather_mm", x=x, token=token, row=row, w=w, offsets=offsets, bias=bias)
    _checks.check_gather_mm("gather_mm", x, token, row, w, offsets)
    if bias is not None:
        _checks.check_expert_bias("gather_mm", "bias", bias, "w", w, "d_out")
    _checks.check_min_bytes("gather_mm", "gather_min_bytes", gather_min_bytes, "gathering")
    return x.new_empty((token.shape[0], w.shape[2]))


def _setup_context_gather_mm(ctx, inputs, output) -> None:
    x, token, row, w, offsets = inputs[:5]
    ctx.save_for_backward(x, token, row, w, offsets)
    ctx.n_inputs = len(inputs)  # the arguments given: one gradient (or None) for each


def _backward_gather_mm(ctx, grad: Tensor):
    x, token, row, w, offsets = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = torch.ops.smoe.gather_mm_backward.default(
            grad, x, token, row, w, offsets, need_x, need_w
        )
    # needs_input_grad covers the arguments given: 5 entries when the call passed no bias
    if len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5]:
        gb = torch.ops.smoe.grouped_mm_bias_backward.default(grad, offsets)
    grads = (gx if need_x else None), None, None, (gw if need_w else None), None, gb, None
    return grads[: ctx.n_inputs]


torch.library.register_autograd(
    "smoe::gather_mm", _backward_gather_mm, setup_context=_setup_context_gather_mm
)


@torch.library.register_fake("smoe::gather_mm_backward")
def _gather_mm_backward_fake(grad_out, x, token, row, w, offsets, need_x: bool, need_w: bool):
    check_devices(
        "gather_mm_backward", x=x, grad_out=grad_out, token=token, row=row, w=w, offsets=offsets
    )
    _checks.check_gather_mm_backward(grad_out, x, token, row, w, offsets)
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    return gx, weight_grad_like(w, need_w)


refuse_double_backward("gather_mm")
