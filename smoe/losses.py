"""Router auxiliary losses, returned unweighted: torch compositions around one pass of
``smoe.ops.router_stats`` over the logits (their softmax column sums and logsumexps)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from smoe import ops
from smoe.ops.stats import RouterStats


def switch_balance_loss(
    logits: Tensor,
    expert: Tensor,
    num_experts: int,
    *,
    first_choice_only: bool = False,
    stats_group: Any = None,
    stats: RouterStats | None = None,
) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e`` (specs/classic_routers.md §2).

    Args:
        logits: ``[T, E]`` router logits (P is the mean of their softmax).
        expert: ``[T, k]`` chosen experts before capacity dropping (-1 entries are ignored).
        num_experts: E.
        first_choice_only: False (default) counts all k choices divided by T, the convention of
            ST-MoE's code and transformers' ``load_balancing_loss_func`` (uniform routing gives k);
            True counts first choices only, as GShard / fairseq / Tutel (uniform gives 1).
        stats_group: a ``torch.distributed`` process group (or a
            :class:`smoe.parallel.GroupRef` holding one) whose ranks each hold their own
            tokens: the counts f (and T) are all-reduced over it (no gradient), P stays this
            rank's, so the mean over ranks of this loss, with equal T per rank, is the loss of
            all ranks' tokens at once (global-batch balancing) and its gradients, averaged as
            data parallelism does, are that loss's. None (default): this rank's tokens only.
        stats: ``smoe.ops.router_stats(logits)``, when the caller has it (a router that also
            returns :func:`router_z_loss` computes it once for both); None: computed here.

    Returns:
        A float32 scalar (float64 for float64 logits); multiply by the coefficient alpha (1e-2
        in Switch) yourself.
    """
    T = logits.shape[0]
    prob_sum = (ops.router_stats(logits) if stats is None else stats).prob_sum
    chosen = (expert[:, :1] if first_choice_only else expert).reshape(-1)
    # Counts by scatter-add of ones (exact in fp32 below 2^24 per expert); -1 entries add 0.
    # A one_hot would materialise [T, k, E] int64.
    valid = (chosen >= 0).to(prob_sum.dtype)
    counts = prob_sum.new_zeros(num_experts).scatter_add_(0, chosen.clamp_min(0).long(), valid)
    p = prob_sum / max(T, 1)
    n: int | Tensor = max(T, 1)  # the tokens f counts over
    if stats_group is not None:
        counts, n = _all_reduced_counts(counts, T, stats_group)
    f = counts / n
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor, *, stats: RouterStats | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(h_t)^2`` in float32 (float64 for float64 logits;
    specs/classic_routers.md §3). ``stats``: ``smoe.ops.router_stats(logits)`` when the caller
    has it (see :func:`switch_balance_loss`)."""
    lse = (ops.router_stats(logits) if stats is None else stats).lse
    return (lse * lse).sum() / max(logits.shape[0], 1)


def xmoe_balance_loss(
    scores: Tensor,
    expert: Tensor,
    num_experts: int,
    tau0: float | Tensor,
    *,
    stats_group: Any = None,
) -> Tensor:
    """X-MoE balance loss, Eq. 9 of Chi et al. 2022 (specs/xmoe.md §4): ``N Σ_i f_i P_i``.

    ``P_i`` is the mean over tokens of ``softmax(s / τ0)_i`` (τ0 fixed, not the learnable gate
    temperature), ``f_i`` the fraction of tokens whose top-1 expert is i (a count: the gradient
    flows through P only). 1 for a uniform assignment with uniform P, N when every token and all
    of P sit on one expert.

    Args:
        scores: ``[T, N]`` cosine scores s.
        expert: ``[T, k]`` chosen experts, best first (only the first column counts).
        num_experts: N.
        tau0: the fixed balance temperature (> 0).
        stats_group: global-batch counts f over a process group, as in
            :func:`switch_balance_loss`.

    Returns:
        A float32 scalar (float64 for float64 scores); the weight α = 0.01 is the caller's (see
        :class:`smoe.routing.xmoe.XMoERouter`).
    """
    return _balance(scores / tau0, expert[:, :1], num_experts, 1, stats_group)


def xmoe_community_balance_loss(
    scores: Tensor, expert: Tensor, num_experts: int, *, stats_group: Any = None
) -> Tensor:
    """The balance loss of fastmoe's ``CustomNaiveGate_Balance_XMoE`` (specs/xmoe.md §11).

    ``P = softmax(s / 0.3)``, ``f_i`` = top-k slots on expert i over ``T k``, ``P̄_i = Σ_t
    P_{t,i} / (T k)``, loss ``N Σ_i f_i P̄_i``: 1/k at perfect balance (not 1). The runs that
    report this router weight it 0.

    Args:
        scores: ``[T, N]`` raw scores s (tokens not normalised).
        expert: ``[T, k]`` chosen experts.
        num_experts: N.
        stats_group: global-batch counts f over a process group, as in
            :func:`switch_balance_loss`.

    Returns:
        A float32 scalar (float64 for float64 scores).
    """
    return _balance(scores / 0.3, expert, num_experts, max(expert.shape[1], 1), stats_group)


def _balance(
    logits: Tensor, chosen: Tensor, num_experts: int, slots: int, stats_group: Any = None
) -> Tensor:
    """``N Σ_i f_i P̄_i`` with ``f_i`` = entries of ``chosen`` on i over ``T·slots`` and ``P̄_i``
    = the sum over tokens of ``softmax(logits)_i`` over ``T·slots``; at least float32. With a
    ``stats_group``, f counts the tokens of all its ranks (see :func:`switch_balance_loss`)."""
    T = logits.shape[0]
    prob_sum = ops.router_stats(logits).prob_sum
    flat = chosen.reshape(-1)
    valid = (flat >= 0).to(prob_sum.dtype)
    counts = prob_sum.new_zeros(num_experts).scatter_add_(0, flat.clamp_min(0).long(), valid)
    total = max(T * slots, 1)
    if stats_group is not None:
        counts, n = _all_reduced_counts(counts, T, stats_group)
        f = counts / (n * slots)
    else:
        f = counts / total
    return num_experts * (f * (prob_sum / total)).sum()


def _all_reduced_counts(counts: Tensor, T: int, group: Any) -> tuple[Tensor, Tensor]:
    """Expert counts and the token count summed over ``group``'s ranks, without gradient (one
    all-reduce of E + 1 numbers); the token count floored at 1."""
    import torch.distributed as dist

    from smoe.parallel import resolve_group

    stats = torch.cat([counts, counts.new_full((1,), float(T))]).detach()
    dist.all_reduce(stats, group=resolve_group(group))
    return stats[:-1], stats[-1].clamp_min(1.0)


def _global_cv_squared(sums: Tensor, group: Any) -> Tensor:
    """The squared coefficient of variation of ``sums [E]`` summed over ``group``'s ranks.

    Its value is the global one on every rank; its gradient flows into this rank's ``sums``,
    scaled by the group's size, so that the mean of the ranks' gradients (data parallelism's
    average) is the global loss's gradient. One all-reduce of E numbers, none in backward."""
    import torch.distributed as dist

    from smoe.parallel import resolve_group

    group = resolve_group(group)
    total = sums.detach().clone()
    dist.all_reduce(total, group=group)
    loss = _cv_squared(sums + (total - sums.detach()))
    return loss.detach() + dist.get_world_size(group) * (loss - loss.detach())


def _at_least_fp32(t: Tensor) -> Tensor:
    # float32 math for half inputs (specs/vmoe.md §9); float64 stays float64 (gradcheck)
    return t if t.dtype == torch.float64 else t.float()


def _cv_squared(v: Tensor) -> Tensor:
    """(std / mean)^2 along the last dim, population std, with a tiny floor on the mean."""
    mean = v.mean(dim=-1)
    var = (v - mean.unsqueeze(-1)).square().mean(dim=-1)
    return var / mean.square().clamp_min(1e-20)


def _group_sums(t: Tensor, group_size: int | None) -> Tensor:
    """[T, E] -> [G, E] sums over consecutive groups of group_size tokens (None: one group).

    The last group may be shorter (zero rows pad it); the losses below only use these sums
    through a coefficient of variation, which does not depend on the group's size.
    """
    T, E = t.shape
    S = T if group_size is None else group_size
    if S < 1:
        raise ValueError(f"V-MoE losses: group_size must be >= 1 or None, got {group_size}")
    G = -(-T // S)
    return torch.nn.functional.pad(t, (0, 0, 0, G * S - T)).reshape(G, S, E).sum(dim=1)


def importance_loss(
    logits: Tensor, *, group_size: int | None = None, stats_group: Any = None
) -> Tensor:
    """V-MoE importance loss (specs/vmoe.md §4): per group, the squared coefficient of variation
    (population std) of ``Imp_e = sum_s softmax(l_s)_e`` over experts, averaged over groups.

    Args:
        logits: ``[T, E]`` clean (noise-free) router logits.
        group_size: tokens per routing group (None: all T tokens form one group; the last
            group may be shorter).
        stats_group: with ``group_size=None``, a process group whose ranks each hold their own
            tokens: Imp is summed over all its ranks (global-batch statistics; the value is the
            global loss on every rank, and the mean of the ranks' gradients is its gradient).
            Routing groups (``group_size``) never span ranks, so it changes nothing there.

    Returns:
        A float32 scalar (float64 for float64 logits): 0 for perfectly uniform importance,
        E - 1 with all mass on one expert. Weight 0.005 in V-MoE's configs.
    """
    if stats_group is not None and group_size is None:
        imp = ops.router_stats(logits).prob_sum
        return _global_cv_squared(imp, stats_group)  # every rank, even with T = 0
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    if group_size is None:  # one group: Imp is router_stats' column sum (one pass)
        return _cv_squared(ops.router_stats(logits).prob_sum)
    p = torch.softmax(_at_least_fp32(logits), dim=-1)
    return _cv_squared(_group_sums(p, group_size)).mean()


def load_loss(
    logits: Tensor,
    noisy_logits: Tensor,
    k: int,
    noise_std: float,
    *,
    group_size: int | None = None,
    stats_group: Any = None,
) -> Tensor:
    """V-MoE load loss (specs/vmoe.md §4), per group then averaged over groups.

    ``P[s, e] = 1 - Phi((threshold_s - l[s, e]) / sigma)`` with ``threshold_s`` the k-th largest
    *noisy* logit of token s (no exclusion of e itself, as in vmoe's code), ``Load_e = mean_s P``,
    loss = squared coefficient of variation of Load over experts.

    Args:
        logits: ``[T, E]`` clean router logits l.
        noisy_logits: ``[T, E]`` the logits with the training noise added (l + eps).
        k: experts per token.
        noise_std: sigma, the std of the noise that was added (V-MoE: 1/E); must be > 0.
        group_size: as in :func:`importance_loss`.
        stats_group: as in :func:`importance_loss` (Load summed over the group's ranks).

    Returns:
        A float32 scalar (float64 for float64 logits; weight 0.005 in V-MoE's configs). The
        gradient flows into both the clean logits and, through the threshold's gather, the
        noisy ones (as in vmoe).
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss: noise_std must be > 0, got {noise_std}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"load_loss: k must be in [1, E] = [1, {logits.shape[1]}], got {k}")
    global_stats = stats_group is not None and group_size is None
    if logits.shape[0] == 0 and not global_stats:
        return logits.new_zeros((), dtype=torch.float32)
    clean = _at_least_fp32(logits)
    threshold = torch.topk(_at_least_fp32(noisy_logits), k, dim=-1).values[:, k - 1 : k]
    z = (threshold - clean) / noise_std
    p = 0.5 * torch.erfc(z / math.sqrt(2.0))  # 1 - Phi(z), accurate in the tails
    if global_stats:
        return _global_cv_squared(p.sum(dim=0), stats_group)  # every rank, even with T = 0
    return _cv_squared(_group_sums(p, group_size)).mean()


#: Default coefficient of every auxiliary loss a router may report, by its name in
#: ``Routing.aux``: Switch/ST-MoE's balance 1e-2 and z 1e-3, V-MoE's importance and load 5e-3.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "balance": 1e-2,
    "z": 1e-3,
    "importance": 5e-3,
    "load": 5e-3,
    # S2MoE (specs/s2moe.md §4): InfoNCE β_unc 0.1, s2moe_implement's KL-to-uniform balance 1e-2
    "s2moe_unc": 0.1,
    "kl_uniform": 1e-2,
}
