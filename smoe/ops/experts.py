"""Expert ops: grouped_mm (one GEMM per expert group) and the fused swiglu activation.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops._common import check_devices, refuse_double_backward

__all__ = ["grouped_mm", "swiglu"]


# ---------------------------------------------------------------------------------------------
# grouped_mm
# ---------------------------------------------------------------------------------------------
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """One GEMM per expert group: ``out[r] = x[r] @ w[e] (+ bias[e])`` for
    ``offsets[e] <= r < offsets[e+1]``.

    Args:
        x: ``[M, d_in]`` rows grouped by expert (e.g. :func:`permute`'s output).
        w: ``[E, d_in, d_out]``, x's dtype. May be a transposed view of an ``[E, d_out, d_in]``
            tensor (transformers' ``gate_up_proj`` / ``down_proj`` layout): used without a copy.
        offsets: ``[E+1]`` int64, ``offsets[0] = 0``, non-decreasing, ``offsets[E] <= M``.
        bias: optional ``[E, d_out]`` per-expert bias, w's dtype and device (transformers'
            ``has_bias`` experts). Fused: the GEMM's beta = 1 input on CPU, the tile epilogue
            on CUDA (added in fp32 before the output's rounding). Its gradient is each group's
            sum of ``grad_out`` rows, in row order.

    Returns:
        ``[M, d_out]``; rows past ``offsets[E]`` are 0 (no bias there).

    Note:
        CPU: one BLAS GEMM per (expert, row block) over torch's thread pool. CUDA: a grouped
        tiled GEMM whose offsets stay on the device (no host sync); invalid offsets trip an
        asynchronous device assert (fatal to the CUDA context). Deterministic.
    """
    return torch.ops.smoe.grouped_mm.default(x, w, offsets, bias)


def _transposed_weight(w: Tensor) -> bool:
    # Same rule as csrc/checks.h is_transposed_weight: each w[e] is column-major.
    return w.stride(2) != 1 and w.stride(1) == 1


@torch.library.register_fake("smoe::grouped_mm")
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    check_devices("grouped_mm", x=x, w=w, offsets=offsets, bias=bias)
    if bias is not None:
        torch._check(
            bias.dim() == 2 and bias.shape[0] == w.shape[0] and bias.shape[1] == w.shape[2],
            lambda: "smoe::grouped_mm: bias must be [E, d_out]",
        )
        torch._check(bias.dtype == w.dtype, lambda: "smoe::grouped_mm: bias must have w's dtype")
    torch._check(x.dim() == 2, lambda: "smoe::grouped_mm: x must be 2-D [M, d_in]")
    torch._check(w.dim() == 3, lambda: "smoe::grouped_mm: w must be 3-D [E, d_in, d_out]")
    torch._check(w.shape[1] == x.shape[1], lambda: "smoe::grouped_mm: w must be [E, d_in, d_out]")
    torch._check(offsets.shape[0] == w.shape[0] + 1, lambda: "smoe::grouped_mm: offsets needs E+1")
    torch._check(w.dtype == x.dtype, lambda: "smoe::grouped_mm: w must have x's dtype")
    return x.new_empty((x.shape[0], w.shape[2]))


def _setup_context_grouped_mm(ctx, inputs, output) -> None:
    x, w, offsets = inputs[:3]
    ctx.save_for_backward(x, w, offsets)


def _backward_grouped_mm(ctx, grad: Tensor):
    x, w, offsets = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = torch.ops.smoe.grouped_mm_backward.default(grad, x, w, offsets, need_x, need_w)
    # needs_input_grad covers the arguments given: 3 entries when the call passed no bias
    if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3]:
        gb = torch.ops.smoe.grouped_mm_bias_backward.default(grad, offsets)
    return (gx if need_x else None), (gw if need_w else None), None, gb


torch.library.register_autograd(
    "smoe::grouped_mm", _backward_grouped_mm, setup_context=_setup_context_grouped_mm
)


@torch.library.register_fake("smoe::grouped_mm_backward")
def _grouped_mm_backward_fake(grad_out, x, w, offsets, need_x: bool, need_w: bool):
    check_devices("grouped_mm_backward", x=x, grad_out=grad_out, w=w, offsets=offsets)
    torch._check(
        grad_out.dim() == 2, lambda: "smoe::grouped_mm_backward: grad_out must be 2-D [M, d_out]"
    )
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    if not need_w:
        gw = w.new_empty((0,))
    elif _transposed_weight(w):
        E, d_in, d_out = w.shape
        gw = w.new_empty_strided((E, d_in, d_out), (d_in * d_out, 1, d_in))
    else:
        gw = w.new_empty(w.shape)
    return gx, gw


@torch.library.register_fake("smoe::grouped_mm_bias_backward")
def _grouped_mm_bias_backward_fake(grad_out: Tensor, offsets: Tensor) -> Tensor:
    check_devices("grouped_mm_bias_backward", grad_out=grad_out, offsets=offsets)
    torch._check(
        grad_out.dim() == 2,
        lambda: "smoe::grouped_mm_bias_backward: grad_out must be 2-D [M, d_out]",
    )
    torch._check(
        offsets.dim() == 1 and offsets.shape[0] >= 1,
        lambda: "smoe::grouped_mm_bias_backward: offsets must be [E+1]",
    )
    return grad_out.new_empty((offsets.shape[0] - 1, grad_out.shape[1]))


# ---------------------------------------------------------------------------------------------
# swiglu
# ---------------------------------------------------------------------------------------------
def swiglu(h: Tensor) -> Tensor:
    """SwiGLU activation on a fused gate/up projection, in one pass.

    Args:
        h: ``[M, 2f]``, gate columns first (transformers' ``gate_up_proj`` output layout).

    Returns:
        ``[M, f]`` = ``silu(h[:, :f]) * h[:, f:]``, math in fp32 for 16-bit inputs.

    Note:
        Equal to the three-op composition up to float rounding (the CPU kernel uses a vectorised
        exp with < 1e-7 relative error); the backward is one pass too. Deterministic.
    """
    if h.dim() == 2 and h.shape[1] % 2:
        raise ValueError(
            f"swiglu: h must have an even number of columns [M, 2f], got {tuple(h.shape)}"
        )
    return torch.ops.smoe.swiglu.default(h)


@torch.library.register_fake("smoe::swiglu")
def _swiglu_fake(h: Tensor) -> Tensor:
    torch._check(h.dim() == 2, lambda: "smoe::swiglu: h must be 2-D [M, 2f]")
    torch._check(h.shape[1] % 2 == 0, lambda: "smoe::swiglu: h must have 2f columns")
    return h.new_empty((h.shape[0], h.shape[1] // 2))


def _setup_context_swiglu(ctx, inputs, output) -> None:
    (h,) = inputs
    ctx.save_for_backward(h)


def _backward_swiglu(ctx, grad: Tensor):
    (h,) = ctx.saved_tensors
    return torch.ops.smoe.swiglu_backward.default(grad, h)


torch.library.register_autograd(
    "smoe::swiglu", _backward_swiglu, setup_context=_setup_context_swiglu
)


@torch.library.register_fake("smoe::swiglu_backward")
def _swiglu_backward_fake(grad_out: Tensor, h: Tensor) -> Tensor:
    check_devices("swiglu_backward", h=h, grad_out=grad_out)
    torch._check(grad_out.dim() == 2, lambda: "smoe::swiglu_backward: grad_out must be 2-D [M, f]")
    return h.new_empty(h.shape)


refuse_double_backward("grouped_mm", "grouped_mm_bias", "swiglu")
