"""What the layer benchmarks measure besides the contenders' times (bench_layer.py, suite*.py,
bench_gpu.py, bench_gemm16.py): the machine's limit, dense GEMMs of the layer's expert FLOPs
(efficiency = its time / the layer's); the time share of each stage of the smoe layer; and the
fresh gradients a timed training step starts from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.experts import Experts, gathers

# isort: split
from common import Stat, limit_dtype  # benchmarks/common.py


# ---------------------------------------------------------------------------------------------
# The physical limit
# ---------------------------------------------------------------------------------------------
def dense_limit(
    rows: int,
    d: int,
    inner: int,
    d_ff: int,
    dtype: torch.dtype,
    backward: bool,
    device="cpu",
    *,
    as_given: bool = False,
) -> Callable[[], None]:
    """The expert GEMMs of a layer as plain dense ``torch.mm`` calls over ``rows`` rows.

    ``inner`` is the first GEMM's width (2·d_ff for SwiGLU, d_ff for GELU). Forward: 2 GEMMs;
    forward+backward: 6 (dX and dW of each). On a CPU where torch has no native kernel for a
    16-bit dtype (see :func:`limit_dtype`), the limit is the float32 GEMMs of the same shapes,
    unless ``as_given`` (then ``dtype`` itself, however slow).
    """
    kw = {"dtype": dtype if as_given else limit_dtype(dtype, device), "device": device}
    x, w1 = torch.randn(rows, d, **kw), torch.randn(d, inner, **kw)
    a, w2 = torch.randn(rows, d_ff, **kw), torch.randn(d_ff, d, **kw)
    gy, gh = torch.randn(rows, d, **kw), torch.randn(rows, inner, **kw)

    def fwd() -> None:
        torch.mm(x, w1)
        torch.mm(a, w2)

    def fwd_bwd() -> None:
        fwd()
        torch.mm(gy, w2.t()), torch.mm(a.t(), gy)
        torch.mm(gh, w1.t()), torch.mm(x.t(), gh)

    return fwd_bwd if backward else fwd


def expert_flops(rows: int, d: int, inner: int, d_ff: int, backward: bool) -> float:
    """FLOPs of the expert GEMMs over ``rows`` rows (x3 with backward)."""
    return 2.0 * rows * (d * inner + d_ff * d) * (3 if backward else 1)


# ---------------------------------------------------------------------------------------------
# Stage times of the smoe layer
# ---------------------------------------------------------------------------------------------
STAGES = ("route", "plan", "permute", "experts", "combine")


def fresh_grads(*owners: nn.Module | Tensor | None) -> Callable[[], None]:
    """A function that drops the ``.grad`` of every parameter of the given modules and of the
    given leaf tensors: what ``optimizer.zero_grad()`` (``set_to_none=True``, torch's default) does
    before each training step. A timed forward+backward calls it first, so that no call adds its
    gradients into those the call before left (an ``add_`` over every weight gradient, which no
    training step without gradient accumulation pays and the dense limit never pays)."""
    leaves: list[Tensor] = []
    for o in owners:
        if isinstance(o, nn.Module):
            leaves.extend(o.parameters())
        elif isinstance(o, Tensor):
            leaves.append(o)

    def drop() -> None:
        for t in leaves:
            t.grad = None

    return drop


def stage_times(
    layer: nn.Module, x: Tensor, backward: bool, *, clock: Callable[..., Stat]
) -> dict[str, float]:
    """Median seconds of each stage of ``layer`` (an ``MoELayer``) run alone, with its backward
    when asked (the layer's capacity, if any, applies in ``make_plan``).

    ``clock(fn) -> Stat`` times one function (e.g. :func:`measure` with fixed settings).
    """
    import math

    flat = x.detach().reshape(-1, x.shape[-1]).requires_grad_(backward)
    r = layer.router(flat)
    E, k = layer.num_experts, r.expert.shape[1]
    capacity = None
    if layer.capacity_factor is not None:
        capacity = max(1, math.ceil(k * flat.shape[0] * layer.capacity_factor / E))
    plan = ops.make_plan(r.expert, E, capacity=capacity)
    xs = ops.permute(flat, plan).detach().requires_grad_(backward)
    ys = layer.experts(xs, plan.offsets).detach().requires_grad_(backward)
    w = r.weight.detach().to(ys.dtype).requires_grad_(backward)
    grad = torch.enable_grad if backward else torch.no_grad

    drop_grads = fresh_grads(layer, flat, xs, ys, w)

    def stage(f: Callable[[], Tensor]) -> float:
        def go() -> None:
            drop_grads()
            with grad():
                out = f()
                if backward:
                    out.backward(torch.ones_like(out))

        return clock(go).median

    def plan_only() -> Tensor:
        return ops.make_plan(r.expert, E, capacity=capacity).offsets

    # a forward without gradients runs the experts as one expert_mlp that gathers its own rows,
    # and a large training step's first GEMM is one gather_mm (smoe.Experts): then there is no
    # permute stage, and the experts stage includes the gather (and, backward, permute's sums)
    ex = layer.experts
    plain = type(ex).forward is Experts.forward
    if backward:
        fused = plain and gathers(flat, plan)
    else:
        fused = plain and ops.experts.fuses(flat, ex.w_in.transpose(1, 2), plan)
    if fused:
        permute, experts = 0.0, stage(lambda: ex(flat, plan.offsets, plan=plan))
    else:
        permute = stage(lambda: ops.permute(flat, plan))
        experts = stage(lambda: ex(xs, plan.offsets))
    return {
        "route": stage(lambda: layer.router(flat).weight),
        "plan": clock(plan_only).median,
        "permute": permute,
        "experts": experts,
        "combine": stage(lambda: ops.combine(ys, w, plan)),
    }
