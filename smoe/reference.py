"""Slow, readable pure-PyTorch versions of every op and layer: the test oracle, never a fallback.

Library code never imports this module. Each function mirrors the public wrapper's signature,
computes in float64 and is written for obviousness. Spec sections are cited per function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smoe.ops import CosineScores, ExpertChoice, Plan, TopK
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


def gate_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A router's logits x @ weight^T (+ bias), exact in float64, returned in float32 (float64 for
    float64 x): 16-bit inputs are never rounded to 16-bit logits."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def topk_softmax(
    logits: Tensor, k: int, *, renormalize: bool = True, selection_bias: Tensor | None = None
) -> TopK:
    """specs/classic_routers.md §2, §4, §6: softmax, top-k by logit (ties to the lower index);
    with ``selection_bias``, top-k by logit + bias (summed in the op's accumulation type, float32
    but for float64 logits), the weights from the unbiased logits (DeepSeek-V3)."""
    x = logits.double()
    probs = torch.softmax(x, dim=-1)
    rank = x
    if selection_bias is not None:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rank = logits.to(acc) + selection_bias.to(acc)
    # A stable sort of -rank keeps the lower index first among equal values.
    expert = torch.sort(-rank, dim=-1, stable=True).indices[:, :k]
    if renormalize:
        weight = torch.softmax(torch.gather(x, 1, expert), dim=-1)
    else:
        weight = torch.gather(probs, 1, expert)
    return TopK(weight.to(logits.dtype), expert.to(torch.int32))


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


def expert_choice(logits: Tensor, capacity: int, *, group_size: int | None = None) -> ExpertChoice:
    """specs/classic_routers.md §5: p = softmax(logits); in each group of consecutive tokens,
    expert e takes the min(capacity, group size) tokens of largest p[:, e] (ties to the lower
    token index), listed in token order; plan rows of expert e are contiguous."""
    T, E = logits.shape
    p = torch.softmax(logits.double(), dim=-1)
    S = max(T, 1) if group_size is None else group_size
    score = p.tolist()
    chosen = [[] for _ in range(E)]
    for e in range(E):
        for g0 in range(0, T, S):
            tokens = range(g0, min(g0 + S, T))
            best = sorted(tokens, key=lambda t: (-score[t][e], t))[: min(capacity, S)]
            chosen[e] += sorted(best)
    order = [(t, e) for e in range(E) for t in chosen[e]]
    row = torch.full((T, E), -1, dtype=torch.int32)
    weight = torch.zeros(T, E, dtype=torch.float64)
    for i, (t, e) in enumerate(order):
        row[t, e] = i
        weight[t, e] = p[t, e]
    per_expert = len(chosen[0]) if E else 0
    dev = logits.device
    plan = Plan(
        offsets=torch.arange(E + 1, dtype=torch.int64, device=dev) * per_expert,
        token=torch.tensor([t for t, _ in order], dtype=torch.int32, device=dev),
        slot=torch.tensor([t * E + e for t, e in order], dtype=torch.int32, device=dev),
        row=row.to(dev),
        kept=(row >= 0).to(dev),
    )
    return ExpertChoice(weight.to(dtype=logits.dtype, device=dev), plan)


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


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up on a fused [M, 2f] projection, gate columns first."""
    gate, up = h.double().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def switch_balance_loss(
    logits: Tensor, expert: Tensor, num_experts: int, *, first_choice_only: bool = False
) -> Tensor:
    """specs/classic_routers.md §2: E * sum_e f_e * P_e, f counting all k choices / T (or first)."""
    probs = torch.softmax(logits.double(), dim=-1)
    T = logits.shape[0]
    chosen = expert[:, :1] if first_choice_only else expert
    f = torch.zeros(num_experts, dtype=torch.float64, device=logits.device)
    for e in chosen.flatten().tolist():
        if e >= 0:
            f[e] += 1.0 / T
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """specs/classic_routers.md §3: mean over tokens of logsumexp(logits)^2."""
    return (torch.logsumexp(logits.double(), dim=-1) ** 2).mean()


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


def capacity_for(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(k * T * factor / E), at least 1 (specs/classic_routers.md §7)."""
    return max(1, math.ceil(k * num_tokens * capacity_factor / num_experts))


def importance_loss(logits: Tensor, *, group_size: int | None = None) -> Tensor:
    """specs/vmoe.md §4: per group, CV^2 (population std) of sum_s softmax(l_s); mean of groups."""
    p = torch.softmax(logits.double(), dim=-1)
    return _mean_cv_squared_per_group(p, group_size)


def load_loss(
    logits: Tensor, noisy_logits: Tensor, k: int, noise_std: float, *, group_size: int | None = None
) -> Tensor:
    """specs/vmoe.md §4: P[s, e] = 1 - Phi((kth largest noisy logit of s - l[s, e]) / sigma)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    T, E = logits.shape
    P = torch.zeros(T, E, dtype=torch.float64)
    for s in range(T):
        threshold = sorted(noisy_logits[s].double().tolist(), reverse=True)[k - 1]
        for e in range(E):
            z = (threshold - float(logits[s, e])) / noise_std
            P[s, e] = 1.0 - float(normal.cdf(torch.tensor(z, dtype=torch.float64)))
    return _mean_cv_squared_per_group(P, group_size)


def _mean_cv_squared_per_group(v: Tensor, group_size: int | None) -> Tensor:
    T = v.shape[0]
    S = T if group_size is None else group_size
    cvs = []
    for g0 in range(0, T, S):
        total = v[g0 : g0 + S].sum(0)
        mean = total.mean()
        var = ((total - mean) ** 2).mean()
        cvs.append(var / mean**2)
    return torch.stack(cvs).mean()


def vmoe_capacity(group_size: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """specs/vmoe.md §3 (vmoe's compute_capacity): ceil(k S C / E), up to a multiple of 4."""
    cap = math.ceil(k * group_size * capacity_factor / num_experts)
    return cap + (-cap) % 4


def cosine_scores(
    h: Tensor,
    proj: Tensor,
    expert_emb: Tensor,
    temperature: Tensor,
    *,
    eps: float = 1e-4,
    normalize_tokens: bool = True,
) -> CosineScores:
    """specs/xmoe.md §3 (Eq. 7), §6, §8, in float64: cos = (h Wᵀ / max(‖h Wᵀ‖, eps)) · (e_i /
    max(‖e_i‖, eps)), logits = cos / max(τ, 1e-4); a non-finite score takes the smallest finite
    score of its row (0 if none), without gradient. Outputs in the op's dtype (float32, or
    float64 for float64 h); differentiable w.r.t. every input (gradcheck's oracle)."""
    z = h.double() @ proj.double().T
    if normalize_tokens:
        z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(eps)
    e = expert_emb.double()
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(eps)
    cos = z @ e.T
    finite = torch.isfinite(cos)
    lowest = torch.where(finite, cos, math.inf).amin(dim=-1, keepdim=True).detach()
    fill = torch.where(torch.isfinite(lowest), lowest, 0.0)
    cos = torch.where(finite, cos, fill)
    logits = cos / temperature.double().clamp_min(1e-4)
    out = torch.float64 if h.dtype == torch.float64 else torch.float32
    return CosineScores(cos.to(out), logits.to(out))


def xmoe_gate(
    cos: Tensor, temperature: float, k: int, *, gate: str = "softmax"
) -> tuple[Tensor, Tensor]:
    """specs/xmoe.md §3.3-§3.4: the k largest cosines (ties to the lower index) and their gate
    values: softmax gate at k = 1, exp(s_k/τ) / Σ_{j=1..N} exp(s_j/τ) (all N experts); at k > 1,
    the softmax of s/τ over the k selected; sigmoid gate, σ(s_k/τ) per selected expert.
    Returns (expert [T, k] int32, weight [T, k] float64)."""
    s = cos.double() / max(temperature, 1e-4)
    expert = torch.sort(-cos.double(), dim=-1, stable=True).indices[:, :k]
    picked = torch.gather(s, 1, expert)
    if gate == "sigmoid":
        weight = torch.sigmoid(picked)
    elif k == 1:
        weight = torch.gather(torch.softmax(s, dim=-1), 1, expert)
    else:
        weight = torch.softmax(picked, dim=-1)
    return expert.to(torch.int32), weight


def xmoe_balance_loss(cos: Tensor, expert: Tensor, num_experts: int, tau0: float) -> Tensor:
    """specs/xmoe.md §4 (Eq. 9): N Σ_i f_i P_i, P_i the mean over tokens of softmax(s/τ0)_i, f_i
    the fraction of tokens whose top-1 expert is i (a count: no gradient)."""
    T = cos.shape[0]
    P = torch.softmax(cos.double() / tau0, dim=-1).mean(0)
    f = [0.0] * num_experts
    for e in expert[:, 0].tolist():
        f[e] += 1.0 / T
    return num_experts * sum(f[i] * P[i] for i in range(num_experts))


def xmoe_community_balance_loss(scores: Tensor, expert: Tensor, num_experts: int) -> Tensor:
    """specs/xmoe.md §11 (fastmoe's CustomNaiveGate_Balance_XMoE): P = softmax(s/0.3), f_i = the
    top-k slots on i / (T k), P̄_i = Σ_t P_{t,i} / (T k), loss N Σ f_i P̄_i (1/k at balance)."""
    T, k = expert.shape
    P = torch.softmax(scores.double() / 0.3, dim=-1).sum(0) / (T * k)
    f = [0.0] * num_experts
    for e in expert.flatten().tolist():
        f[e] += 1.0 / (T * k)
    return num_experts * sum(f[i] * P[i] for i in range(num_experts))
