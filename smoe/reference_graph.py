"""Float64 oracles of graph-of-tokens routing (specs/graph_routing.md): the op ``graph_mix``
(§5), differentiable by autograd w.r.t. x and A (the backward's oracle), and the whole routing of
Similarity-Aware and Attention-Aware routers (§2): gate logits, the graph, the mix, top-k after
the mix, the renormalised weights. Re-exported by :mod:`smoe.reference`; library code never
imports it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def graph_mix(
    x: Tensor,
    A: Tensor,
    *,
    self_coef: float = 1.0,
    lam: float = 1.0,
    cache: Tensor | None = None,
) -> Tensor:
    """specs/graph_routing.md §5: ``self_coef · x + lam · A @ x'`` per batch entry, with
    ``x' = cat(cache, x, dim=1)`` (or x), in float64. The cache is detached (it gets no gradient,
    §5). ``lam = 0`` drops the graph term (``self_coef · x``, not ``+ 0 · A x'``), as the op does.
    Returns float64 [B, S, E]."""
    xd = x.double()
    if lam == 0:
        return self_coef * xd
    xp = xd if cache is None else torch.cat([cache.detach().double(), xd], dim=1)
    return self_coef * xd + lam * torch.bmm(A.double(), xp)


# --- the routers (§2) ----------------------------------------------------------------------------
_EPS = 1e-9  # in the renormalisation of p̃ over the selected experts, mix="probs" (§2, §7)


class GraphRouting(NamedTuple):
    """The float64 routing of a graph-of-tokens router: ``weight [T, k]``, ``expert [T, k]``
    (int32) and ``probs [T, E]``, p̃ (the plain gate's p when the graph is off)."""

    weight: Tensor
    expert: Tensor
    probs: Tensor


def neighbourhood(S: int, *, causal: bool, window: int | None = None) -> Tensor:
    """§2.2 N(i) as ``[S, S]`` bool: every j; j <= i when causal; |i - j| < window."""
    ok = torch.ones(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(S):
            if (causal and j > i) or (window is not None and abs(i - j) >= window):
                ok[i, j] = False
    return ok


def similarity_graph(
    u: Tensor,
    z: Tensor,
    *,
    sim: str = "dot",
    tau: float = 1.0,
    causal: bool = False,
    window: int | None = None,
    topm: int | None = None,
) -> Tensor:
    """§2.2: ``A [B, S, S]`` = softmax over N(i) of sim(u_i, u_j) / τ in float64, for router
    inputs ``u [B, S, d]`` and gate logits ``z [B, S, E]``. sim "dot": u·u/√d; "cosine": u/‖u‖
    (the norm floored at 1e-4) dotted; "router": z·z/√E. ``topm``: only the m
    largest similarities of N(i), and every one tied with the m-th, enter the softmax."""
    if sim == "dot":
        q, scale = u.double(), 1.0 / (math.sqrt(u.shape[-1]) * tau)
    elif sim == "cosine":
        ud = u.double()
        q, scale = ud / ud.norm(dim=-1, keepdim=True).clamp_min(1e-4), 1.0 / tau
    elif sim == "router":
        q, scale = z.double(), 1.0 / (math.sqrt(z.shape[-1]) * tau)
    else:
        raise ValueError(f"similarity_graph: unknown sim {sim!r}")
    s = (q @ q.transpose(-1, -2)) * scale
    B, S = s.shape[0], s.shape[1]
    keep = neighbourhood(S, causal=causal, window=window).expand(B, S, S).clone()
    if topm is not None:
        for b in range(B):
            for i in range(S):
                row = s[b, i].detach()
                candidates = row[keep[b, i]]
                if topm < candidates.numel():
                    mth = torch.sort(candidates, descending=True).values[topm - 1]
                    keep[b, i] &= row >= mth
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)


def attention_graph(
    attention: Tensor, *, heads: str | int = "mean", causal: bool = False
) -> Tensor:
    """§2.2: ``A [B, S, S]`` in float64 from attention probabilities ``[B, H, S, S]`` (or
    ``[B, S, S]``, one head): the mean over heads; the max over heads, each row renormalised; or
    head ``heads`` alone. When causal, the entries j > i are zeroed (rows not renormalised)."""
    a = attention.double()
    if a.dim() == 3:
        a = a.unsqueeze(1)
    if heads == "mean":
        A = a.mean(dim=1)
    elif heads == "max":
        m = a.amax(dim=1)
        A = m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    else:
        A = a[:, heads]
    if causal:
        A = A.masked_fill(~neighbourhood(A.shape[-1], causal=True), 0.0)
    return A


def mix_and_select(
    z: Tensor,
    A: Tensor,
    k: int,
    *,
    mix: str = "poe",
    lam: float = 1.0,
    top1_weight: str = "one",
    expert: Tensor | None = None,
) -> GraphRouting:
    """§2: gate logits ``z [B, S, E]`` mixed over ``A [B, S, S]``, then top-k. poe: z̃ = z + λ A z;
    logits: z̃ = (1 − λ) z + λ A z; probs: p̃ = (1 − λ) p + λ A p with p = softmax(z); else p̃ =
    softmax(z̃). The experts: the k largest p̃ (ties: the lower index). The weights: p̃ over them
    renormalised (probs: + 1e-9 in the denominator); at k = 1, ``top1_weight`` "one" (1) or
    "prob" (p̃). λ = 0 is the plain gate: top-k of z, the softmax over the selected logits (at
    k = 1 with "prob": p). ``expert [T, k]``: weigh this selection instead (a test that accepts
    another order of near-tied p̃). Returns ``[T, *]`` rows, T = B·S, row-major."""
    zd = z.double()
    B, S, E = zd.shape
    T = B * S
    graph = lam != 0 and T > 0
    z_mixed = None
    if mix == "probs" and graph:
        p = torch.softmax(zd, dim=-1)
        p_mixed = ((1 - lam) * p + lam * A.double() @ p).reshape(T, E)
        score = p_mixed
    else:
        self_coef = 1.0 if mix == "poe" else 1.0 - lam
        z_mixed = (self_coef * zd + lam * A.double() @ zd) if graph else zd
        z_mixed = z_mixed.reshape(T, E)
        p_mixed, score = torch.softmax(z_mixed, dim=-1), z_mixed
    if expert is None:
        expert = torch.sort(-score.detach(), dim=-1, stable=True).indices[:, :k]
    expert = expert.long()
    sel = torch.gather(p_mixed, 1, expert)
    if k == 1 and top1_weight == "prob":
        weight = sel
    elif z_mixed is not None:  # p̃ over the selection renormalised: the softmax of selected z̃
        weight = torch.softmax(torch.gather(z_mixed, 1, expert), dim=-1)
    elif k == 1:
        weight = torch.ones_like(sel)
    else:
        weight = sel / (sel.sum(dim=-1, keepdim=True) + _EPS)
    return GraphRouting(weight, expert.to(torch.int32), p_mixed)


def default_lam(mix: str, lam: float | None) -> float:
    """§4: λ = 1 for poe, 0.5 for the convex mixes, when not given."""
    if lam is not None:
        return lam
    return 1.0 if mix == "poe" else 0.5


def similarity_aware_routing(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    *,
    batch_shape: tuple[int, ...] | None = None,
    mix: str = "poe",
    lam: float | None = None,
    sim: str = "dot",
    tau: float = 1.0,
    causal: bool = False,
    window: int | None = None,
    topm: int | None = None,
    detach_graph: bool = False,
    top1_weight: str = "one",
    expert: Tensor | None = None,
) -> GraphRouting:
    """§2 Similarity-Aware routing of ``x [T, d]`` in float64: z = x Wᵀ (+ b); A the similarity
    graph of each sequence (``batch_shape`` ``(..., S)`` groups the tokens row-major; without
    it, or 1-D, the T tokens are one sequence); the mix, top-k after it, the weights.
    ``detach_graph``: no gradient through A. ``expert``: as :func:`mix_and_select`."""
    xd = x.double()
    z = xd @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    T, E = z.shape
    if batch_shape is None or len(batch_shape) < 2:
        B, S = 1, T
    else:
        S = int(batch_shape[-1])
        B = math.prod(int(n) for n in batch_shape[:-1])
    u, zs = xd.reshape(B, S, xd.shape[-1]), z.reshape(B, S, E)
    if detach_graph:
        u, zq = u.detach(), zs.detach()
    else:
        zq = zs
    A = similarity_graph(u, zq, sim=sim, tau=tau, causal=causal, window=window, topm=topm)
    lam = default_lam(mix, lam)
    return mix_and_select(zs, A, k, mix=mix, lam=lam, top1_weight=top1_weight, expert=expert)


def attention_aware_routing(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    attention: Tensor,
    k: int,
    *,
    mix: str = "poe",
    lam: float | None = None,
    heads: str | int = "mean",
    causal: bool = False,
    detach_graph: bool = False,
    top1_weight: str = "one",
    expert: Tensor | None = None,
) -> GraphRouting:
    """§2 Attention-Aware routing of ``x [T, d]`` in float64: z = x Wᵀ (+ b); A from the
    attention probabilities ``[B, H, S, S]`` (or ``[B, S, S]``), whose B and S group the T = B·S
    tokens row-major; the mix, top-k after it, the weights. ``detach_graph``: no gradient
    through A. ``expert``: as :func:`mix_and_select`."""
    xd = x.double()
    z = xd @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    T, E = z.shape
    B, S = attention.shape[0], attention.shape[-1]
    A = attention_graph(attention, heads=heads, causal=causal)
    if detach_graph:
        A = A.detach()
    lam = default_lam(mix, lam)
    zs = z.reshape(B, S, E)
    return mix_and_select(zs, A, k, mix=mix, lam=lam, top1_weight=top1_weight, expert=expert)
