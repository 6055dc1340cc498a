"""Float64 oracles of the optimal-transport routers (specs/sinkhorn_ssr.md): Sinkhorn in the log
domain (differentiable by autograd: the unrolled backward's oracle), the scaling form, and SSR's
gates from a plan. Re-exported by :mod:`smoe.reference`; library code never imports it."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinkhorn(
    scores: Tensor,
    *,
    eps: float,
    max_iter: int,
    row_mass: float = 1.0,
    col_mass: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """specs/sinkhorn_ssr.md §3 in float64, the op's iteration order: f = 0; max_iter times
    g = log c − logsumexp_t(S + f), f = log r − logsumexp_e(S + g), S = scores / eps.
    Returns (log_plan [T, E], f [T], g [E]), differentiable w.r.t. scores; at T = 0 an empty
    plan and zero potentials (the op's convention)."""
    S = scores.double() / eps
    T, E = S.shape
    if T == 0:
        return S.clone(), S.new_zeros(0), S.new_zeros(E)
    c = T * row_mass / E if col_mass is None else col_mass
    f = S.new_zeros(T)
    g = S.new_zeros(E)
    for _ in range(max_iter):
        g = math.log(c) - torch.logsumexp(S + f[:, None], dim=0)
        f = math.log(row_mass) - torch.logsumexp(S + g[None, :], dim=1)
    return f[:, None] + S + g[None, :], f, g


def sinkhorn_scaling(
    scores: Tensor,
    *,
    eps: float,
    max_iter: int,
    row_mass: float = 1.0,
    col_mass: float | None = None,
) -> Tensor:
    """The plan by the scaling form (§3): K = exp(S − max S), u = 1; max_iter times
    v = c ⊘ (Kᵀ u), u = r ⊘ (K v); Π = diag(u) K diag(v). Float64."""
    S = scores.double() / eps
    T, E = S.shape
    c = T * row_mass / E if col_mass is None else col_mass
    K = torch.exp(S - S.max())
    u = S.new_ones(T)
    v = S.new_ones(E)
    for _ in range(max_iter):
        v = c / (K.T @ u)
        u = row_mass / (K @ v)
    return u[:, None] * K * v[None, :]


def plan_gates(plan: Tensor, k: int, route_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """§4: the k largest entries of each plan row (ties to the lower expert), renormalised to sum
    to ``route_scale``. Returns (expert [T, k] int32, weight [T, k] float64)."""
    p = plan.double()
    expert = torch.sort(-p, dim=-1, stable=True).indices[:, :k]
    picked = torch.gather(p, 1, expert)
    return expert.to(torch.int32), route_scale * picked / picked.sum(-1, keepdim=True)
