"""Expert ops: grouped_mm (one GEMM per expert group), the fused swiglu activation and expert_mlp
(each expert's whole MLP per row block).

One section per op, in schema order (csrc/registration.cpp): wrapper, fake, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from smoe.ops import _checks
from smoe.ops._common import check_devices, refuse_double_backward
from smoe.ops.dispatch import permute

__all__ = ["MLP_ACTIVATIONS", "expert_mlp", "grouped_mm", "swiglu"]


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
    _checks.check_grouped_mm(x, w, offsets)
    if bias is not None:
        _checks.check_expert_bias("grouped_mm", "bias", bias, "w", w, "d_out")
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
    _checks.check_grouped_mm_backward(grad_out, x, w, offsets)
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    return gx, weight_grad_like(w, need_w)


def weight_grad_like(w: Tensor, need_w: bool) -> Tensor:
    """The fake of a grouped GEMM's weight gradient: w's layout (transposed-contiguous for a
    transposed view, else contiguous), or an empty [0] tensor when not asked for."""
    if not need_w:
        return w.new_empty((0,))
    if _transposed_weight(w):
        E, d_in, d_out = w.shape
        return w.new_empty_strided((E, d_in, d_out), (d_in * d_out, 1, d_in))
    return w.new_empty(w.shape)


@torch.library.register_fake("smoe::grouped_mm_bias_backward")
def _grouped_mm_bias_backward_fake(grad_out: Tensor, offsets: Tensor) -> Tensor:
    check_devices("grouped_mm_bias_backward", grad_out=grad_out, offsets=offsets)
    _checks.check_grouped_mm_bias_backward(grad_out, offsets)
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
    _checks.check_swiglu("swiglu", h)
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
    _checks.check_swiglu_backward(grad_out, h)
    return h.new_empty(h.shape)


# ---------------------------------------------------------------------------------------------
# expert_mlp
# ---------------------------------------------------------------------------------------------
MLP_ACTIVATIONS = _checks.MLP_ACTIVATIONS
FUSE_MIN_BYTES = 4 << 20  # expert_mlp(fused=None) fuses on CPU when the hidden passes this


def may_pass_fuse_bytes(nbytes) -> bool:
    """Whether ``nbytes`` may pass ``FUSE_MIN_BYTES``, the fused and gathering paths' size rule:
    ``nbytes > FUSE_MIN_BYTES`` on concrete sizes; on symbolic ones (``torch.export``,
    ``torch.compile(dynamic=True)``) True unless ``nbytes`` is under it for every size, decided
    without a guard (a guard would tie the traced graph to the traced length's side of 4 MiB)."""
    return not statically_known_true(nbytes <= FUSE_MIN_BYTES)


def min_bytes_rule(nbytes) -> int:
    """The ``fuse_min_bytes`` / ``gather_min_bytes`` argument of an op called where
    :func:`may_pass_fuse_bytes`: 0 (always the fused or gathering path) where ``nbytes`` passes
    ``FUSE_MIN_BYTES`` for every size, else ``FUSE_MIN_BYTES``, and the op applies the rule to the
    real size when it runs, so that one traced graph serves both sides."""
    return 0 if statically_known_true(nbytes > FUSE_MIN_BYTES) else FUSE_MIN_BYTES


def run_itemsize(x: Tensor) -> int:
    """Bytes per element that the GEMM ops (grouped_mm, gather_mm, expert_mlp) run ``x`` in: the
    autocast dtype's under ``torch.autocast`` for x's device (their autocast rules,
    csrc/autocast.cpp, cast every floating input but float64), else x's own."""
    if (
        x.is_floating_point()
        and x.dtype != torch.float64
        and torch.is_autocast_enabled(x.device.type)
    ):
        return torch.get_autocast_dtype(x.device.type).itemsize
    return x.element_size()


def _hidden_bytes(x: Tensor, w_in: Tensor, plan) -> int:
    """The bytes of the hidden ``[M, n_in]`` in the dtype the op runs in (x's, or autocast's)."""
    rows = x.shape[0] if plan is None else plan.token.shape[0]
    return rows * w_in.shape[-1] * run_itemsize(x)


def fuses(x: Tensor, w_in: Tensor, plan=None) -> bool:
    """Whether :func:`expert_mlp` with ``fused=None`` runs the ``smoe::expert_mlp`` op: on CPU,
    unless the hidden ``[M, n_in]`` in the dtype the op runs in (x's, or autocast's) is at most
    ``FUSE_MIN_BYTES``. On symbolic sizes, where that cannot be told for every size, it does:
    the op then applies the rule to the real size at run time (its ``fuse_min_bytes``)."""
    return x.device.type == "cpu" and may_pass_fuse_bytes(_hidden_bytes(x, w_in, plan))


def expert_mlp(
    x: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    activation: str = "swiglu",
    plan=None,
    fused: bool | None = None,
) -> Tensor:
    """Each expert's whole MLP on its rows: ``act(in[r] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``
    for ``offsets[e] <= r < offsets[e+1]``.

    Args:
        x: ``[T, d]`` tokens with ``plan`` (row r reads ``x[plan.token[r]]``, the gather of
            :func:`smoe.ops.permute`), or ``[M, d]`` rows already grouped by expert without it.
        offsets: ``[E+1]`` int64 (``plan.offsets``).
        w_in: ``[E, d, n_in]`` (a transposed view of ``[E, n_in, d]`` is used without a copy);
            ``n_in = 2 d_ff`` for ``"swiglu"`` (gate columns first), else ``d_ff``.
        w_out: ``[E, d_ff, d_out]``, likewise.
        b_in, b_out: optional per-expert biases ``[E, n_in]`` and ``[E, d_out]``.
        activation: one of ``MLP_ACTIVATIONS``: ``"swiglu"``, ``"gelu"`` (erf), ``"gelu_tanh"``,
            ``"relu"``.
        plan: a :class:`smoe.ops.Plan` of x's tokens, or None.
        fused: True runs the ``smoe::expert_mlp`` op; False the unfused chain (permute ->
            grouped_mm -> activation -> grouped_mm); None (default) the op when the hidden
            ``[M, n_in]`` would pass ``FUSE_MIN_BYTES`` (4 MiB) on CPU, else the chain: a small
            hidden is neither page-faulted nor worth the fusion, and the unfused ops' (expert,
            column block) items keep more threads busy than a few (expert, row block) items.
            With symbolic sizes (``torch.compile(dynamic=True)``, ``torch.export``) on CPU: the
            op with ``fuse_min_bytes=FUSE_MIN_BYTES``, which applies that rule to the real size
            when it runs, so that one traced graph takes the fused path at large token counts
            and the chain (run inside the op: the same kernels) at small ones.

    Returns:
        ``[M, d_out]`` grouped rows (what :func:`grouped_mm` of the activation gives); rows past
        ``offsets[E]`` are 0.

    Note:
        The same math as permute -> grouped_mm -> activation -> grouped_mm. On CPU each (expert,
        row block) item gathers its rows, runs both GEMMs and the activation in one thread's
        scratch: neither the grouped rows nor the hidden ``[M, n_in]`` are materialised, which is
        what makes inference at large T fast (no page faults on fresh large tensors). The first
        GEMM makes grouped_mm's own calls; the second's row blocks follow the first's, so the
        result may differ from the unfused chain in the last bits (it was bitwise equal at the
        benchmarked shapes), and it is deterministic for every thread count. On CUDA it runs the
        unfused chain.
        The backward recomputes the hidden through the unfused ops (nothing but the inputs is
        saved): correct, and memory-light, but a training step pays the first GEMM twice, so
        :class:`smoe.Experts` uses this op only where no gradient is needed.
    """
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(
            f"expert_mlp: activation must be one of {MLP_ACTIVATIONS}, got {activation!r}"
        )
    fuse_min_bytes = 0  # the op: always fused
    if fused is None:
        fused = fuses(x, w_in, plan)
        if fused:  # FUSE_MIN_BYTES on a symbolic size: the op applies the rule when it runs
            fuse_min_bytes = min_bytes_rule(_hidden_bytes(x, w_in, plan))
    if not fused:
        h = grouped_mm(x if plan is None else permute(x, plan), w_in, offsets, b_in)
        return grouped_mm(_mlp_activation(activation, h), w_out, offsets, b_out)
    token, row = (None, None) if plan is None else (plan.token, plan.row)
    return torch.ops.smoe.expert_mlp.default(
        x, token, row, offsets, w_in, b_in, w_out, b_out, activation, fuse_min_bytes
    )


@torch.library.register_fake("smoe::expert_mlp")
def _expert_mlp_fake(
    x, token, row, offsets, w_in, b_in, w_out, b_out, activation, fuse_min_bytes=0
):
    check_devices(
        "expert_mlp",
        x=x,
        token=token,
        row=row,
        offsets=offsets,
        w_in=w_in,
        b_in=b_in,
        w_out=w_out,
        b_out=b_out,
    )
    _checks.check_expert_mlp(
        x, token, row, offsets, w_in, b_in, w_out, b_out, activation, fuse_min_bytes
    )
    M = x.shape[0] if token is None else token.shape[0]
    return x.new_empty((M, w_out.shape[2]))


def _mlp_activation(activation: str, h: Tensor) -> Tensor:
    if activation == "swiglu":
        return torch.ops.smoe.swiglu.default(h)
    if activation == "relu":
        return torch.relu(h)
    return torch.nn.functional.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _mlp_activation_backward(activation: str, grad: Tensor, h: Tensor) -> Tensor:
    if activation == "swiglu":
        return torch.ops.smoe.swiglu_backward.default(grad, h)
    if activation == "relu":
        return torch.ops.aten.threshold_backward.default(grad, h, 0)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward.default(grad, h, approximate=approximate)


def _setup_context_expert_mlp(ctx, inputs, output) -> None:
    x, token, row, offsets, w_in, b_in, w_out, b_out, activation = inputs[:9]
    ctx.save_for_backward(x, token, row, offsets, w_in, b_in, w_out)
    ctx.activation = activation
    ctx.has_b_out = b_out is not None


def _backward_expert_mlp(ctx, grad: Tensor):
    x, token, row, offsets, w_in, b_in, w_out = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_w_in, need_b_in, need_w_out, need_b_out = (
        need[0],
        need[4],
        need[5],
        need[6],
        need[7],
    )
    gx = gw_in = gb_in = gw_out = gb_out = None
    mm_backward = torch.ops.smoe.grouped_mm_backward.default
    bias_backward = torch.ops.smoe.grouped_mm_bias_backward.default
    grad = grad.contiguous()
    # recompute the forward's grouped rows, hidden and activation with the unfused ops
    xs = x if token is None else torch.ops.smoe.permute.default(x, token, row)
    h = torch.ops.smoe.grouped_mm.default(xs, w_in, offsets, b_in)
    a = _mlp_activation(ctx.activation, h)
    ga, gw_out = mm_backward(grad, a, w_out, offsets, True, need_w_out)
    if need_b_out:
        gb_out = bias_backward(grad, offsets)
    gh = _mlp_activation_backward(ctx.activation, ga, h)
    if need_x or need_w_in:
        gxs, gw_in = mm_backward(gh, xs, w_in, offsets, need_x, need_w_in)
        if need_x:
            gx = gxs if token is None else torch.ops.smoe.permute_backward.default(gxs, row)
    if need_b_in:
        gb_in = bias_backward(gh, offsets)
    return (
        gx,
        None,
        None,
        None,
        gw_in if need_w_in else None,
        gb_in,
        gw_out if need_w_out else None,
        gb_out,
        None,
        None,
    )


torch.library.register_autograd(
    "smoe::expert_mlp", _backward_expert_mlp, setup_context=_setup_context_expert_mlp
)


refuse_double_backward("grouped_mm", "grouped_mm_bias", "swiglu")
