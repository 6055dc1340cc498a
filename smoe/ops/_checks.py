"""The argument checks of the dispatch and expert-GEMM kernels (csrc/checks.h,
checks_grouped_mm.h, checks_expert_mlp.h), for their fakes: the same checks in the same order with
the same messages, so that ``torch.compile`` refuses a bad call while tracing, with the error the
kernel would give, instead of tracing it and failing when the graph first runs.

Each function here mirrors the C++ function of the same name. Values are not read (a fake has
none): expert ids, offsets and NaNs are the kernels' checks alone. Sizes may be symbolic; a check
on them becomes a guard, as any ``torch._check`` in a fake does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops._common import FLOATS

INT32_MAX = 2**31 - 1

_INDEX_NAMES = {torch.int32: "int32", torch.int64: "int64"}
# c10's ScalarType names, which the kernels' messages print
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                 torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long",
                 torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                 torch.bool: "Bool"}  # fmt: skip


def scalar_name(dtype: torch.dtype) -> str:
    """c10's name of a dtype (``Float``), as a kernel's message prints ``t.scalar_type()``."""
    return _SCALAR_NAMES.get(dtype, str(dtype))


def index_dtype_name(dtype: torch.dtype) -> str:
    """How the kernels' index checks (``index_type_name``) name a dtype."""
    return _INDEX_NAMES.get(dtype) or scalar_name(dtype)


def sizes(t: Tensor) -> str:
    """A shape as a kernel's message prints ``t.sizes()``: ``[4, 2]``."""
    return str(list(t.shape))


def num(v: float) -> str:
    """A double as a kernel's message prints it (``std::ostream``'s default ``%g``)."""
    return f"{v:g}"


def check(ok, op: str, *msg) -> None:
    """``TORCH_CHECK(ok, "smoe::", op, ": ", msg...)``; the message is built only on failure.

    On symbolic sizes (``torch.compile(dynamic=True)``, ``torch.export``) ``ok`` is a SymBool:
    the call is refused when it fails for the sizes being traced, and otherwise adds no guard
    (``torch._check`` would guard on it, tying the graph to conditions sympy may not prove for
    every size, such as ``min(L, round(c * S)) <= L``); the kernel checks it again at run time.
    """
    if isinstance(ok, torch.SymBool):
        hint = ok.node.hint  # the traced sizes' value, read without a guard; None if unbacked
        if hint is None or hint:
            return
        ok = False
    torch._check(ok, lambda: f"smoe::{op}: " + "".join(str(m) for m in msg))


def check_float(op: str, name: str, t: Tensor) -> None:
    check(
        t.dtype in FLOATS,
        op,
        name,
        " must be float32, float64, float16 or bfloat16, got ",
        scalar_name(t.dtype),
    )


def check_index(
    op: str, name: str, t: Tensor, like: Tensor, dim: int, dtype: torch.dtype = torch.int32
) -> None:
    want = f" must be a {dim}-D {_INDEX_NAMES[dtype]} tensor, got "
    check(t.device == like.device, op, name, " must be on ", like.device,
          " like the other inputs, got ", t.device)  # fmt: skip
    check(t.dtype == dtype, op, name, want, index_dtype_name(t.dtype))
    check(t.dim() == dim, op, name, want, t.dim(), "-D")


def check_int32_count(op: str, name: str, n, what: str) -> None:
    check(n < INT32_MAX, op, name, " must have fewer than 2^31 - 1 ", what,
          " (plan indices are int32), got ", n)  # fmt: skip


def check_same(op: str, name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    """``name`` on ``like``'s device with its dtype (the kernels' two checks of a second
    operand, in their words)."""
    check(t.device == like.device, op, name, " must be on ", like.device, " like ", like_name,
          ", got ", t.device)  # fmt: skip
    check(t.dtype == like.dtype, op, name, " must have ", like_name, "'s dtype ",
          scalar_name(like.dtype), ", got ", scalar_name(t.dtype))  # fmt: skip


# ---- the plan and the ops that gather through it --------------------------------------------
def check_make_plan(expert: Tensor, num_experts: int, capacity, priority: Tensor | None) -> None:
    op = "make_plan"
    want = "expert must be a 2-D int32 [T, k] tensor, got "
    check(expert.dtype == torch.int32, op, want, index_dtype_name(expert.dtype))
    check(expert.dim() == 2, op, want, expert.dim(), "-D")
    check(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts)
    check(num_experts < INT32_MAX, op, "num_experts must fit in int32, got ", num_experts)
    check(expert.numel() < INT32_MAX, op,
          "expert must have fewer than 2^31 - 1 slots (T*k), got ", expert.numel())  # fmt: skip
    check(capacity is None or capacity >= 0, op,
          "capacity must be >= 0 (or None for no limit), got ", capacity)  # fmt: skip
    if priority is not None:
        check(priority.device == expert.device, op, "priority must be on ", expert.device,
              " like expert, got ", priority.device)  # fmt: skip
        check_float(op, "priority", priority)
        T = expert.shape[0]
        check(tuple(priority.shape) in ((T,), tuple(expert.shape)), op, "priority must be [T] = [",
              T, "] (one score per token) or [T, k] = ", sizes(expert),
              " (one per choice rank), got ", sizes(priority))  # fmt: skip


def check_plan(
    op: str,
    data: Tensor,
    rows_expected,
    rows_name: str,
    token: Tensor | None,
    slot: Tensor | None,
    row: Tensor,
) -> None:
    if token is not None:
        check_index(op, "token", token, data, 1)
    if slot is not None:
        check_index(op, "slot", slot, data, 1)
    check_index(op, "row", row, data, 2)
    check_int32_count(op, "row", row.numel(), "slots (T*k)")
    if token is not None:
        check_int32_count(op, "token", token.shape[0], "plan rows (M)")
    if token is not None and slot is not None:
        check(slot.shape[0] == token.shape[0], op, "slot must have as many entries as token (M = ",
              token.shape[0], "), got ", slot.shape[0])  # fmt: skip
    if rows_expected is not None:
        check(data.shape[0] == rows_expected, op, rows_name, " must have ", rows_expected,
              " rows, got ", data.shape[0])  # fmt: skip


def _rows_of(row: Tensor):
    return row.shape[0] if row.dim() == 2 else None


def check_permute(x: Tensor, token: Tensor, row: Tensor) -> None:
    check_float("permute", "x", x)
    check(x.dim() == 2, "permute", "x must be 2-D [T, d], got ", x.dim(), "-D")
    check_plan("permute", x, _rows_of(row), "x (T = row.size(0))", token, None, row)


def check_permute_backward(grad_out: Tensor, row: Tensor) -> None:
    op = "permute_backward"
    check_float(op, "grad_out", grad_out)
    check(grad_out.dim() == 2, op, "grad_out must be 2-D [M, d], got ", grad_out.dim(), "-D")
    check_plan(op, grad_out, None, "grad_out", None, None, row)


def check_combine(
    op: str, y_sorted: Tensor, weight: Tensor, token: Tensor, slot: Tensor, row: Tensor
) -> None:
    check_float(op, "y_sorted", y_sorted)
    check(y_sorted.dim() == 2, op, "y_sorted must be 2-D [M, d], got ", y_sorted.dim(), "-D")
    check_same(op, "weight", weight, "y_sorted", y_sorted)
    M = token.shape[0] if token.dim() == 1 else None
    check_plan(op, y_sorted, M, "y_sorted (M = token.size(0))", token, slot, row)
    check(tuple(weight.shape) == tuple(row.shape), op, "weight must have row's shape [T, k] = ",
          sizes(row), ", got ", sizes(weight))  # fmt: skip


def check_combine_backward(
    grad_out: Tensor, y_sorted: Tensor, weight: Tensor, token: Tensor, slot: Tensor, row: Tensor
) -> None:
    op = "combine_backward"
    check_combine(op, y_sorted, weight, token, slot, row)
    check_float(op, "grad_out", grad_out)
    check(grad_out.device == y_sorted.device, op, "grad_out must be on ", y_sorted.device,
          " like y_sorted, got ", grad_out.device)  # fmt: skip
    ok = (
        grad_out.dim() == 2
        and grad_out.shape[0] == row.shape[0]
        and grad_out.shape[1] == y_sorted.shape[1]
        and grad_out.dtype == y_sorted.dtype
    )
    check(ok, op, "grad_out must be [T, d] = [", row.shape[0], ", ", y_sorted.shape[1],
          "] with y_sorted's dtype, got ", sizes(grad_out), " ",
          scalar_name(grad_out.dtype))  # fmt: skip


# ---- expert GEMMs --------------------------------------------------------------------------
def check_swiglu(op: str, h: Tensor) -> None:
    check_float(op, "h", h)
    check(h.dim() == 2 and h.shape[-1] % 2 == 0, op,
          "h must be 2-D [M, 2*f] (gate columns, then up columns), got shape ",
          sizes(h))  # fmt: skip


def check_swiglu_backward(grad_out: Tensor, h: Tensor) -> None:
    op = "swiglu_backward"
    check_swiglu(op, h)
    ok = (
        grad_out.device == h.device
        and grad_out.dtype == h.dtype
        and grad_out.dim() == 2
        and grad_out.shape[0] == h.shape[0]
        and grad_out.shape[1] == h.shape[1] // 2
    )
    check(ok, op, "grad_out must be [M, f] = [", h.shape[0], ", ", h.shape[1] // 2,
          "] with h's dtype and device, got ", sizes(grad_out), " ", scalar_name(grad_out.dtype),
          " on ", grad_out.device)  # fmt: skip


def check_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> None:
    op = "grouped_mm"
    check(w.device == x.device, op, "w must be on ", x.device, " like x, got ", w.device)
    check_index(op, "offsets", offsets, x, 1, torch.int64)
    check_float(op, "x", x)
    check(w.dtype == x.dtype, op, "w must have x's dtype ", scalar_name(x.dtype), ", got ",
          scalar_name(w.dtype))  # fmt: skip
    check(x.dim() == 2, op, "x must be 2-D [M, d_in], got ", x.dim(), "-D")
    check(w.dim() == 3, op, "w must be 3-D [E, d_in, d_out], got ", w.dim(), "-D")
    check(w.shape[1] == x.shape[1], op, "w must be [E, d_in, d_out] with d_in = ", x.shape[1],
          " (x.size(1)), got w of shape ", sizes(w))  # fmt: skip
    check(offsets.shape[0] == w.shape[0] + 1, op, "offsets must have E + 1 = ", w.shape[0] + 1,
          " entries, got ", offsets.shape[0])  # fmt: skip


def check_expert_bias(op: str, name: str, b: Tensor, w_name: str, w: Tensor, cols: str) -> None:
    check(b.layout == torch.strided, op, name, " must be a strided tensor, got ", b.layout)
    check_same(op, name, b, w_name, w)
    ok = b.dim() == 2 and b.shape[0] == w.shape[0] and b.shape[1] == w.shape[2]
    check(ok, op, name, " must be [E, ", cols, "] = [", w.shape[0], ", ", w.shape[2],
          "], got shape ", sizes(b))  # fmt: skip


def _check_grad_rows(op: str, grad_out: Tensor, x: Tensor, M, d_out) -> None:
    """The output gradient of a grouped GEMM: [M, d_out] on x's device with x's dtype."""
    check(grad_out.device == x.device, op, "grad_out must be on ", x.device, " like x, got ",
          grad_out.device)  # fmt: skip
    ok = (
        grad_out.dtype == x.dtype
        and grad_out.dim() == 2
        and grad_out.shape[0] == M
        and grad_out.shape[1] == d_out
    )
    check(ok, op, "grad_out must be [M, d_out] = [", M, ", ", d_out, "] with x's dtype, got ",
          sizes(grad_out), " ", scalar_name(grad_out.dtype))  # fmt: skip


def check_grouped_mm_backward(grad_out: Tensor, x: Tensor, w: Tensor, offsets: Tensor) -> None:
    op = "grouped_mm_backward"
    check_grouped_mm(x, w, offsets)
    _check_grad_rows(op, grad_out, x, x.shape[0], w.shape[2])


def check_grouped_mm_bias_backward(grad_out: Tensor, offsets: Tensor) -> None:
    op = "grouped_mm_bias_backward"
    check_float(op, "grad_out", grad_out)
    check(grad_out.dim() == 2, op, "grad_out must be 2-D [M, d_out], got ", grad_out.dim(), "-D")
    check_index(op, "offsets", offsets, grad_out, 1, torch.int64)
    check(offsets.shape[0] >= 1, op, "offsets must have E + 1 >= 1 entries, got 0")


def check_gather_mm(
    op: str, x: Tensor, token: Tensor, row: Tensor, w: Tensor, offsets: Tensor
) -> None:
    check_float(op, "x", x)
    check(x.dim() == 2, op, "x must be 2-D [T, d_in], got ", x.dim(), "-D")
    check_plan(op, x, _rows_of(row), "x (T = row.size(0))", token, None, row)
    check_same(op, "w", w, "x", x)
    check(w.dim() == 3, op, "w must be 3-D [E, d_in, d_out], got ", w.dim(), "-D")
    check(w.shape[1] == x.shape[1], op, "w must be [E, d_in, d_out] with d_in = ", x.shape[1],
          " (x.size(1)), got w of shape ", sizes(w))  # fmt: skip
    check_index(op, "offsets", offsets, x, 1, torch.int64)
    check(offsets.shape[0] == w.shape[0] + 1, op, "offsets must have E + 1 = ", w.shape[0] + 1,
          " entries, got ", offsets.shape[0])  # fmt: skip


def check_gather_mm_backward(
    grad_out: Tensor, x: Tensor, token: Tensor, row: Tensor, w: Tensor, offsets: Tensor
) -> None:
    op = "gather_mm_backward"
    check_gather_mm(op, x, token, row, w, offsets)
    _check_grad_rows(op, grad_out, x, token.shape[0], w.shape[2])


MLP_ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu")


def check_min_bytes(op: str, name: str, value: int, zero: str) -> None:
    """csrc/checks_size_rule.h: the size-rule argument of expert_mlp and gather_mm."""
    check(value >= 0, op, name, " must be >= 0 (0: always ", zero, "), got ", value)


def check_expert_mlp(
    x: Tensor,
    token: Tensor | None,
    row: Tensor | None,
    offsets: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    fuse_min_bytes: int = 0,
) -> None:
    op = "expert_mlp"
    check(activation in MLP_ACTIVATIONS, op, "activation must be one of 'swiglu', 'gelu', ",
          "'gelu_tanh', 'relu', got '", activation, "'")  # fmt: skip
    check_min_bytes(op, "fuse_min_bytes", fuse_min_bytes, "fused")
    check_float(op, "x", x)
    check(x.dim() == 2, op, "x must be 2-D ([T, d] with a plan, [M, d] without), got ", x.dim(),
          "-D")  # fmt: skip
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        check_same(op, name, w, "x", x)
        check(w.dim() == 3, op, name, " must be 3-D, got ", w.dim(), "-D")
    check((token is None) == (row is None), op,
          "token and row come together (a plan) or not at all, got ",
          "row without token" if token is None else "token without row")  # fmt: skip
    if token is not None:
        check_plan(op, x, _rows_of(row), "x (T = row.size(0))", token, None, row)
    check_index(op, "offsets", offsets, x, 1, torch.int64)
    E = w_in.shape[0]
    check(w_in.shape[1] == x.shape[1], op, "w_in must be [E, d, n_in] with d = ", x.shape[1],
          " (x.size(1)), got shape ", sizes(w_in))  # fmt: skip
    check(w_out.shape[0] == E, op, "w_out must have E = ", E, " experts like w_in, got shape ",
          sizes(w_out))  # fmt: skip
    n_in, d_ff = w_in.shape[2], w_out.shape[1]
    gated = activation == "swiglu"
    check(n_in == (2 * d_ff if gated else d_ff), op, "w_in must have ",
          "2 * d_ff = " if gated else "d_ff = ", 2 * d_ff if gated else d_ff,
          " output columns for activation '", activation, "' (d_ff = w_out.size(1)), got ",
          n_in)  # fmt: skip
    check(offsets.shape[0] == E + 1, op, "offsets must have E + 1 = ", E + 1, " entries, got ",
          offsets.shape[0])  # fmt: skip
    if b_in is not None:
        check_expert_bias(op, "b_in", b_in, "w_in", w_in, "n_in")
    if b_out is not None:
        check_expert_bias(op, "b_out", b_out, "w_out", w_out, "d_out")
