"""Slow, readable pure-PyTorch versions of every op and layer: the test oracle, never a fallback.

Library code never imports this module. Each function mirrors the public wrapper's signature,
computes in float64 and is written for obviousness. Spec sections are cited per function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.ops import Plan
from smoe.reference_graph import (  # noqa: F401 (re-exported)
    GraphRouting,
    attention_aware_routing,
    attention_graph,
    graph_mix,
    mix_and_select,
    similarity_aware_routing,
    similarity_graph,
)
from smoe.reference_momentum import momentum_update  # noqa: F401 (re-exported)
from smoe.reference_ot import plan_gates, sinkhorn, sinkhorn_scaling  # noqa: F401 (re-exported)
from smoe.reference_routing import (  # noqa: F401 (re-exported)
    capacity_for,
    cosine_scores,
    expert_choice,
    importance_loss,
    load_loss,
    router_stats,
    router_z_loss,
    switch_balance_loss,
    topk_softmax,
    vmoe_capacity,
    xmoe_balance_loss,
    xmoe_community_balance_loss,
    xmoe_gate,
)


def gate_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A router's logits x @ weight^T (+ bias), exact in float64, returned in float32 (float64 for
    float64 x): 16-bit inputs are never rounded to 16-bit logits."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def gate_linear_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """gate_linear's gradients of x and weight from the logits' gradient, exact in float64 (not
    rounded to the inputs' dtypes): grad @ weight and grad^T @ x."""
    g = grad.double()
    return g @ weight.double(), g.t() @ x.double()


def make_plan(
    expert: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority: Tensor | None = None,
    group_size: int | None = None,
) -> Plan:
    """DESIGN.md dispatch: stable sort by expert; capacity filled rank-major (GShard, V-MoE);
    with ``priority``, tokens within a rank by priority, highest first (specs/vmoe.md §3 BPR);
    with ``group_size``, each expert's capacity counts per group of consecutive tokens (§2)."""
    T, k = expert.shape
    S = T if group_size is None else group_size
    ex = expert.tolist()
    kept = [[e >= 0 for e in ex[t]] for t in range(T)]

    def rank_order(j: int) -> list[int]:
        if priority is None:
            return list(range(T))
        p = priority.double().tolist()
        score = [p[t] if priority.dim() == 1 else p[t][j] for t in range(T)]
        return sorted(range(T), key=lambda t: (-score[t], t))

    if capacity is not None:
        fill = {}  # (expert, group) -> slots taken
        for j in range(k):  # every token's first choice, then every second choice, ...
            for t in rank_order(j):
                e = ex[t][j]
                taken = fill.get((e, t // S), 0)
                kept[t][j] = e >= 0 and taken < capacity
                if kept[t][j]:
                    fill[(e, t // S)] = taken + 1
    slots_of = [[] for _ in range(num_experts)]
    for t in range(T):  # token order (then choice order) within each expert
        for j in range(k):
            if kept[t][j]:
                slots_of[ex[t][j]].append(t * k + j)
    order = [s for e in range(num_experts) for s in slots_of[e]]
    offsets = [0]
    for e in range(num_experts):
        offsets.append(offsets[-1] + len(slots_of[e]))
    pad = [-1] * (T * k - len(order))
    row = [-1] * (T * k)
    for i, s in enumerate(order):
        row[s] = i
    dev = expert.device
    return Plan(
        offsets=torch.tensor(offsets, dtype=torch.int64, device=dev),
        token=torch.tensor([s // k for s in order] + pad, dtype=torch.int32, device=dev),
        slot=torch.tensor(order + pad, dtype=torch.int32, device=dev),
        row=torch.tensor(row, dtype=torch.int32, device=dev).reshape(T, k),
        kept=torch.tensor(kept, dtype=torch.bool, device=dev).reshape(T, k),
    )


def permute(x: Tensor, plan: Plan) -> Tensor:
    """Row i of the result is x[token[i]], zero for padding rows."""
    out = torch.zeros(plan.token.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for i, t in enumerate(plan.token.tolist()):
        if t >= 0:
            out[i] = x[t].double()
    return out.to(x.dtype)


def combine(y_sorted: Tensor, weight: Tensor, plan: Plan) -> Tensor:
    """y[t] = sum_j weight[t, j] * y_sorted[row[t, j]] over kept slots."""
    T, k = plan.row.shape
    out = torch.zeros(T, y_sorted.shape[1], dtype=torch.float64, device=y_sorted.device)
    for t in range(T):
        for j in range(k):
            r = int(plan.row[t, j])
            if r >= 0:
                out[t] += weight[t, j].double() * y_sorted[r].double()
    return out.to(y_sorted.dtype)


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[r] = x[r] @ w[e] (+ bias[e]) for rows of group e; rows past offsets[E] are zero."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    off = offsets.tolist()
    for e in range(w.shape[0]):
        out[off[e] : off[e + 1]] = x[off[e] : off[e + 1]].double() @ w[e].double()
        if bias is not None:
            out[off[e] : off[e + 1]] += bias[e].double()
    return out.to(x.dtype)


def gather_mm(x: Tensor, plan: Plan, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """grouped_mm of the rows the plan gathers: row r is x[token[r]] @ w[e] (+ bias[e])."""
    return grouped_mm(permute(x, plan), w, plan.offsets, bias)


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up on a fused [M, 2f] projection, gate columns first."""
    gate, up = h.double().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def expert_ffn(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> Tensor:
    """One expert on rows x: weights in nn.Linear layout ([out, in]), optional biases."""
    h = x @ w_in.T
    if b_in is not None:
        h = h + b_in
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
    elif activation == "relu":
        h = torch.relu(h)
    elif activation == "gelu_tanh":
        h = torch.nn.functional.gelu(h, approximate="tanh")
    else:
        h = torch.nn.functional.gelu(h)
    y = h @ w_out.T
    return y if b_out is None else y + b_out


def expert_mlp(
    x: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    activation: str = "swiglu",
    plan: Plan | None = None,
) -> Tensor:
    """Each group's rows (x through the plan, or x itself) through its expert's MLP, in float64;
    w_in [E, d, n_in], w_out [E, d_ff, d_out] (grouped_mm's layout); rows past offsets[E] zero."""
    rows = (x if plan is None else permute(x, plan)).double()
    out = torch.zeros(rows.shape[0], w_out.shape[2], dtype=torch.float64, device=x.device)
    off = offsets.tolist()
    for e in range(w_in.shape[0]):
        bi = None if b_in is None else b_in[e].double()
        bo = None if b_out is None else b_out[e].double()
        part = rows[off[e] : off[e + 1]]
        out[off[e] : off[e + 1]] = expert_ffn(
            part, w_in[e].double().T, w_out[e].double().T, activation, bi, bo
        )
    return out.to(x.dtype)


def routed_moe(
    x: Tensor,
    expert: Tensor,
    weight: Tensor,
    kept: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    *,
    activation: str = "gelu",
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> Tensor:
    """y[t] = sum over kept (t, j) of weight[t, j] * Expert_{expert[t, j]}(x[t]), one token and
    one expert at a time, in float64; expert weights ``[E, out, in]``, biases ``[E, out]``."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(expert.shape[1]):
            if kept[t, j]:
                e = int(expert[t, j])
                bias = [None if b is None else b[e].double() for b in (b_in, b_out)]
                y = expert_ffn(
                    x[t : t + 1].double(), w_in[e].double(), w_out[e].double(), activation, *bias
                )
                out[t] += weight[t, j].double() * y[0]
    return out


def moe_layer(
    x: Tensor,
    gate_weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    k: int,
    *,
    activation: str = "gelu",
    renormalize: bool = True,
    capacity: int | None = None,
) -> Tensor:
    """A token-choice MoE layer, one token and one expert at a time, in float64."""
    xs = x.reshape(-1, x.shape[-1]).double()
    logits = xs @ gate_weight.double().T
    weight, expert = topk_softmax(logits, k, renormalize=renormalize)
    plan = make_plan(expert, w_in.shape[0], capacity=capacity)
    out = routed_moe(xs, expert, weight, plan.kept, w_in, w_out, activation=activation)
    return out.reshape(x.shape)
