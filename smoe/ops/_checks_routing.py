"""The argument checks of the routing kernels (csrc/checks.h: topk_softmax, expert_choice;
checks_sigmoid.h; checks_sinkhorn.h; checks_gate.h; checks_stats.h), for their fakes: the same
checks in the same order with the same messages (see :mod:`smoe.ops._checks`). Values (NaN
logits, a non-finite selection bias) are the kernels' checks alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smoe.ops._checks import (
    check,
    check_float,
    check_index,
    check_int32_count,
    num,
    scalar_name,
    sizes,
)
from smoe.ops._common import acc_dtype


def _check_logits(op: str, logits: Tensor) -> None:
    check_float(op, "logits", logits)
    check(logits.dim() == 2, op, "logits must be 2-D [T, E], got ", logits.dim(), "-D")


def check_topk_softmax(logits: Tensor, k: int) -> None:
    op = "topk_softmax"
    _check_logits(op, logits)
    E = logits.shape[1]
    check(E >= 1, op, "logits must have at least one expert (E >= 1), got E = 0")
    check(1 <= k <= E, op, "k must be in [1, E] = [1, ", E, "], got ", k)
    check_int32_count(op, "logits", logits.shape[0] * k, "slots (T*k)")


def check_selection_bias(op: str, bias: Tensor | None, logits: Tensor) -> None:
    if bias is None:
        return
    check(bias.dtype == torch.float32, op, "selection_bias must be float32, got ",
          scalar_name(bias.dtype))  # fmt: skip
    check(bias.dim() == 1 and bias.shape[0] == logits.shape[1], op,
          "selection_bias must be [E] = [", logits.shape[1], "], got ", sizes(bias))  # fmt: skip
    check(bias.device == logits.device, op, "selection_bias must be on ", logits.device,
          " (logits' device), got ", bias.device)  # fmt: skip


def check_topk_backward(op: str, grad_weight: Tensor, logits: Tensor, expert: Tensor) -> None:
    """check_topk_softmax_backward and the shape checks of check_topk_sigmoid_backward (the
    same, in the same order)."""
    _check_logits(op, logits)
    check_index(op, "expert", expert, logits, 2)
    E, k = logits.shape[1], expert.shape[1]
    check(1 <= k <= E, op, "expert must be [T, k] with k in [1, E] = [1, ", E, "], got k = ", k)
    check_int32_count(op, "expert", expert.numel(), "slots (T*k)")
    ok = (
        grad_weight.device == logits.device
        and grad_weight.dtype == logits.dtype
        and tuple(grad_weight.shape) == tuple(expert.shape)
    )
    check(ok, op, "grad_weight must match expert's shape ", sizes(expert),
          " and logits' dtype and device, got ", sizes(grad_weight), " ",
          scalar_name(grad_weight.dtype), " on ", grad_weight.device)  # fmt: skip
    check(expert.shape[0] == logits.shape[0], op, "expert must have T = ", logits.shape[0],
          " rows, got ", expert.shape[0])  # fmt: skip


def check_topk_sigmoid(logits: Tensor, k: int, n_group: int, topk_group: int, scale: float) -> None:
    op = "topk_sigmoid"
    _check_logits(op, logits)
    E = logits.shape[1]
    check(E >= 1, op, "logits must have at least one expert (E >= 1), got E = 0")
    check(n_group >= 1 and E % n_group == 0, op, "n_group must be >= 1 and divide E = ", E,
          ", got ", n_group)  # fmt: skip
    check(1 <= topk_group <= n_group, op, "topk_group must be in [1, n_group] = [1, ", n_group,
          "], got ", topk_group)  # fmt: skip
    reachable = topk_group * (E // n_group)
    check(1 <= k <= reachable, op, "k must be in [1, topk_group * E / n_group] = [1, ",
          reachable, "], got ", k)  # fmt: skip
    check(math.isfinite(scale), op, "scale must be finite, got ", num(scale))
    check_int32_count(op, "logits", logits.shape[0] * k, "slots (T*k)")


def check_topk_sigmoid_backward(
    grad_weight: Tensor, logits: Tensor, expert: Tensor, scale: float
) -> None:
    op = "topk_sigmoid_backward"
    check_topk_backward(op, grad_weight, logits, expert)
    check(math.isfinite(scale), op, "scale must be finite, got ", num(scale))


def check_expert_choice(logits: Tensor, capacity: int, group_size: int | None) -> None:
    op = "expert_choice"
    _check_logits(op, logits)
    check(logits.shape[1] >= 1, op, "logits must have at least one expert (E >= 1), got E = 0")
    check(capacity >= 0, op, "capacity must be >= 0, got ", capacity)
    check(group_size is None or group_size >= 1, op,
          "group_size must be >= 1 (or None for one group), got ",
          0 if group_size is None else group_size)  # fmt: skip
    check(logits.numel() < 2**31 - 1, op,
          "logits must have fewer than 2^31 - 1 entries (T*E), got ", logits.numel())  # fmt: skip


def check_expert_choice_backward(grad_weight: Tensor, logits: Tensor, row: Tensor) -> None:
    op = "expert_choice_backward"
    check_expert_choice(logits, 0, None)
    check_index(op, "row", row, logits, 2)
    check(tuple(row.shape) == tuple(logits.shape), op, "row must have logits' shape [T, E] = ",
          sizes(logits), ", got ", sizes(row))  # fmt: skip
    ok = (
        grad_weight.device == logits.device
        and grad_weight.dtype == logits.dtype
        and tuple(grad_weight.shape) == tuple(logits.shape)
    )
    check(ok, op, "grad_weight must match logits' shape ", sizes(logits),
          ", dtype and device, got ", sizes(grad_weight), " ", scalar_name(grad_weight.dtype),
          " on ", grad_weight.device)  # fmt: skip


def check_sinkhorn(
    scores: Tensor,
    eps: float,
    max_iter: int,
    tol: float,
    row_mass: float,
    col_mass: float | None,
    check_every: int,
) -> None:
    op = "sinkhorn"
    check_float(op, "scores", scores)
    check(scores.dim() == 2, op, "scores must be 2-D [T, E], got ", scores.dim(), "-D")
    check(scores.shape[1] >= 1, op, "scores must have at least one expert column")
    check(0 < eps < math.inf, op, "eps must be finite and > 0, got ", num(eps))
    check(max_iter >= 1, op, "max_iter must be >= 1, got ", max_iter)
    check(0 <= tol < math.inf, op, "tol must be finite and >= 0, got ", num(tol))
    check(check_every >= 1, op, "check_every must be >= 1, got ", check_every)
    check(0 < row_mass < math.inf, op, "row_mass must be finite and > 0, got ", num(row_mass))
    if col_mass is None:
        return
    check(0 < col_mass < math.inf, op, "col_mass must be finite and > 0, got ", num(col_mass))
    T, E = scores.shape
    if not (isinstance(T, int) and isinstance(E, int)):
        return  # symbolic sizes: the kernel checks the masses when the graph runs
    total, cols = T * row_mass, E * col_mass
    check(T == 0 or abs(total - cols) <= 1e-6 * max(total, cols), op,
          "the marginals must carry the same mass: T * row_mass = ", T, " * ", num(row_mass),
          " = ", num(total), " but E * col_mass = ", E, " * ", num(col_mass), " = ",
          num(cols))  # fmt: skip


def check_sinkhorn_backward(
    grad_log_plan: Tensor,
    grad_f: Tensor,
    grad_g: Tensor,
    scores: Tensor,
    f_hist: Tensor,
    g_hist: Tensor,
    iters_done: Tensor,
    eps: float,
) -> None:
    op = "sinkhorn_backward"
    check_float(op, "scores", scores)
    check(scores.dim() == 2 and scores.shape[-1] >= 1, op,
          "scores must be 2-D [T, E] with E >= 1, got shape ", sizes(scores))  # fmt: skip
    check(0 < eps < math.inf, op, "eps must be finite and > 0, got ", num(eps))
    T, E = scores.shape
    acc = acc_dtype(scores)

    def expect(name: str, t: Tensor, shape: tuple, dtype: torch.dtype) -> None:
        check(t.device == scores.device, op, name, " must be on ", scores.device,
              " like scores, got ", t.device)  # fmt: skip
        check(t.dtype == dtype and tuple(t.shape) == shape, op, name, " must be ", list(shape),
              " ", scalar_name(dtype), ", got ", sizes(t), " ", scalar_name(t.dtype))  # fmt: skip

    expect("grad_log_plan", grad_log_plan, (T, E), acc)
    expect("grad_f", grad_f, (T,), acc)
    expect("grad_g", grad_g, (E,), acc)
    check(f_hist.dim() == 2 and f_hist.shape[0] >= 1, op, "f_hist must be [max_iter, T], got ",
          sizes(f_hist))  # fmt: skip
    expect("f_hist", f_hist, (f_hist.shape[0], T), acc)
    expect("g_hist", g_hist, (f_hist.shape[0], E), acc)
    expect("iters_done", iters_done, (), torch.int64)


# ---- the gate and the losses' statistics (checks_gate.h, checks_stats.h) ------------------
def check_gate_linear(x: Tensor, weight: Tensor, bias: Tensor | None, op: str = "gate_linear"):
    """Returns the logits' dtype (float64 for float64 x, else float32)."""
    check(weight.device == x.device, op, "weight must be on ", x.device, " like x, got ",
          weight.device)  # fmt: skip
    if bias is not None:
        check(bias.device == x.device, op, "bias must be on ", x.device, " like x, got ",
              bias.device)  # fmt: skip
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if bias is not None:
        check_float(op, "bias", bias)
    check(x.dim() == 2, op, "x must be 2-D [T, d], got ", x.dim(), "-D")
    check(weight.dim() == 2, op, "weight must be 2-D [E, d], got ", weight.dim(), "-D")
    check(weight.shape[1] == x.shape[1], op, "weight must be [E, d] with d = ", x.shape[1],
          " (x's columns), got ", sizes(weight))  # fmt: skip
    if bias is not None:
        ok = bias.dim() == 1 and bias.shape[0] == weight.shape[0]
        check(ok, op, "bias must be [E] with E = ", weight.shape[0], " (weight's rows), got ",
              sizes(bias))  # fmt: skip
    return acc_dtype(x)


def check_gate_linear_backward(grad: Tensor, x: Tensor, weight: Tensor) -> torch.dtype:
    op = "gate_linear_backward"
    dt = check_gate_linear(x, weight, None, op)
    check(grad.device == x.device, op, "grad must be on ", x.device, " like x, got ", grad.device)
    check(grad.dtype == dt, op, "grad must be ", scalar_name(dt), " (the logits' dtype for ",
          scalar_name(x.dtype), " x), got ", scalar_name(grad.dtype))  # fmt: skip
    ok = grad.dim() == 2 and grad.shape[0] == x.shape[0] and grad.shape[1] == weight.shape[0]
    check(ok, op, "grad must be [T, E] = [", x.shape[0], ", ", weight.shape[0], "], got ",
          sizes(grad))  # fmt: skip
    return dt


def check_router_stats(logits: Tensor, op: str = "router_stats") -> None:
    _check_logits(op, logits)
    check(logits.shape[1] >= 1, op, "logits must have at least one expert (E >= 1), got E = 0")


def check_router_stats_backward(
    grad_prob_sum: Tensor | None, grad_lse: Tensor | None, logits: Tensor
) -> None:
    op = "router_stats_backward"
    check_router_stats(logits, op)
    dt = acc_dtype(logits)
    T, E = logits.shape
    for name, t, n, what in (
        ("grad_prob_sum", grad_prob_sum, E, "[E]"),
        ("grad_lse", grad_lse, T, "one per row of logits"),
    ):
        if t is None:
            continue
        check(t.device == logits.device, op, name, " must be on ", logits.device,
              " like logits, got ", t.device)  # fmt: skip
        check(t.dtype == dt, op, name, " must be ", scalar_name(dt), " (", what, "), got ",
              scalar_name(t.dtype))  # fmt: skip
        check(t.dim() == 1 and t.shape[0] == n, op, name, " must be [", n, "] (", what, "), got ",
              sizes(t))  # fmt: skip
