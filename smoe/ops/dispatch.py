"""Dispatch ops shared by every router: make_plan (the CSR plan), permute and combine (gathers).

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smoe.ops import _checks
from smoe.ops._common import check_devices, refuse_double_backward

__all__ = ["Plan", "combine", "make_plan", "permute"]


# ---------------------------------------------------------------------------------------------
# make_plan
# ---------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    """Routing plan: the token slots grouped by expert, CSR style.

    A plan has M sorted rows: ``M = T*k`` from :func:`make_plan` (worst case; rows past
    ``offsets[E]`` are padding), ``M = E*C`` from :func:`expert_choice` (no padding).

    Fields (N = ``offsets[E]`` kept assignments, a device value; rows past N are padding):
        offsets: ``[E+1]`` int64, expert e owns sorted rows ``offsets[e]:offsets[e+1]``.
        token: ``[M]`` int32, the token of each sorted row (-1 for padding).
        slot: ``[M]`` int32, the flat slot ``t*k + j`` of each sorted row (-1 for padding).
        row: ``[T, k]`` int32, the sorted row of each slot (-1 if dropped or unassigned).
        kept: ``[T, k]`` bool, whether the slot got a place.
    """

    offsets: Tensor
    token: Tensor
    slot: Tensor
    row: Tensor
    kept: Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0] - 1

    def tokens_per_expert(self) -> Tensor:
        """``[E]`` int64 number of kept assignments of each expert."""
        return self.offsets[1:] - self.offsets[:-1]


def make_plan(
    expert: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority: Tensor | None = None,
    group_size: int | None = None,
) -> Plan:
    """Stable counting sort of the T*k slots by expert, with optional capacity dropping.

    Spec: DESIGN.md (dispatch), specs/classic_routers.md §2 (capacity).

    Args:
        expert: ``[T, k]`` int32 expert of each slot; -1 means "no assignment" (skipped).
        num_experts: E >= 1.
        capacity: max slots per expert, or None for no limit. Experts accept slots rank-major
            (all first choices, then all second choices, ...) until full, as in GShard, fairseq,
            Tutel and V-MoE; within a rank, tokens in token order unless ``priority`` is given.
        priority: V-MoE's Batch Prioritized Routing (specs/vmoe.md §3): ``[T]`` one score per
            token (used for every rank; V-MoE's default is the token's largest routing weight)
            or ``[T, k]`` one per choice rank. Within a rank, tokens are then taken by priority,
            highest first, ties to the lower token index. Only matters with a capacity.
        group_size: V-MoE's per-group routing (specs/vmoe.md §2): the capacity (and the
            priority order) apply separately to each group of ``group_size`` consecutive tokens,
            the last group possibly shorter. The plan is the same as without groups when nothing
            is dropped. Done by one make_plan over E*G (expert, group) buckets, ordered
            expert-major, so each expert's rows stay in token order.

    Returns:
        Plan: kept slots listed in token order within each expert (see :class:`Plan`).

    Raises:
        ValueError: num_experts < 1, negative capacity, group_size < 1.
        RuntimeError (from the op): wrong dtype/rank, expert values outside [-1, E), priority of
            the wrong shape or with NaN.

    Note:
        Output shapes depend only on input shapes (worst case T*k rows): no host sync. The
        result is deterministic. On CUDA, out-of-range expert values are caught by an
        asynchronous device assert (fatal to the CUDA context), not a catchable RuntimeError.
    """
    if num_experts < 1:
        raise ValueError(f"make_plan: num_experts must be >= 1, got {num_experts}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"make_plan: capacity must be >= 0 (or None for no limit), got {capacity}")
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"make_plan: group_size must be >= 1 or None, got {group_size}")
        grouped = expert.dim() == 2 and expert.dtype == torch.int32  # else the op raises
        if capacity is not None and grouped and expert.shape[0] > group_size:
            return _make_grouped_plan(expert, num_experts, capacity, priority, group_size)
    return Plan(
        *torch.ops.smoe.make_plan.default(expert, num_experts, capacity=capacity, priority=priority)
    )


def _make_grouped_plan(
    expert: Tensor, E: int, capacity: int, priority: Tensor | None, group_size: int
) -> Plan:
    # Bucket (e, g) = e * G + g: expert-major, then group; groups are consecutive token ranges,
    # so each expert's rows stay in token order and its offsets are every G-th bucket offset.
    T = expert.shape[0]
    G = -(-T // group_size)
    group = torch.arange(T, device=expert.device, dtype=torch.int32).div_(
        group_size, rounding_mode="floor"
    )
    # Out-of-range experts become -2, which the op rejects (expert * G could wrap into range).
    valid = (expert >= 0) & (expert < E)
    invalid = torch.where(expert == -1, -1, -2).to(torch.int32)
    bucket = torch.where(valid, expert * G + group.unsqueeze(1), invalid)
    offsets, token, slot, row, kept = torch.ops.smoe.make_plan.default(
        bucket, E * G, capacity=capacity, priority=priority
    )
    return Plan(offsets[::G].contiguous(), token, slot, row, kept)


@torch.library.register_fake("smoe::make_plan")
def _make_plan_fake(expert, num_experts, *, capacity=None, priority=None):
    _checks.check_make_plan(expert, num_experts, capacity, priority)
    T, k = expert.shape
    return (
        expert.new_empty((num_experts + 1,), dtype=torch.int64),
        expert.new_empty((T * k,)),
        expert.new_empty((T * k,)),
        expert.new_empty((T, k)),
        expert.new_empty((T, k), dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------
# permute
# ---------------------------------------------------------------------------------------------
def permute(x: Tensor, plan: Plan) -> Tensor:
    """Gather the rows of x into expert order.

    Args:
        x: ``[T, d]`` tokens.
        plan: from :func:`make_plan` over the same T tokens.

    Returns:
        ``[M, d]`` (M = ``plan.token.shape[0]``): row i is ``x[plan.token[i]]``; padding rows
        (past ``offsets[E]``) are 0.

    Note:
        A pure gather, forward and backward (the backward gathers through ``plan.row``): no
        atomics, bitwise reproducible.
    """
    return torch.ops.smoe.permute.default(x, plan.token, plan.row)


@torch.library.register_fake("smoe::permute")
def _permute_fake(x: Tensor, token: Tensor, row: Tensor) -> Tensor:
    check_devices("permute", x=x, token=token, row=row)
    _checks.check_permute(x, token, row)
    return x.new_empty((token.shape[0], x.shape[1]))


def _setup_context_permute(ctx, inputs, output) -> None:
    _x, _token, row = inputs
    ctx.save_for_backward(row)


def _backward_permute(ctx, grad: Tensor):
    (row,) = ctx.saved_tensors
    return torch.ops.smoe.permute_backward.default(grad, row), None, None


torch.library.register_autograd(
    "smoe::permute", _backward_permute, setup_context=_setup_context_permute
)


@torch.library.register_fake("smoe::permute_backward")
def _permute_backward_fake(grad_out: Tensor, row: Tensor) -> Tensor:
    check_devices("permute_backward", grad_out=grad_out, row=row)
    _checks.check_permute_backward(grad_out, row)
    return grad_out.new_empty((row.shape[0], grad_out.shape[1]))


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
def combine(y_sorted: Tensor, weight: Tensor, plan: Plan) -> Tensor:
    """Weighted gather of expert outputs back to token order.

    Args:
        y_sorted: ``[M, d]`` expert outputs in plan order.
        weight: ``[T, k]`` routing weights, y_sorted's dtype.
        plan: the plan y_sorted was produced with.

    Returns:
        ``[T, d]``: ``y[t] = sum_j weight[t, j] * y_sorted[plan.row[t, j]]`` over kept slots
        (a token whose slots were all dropped gets 0).

    Note:
        Gathers only, forward and backward; accumulation in fp32 for 16-bit inputs in a fixed
        order: bitwise reproducible.
    """
    return torch.ops.smoe.combine.default(y_sorted, weight, plan.token, plan.slot, plan.row)


@torch.library.register_fake("smoe::combine")
def _combine_fake(y_sorted, weight, token, slot, row) -> Tensor:
    check_devices("combine", y_sorted=y_sorted, weight=weight, token=token, slot=slot, row=row)
    _checks.check_combine("combine", y_sorted, weight, token, slot, row)
    return y_sorted.new_empty((row.shape[0], y_sorted.shape[1]))


def _setup_context_combine(ctx, inputs, output) -> None:
    y_sorted, weight, token, slot, row = inputs
    ctx.save_for_backward(y_sorted, weight, token, slot, row)


def _backward_combine(ctx, grad: Tensor):
    y_sorted, weight, token, slot, row = ctx.saved_tensors
    grad_ys, grad_w = torch.ops.smoe.combine_backward.default(
        grad, y_sorted, weight, token, slot, row
    )
    return grad_ys, grad_w, None, None, None


torch.library.register_autograd(
    "smoe::combine", _backward_combine, setup_context=_setup_context_combine
)


@torch.library.register_fake("smoe::combine_backward")
def _combine_backward_fake(grad_out, y_sorted, weight, token, slot, row):
    tensors = dict(y_sorted=y_sorted, grad_out=grad_out, weight=weight, token=token, slot=slot)
    check_devices("combine_backward", **tensors, row=row)
    _checks.check_combine_backward(grad_out, y_sorted, weight, token, slot, row)
    return y_sorted.new_empty(y_sorted.shape), weight.new_empty(weight.shape)


refuse_double_backward("permute", "combine")
