"""Typed Python wrappers of the ``torch.ops.smoe`` custom ops, with their fakes and autograd.

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd. The
kernels live in csrc/; nothing numerical happens here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smoe import _loader

_loader.load_library()

__all__ = [
    "ExpertChoice",
    "Plan",
    "TopK",
    "combine",
    "expert_choice",
    "grouped_mm",
    "make_plan",
    "permute",
    "swiglu",
    "topk_softmax",
]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# topk_softmax
# ---------------------------------------------------------------------------------------------
class TopK(NamedTuple):
    """Selected experts per token: ``weight [T, k]`` (logits' dtype), ``expert [T, k]`` int32."""

    weight: Tensor
    expert: Tensor


def topk_softmax(logits: Tensor, k: int, *, renormalize: bool = True) -> TopK:
    """Softmax over the experts, then the k largest (token-choice routing).

    Spec: specs/classic_routers.md §2, §4 and §6.

    Args:
        logits: ``[T, E]`` float router logits.
        k: experts per token, ``1 <= k <= E``.
        renormalize: if True the k weights sum to 1 (Mixtral; equal, value and gradient, to a
            softmax over the top-k logits); if False they are the raw softmax probabilities
            (Switch, V-MoE).

    Returns:
        TopK: ``weight [T, k]`` in logits' dtype, ``expert [T, k]`` int32, best first.

    Raises:
        ValueError: k out of range. RuntimeError (from the op): bad dtype or rank, NaN/+inf logits.

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
    weight, expert = torch.ops.smoe.topk_softmax.default(logits, k, renormalize=renormalize)
    return TopK(weight, expert)


@torch.library.register_fake("smoe::topk_softmax")
def _topk_softmax_fake(
    logits: Tensor, k: int, *, renormalize: bool = True
) -> tuple[Tensor, Tensor]:
    torch._check(logits.dim() == 2, lambda: "smoe::topk_softmax: logits must be 2-D [T, E]")
    torch._check(logits.dtype in _FLOATS, lambda: "smoe::topk_softmax: logits must be floating")
    torch._check(1 <= k <= logits.shape[1], lambda: "smoe::topk_softmax: k must be in [1, E]")
    T = logits.shape[0]
    return logits.new_empty((T, k)), logits.new_empty((T, k), dtype=torch.int32)


def _setup_context_topk_softmax(ctx, inputs, keyword_only_inputs, output) -> None:
    logits, _k = inputs
    _weight, expert = output
    ctx.mark_non_differentiable(expert)
    ctx.renormalize = keyword_only_inputs.get("renormalize", True)
    ctx.save_for_backward(logits, expert)


def _backward_topk_softmax(ctx, grad_weight: Tensor, _grad_expert: Tensor | None):
    logits, expert = ctx.saved_tensors
    grad = torch.ops.smoe.topk_softmax_backward.default(
        grad_weight.contiguous(), logits, expert, ctx.renormalize
    )
    return grad, None


@torch.library.register_fake("smoe::topk_softmax_backward")
def _topk_softmax_backward_fake(
    grad_weight: Tensor, logits: Tensor, expert: Tensor, renormalize: bool
) -> Tensor:
    return logits.new_empty(logits.shape)


torch.library.register_autograd(
    "smoe::topk_softmax", _backward_topk_softmax, setup_context=_setup_context_topk_softmax
)


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
    torch._check(expert.dim() == 2, lambda: "smoe::make_plan: expert must be 2-D [T, k]")
    torch._check(expert.dtype == torch.int32, lambda: "smoe::make_plan: expert must be int32")
    torch._check(num_experts >= 1, lambda: "smoe::make_plan: num_experts must be >= 1")
    torch._check(
        capacity is None or capacity >= 0, lambda: "smoe::make_plan: capacity must be >= 0"
    )
    torch._check(
        priority is None or priority.shape[0] == expert.shape[0],
        lambda: "smoe::make_plan: priority must be [T] or [T, k]",
    )
    T, k = expert.shape
    return (
        expert.new_empty((num_experts + 1,), dtype=torch.int64),
        expert.new_empty((T * k,)),
        expert.new_empty((T * k,)),
        expert.new_empty((T, k)),
        expert.new_empty((T, k), dtype=torch.bool),
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
    return (T // group_size) * min(capacity, group_size) + torch.sym_min(capacity, T % group_size)


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
    torch._check(logits.dim() == 2, lambda: "smoe::expert_choice: logits must be 2-D [T, E]")
    torch._check(logits.dtype in _FLOATS, lambda: "smoe::expert_choice: logits must be floating")
    torch._check(capacity >= 0, lambda: "smoe::expert_choice: capacity must be >= 0")
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
    return logits.new_empty(logits.shape)


torch.library.register_autograd(
    "smoe::expert_choice", _backward_expert_choice, setup_context=_setup_context_expert_choice
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
    torch._check(x.dim() == 2, lambda: "smoe::permute: x must be 2-D [T, d]")
    torch._check(token.dim() == 1 and row.dim() == 2, lambda: "smoe::permute: bad plan tensors")
    torch._check(x.shape[0] == row.shape[0], lambda: "smoe::permute: x must have T rows")
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
    torch._check(y_sorted.dim() == 2, lambda: "smoe::combine: y_sorted must be 2-D [M, d]")
    torch._check(weight.shape == row.shape, lambda: "smoe::combine: weight must be [T, k]")
    torch._check(weight.dtype == y_sorted.dtype, lambda: "smoe::combine: weight dtype mismatch")
    torch._check(
        y_sorted.shape[0] == token.shape[0], lambda: "smoe::combine: y_sorted needs M rows"
    )
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
    return y_sorted.new_empty(y_sorted.shape), weight.new_empty(weight.shape)


# ---------------------------------------------------------------------------------------------
# grouped_mm
# ---------------------------------------------------------------------------------------------
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """One GEMM per expert group: ``out[r] = x[r] @ w[e]`` for ``offsets[e] <= r < offsets[e+1]``.

    Args:
        x: ``[M, d_in]`` rows grouped by expert (e.g. :func:`permute`'s output).
        w: ``[E, d_in, d_out]``, x's dtype. May be a transposed view of an ``[E, d_out, d_in]``
            tensor (transformers' ``gate_up_proj`` / ``down_proj`` layout): used without a copy.
        offsets: ``[E+1]`` int64, ``offsets[0] = 0``, non-decreasing, ``offsets[E] <= M``.

    Returns:
        ``[M, d_out]``; rows past ``offsets[E]`` are 0.

    Note:
        CPU: one BLAS GEMM per (expert, row block) over torch's thread pool. CUDA: a grouped
        tiled GEMM whose offsets stay on the device (no host sync); invalid offsets trip an
        asynchronous device assert (fatal to the CUDA context). Deterministic.
    """
    return torch.ops.smoe.grouped_mm.default(x, w, offsets)


def _transposed_weight(w: Tensor) -> bool:
    # Same rule as csrc/checks.h is_transposed_weight: each w[e] is column-major.
    return w.stride(2) != 1 and w.stride(1) == 1


@torch.library.register_fake("smoe::grouped_mm")
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    torch._check(x.dim() == 2, lambda: "smoe::grouped_mm: x must be 2-D [M, d_in]")
    torch._check(w.dim() == 3, lambda: "smoe::grouped_mm: w must be 3-D [E, d_in, d_out]")
    torch._check(w.shape[1] == x.shape[1], lambda: "smoe::grouped_mm: w must be [E, d_in, d_out]")
    torch._check(offsets.shape[0] == w.shape[0] + 1, lambda: "smoe::grouped_mm: offsets needs E+1")
    torch._check(w.dtype == x.dtype, lambda: "smoe::grouped_mm: w must have x's dtype")
    return x.new_empty((x.shape[0], w.shape[2]))


def _setup_context_grouped_mm(ctx, inputs, output) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward_grouped_mm(ctx, grad: Tensor):
    x, w, offsets = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = torch.ops.smoe.grouped_mm_backward.default(grad, x, w, offsets, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None


torch.library.register_autograd(
    "smoe::grouped_mm", _backward_grouped_mm, setup_context=_setup_context_grouped_mm
)


@torch.library.register_fake("smoe::grouped_mm_backward")
def _grouped_mm_backward_fake(grad_out, x, w, offsets, need_x: bool, need_w: bool):
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    if not need_w:
        gw = w.new_empty((0,))
    elif _transposed_weight(w):
        E, d_in, d_out = w.shape
        gw = w.new_empty_strided((E, d_in, d_out), (d_in * d_out, 1, d_in))
    else:
        gw = w.new_empty(w.shape)
    return gx, gw


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
    return h.new_empty(h.shape)


# ---------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------
# The *_backward ops have no derivative of their own. Registering one that raises turns autograd's
# confusing "appears to not have been used in the graph" (or a silent None with allow_unused=True)
# into a clear error (STYLE.md §8).
def _refuse_double_backward(op: str) -> None:
    def backward(ctx, *grads):
        raise RuntimeError(f"smoe::{op}: double backward is not supported")

    torch.library.register_autograd(
        f"smoe::{op}_backward", backward, setup_context=lambda ctx, inputs, output: None
    )


for _op in ("topk_softmax", "expert_choice", "permute", "combine", "swiglu", "grouped_mm"):
    _refuse_double_backward(_op)
