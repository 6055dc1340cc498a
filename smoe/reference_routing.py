"""The routers' oracles: top-k softmax, expert choice, the balance and z losses, capacities, and
X-MoE's cosine gate. Part of the test oracle (``smoe.reference`` re-exports every name here);
float64, written for obviousness, spec sections cited per function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smoe.ops import CosineScores, ExpertChoice, Plan, TopK


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


def router_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The statistics of ``smoe.ops.router_stats`` in float64, returned in float32 (float64 for
    float64 logits): the sum over tokens of softmax(logits_t), and logsumexp(logits_t).

    The logsumexp is written out around torch.logsumexp's shift (the row max, 0 where infinite),
    held constant: the same values, and a gradient that is the softmax itself (torch.logsumexp's
    backward, exp(x - lse), loses it where |lse| is so large that lse rounds to the max).
    """
    wide = logits.double()
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    prob_sum = torch.softmax(wide, dim=-1).sum(0)
    m = wide.detach().amax(dim=-1, keepdim=True)
    m = torch.where(m.isinf(), 0.0, m)
    lse = (m + torch.exp(wide - m).sum(dim=-1, keepdim=True).log()).squeeze(-1)
    return prob_sum.to(dt), lse.to(dt)


def router_z_loss(logits: Tensor) -> Tensor:
    """specs/classic_routers.md §3: mean over tokens of logsumexp(logits)^2."""
    return (torch.logsumexp(logits.double(), dim=-1) ** 2).mean()


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
