"""The low-precision rule of STYLE.md §8 (flash-attention's): its baseline, metric and check.

In fp16/bf16 an smoe op's error against the float64 reference must be at most 3x the error of
the same computation written with torch's own ops in that precision. This module holds:

- the torch-ops versions of smoe's numeric ops (``gate_linear``, ``topk_softmax``, ``topk_sigmoid``,
  ``expert_choice``, ``permute``, ``combine``, ``grouped_mm``, ``swiglu``, ``expert_mlp``,
  ``s2moe_perturb``).
  ``smoe.reference`` cannot serve here: each of its functions upcasts to float64 and rounds once
  at the end, so on fp16/bf16 inputs it returns the correctly rounded answer, not what PyTorch
  code in that precision computes. The versions below keep every intermediate in the input's
  dtype, as plain PyTorch code would (torch's kernels then decide their internal accumulation,
  e.g. fp32 inside CPU matmuls and reductions); their backward is torch's autograd. Run on
  float64 inputs they are float64 math, and tests/test_low_precision.py checks that they then
  equal ``smoe.reference`` (``reference_s2moe`` for ``s2moe_perturb``).
- ``oracle_ops``: the float64 reference, the same functions but with a softmax (sigmoid) backward
  that does not cancel when one probability (s) is ~1 (autograd's does, even in float64).
- :func:`use_torch_ops` (:func:`use_ops`), a switch under which smoe's modules (``MoELayer``,
  ``Experts``, the routers) call these instead of ``torch.ops.smoe``: "the same model with
  torch's ops".
- :func:`max_abs_error` and :func:`check_rule`, the metric and the bound.

Discrete choices are shared with smoe so that only arithmetic differs: top-k selects by logit
with ties to the lower index (smoe's rule), ``topk_sigmoid`` and ``expert_choice`` keep smoe's
choice of experts (plan) and only recompute the weights, and ``make_plan`` and ``unified_topk``
(integers out, only comparisons inside) are not replaced.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from hypothesis import settings
from torch import Tensor

import smoe.ops
from smoe.ops import ExpertChoice, Plan, TopK

#: The bound of the rule: smoe's error <= RATIO * torch-ops error + floor.
RATIO = 3.0
#: The floor, in units of ``finfo(dtype).eps * max|float64 result|`` (1 to 2 ulps of the largest
#: output element). It only matters where the torch-ops error is (near) 0, e.g. exact gathers.
FLOOR_EPS = 1.0


# ---------------------------------------------------------------------------------------------
# torch-ops versions of the numeric ops (same signatures as smoe.ops)
# ---------------------------------------------------------------------------------------------
def gate_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The routers' gate in plain torch, as they ran it before smoe's op: ``F.linear`` on the
    inputs upcast to float32 (float64 stays float64); logits are never 16-bit."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def topk_softmax(
    logits: Tensor, k: int, *, renormalize: bool = True, selection_bias: Tensor | None = None
) -> TopK:
    """Mixtral's routing in plain torch: softmax, top-k, divide by the sum of the k (with a
    selection bias: top-k of logits + bias, weights from the unbiased softmax)."""
    probs = torch.softmax(logits, dim=-1)
    rank = logits if selection_bias is None else logits.float() + selection_bias
    # A stable sort of -rank: top-k by logit, ties to the lower index (smoe's selection rule).
    expert = torch.sort(-rank, dim=-1, stable=True).indices[:, :k]
    weight = torch.gather(probs, 1, expert)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return TopK(weight, expert.to(torch.int32))


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
    """smoe's experts (the group-limited top-k of sigmoid + bias), DeepSeek-V3's weights in torch:
    sigmoid, gather, divide by the sum + 1e-20, times scale."""
    args = (logits, k, selection_bias, n_group, topk_group, renormalize, scale)
    return _topk_sigmoid(torch.sigmoid, *args)


def _for_smoe(x: Tensor, *others: Tensor | None) -> tuple[Tensor | None, ...]:
    """``(x, *others)`` where smoe's ops take them: all on the host when ``x`` is the oracle's
    float64 CUDA tensor (smoe's CUDA kernels take no float64), else as given."""
    if x.dtype == torch.float64 and x.is_cuda:
        return (x.cpu(), *(None if t is None else t.cpu() for t in others))
    return (x, *others)


def _topk_sigmoid(sigmoid, logits, k, selection_bias, n_group, topk_group, renormalize, scale):
    x, bias = _for_smoe(logits.detach(), selection_bias)
    kw = dict(selection_bias=bias, n_group=n_group, topk_group=topk_group)
    expert = smoe_ops["topk_sigmoid"](x, k, **kw).expert.to(logits.device)
    weight = torch.gather(sigmoid(logits), 1, expert.long())
    if renormalize:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    return TopK(weight * scale, expert)


def expert_choice(logits: Tensor, capacity: int, *, group_size: int | None = None) -> ExpertChoice:
    """smoe's plan (the discrete part), weights ``softmax(logits)`` where chosen, in torch."""
    plan = smoe_ops["expert_choice"](logits.detach(), capacity, group_size=group_size).plan
    return ExpertChoice(expert_choice_weight(logits, plan.row), plan)


def expert_choice_weight(logits: Tensor, row: Tensor) -> Tensor:
    """``softmax(logits)`` where ``row >= 0`` (chosen), else 0."""
    return torch.where(row >= 0, torch.softmax(logits, dim=-1), 0.0)


def permute(x: Tensor, plan: Plan) -> Tensor:
    """``x[token]``, zero rows for padding; the backward is torch's index_put with accumulate."""
    token = plan.token.long()
    return torch.where((token >= 0).unsqueeze(1), x[token.clamp_min(0)], 0.0)


def combine(y_sorted: Tensor, weight: Tensor, plan: Plan) -> Tensor:
    """``sum_j weight[t, j] * y_sorted[row[t, j]]`` over kept slots: gather, multiply, sum."""
    row = plan.row.long()
    gathered = y_sorted[row.clamp_min(0)]  # [T, k, d]
    # where, not a 0/1 mask product: a dropped slot must not turn into 0 * NaN = NaN.
    terms = torch.where((row >= 0).unsqueeze(-1), weight.unsqueeze(-1) * gathered, 0.0)
    return terms.sum(dim=1)


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """One ``@`` (``addmm`` with a bias) per expert group (host loop over the offsets); rows past
    offsets[E] are 0."""
    off = offsets.tolist()
    parts = [
        x[off[e] : off[e + 1]] @ w[e]
        if bias is None
        else torch.addmm(bias[e], x[off[e] : off[e + 1]], w[e])
        for e in range(w.shape[0])
    ]
    parts.append(x.new_zeros(x.shape[0] - off[-1], w.shape[2]))
    return torch.cat(parts)


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` on a fused ``[M, 2f]`` projection, gate columns first."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


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
    """The chain of the versions above: permute, grouped_mm, the activation, grouped_mm
    (``fused`` is smoe's choice of kernel; here there is one)."""
    h = grouped_mm(x if plan is None else permute(x, plan), w_in, offsets, b_in)
    if activation == "swiglu":
        a = swiglu(h)
    elif activation == "relu":
        a = F.relu(h)
    else:
        a = F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")
    return grouped_mm(a, w_out, offsets, b_out)


def s2moe_perturb(
    x: Tensor, n1: Tensor, n2: Tensor, mu: Tensor, s_mul: Tensor, s_add: Tensor
) -> Tensor:
    """S2MoE's ``(1 + s_mul n1) x + (mu + s_add n2)`` with torch broadcasting; the statistics'
    gradients are autograd's sums over the broadcast dims."""
    return (1 + s_mul * n1) * x + (mu + s_add * n2)


# ---------------------------------------------------------------------------------------------
# the float64 oracle: the torch-ops versions, with a softmax backward free of cancellation
# ---------------------------------------------------------------------------------------------
class _PairwiseSoftmax(torch.autograd.Function):
    """softmax whose backward is ``p_e sum_j p_j (g_e - g_j)``. Autograd's ``p_e (g_e - sum_j
    p_j g_j)`` cancels to 0 when p_e is within float64's eps of 1 (logit gaps over ~37), where
    the true gradient, ``p_e (1 - p_e) ...``, is tiny but not 0 and float32 kernels that avoid
    the cancellation get it right: the oracle must not be the less accurate side."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        p = torch.softmax(x, dim=-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return p * ((g.unsqueeze(-1) - g.unsqueeze(-2)) * p.unsqueeze(-2)).sum(-1)


def topk_softmax_oracle(
    logits: Tensor, k: int, *, renormalize: bool = True, selection_bias: Tensor | None = None
) -> TopK:
    rank = logits if selection_bias is None else logits + selection_bias.to(logits.dtype)
    expert = torch.sort(-rank, dim=-1, stable=True).indices[:, :k]
    if renormalize:
        weight = _PairwiseSoftmax.apply(torch.gather(logits, 1, expert))
    else:
        weight = torch.gather(_PairwiseSoftmax.apply(logits), 1, expert)
    return TopK(weight, expert.to(torch.int32))


class _StableSigmoid(torch.autograd.Function):
    """sigmoid whose backward is ``g s sigmoid(-x)``: autograd's ``g s (1 - s)`` is 0 once s
    rounds to 1 in float64 (x over ~37), where smoe's kernels, which use sigmoid(-x), are not."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x) * torch.sigmoid(-x)


def topk_sigmoid_oracle(
    logits: Tensor,
    k: int,
    *,
    selection_bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int | None = None,
    renormalize: bool = False,
    scale: float = 1.0,
) -> TopK:
    args = (logits, k, selection_bias, n_group, topk_group, renormalize, scale)
    return _topk_sigmoid(_StableSigmoid.apply, *args)


def expert_choice_oracle(
    logits: Tensor, capacity: int, *, group_size: int | None = None
) -> ExpertChoice:
    (x,) = _for_smoe(logits.detach())
    plan = smoe_ops["expert_choice"](x, capacity, group_size=group_size).plan
    plan = type(plan)(*(t.to(logits.device) for t in plan))
    return ExpertChoice(torch.where(plan.row >= 0, _PairwiseSoftmax.apply(logits), 0.0), plan)


NUMERIC_OPS = (
    "gate_linear",
    "topk_softmax",
    "topk_sigmoid",
    "expert_choice",
    "permute",
    "combine",
    "grouped_mm",
    "swiglu",
    "expert_mlp",
    "s2moe_perturb",
)
#: smoe's own wrappers, kept whatever the switch does.
smoe_ops = {name: getattr(smoe.ops, name) for name in NUMERIC_OPS}
#: the torch-ops baseline (run in fp16/bf16).
torch_ops = {name: globals()[name] for name in NUMERIC_OPS}
#: the float64 oracle (run on float64 copies of the rounded inputs).
oracle_ops = {
    **torch_ops,
    "topk_softmax": topk_softmax_oracle,
    "topk_sigmoid": topk_sigmoid_oracle,
    "expert_choice": expert_choice_oracle,
}


@contextlib.contextmanager
def use_ops(table: dict) -> Iterator[None]:
    """Within the block, smoe's modules compute with the functions of ``table``.

    The layer, the experts and the routers look their ops up as ``smoe.ops.<name>`` at call
    time, so replacing those attributes switches a whole model; ``make_plan`` stays smoe's.
    """
    try:
        for name, fn in table.items():
            setattr(smoe.ops, name, fn)
        yield
    finally:
        for name, fn in smoe_ops.items():
            setattr(smoe.ops, name, fn)


def use_torch_ops():
    """The switch to torch's ops: "the same model with torch's ops" (see :func:`use_ops`)."""
    return use_ops(torch_ops)


# ---------------------------------------------------------------------------------------------
# metric and bound
# ---------------------------------------------------------------------------------------------
def max_abs_error(got: Tensor, want64: Tensor) -> float:
    """``max |got - want|`` over all elements, in float64 (inf/NaN in got give inf/NaN)."""
    if got.numel() == 0:
        return 0.0
    return (got.double() - want64.double()).abs().max().item()


def floor(want64: Tensor, dtype: torch.dtype) -> float:
    """FLOOR_EPS x ``finfo(dtype).eps`` x the largest |float64 result| (0 for an empty one)."""
    if want64.numel() == 0:
        return 0.0
    return FLOOR_EPS * torch.finfo(dtype).eps * want64.double().abs().max().item()


def in_scope(low: Tensor, want64: Tensor) -> bool:
    """Whether the rule applies: the float64 result is inside the dtype's range and the
    torch-ops result is finite. Outside, the computation itself overflows in that precision
    (e.g. fp16 gradients of 1e2-sized activations without loss scaling) and there is no
    torch-ops error to compare with; the overflow tests check smoe's accumulations there."""
    if want64.numel() == 0:
        return True
    fits = want64.abs().max().item() <= torch.finfo(low.dtype).max
    return fits and bool(torch.isfinite(low).all())


def rule(got: Tensor, low: Tensor, want64: Tensor) -> dict[str, float]:
    """The numbers of the rule for one output: smoe's error, torch-ops error, floor, ratio."""
    err, base = max_abs_error(got, want64), max_abs_error(low, want64)
    fl = floor(want64, got.dtype)
    denom = max(base, fl)
    ratio = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
    return {"smoe_err": err, "torch_err": base, "floor": fl, "ratio": ratio}


def check_rule(name: str, got: Tensor, low: Tensor, want64: Tensor) -> None:
    """Assert smoe's error <= RATIO x torch-ops error + floor (NaN or inf in got fails), where
    the rule applies (:func:`in_scope`)."""
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype} vs torch-ops {low.dtype}"
    if not in_scope(low, want64):
        return
    r = rule(got, low, want64)
    bound = RATIO * r["torch_err"] + r["floor"]
    assert r["smoe_err"] <= bound, (
        f"{name} ({got.dtype}): smoe max-abs error {r['smoe_err']:.4g} > {RATIO:g} x torch-ops "
        f"error {r['torch_err']:.4g} + floor {r['floor']:.4g}"
    )


def ci_settings(examples: int) -> settings:
    """``examples`` per test under the ci hypothesis profile (the CI time budget); the dev
    profile's count under SMOE_HYPOTHESIS=dev."""
    if os.environ.get("SMOE_HYPOTHESIS", "ci") == "ci":
        return settings(max_examples=examples)
    return settings()
