"""Low-precision error of every numeric op, forward and backward (STYLE.md §8's rule).

In fp16 and bf16, each output's max-abs error against the float64 result (computed on the same,
already rounded inputs) is at most 3x the max-abs error of the same computation written with
torch's own ops in that precision, plus a floor of 1-2 ulps of the largest output (needed where
torch's error is 0, e.g. exact gathers); see tests/low_precision.py. Shapes and magnitudes are
drawn by hypothesis: activations up to 1e2 in fp16 and 1e4 in bf16, down to 1e-2. Discrete
choices are held fixed: logits have clear margins, so smoe's selection in low precision equals
the float64 one (asserted), and the torch-ops baseline uses the same selection rule or plan.
``make_plan`` and ``unified_topk`` are integer-only and have no numeric error; their float
priorities (scores) are checked to give the same plan (indices) in every precision. The
fp16-overflow cases, the MoELayer and NaN propagation are in tests/test_low_precision_layer.py;
the routers' backwards near saturation in tests/test_low_precision_saturation.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from smoe import ops, reference_s2moe, reference_sigmoid
from smoe import reference as ref
from tests.helpers import spaced_logits
from tests.low_precision import check_rule, ci_settings, oracle_ops, smoe_ops, torch_ops

LOW = [torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
MAX_SCALE = {torch.float16: 1e2, torch.bfloat16: 1e4}


def draw_scale(data, dtype: torch.dtype) -> float:
    """An activation magnitude, log-uniform in [1e-2, MAX_SCALE[dtype]]."""
    hi = math.log10(MAX_SCALE[dtype])
    return 10.0 ** data.draw(st.floats(-2.0, hi), label="log10(scale)")


def draw_plan(data, T: int, E: int, k: int, device) -> ops.Plan:
    """A plan of T tokens with k distinct experts each, some slots unassigned (-1), maybe a
    capacity that drops slots."""
    expert = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    expert = torch.where(torch.rand(T, k) < 0.1, -1, expert).to(torch.int32)
    capacity = data.draw(st.none() | st.integers(0, max(T * k // E, 1)), label="capacity")
    return ops.make_plan(expert.to(device), E, capacity=capacity)


def run_rule(fn, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Check the rule on every output of ``fn(op_table, *inputs)`` and on the gradient of every
    input (for a random cotangent): smoe's ops and torch's ops in ``dtype`` against the float64
    oracle (tests/low_precision.py).

    ``inputs`` are float64 values; they are rounded to ``dtype`` first and the oracle takes the
    rounded values, so only the arithmetic is measured.
    """
    low = [t.to(dtype) for t in inputs]
    runs = {}
    for key, table, args in [
        ("smoe", smoe_ops, low),
        ("torch", torch_ops, low),
        ("float64", oracle_ops, [t.double() for t in low]),
    ]:
        args = [a.detach().requires_grad_() for a in args]
        runs[key] = (args, fn(table, *args))
    for i, (got, base, want) in enumerate(zip(*(runs[key][1] for key in runs))):
        check_rule(f"output {i}", got, base, want)
    cotangents = [torch.randn(o.shape, dtype=torch.float64).to(dtype) for o in runs["smoe"][1]]
    grads = []
    for args, outs in runs.values():
        cot = [c.to(o.dtype).to(o.device) for c, o in zip(cotangents, outs)]
        grads.append(torch.autograd.grad(outs, args, cot))
    for i, (got, base, want) in enumerate(zip(*grads)):
        check_rule(f"grad of input {i}", got, base, want)


# ---- per op: forward and backward, drawn shapes and magnitudes ----
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_topk_softmax_low_precision_error_within_3x_torch(dtype, device, data):
    T, E = data.draw(st.integers(0, 48), label="T"), data.draw(st.integers(1, 16), label="E")
    k = data.draw(st.integers(1, E), label="k")
    renormalize = data.draw(st.booleans(), label="renormalize")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    # Spaced logits (gaps >= 0.3 before scaling) stay distinct after rounding: max |logit| ~ scale.
    logits = spaced_logits(T, E) * (draw_scale(data, dtype) / (0.3 * E))
    logits = logits.to(device)
    chosen = ops.topk_softmax(logits.to(dtype), k, renormalize=renormalize).expert
    assert torch.equal(chosen, ref.topk_softmax(logits.to(dtype).double(), k).expert)

    def fn(o, lg):
        return (o["topk_softmax"](lg, k, renormalize=renormalize).weight,)

    run_rule(fn, [logits], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_topk_sigmoid_low_precision_error_within_3x_torch(dtype, device, data):
    n_group, G = data.draw(st.integers(1, 4), label="n_group"), data.draw(st.integers(1, 4))
    topk_group = data.draw(st.integers(1, n_group), label="topk_group")
    T, E = data.draw(st.integers(0, 48), label="T"), n_group * G
    k = data.draw(st.integers(1, topk_group * G), label="k")
    kw = dict(
        n_group=n_group,
        topk_group=topk_group,
        renormalize=data.draw(st.booleans(), label="renormalize"),
        scale=data.draw(st.sampled_from([1.0, 2.5]), label="scale"),
    )
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    if data.draw(st.booleans(), label="selection_bias"):
        kw["selection_bias"] = (torch.randn(E) * 0.1).to(device)
    # Spaced logits in [-spread, spread]: |logit| <= 12 keeps sigmoid off its fp32 saturation.
    spread = 10.0 ** data.draw(st.floats(-2.0, math.log10(12.0)), label="log10(spread)")
    logits = ((spaced_logits(T, E) / (0.15 * E) - 1) * spread).to(device)
    chosen = ops.topk_sigmoid(logits.to(dtype), k, **kw).expert
    # fp32 ranking agrees with float64 unless two sums of s + bias are within rounding: skip those
    assume(
        torch.equal(
            chosen.cpu(),
            reference_sigmoid.topk_sigmoid(logits.to(dtype).cpu(), k, **_cpu(kw)).expert,
        )
    )

    def fn(o, lg):
        return (o["topk_sigmoid"](lg, k, **kw).weight,)

    run_rule(fn, [logits], dtype)


def _cpu(kw: dict) -> dict:
    bias = kw.get("selection_bias")
    return kw if bias is None else {**kw, "selection_bias": bias.cpu()}


def separated_logits(T: int, E: int, sigma: float, dtype: torch.dtype, margin=1e-5):
    """Logits whose probabilities p[:, e], after rounding the logits to dtype, differ between
    any two tokens by a relative margin: fp32 and float64 make the same expert choices."""
    for _ in range(200):
        logits = (torch.randn(T, E, dtype=torch.float64) * sigma).to(dtype).double()
        q = torch.softmax(logits, dim=-1).sort(dim=0).values
        if T < 2 or E < 2 or ((q[1:] - q[:-1]) / q[1:]).min() >= margin:
            return logits
    raise AssertionError("no separated logits found")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_expert_choice_low_precision_error_within_3x_torch(dtype, device, data):
    T, E = data.draw(st.integers(0, 32), label="T"), data.draw(st.integers(1, 8), label="E")
    capacity = data.draw(st.integers(0, T + 1), label="capacity")
    group = data.draw(st.none() | st.integers(1, max(T, 1)), label="group_size")
    sigma = data.draw(st.floats(0.5, 4.0), label="sigma")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    logits = separated_logits(T, E, sigma, dtype).to(device)
    got = ops.expert_choice(logits.to(dtype), capacity, group_size=group).plan
    want = ref.expert_choice(logits, capacity, group_size=group).plan
    assert torch.equal(got.row, want.row) and torch.equal(got.token, want.token)

    def fn(o, lg):
        return (o["expert_choice"](lg, capacity, group_size=group).weight,)

    run_rule(fn, [logits], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_permute_low_precision_error_within_3x_torch(dtype, device, data):
    T, E = data.draw(st.integers(0, 48), label="T"), data.draw(st.integers(1, 8), label="E")
    k, d = data.draw(st.integers(1, E), label="k"), data.draw(st.integers(1, 48), label="d")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    plan = draw_plan(data, T, E, k, device)
    x = torch.randn(T, d, dtype=torch.float64, device=device) * draw_scale(data, dtype)
    # the backward sums each token's k gradient rows
    run_rule(lambda o, x: (o["permute"](x, plan),), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_combine_low_precision_error_within_3x_torch(dtype, device, data):
    T, E = data.draw(st.integers(0, 48), label="T"), data.draw(st.integers(1, 8), label="E")
    k, d = data.draw(st.integers(1, E), label="k"), data.draw(st.integers(1, 48), label="d")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    plan = draw_plan(data, T, E, k, device)
    y = torch.randn(T * k, d, dtype=torch.float64, device=device) * draw_scale(data, dtype)
    weight = torch.softmax(torch.randn(T, k, dtype=torch.float64, device=device), dim=-1)
    run_rule(lambda o, y, w: (o["combine"](y, w, plan),), [y, weight], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_grouped_mm_low_precision_error_within_3x_torch(dtype, device, data):
    E = data.draw(st.integers(1, 6), label="E")
    counts = data.draw(st.lists(st.integers(0, 40), min_size=E, max_size=E), label="counts")
    pad = data.draw(st.integers(0, 5), label="padding rows")
    d_in, d_out = data.draw(st.integers(1, 64), label="d_in"), data.draw(st.integers(1, 64))
    transposed = data.draw(st.booleans(), label="transposed w")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=device)
    x = torch.randn(sum(counts) + pad, d_in, dtype=torch.float64, device=device)
    x = x * draw_scale(data, dtype)
    w = torch.randn(E, d_out, d_in, dtype=torch.float64, device=device) / math.sqrt(d_in)

    def fn(o, x, w):
        # w handed over as the transposed view of an [E, d_out, d_in] parameter, or contiguous
        wt = w.transpose(1, 2) if transposed else w.transpose(1, 2).contiguous()
        return (o["grouped_mm"](x, wt, offsets),)

    run_rule(fn, [x, w], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_swiglu_low_precision_error_within_3x_torch(dtype, device, data):
    M, f = data.draw(st.integers(0, 64), label="M"), data.draw(st.integers(1, 64), label="f")
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    # |h| <= 4 scale; in fp16 scale <= 60 keeps silu(gate) * up inside 65504
    scale = min(draw_scale(data, dtype), 60.0 if dtype == torch.float16 else math.inf)
    h = torch.randn(M, 2 * f, dtype=torch.float64, device=device).clamp(-4, 4) * scale
    run_rule(lambda o, h: (o["swiglu"](h),), [h], dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_make_plan_low_precision_priority_gives_the_float64_plan(dtype):
    # make_plan is integer-only; its priority is read as fp32, so a 16-bit priority must give
    # the plan of the same (rounded) values in float64.
    expert = torch.stack([torch.randperm(8)[:2] for _ in range(64)]).to(torch.int32)
    priority = (torch.rand(64, dtype=torch.float64) * 100).to(dtype)
    got = ops.make_plan(expert, 8, capacity=6, priority=priority)
    want = ops.make_plan(expert, 8, capacity=6, priority=priority.double())
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_unified_topk_low_precision_scores_give_the_float64_selection(dtype, device):
    # unified_topk only compares scores (indices out, no arithmetic): 16-bit scores, most of them
    # tied after rounding, must select what the same (rounded) values select in float64.
    scores = (torch.randn(6, 500, dtype=torch.float64) * 3).to(dtype)
    scores[::2, -40:] = -torch.inf  # padding
    counts = torch.tensor([0, 7, 100, 250, 250, 31])
    for c in (None, counts):
        got = ops.unified_topk(scores.to(device), 250, counts=None if c is None else c.to(device))
        assert torch.equal(got.cpu(), ops.unified_topk(scores.double(), 250, counts=c))


# s2moe_perturb's statistics patterns: name -> (x's shape, statistics' shape) from (B, S, d)
S2MOE_STATS = {
    "sequence": lambda B, S, d: ((B, S, d), (B, 1, d)),
    "time_major": lambda B, S, d: ((S, B, d), (1, B, d)),
    "token": lambda B, S, d: ((B * S, d), (B * S, 1)),
    "batch": lambda B, S, d: ((B * S, d), (1, d)),
    "scalars": lambda B, S, d: ((B, S, d), ()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@ci_settings(15)
@given(data=st.data())
def test_s2moe_perturb_low_precision_error_within_3x_torch(dtype, device, data):
    pattern = data.draw(st.sampled_from(sorted(S2MOE_STATS)), label="statistics")
    B, S = data.draw(st.integers(0, 4), label="B"), data.draw(st.integers(1, 48), label="S")
    shape, stat = S2MOE_STATS[pattern](B, S, data.draw(st.integers(1, 32), label="d"))
    torch.manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    scale = draw_scale(data, dtype)
    x = torch.randn(shape, dtype=torch.float64, device=device) * scale
    mu = torch.randn(stat, dtype=torch.float64, device=device) * scale
    s_mul, s_add = (torch.rand(stat, dtype=torch.float64, device=device) + 0.1 for _ in range(2))
    s_add = s_add * scale
    # the noise: fixed (no gradient), rounded to dtype once so that every run sees its values
    n1, n2 = (torch.randn(shape, device=device).to(dtype) for _ in range(2))

    def fn(o, x, mu, s_mul, s_add):
        return (o["s2moe_perturb"](x, n1.to(x.dtype), n2.to(x.dtype), mu, s_mul, s_add),)

    run_rule(fn, [x, mu, s_mul, s_add], dtype)


def test_s2moe_perturb_torch_ops_baseline_in_float64_matches_reference():
    x, n1, n2 = (torch.randn(3, 7, 8, dtype=torch.float64) for _ in range(3))
    stats = [torch.rand(3, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    got = torch_ops["s2moe_perturb"](x, n1, n2, *stats)
    want = reference_s2moe.s2moe_perturb(x, n1, n2, *stats)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(got, stats, g), torch.autograd.grad(want, stats, g)):
        torch.testing.assert_close(a, b)


# ---- the baseline itself: in float64 it is the reference's math ----
@pytest.mark.parametrize("renormalize", [False, True])
def test_torch_ops_baseline_in_float64_matches_reference(renormalize):
    T, E, k, d = 12, 5, 2, 7
    logits = spaced_logits(T, E)
    w, ex = torch_ops["topk_softmax"](logits, k, renormalize=renormalize)
    rw, rex = ref.topk_softmax(logits, k, renormalize=renormalize)
    assert torch.equal(ex, rex)
    torch.testing.assert_close(w, rw)
    ec = torch_ops["expert_choice"](logits, 3, group_size=5)
    torch.testing.assert_close(ec.weight, ref.expert_choice(logits, 3, group_size=5).weight)
    plan = ops.make_plan(ex, E, capacity=4)
    x, y = torch.randn(T, d, dtype=torch.float64), torch.randn(T * k, d, dtype=torch.float64)
    assert torch.equal(torch_ops["permute"](x, plan), ref.permute(x, plan))
    torch.testing.assert_close(torch_ops["combine"](y, w, plan), ref.combine(y, w, plan))
    wm = torch.randn(E, d, 3, dtype=torch.float64)
    torch.testing.assert_close(
        torch_ops["grouped_mm"](y, wm, plan.offsets), ref.grouped_mm(y, wm, plan.offsets)
    )
    torch.testing.assert_close(torch_ops["swiglu"](y[:, :6]), ref.swiglu(y[:, :6]))
    kw = dict(selection_bias=torch.randn(E) * 0.1, renormalize=renormalize, scale=2.5)
    got = torch_ops["topk_sigmoid"](logits, k, **kw)
    want = reference_sigmoid.topk_sigmoid(logits, k, **kw)
    assert torch.equal(got.expert, want.expert)
    torch.testing.assert_close(got.weight, want.weight)
    # the oracle's softmax (sigmoid) backward is autograd's, rearranged
    lg = logits.clone().requires_grad_()
    g = torch.randn(T, k, dtype=torch.float64)
    for fn in (torch_ops, oracle_ops):
        w = fn["topk_softmax"](lg, k, renormalize=renormalize).weight
        torch.testing.assert_close(w, rw)
        grad = torch.autograd.grad(w, lg, g)[0]
        want = torch.autograd.grad(ref.topk_softmax(lg, k, renormalize=renormalize).weight, lg, g)
        torch.testing.assert_close(grad, want[0])
        w = fn["topk_sigmoid"](lg, k, **kw).weight
        grad = torch.autograd.grad(w, lg, g)[0]
        want = torch.autograd.grad(reference_sigmoid.topk_sigmoid(lg, k, **kw).weight, lg, g)
        torch.testing.assert_close(grad, want[0])
        w = fn["expert_choice"](lg, 3).weight
        grad = torch.autograd.grad(w, lg, g[:, :1].expand(T, E))[0]
        want = torch.autograd.grad(ref.expert_choice(lg, 3).weight, lg, g[:, :1].expand(T, E))
        torch.testing.assert_close(grad, want[0])
