"""S2MoE's op: ``s2moe_perturb``, the fused Gaussian perturbation of the stochastic path.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import _checks_methods
from smoe.ops._common import check_devices, refuse_double_backward

__all__ = ["s2moe_perturb"]


# ---------------------------------------------------------------------------------------------
# s2moe_perturb
# ---------------------------------------------------------------------------------------------
def s2moe_perturb(
    x: Tensor, n1: Tensor, n2: Tensor, mu: Tensor, s_mul: Tensor, s_add: Tensor
) -> Tensor:
    """``(1 + s_mul ⊙ n1) ⊙ x + (mu + s_add ⊙ n2)`` in one pass (specs/s2moe.md §2.2, §5).

    Args:
        x: the MoE input, any shape, float.
        n1, n2: standard normal noise of x's shape (drawn by the caller with torch's RNG, so
            that seeds and generators behave); they get no gradient.
        mu, s_mul, s_add: one value each, or broadcast over one run of consecutive dims of x,
            the same for all three (DSU "sequence" statistics ``[B, 1, d]``, "token" ``[T, 1]``,
            "batch" ``[1, d]``; InstanceNorm's scalars α, β). x's dtype.

    Returns:
        x's shape and dtype (contiguous); math in float32 (float64 for float64).

    Note:
        Backward op: d x = g ⊙ (1 + s_mul ⊙ n1), and each statistic's gradient summed over the
        dims it is broadcast over, in a fixed order (deterministic at any thread count, no
        atomics on CUDA).
    """
    return torch.ops.smoe.s2moe_perturb.default(x, n1, n2, mu, s_mul, s_add)


def _check_inputs(
    op: str, x: Tensor, n1: Tensor, n2: Tensor, stats: dict[str, Tensor], grad: Tensor | None = None
) -> None:
    """The checks of csrc/checks_s2moe.h on metadata (the kernels' order and messages)."""
    check_devices(op, x=x, n1=n1, n2=n2, **stats)
    _checks_methods.check_s2moe_perturb(op, x, n1, n2, stats)
    if grad is not None:
        _checks_methods.check_s2moe_perturb_backward(grad, x)
    _checks_methods.check_perturb_view(op, x, stats)


@torch.library.register_fake("smoe::s2moe_perturb")
def _s2moe_perturb_fake(x, n1, n2, mu, s_mul, s_add) -> Tensor:
    _check_inputs("s2moe_perturb", x, n1, n2, {"mu": mu, "s_mul": s_mul, "s_add": s_add})
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context_s2moe_perturb(ctx, inputs, output) -> None:
    x, n1, n2, mu, s_mul, s_add = inputs
    ctx.save_for_backward(x, n1, n2, mu, s_mul, s_add)
    ctx.need = [x.requires_grad, mu.requires_grad, s_mul.requires_grad, s_add.requires_grad]


def _backward_s2moe_perturb(ctx, grad: Tensor):
    x, n1, n2, mu, s_mul, s_add = ctx.saved_tensors
    gx, gmu, gmul, gadd = torch.ops.smoe.s2moe_perturb_backward.default(
        grad.contiguous(), x, n1, n2, mu, s_mul, s_add, ctx.need
    )
    need = ctx.need
    return (
        gx if need[0] else None,
        None,  # the noise gets no gradient
        None,
        gmu if need[1] else None,
        gmul if need[2] else None,
        gadd if need[3] else None,
    )


@torch.library.register_fake("smoe::s2moe_perturb_backward")
def _s2moe_perturb_backward_fake(grad, x, n1, n2, mu, s_mul, s_add, output_mask):
    op = "s2moe_perturb_backward"
    torch._check(  # the kernel's schema conversion (bool[4]) says this before the op runs
        len(output_mask) == 4,
        lambda: (
            f"Tried to convert a List with {len(output_mask)} elements to a fixed-size array of "
            "size 4"
        ),
    )
    check_devices(op, x=x, grad=grad)
    _check_inputs(op, x, n1, n2, {"mu": mu, "s_mul": s_mul, "s_add": s_add}, grad)
    outs = [torch.empty_like(x, memory_format=torch.contiguous_format)]
    outs += [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (mu, s_mul, s_add)]
    return tuple(o if m else x.new_empty((0,)) for o, m in zip(outs, output_mask))


torch.library.register_autograd(
    "smoe::s2moe_perturb", _backward_s2moe_perturb, setup_context=_setup_context_s2moe_perturb
)

refuse_double_backward("s2moe_perturb")
