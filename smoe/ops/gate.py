"""The routers' gate: ``gate_linear``, their logits in float32 from the exact values of 16-bit
inputs.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import _checks_routing
from smoe.ops._common import check_devices

__all__ = ["gate_linear"]


# ---------------------------------------------------------------------------------------------
# gate_linear
# ---------------------------------------------------------------------------------------------
def gate_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A router's logits ``x @ weight.T (+ bias)`` in float32 (float64 for float64 ``x``).

    The same values as ``F.linear(x.float(), weight.float(), bias.float())`` up to summation order:
    the logits are never rounded to 16 bits, whatever the dtypes of ``x``, ``weight`` and ``bias``
    (a 16-bit routing decision flips near-ties between experts).

    Args:
        x: ``[T, d]`` float.
        weight: ``[E, d]`` float (any float dtype; a float32 master weight under autocast too).
        bias: None or ``[E]`` float.

    Returns:
        ``[T, E]`` float32 (float64 for float64 ``x``). Differentiable (twice) in ``x``,
        ``weight`` and ``bias``; the backward is two GEMMs in the logits' dtype, each gradient cast
        to its input's dtype.

    Note:
        CPU, ``x`` and ``weight`` both bfloat16 (a model cast to bf16): rows of ``x`` run through
        oneDNN's bf16 micro-kernel with float32 accumulators (products of bf16 values are exact in
        float32), at the bf16 GEMM's rate and without a float32 copy of ``x``;
        ``python -m smoe.info`` says whether it runs here (``SMOE_CPU_BRGEMM=0`` turns it off).
        The backward's GEMMs run there too, with the float32 logit gradient as two bf16 parts
        (hi + lo, ~2^-17 relative): the gradients equal those of the float32 GEMMs up to that
        and the summation order, before their rounding to bf16. Every other case, and CUDA, runs
        the float32 GEMMs on the upcast inputs.
    """
    return torch.ops.smoe.gate_linear.default(x, weight, bias)


@torch.library.register_fake("smoe::gate_linear")
def _gate_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    check_devices("gate_linear", x=x, weight=weight, bias=bias)
    dtype = _checks_routing.check_gate_linear(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)


def _setup_context_gate_linear(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_gate_linear(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_weight = grad_bias = None
    if torch.is_grad_enabled():
        # create_graph (a double backward): the same GEMMs as ATen ops, which autograd can
        # differentiate again (the op below has no backward of its own)
        dt = grad.dtype
        if need_x:
            grad_x = (grad @ weight.to(dt)).to(x.dtype)
        if need_w:
            grad_weight = (grad.t() @ x.to(dt)).to(weight.dtype)
    elif need_x or need_w:
        gx, gw = torch.ops.smoe.gate_linear_backward.default(grad, x, weight, need_x, need_w)
        grad_x = gx if need_x else None
        grad_weight = gw if need_w else None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_bias


torch.library.register_autograd(
    "smoe::gate_linear", _backward_gate_linear, setup_context=_setup_context_gate_linear
)


# ---------------------------------------------------------------------------------------------
# gate_linear_backward
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("smoe::gate_linear_backward")
def _gate_linear_backward_fake(
    grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_weight: bool
) -> tuple[Tensor, Tensor]:
    check_devices("gate_linear_backward", x=x, weight=weight, grad=grad)
    _checks_routing.check_gate_linear_backward(grad, x, weight)
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty((0,))
    return gx, gw
