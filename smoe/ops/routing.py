"""Routing ops: token-choice top-k softmax, top-k sigmoid (DeepSeek-V3) and expert choice.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks_routing
from smoe.ops._common import check_devices, refuse_double_backward
from smoe.ops.dispatch import Plan

__all__ = ["ExpertChoice", "TopK", "expert_choice", "topk_sigmoid", "topk_softmax"]


# ---------------------------------------------------------------------------------------------
# topk_softmax
# ---------------------------------------------------------------------------------------------
class TopK(NamedTuple):
    """Selected experts per token: ``weight [T, k]`` (logits' dtype), ``expert [T, k]`` int32."""

    weight: Tensor
    expert: Tensor


def topk_softmax(
    logits: Tensor, k: int, *, renormalize: bool = True, selection_bias: Tensor | None = None
) -> TopK:
    """Softmax over the experts, then the k largest (token-choice routing).

    Spec: specs/classic_routers.md §2, §4 and §6.

    Args:
        logits: ``[T, E]`` float router logits.
        k: experts per token, ``1 <= k <= E``.
        renormalize: if True the k weights sum to 1 (Mixtral; equal, value and gradient, to a
            softmax over the top-k logits); if False they are the raw softmax probabilities
            (Switch, V-MoE).
        selection_bias: None, or ``[E]`` float32 finite, on logits' device: added to the logits
            for the selection only (aux-loss-free balancing, DeepSeek-V3 / Wang et al. 2024); the
            weights are those of the unbiased softmax, and the bias gets no gradient.

    Returns:
        TopK: ``weight [T, k]`` in logits' dtype, ``expert [T, k]`` int32, best first.

    Raises:
        ValueError: k out of range. RuntimeError (from the op): bad dtype or rank, NaN/+inf
            logits or a row of only -inf (no expert has a probability).

    Note:
        Softmax math is in fp32 for 16-bit inputs. Ties go to the lower expert index on CPU and
        CUDA alike. Deterministic; no host sync. On CUDA the NaN check is an asynchronous device
        assert: it surfaces as "device-side assert triggered" at a later sync and leaves the CUDA
        context unusable (the CPU raises a RuntimeError naming the row).
    """
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"topk_softmax: k must be an int, got {type(k).__name__}")
    if logits.dim() == 2 and not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_softmax: k must be in [1, E] = [1, {logits.shape[1]}], got {k}")
    weight, expert = torch.ops.smoe.topk_softmax.default(
        logits, k, selection_bias, renormalize=renormalize
    )
    return TopK(weight, expert)


@torch.library.register_fake("smoe::topk_softmax")
def _topk_softmax_fake(
    logits: Tensor, k: int, selection_bias: Tensor | None = None, *, renormalize: bool = True
) -> tuple[Tensor, Tensor]:
    _checks_routing.check_topk_softmax(logits, k)
    _checks_routing.check_selection_bias("topk_softmax", selection_bias, logits)
    T = logits.shape[0]
    return logits.new_empty((T, k)), logits.new_empty((T, k), dtype=torch.int32)


def _setup_context_topk_softmax(ctx, inputs, keyword_only_inputs, output) -> None:
    logits, _k, _bias = inputs
    _weight, expert = output
    ctx.mark_non_differentiable(expert)
    ctx.renormalize = keyword_only_inputs.get("renormalize", True)
    ctx.save_for_backward(logits, expert)


def _backward_topk_softmax(ctx, grad_weight: Tensor, _grad_expert: Tensor | None):
    logits, expert = ctx.saved_tensors
    grad = torch.ops.smoe.topk_softmax_backward.default(
        grad_weight.contiguous(), logits, expert, ctx.renormalize
    )
    return grad, None, None  # the selection bias gets no gradient


@torch.library.register_fake("smoe::topk_softmax_backward")
def _topk_softmax_backward_fake(
    grad_weight: Tensor, logits: Tensor, expert: Tensor, renormalize: bool
) -> Tensor:
    check_devices("topk_softmax_backward", logits=logits, grad_weight=grad_weight, expert=expert)
    _checks_routing.check_topk_backward("topk_softmax_backward", grad_weight, logits, expert)
    return logits.new_empty(logits.shape)


torch.library.register_autograd(
    "smoe::topk_softmax", _backward_topk_softmax, setup_context=_setup_context_topk_softmax
)


# ---------------------------------------------------------------------------------------------
# topk_sigmoid
# ---------------------------------------------------------------------------------------------
def topk_sigmoid(
    logits: Tensor,
    k: int,
    *,
    selection_bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = False,
    scale: float = 1.0,
) -> TopK:
    """Sigmoid scores, group-limited top-k (DeepSeek-V3's router, transformers'
    ``DeepseekV3TopkRouter``).

    ``s = sigmoid(logits)``; the experts are ranked by ``s + selection_bias``, only within the
    ``topk_group`` best of ``n_group`` consecutive groups of ``E / n_group`` experts (a group
    scores the sum of its two best ranked values, its best when a group has one expert); ties go
    to the lower index. The weights are ``s`` of the chosen experts (never the bias), divided by
    their sum + 1e-20 when ``renormalize``, times ``scale`` (``routed_scaling_factor``).

    Args:
        logits: ``[T, E]`` float router logits.
        k: experts per token, ``1 <= k <= topk_group * E / n_group``.
        selection_bias: None, or ``[E]`` float32 finite on logits' device, for the selection
            only (``e_score_correction_bias``; :class:`smoe.ExpertBiasUpdater` trains it).
        n_group: expert groups (must divide E); 1 turns group limiting off.
        topk_group: groups kept per token, in ``[1, n_group]`` (default: all of them).
        renormalize: DeepSeek-V3's ``norm_topk_prob``.
        scale: finite factor on the weights.

    Returns:
        TopK: ``weight [T, k]`` in logits' dtype, ``expert [T, k]`` int32, best first.

    Note:
        fp32 math for 16-bit logits; deterministic; no host sync. NaN logits are an error (on
        CUDA an asynchronous device assert). The gradient flows to the logits only.
    """
    for name, value in (("k", k), ("n_group", n_group), ("topk_group", topk_group)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"topk_sigmoid: {name} must be an int, got {type(value).__name__}")
    weight, expert = torch.ops.smoe.topk_sigmoid.default(
        logits,
        k,
        selection_bias,
        n_group=n_group,
        topk_group=topk_group,
        renormalize=renormalize,
        scale=float(scale),
    )
    return TopK(weight, expert)


@torch.library.register_fake("smoe::topk_sigmoid")
def _topk_sigmoid_fake(
    logits: Tensor,
    k: int,
    selection_bias: Tensor | None = None,
    *,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = False,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    topk_group = n_group if topk_group is None else topk_group
    _checks_routing.check_topk_sigmoid(logits, k, n_group, topk_group, scale)
    _checks_routing.check_selection_bias("topk_sigmoid", selection_bias, logits)
    T = logits.shape[0]
    return logits.new_empty((T, k)), logits.new_empty((T, k), dtype=torch.int32)


def _setup_context_topk_sigmoid(ctx, inputs, keyword_only_inputs, output) -> None:
    logits, _k, _bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.renormalize = keyword_only_inputs.get("renormalize", False)
    ctx.scale = keyword_only_inputs.get("scale", 1.0)
    ctx.save_for_backward(logits, output[1])


def _backward_topk_sigmoid(ctx, grad_weight: Tensor, _grad_expert: Tensor | None):
    logits, expert = ctx.saved_tensors
    grad = torch.ops.smoe.topk_sigmoid_backward.default(
        grad_weight.contiguous(), logits, expert, ctx.renormalize, ctx.scale
    )
    return grad, None, None  # the selection bias gets no gradient


@torch.library.register_fake("smoe::topk_sigmoid_backward")
def _topk_sigmoid_backward_fake(
    grad_weight: Tensor, logits: Tensor, expert: Tensor, renormalize: bool, scale: float
) -> Tensor:
    check_devices("topk_sigmoid_backward", logits=logits, grad_weight=grad_weight, expert=expert)
    _checks_routing.check_topk_sigmoid_backward(grad_weight, logits, expert, scale)
    return logits.new_empty(logits.shape)


torch.library.register_autograd(
    "smoe::topk_sigmoid", _backward_topk_sigmoid, setup_context=_setup_context_topk_sigmoid
)


# ---------------------------------------------------------------------------------------------
# expert_choice
# ---------------------------------------------------------------------------------------------
class ExpertChoice(NamedTuple):
    """Expert-choice routing: ``weight [T, E]`` combine weights and the :class:`Plan`."""

    weight: Tensor
    plan: Plan


def _expert_choice_total(T, capacity: int, group_size: int | None):
    # Plan rows per expert: T // S full groups take min(C, S), a short last one min(C, T % S).
    if group_size is None:
        return torch.sym_min(capacity, T)
    full = torch.sym_min(capacity, group_size)
    return (T // group_size) * full + torch.sym_min(capacity, T % group_size)


def expert_choice(logits: Tensor, capacity: int, *, group_size: int | None = None) -> ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): every expert picks its top-``capacity`` tokens.

    Spec: specs/classic_routers.md §5. ``p = softmax(logits)`` over experts per token (fp32
    math); in every group of ``group_size`` consecutive tokens, expert e takes the ``capacity``
    tokens with the largest ``p[:, e]`` (ties to the lower token index), listed in token order.
    A token may get 0..E experts. Not causal: a token's experts depend on the other tokens of its
    group, so do not use it in autoregressive decoding without care.

    Args:
        logits: ``[T, E]`` float router logits.
        capacity: tokens per expert per group (see
            :func:`smoe.routing.expert_choice.expert_choice_capacity`), clamped to
            the group's size.
        group_size: tokens per routing group; None = all T tokens form one group. The last group
            may be shorter.

    Returns:
        ExpertChoice: ``weight [T, E]`` (logits' dtype: the probability where chosen, else 0;
        differentiable) and a :class:`Plan` with ``M = E * C_tot`` rows and no padding
        (``offsets[e] = e * C_tot``), whose ``row`` and ``kept`` are ``[T, E]`` and ``slot`` is
        ``t * E + e``, so :func:`permute`, :func:`grouped_mm` and :func:`combine` with
        ``weight`` work unchanged.

    Raises:
        ValueError: negative capacity, group_size < 1. RuntimeError (from the op): bad dtype or
            rank, NaN/+inf logits or a row of only -inf (an asynchronous device assert on
            CUDA).

    Note:
        Deterministic, no host sync; every expert gets exactly ``min(capacity, group size)``
        tokens per group.
    """
    if capacity < 0:
        raise ValueError(f"expert_choice: capacity must be >= 0, got {capacity}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"expert_choice: group_size must be >= 1 or None, got {group_size}")
    weight, offsets, token, slot, row = torch.ops.smoe.expert_choice.default(
        logits, capacity, group_size=group_size
    )
    return ExpertChoice(weight, Plan(offsets, token, slot, row, row >= 0))


@torch.library.register_fake("smoe::expert_choice")
def _expert_choice_fake(logits: Tensor, capacity: int, *, group_size: int | None = None):
    _checks_routing.check_expert_choice(logits, capacity, group_size)
    T, E = logits.shape
    M = E * _expert_choice_total(T, capacity, group_size)
    return (
        logits.new_empty((T, E)),
        logits.new_empty((E + 1,), dtype=torch.int64),
        logits.new_empty((M,), dtype=torch.int32),
        logits.new_empty((M,), dtype=torch.int32),
        logits.new_empty((T, E), dtype=torch.int32),
    )


def _setup_context_expert_choice(ctx, inputs, keyword_only_inputs, output) -> None:
    logits, _capacity = inputs
    _weight, offsets, token, slot, row = output
    ctx.mark_non_differentiable(offsets, token, slot, row)
    ctx.save_for_backward(logits, row)


def _backward_expert_choice(ctx, grad_weight: Tensor, *_grad_plan):
    logits, row = ctx.saved_tensors
    grad = torch.ops.smoe.expert_choice_backward.default(grad_weight.contiguous(), logits, row)
    return grad, None


@torch.library.register_fake("smoe::expert_choice_backward")
def _expert_choice_backward_fake(grad_weight: Tensor, logits: Tensor, row: Tensor) -> Tensor:
    op = "expert_choice_backward"
    check_devices(op, logits=logits, grad_weight=grad_weight, row=row)
    _checks_routing.check_expert_choice_backward(grad_weight, logits, row)
    return logits.new_empty(logits.shape)


torch.library.register_autograd(
    "smoe::expert_choice", _backward_expert_choice, setup_context=_setup_context_expert_choice
)


refuse_double_backward("topk_softmax", "topk_sigmoid", "expert_choice")
