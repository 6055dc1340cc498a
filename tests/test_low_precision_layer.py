"""MoELayer in fp16/bf16, fp16 accumulation overflow, and how a NaN token propagates.

- The layer follows the rule of tests/test_low_precision.py: forward output, dx, the experts'
  weight gradients and the router's gradient each have a max-abs error against float64 at most
  3x (+ floor) that of the same layer computing with torch's own ops in that precision
  (:func:`tests.low_precision.use_torch_ops`). The router's logits are fp32 in both (smoe's
  routers upcast 16-bit inputs); the top-k choices are held fixed by drawing tokens whose
  logits have clear margins. An output whose true value exceeds the dtype's range, or for which
  torch's layer overflows too (fp16 at activations ~1e2: the routing weights' gradient is an
  fp16 tensor), is out of the rule's scope (:func:`tests.low_precision.in_scope`).
- Overflow: inputs whose partial sums pass fp16's 65504 while the result fits; smoe's ops
  accumulate in fp32 and must give the finite, correctly rounded result.
- NaN: smoe's routers reject NaN logits (``topk_softmax`` and ``expert_choice`` raise on CPU, a
  device assert on CUDA), so a NaN token makes ``MoELayer.forward`` with router ``"topk"`` or
  ``"expert_choice"`` raise, whatever the capacity. Below the router, dispatch and experts are
  row-independent: with routes fixed (a router that routes on ``nan_to_num(x)``), a NaN in one
  token changes only that token's output and dx (bitwise) and the weight gradients of the
  experts it visited; with a capacity or expert choice this holds as long as the NaN token's
  routes are unchanged (if they change, other tokens' places legitimately change too).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from smoe import MoELayer, ops
from smoe import reference as ref
from smoe.routing import build_router
from tests.low_precision import (
    check_rule,
    ci_settings,
    floor,
    max_abs_error,
    oracle_ops,
    smoe_ops,
    use_ops,
    use_torch_ops,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW = [torch.float16, torch.bfloat16]
MAX_SCALE = {torch.float16: 1e2, torch.bfloat16: 1e4}
FP16_MAX = torch.finfo(torch.float16).max


def margined_tokens(T: int, d: int, gate: torch.Tensor, k: int, scale: float, dtype):
    """[T, d] float64 tokens (values of ``dtype``) whose float64 router logits have relative
    gaps >= 1e-3 between the first k+1 sorted values: fp32 and float64 choose alike."""
    x = torch.empty(T, d, dtype=torch.float64)
    todo = torch.ones(T, dtype=torch.bool)
    for _ in range(100):
        x[todo] = (torch.randn(int(todo.sum()), d, dtype=torch.float64) * scale).to(dtype).double()
        s = (x @ gate.double().T).sort(dim=-1, descending=True).values[:, : k + 1]
        gaps = (s[:, :-1] - s[:, 1:]).min(dim=-1).values if s.shape[1] > 1 else s[:, 0] * 0 + 1
        todo = gaps < 1e-3 * s.abs().max(dim=-1).values
        if not todo.any():
            return x
    raise AssertionError("no margined tokens found")


def layer_grads(layer: MoELayer, x: torch.Tensor, cot: torch.Tensor):
    """(y, dx, d router weight, d w_in, d w_out) for the loss sum(y * cot)."""
    x = x.detach().requires_grad_()
    y, _ = layer(x)
    params = [layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    grads = torch.autograd.grad(y, [x, *params], cot.to(y.dtype))
    return (y, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(8)
@given(data=st.data())
def test_moe_layer_low_precision_error_within_3x_torch(dtype, device, data):
    T, d = data.draw(st.integers(1, 40), label="T"), data.draw(st.integers(2, 32), label="d")
    E = data.draw(st.integers(1, 8), label="E")
    k = data.draw(st.integers(1, min(E, 3)), label="k")
    d_ff = data.draw(st.integers(1, 32), label="d_ff")
    activation = data.draw(st.sampled_from(["gelu", "swiglu"]), label="activation")
    capacity_factor = data.draw(st.sampled_from([None, 1.0]), label="capacity_factor")
    scale = 10.0 ** data.draw(st.floats(-2.0, math.log10(MAX_SCALE[dtype])), label="log10 scale")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    layer = MoELayer(d, d_ff, E, k, activation=activation, capacity_factor=capacity_factor)
    low = layer.to(device=device, dtype=dtype)
    # the same (rounded) weights in float64, on the host: smoe's CUDA kernels take no float64
    f64 = copy.deepcopy(low).cpu().double()
    x = margined_tokens(T, d, low.router.weight.cpu(), k, scale, dtype).to(device)
    cot = torch.randn(T, d, dtype=torch.float64, device=device).to(dtype)
    got = layer_grads(low, x.to(dtype), cot)
    with use_torch_ops():
        base = layer_grads(low, x.to(dtype), cot)
    with use_ops(oracle_ops):
        want = [t.to(device) for t in layer_grads(f64, x.cpu(), cot.cpu().double())]
    names = ["y", "dx", "d router.weight", "d experts.w_in", "d experts.w_out"]
    for name, g, b, w in zip(names, got, base, want):
        check_rule(name, g, b, w)


def test_torch_ops_layer_in_float64_matches_reference():
    layer = MoELayer(6, 5, 4, 2, capacity_factor=1.0).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    with use_torch_ops():
        assert ops.grouped_mm is not smoe_ops["grouped_mm"]
        y, _ = layer(x)
    assert ops.grouped_mm is smoe_ops["grouped_mm"]  # the switch restores smoe's ops
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    want = ref.moe_layer(x, layer.router.weight, w_in, w_out, 2, capacity=5)
    torch.testing.assert_close(y, want)


# ---- fp16 accumulation overflow: partial sums pass 65504, results fit ----
def alternating(n: int, value: float) -> torch.Tensor:
    """[+value] * (n/2) then [-value] * (n/2): partial sums reach n/2 * value, the total 0."""
    return torch.cat([torch.full((n // 2,), value), torch.full((n - n // 2,), -value)]).double()


def check_exact(name: str, got: torch.Tensor, want64: torch.Tensor, partial_max: float) -> None:
    assert partial_max > FP16_MAX >= want64.abs().max(), f"{name}: not an overflow case"
    assert torch.isfinite(got).all(), f"{name}: fp16 result not finite"
    err = max_abs_error(got.cpu(), want64)
    assert err <= floor(want64, torch.float16), f"{name}: error {err} vs float64"


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_fp16_sums_past_65504_stay_finite(device):
    n = 2048
    x = torch.full((3, n), 100.0, dtype=torch.float64)
    w = torch.stack([alternating(n, 1.0), alternating(n, 0.5)], dim=1).unsqueeze(0)
    w[0, -1] = 0.25  # results 125 and 75
    off = torch.tensor([0, 3])
    partial = (x[0].unsqueeze(1) * w[0]).cumsum(0).abs().max().item()
    got = ops.grouped_mm(x.half().to(device), w.half().to(device), off.to(device))
    check_exact("forward", got, ref.grouped_mm(x, w, off), partial)
    # backward: dW sums over M rows, dX over d_out columns
    g = alternating(n, 1.0).unsqueeze(1).repeat(1, 2)
    g[-1] = 0.5  # dW = 150
    xs = torch.full((n, 2), 100.0, dtype=torch.float64)
    w2 = torch.ones(1, 2, 2, dtype=torch.float64)
    gw_partial = (xs[:, :1] * g[:, :1]).cumsum(0).abs().max().item()
    args = [t.half().to(device) for t in (g, xs, w2)]
    off = torch.tensor([0, n], device=device)
    _, gw = torch.ops.smoe.grouped_mm_backward(*args, off, False, True)
    check_exact("dW", gw[0], xs.T @ g, gw_partial)
    gy = torch.full((1, n), 100.0, dtype=torch.float64)
    wx = alternating(n, 1.0).reshape(1, 1, n).repeat(1, 2, 1)  # [E, d_in=2, d_out=n]
    wx[0, :, -1] = 0.5  # dX = 150
    gx_partial = (gy[0] * wx[0, 0]).cumsum(0).abs().max().item()
    args = [t.half().to(device) for t in (gy, torch.ones(1, 2, dtype=torch.float64), wx)]
    off = torch.tensor([0, 1], device=device)
    gx, _ = torch.ops.smoe.grouped_mm_backward(*args, off, True, False)
    check_exact("dX", gx, gy @ wx[0].T, gx_partial)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_and_permute_fp16_sums_past_65504_stay_finite(device):
    # token 0's three slots hold 40000, 40000, -32000: 80000 on the way, 48000 at the end
    expert = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=device)
    plan = ops.make_plan(expert, 3)
    rows = torch.tensor([[40000.0, 1.0], [40000.0, 2.0], [-32000.0, 3.0]], dtype=torch.float64)
    ones = torch.ones(1, 3, dtype=torch.float64)
    got = ops.combine(rows.half().to(device), ones.half().to(device), plan)
    check_exact("combine", got, rows.sum(0, keepdim=True), 80000.0)
    gx = torch.ops.smoe.permute_backward(rows.half().to(device), plan.row)
    check_exact("permute backward", gx, rows.sum(0, keepdim=True), 80000.0)
    # combine's weight gradient: <grad_out, y_sorted> over a wide row
    n = 2048
    y = torch.full((3, n), 100.0, dtype=torch.float64)
    g = alternating(n, 1.0).unsqueeze(0)
    g[0, -1] = 0.5  # <g, y_sorted[j]> = 150
    args = (g.half().to(device), y.half().to(device), ones.half().to(device))
    _, gw = torch.ops.smoe.combine_backward(*args, plan.token, plan.slot, plan.row)
    partial = (g[0] * y[0]).cumsum(0).abs().max().item()
    check_exact("combine weight grad", gw, (g @ y.T), partial)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_and_topk_fp16_intermediates_past_65504_stay_finite(device):
    # swiglu backward: grad * up = 1e6 overflows fp16, times silu'(-20) ~ -4e-8 it is ~ -0.04
    h = torch.tensor([[-20.0, 1000.0]], dtype=torch.float64)
    g = torch.tensor([[1000.0]], dtype=torch.float64)
    hh = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(ref.swiglu(hh), hh, g)
    got = torch.ops.smoe.swiglu_backward(g.half().to(device), h.half().to(device))
    check_exact("swiglu backward", got, want, 1e6)
    # softmax of logits near 65504: exp(l) overflows unless the row max is subtracted first
    logits = torch.tensor([[60000.0, 59968.0, -60000.0, 59904.0]], dtype=torch.float64)
    got = ops.topk_softmax(logits.half().to(device), 2).weight
    check_exact("topk_softmax", got, ref.topk_softmax(logits, 2).weight, math.inf)


# ---- NaN propagation ----
class RouteOnFinite(nn.Module):
    """A registered router applied to ``nan_to_num(x)``: routes that a NaN cannot change."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, context=None):
        return self.inner(torch.nan_to_num(x), context=context)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_moe_layer_nan_token_raises_in_the_router(router):
    layer = MoELayer(8, 16, 4, 2, router=router)
    x = torch.randn(10, 8)
    x[3, 5] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        layer(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "router,capacity_factor",
    [("topk", None), ("topk", 1.0), ("expert_choice", None)],
    ids=["topk", "topk-capacity", "expert-choice"],
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_nan_token_changes_only_its_own_output(
    activation, router, capacity_factor, dtype, device
):
    T, d, E, t = 48, 16, 6, 7
    layer = MoELayer(d, 32, E, 2, activation=activation, capacity_factor=capacity_factor)
    layer.router = RouteOnFinite(build_router(router, d, E, 2))
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(T, d).to(device=device, dtype=dtype)
    x[t, 3] = 0.0  # nan_to_num maps the NaN back to 0: the same routes in both runs
    bad = x.clone()
    bad[t, 3] = float("nan")
    cot = torch.randn(T, d).to(device=device, dtype=dtype)
    runs = []
    for inp in (x, bad):
        inp = inp.clone().requires_grad_()
        y, _ = layer(inp)
        grads = torch.autograd.grad(y, [inp, layer.experts.w_in, layer.experts.w_out], cot)
        runs.append((y, *grads))
    (y0, dx0, win0, wout0), (y1, dx1, win1, wout1) = runs
    others = torch.arange(T, device=device) != t
    assert torch.isfinite(y0).all() and torch.isfinite(dx0).all()
    assert torch.equal(y1[others], y0[others]) and torch.equal(dx1[others], dx0[others])
    routing = layer.router(x)  # the experts token t got a place with, as the layer plans them
    plan = routing.plan
    if plan is None:
        cap = None if capacity_factor is None else math.ceil(2 * T * capacity_factor / E)
        plan = ops.make_plan(routing.expert, E, capacity=cap)
    rows = (plan.token == t).nonzero().flatten()
    hit = {int(torch.searchsorted(plan.offsets[1:], r, right=True)) for r in rows}
    for e in range(E):
        same = torch.equal(win1[e], win0[e]) and torch.equal(wout1[e], wout0[e])
        assert same == (e not in hit), f"expert {e}: visited by the NaN token: {e in hit}"
    if hit:  # the NaN reaches the token's own output
        assert torch.isnan(y1[t]).any()
