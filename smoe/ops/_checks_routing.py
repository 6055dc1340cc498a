"""The argument checks of the routing kernels (csrc/checks.h: topk_softmax, expert_choice;
checks_sigmoid.h; checks_sinkhorn.h), for their fakes: the same checks in the same order with the
same messages (see :mod:`smoe.ops._checks`). Values (NaN logits, a non-finite selection bias)
are the kernels' checks alone.
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
    scalar_name,
    sizes,
)


def _num(v: float) -> str:
    """A double as a kernel's message prints it (``std::ostream``'s default ``%g``)."""
    return f"{v:g}"


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
    check(math.isfinite(scale), op, "scale must be finite, got ", _num(scale))
    check_int32_count(op, "logits", logits.shape[0] * k, "slots (T*k)")


def check_topk_sigmoid_backward(
    grad_weight: Tensor, logits: Tensor, expert: Tensor, scale: float
) -> None:
    op = "topk_sigmoid_backward"
    check_topk_backward(op, grad_weight, logits, expert)
    check(math.isfinite(scale), op, "scale must be finite, got ", _num(scale))


def check_expert_choice(logits: Tensor, capacity: int, group_size: int | None) -> None:
    op = "expert_choice"
    _check_logits(op, logits)
    check(logits.shape[1] >= 1, op, "logits must have at least one expert (E >= 1), got E = 0")
    check(capacity >= 0, op, "capacity must be >= 0, got ", capacity)
    check(group_size is None or group_size >= 1, op,
          "group_size must be >= 1 (or None for one group), got ", group_size or 0)  # fmt: skip
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
    check(0 < eps < math.inf, op, "eps must be finite and > 0, got ", _num(eps))
    check(max_iter >= 1, op, "max_iter must be >= 1, got ", max_iter)
    check(0 <= tol < math.inf, op, "tol must be finite and >= 0, got ", _num(tol))
    check(check_every >= 1, op, "check_every must be >= 1, got ", check_every)
    check(0 < row_mass < math.inf, op, "row_mass must be finite and > 0, got ", _num(row_mass))
    if col_mass is None:
        return
    check(0 < col_mass < math.inf, op, "col_mass must be finite and > 0, got ", _num(col_mass))
    T, E = scores.shape
    if not (isinstance(T, int) and isinstance(E, int)):
        return  # symbolic sizes: the kernel checks the masses when the graph runs
    total, cols = T * row_mass, E * col_mass
    check(T == 0 or abs(total - cols) <= 1e-6 * max(total, cols), op,
          "the marginals must carry the same mass: T * row_mass = ", T, " * ", _num(row_mass),
          " = ", _num(total), " but E * col_mass = ", E, " * ", _num(col_mass), " = ",
          _num(cols))  # fmt: skip


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
    check(0 < eps < math.inf, op, "eps must be finite and > 0, got ", _num(eps))
    T, E = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32

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
