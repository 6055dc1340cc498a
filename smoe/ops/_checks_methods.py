"""The argument checks of the method-specific kernels (csrc/checks.h: cosine_scores;
checks_usmoe.h; checks_graph.h; checks_momentum.h; checks_s2moe.h), for their fakes: the same
checks in the same order with the same messages (see :mod:`smoe.ops._checks`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smoe.ops._checks import check, check_float, num, scalar_name, sizes
from smoe.ops._common import acc_dtype


# ---- X-MoE (checks.h) -----------------------------------------------------------------------
def check_cosine_scores(
    op: str, h: Tensor, proj: Tensor, expert_emb: Tensor, temperature: Tensor, eps: float
) -> None:
    for name, t in (("proj", proj), ("expert_emb", expert_emb), ("temperature", temperature)):
        check(t.device == h.device, op, name, " must be on ", h.device, " like h, got ", t.device)
    check_float(op, "h", h)
    for name, t in (("proj", proj), ("expert_emb", expert_emb)):
        check(t.dtype == h.dtype, op, name, " must have h's dtype ", scalar_name(h.dtype),
              ", got ", scalar_name(t.dtype))  # fmt: skip
    check_float(op, "temperature", temperature)
    check(h.dim() == 2, op, "h must be 2-D [T, d], got ", h.dim(), "-D")
    ok = proj.dim() == 2 and proj.shape[-1] == h.shape[1] and proj.shape[0] >= 1
    check(ok, op, "proj must be [d_e, d] with d = h.size(1) = ", h.shape[1],
          " and d_e >= 1, got shape ", sizes(proj))  # fmt: skip
    d_e = proj.shape[0]
    ok = expert_emb.dim() == 2 and expert_emb.shape[-1] == d_e and expert_emb.shape[0] >= 1
    check(ok, op, "expert_emb must be [N, d_e] with d_e = proj.size(0) = ", d_e,
          " and N >= 1, got shape ", sizes(expert_emb))  # fmt: skip
    check(temperature.dim() == 0, op, "temperature must be a 0-dim (scalar) tensor, got shape ",
          sizes(temperature))  # fmt: skip
    check(0 < eps < math.inf, op, "eps must be finite and > 0, got ", num(eps))


def check_cosine_scores_backward(
    grad_cos: Tensor,
    grad_logits: Tensor,
    h: Tensor,
    proj: Tensor,
    expert_emb: Tensor,
    temperature: Tensor,
    eps: float,
) -> None:
    op = "cosine_scores_backward"
    check_cosine_scores(op, h, proj, expert_emb, temperature, eps)
    out = acc_dtype(h)
    T, N = h.shape[0], expert_emb.shape[0]
    for name, g in (("grad_cos", grad_cos), ("grad_logits", grad_logits)):
        ok = (
            g.device == h.device
            and g.dtype == out
            and g.dim() == 2
            and g.shape[0] == T
            and g.shape[1] == N
        )
        check(ok, op, name, " must be [T, N] = [", T, ", ", N, "] ", scalar_name(out), " on ",
              h.device, ", got ", sizes(g), " ", scalar_name(g.dtype), " on ",
              g.device)  # fmt: skip


# ---- USMoE (checks_usmoe.h) -------------------------------------------------------------------
def check_unified_topk(scores: Tensor, n: int, counts: Tensor | None) -> None:
    op = "unified_topk"
    check_float(op, "scores", scores)
    check(scores.dim() == 2, op, "scores must be 2-D [G, L], got ", scores.dim(), "-D")
    L = scores.shape[1]
    check(L < 2**31 - 1, op, "scores must have fewer than 2^31 - 1 columns (L), got ", L)
    check(0 <= n <= L, op, "n must be in [0, L] = [0, ", L, "], got ", n)
    if counts is None:
        return
    check(counts.device == scores.device, op, "counts must be on ", scores.device,
          " like scores, got ", counts.device)  # fmt: skip
    check(counts.dtype == torch.int64, op, "counts must be int64, got ", scalar_name(counts.dtype))
    check(counts.dim() == 1 and counts.shape[0] == scores.shape[0], op, "counts must be [G] = [",
          scores.shape[0], "], got ", sizes(counts))  # fmt: skip


# ---- Similarity- / Attention-Aware SMoE (checks_graph.h) ------------------------------------
def _graph_device(op: str, name: str, t: Tensor, x: Tensor) -> None:
    check(t.device == x.device, op, name, " must be on ", x.device, " like x, got ", t.device)


def _graph_dtype(op: str, name: str, t: Tensor, x: Tensor) -> None:
    check(t.dtype == x.dtype, op, name, " must have x's dtype ", scalar_name(x.dtype), ", got ",
          scalar_name(t.dtype))  # fmt: skip


def graph_option_error(self_coef: float, lam: float) -> str | None:
    """The first bad option of graph_mix in the kernel's order and words, or None. Comparisons,
    not math.isfinite (dynamo traces the wrapper's call); NaN fails each. The wrapper raises it as
    a ValueError, the fakes as the kernel's RuntimeError."""
    if not -math.inf < self_coef < math.inf:
        return f"self_coef must be finite, got {num(self_coef)}"
    if not 0 <= lam < math.inf:
        return f"lam must be >= 0 and finite, got {num(lam)}"
    return None


def check_graph_mix(
    op: str, x: Tensor, A: Tensor, cache: Tensor | None, self_coef: float, lam: float
) -> None:
    _graph_device(op, "A", A, x)
    if cache is not None:
        _graph_device(op, "cache", cache, x)
    check_float(op, "x", x)
    _graph_dtype(op, "A", A, x)
    if cache is not None:
        _graph_dtype(op, "cache", cache, x)
    check(x.dim() == 3, op, "x must be 3-D [B, S, E], got ", x.dim(), "-D")
    check(A.dim() == 3, op, "A must be 3-D [B, S, S'], got ", A.dim(), "-D")
    B, S, E = x.shape
    C = 0
    if cache is not None:
        ok = cache.dim() == 3 and cache.shape[0] == B and cache.shape[-1] == E
        check(ok, op, "cache must be [B, C, E] with B = ", B, " and E = ", E,
              " (x's), got shape ", sizes(cache))  # fmt: skip
        C = cache.shape[1]
    ok = A.shape[0] == B and A.shape[1] == S and A.shape[2] == C + S
    check(ok, op, "A must be [B, S, S'] = [", B, ", ", S, ", ", C + S,
          "] (B, S from x; S' = C + S with C = ", C, " cached rows), got ", sizes(A))  # fmt: skip
    problem = graph_option_error(self_coef, lam)
    check(problem is None, op, problem)


def check_graph_mix_backward(
    grad: Tensor, x: Tensor, A: Tensor, cache: Tensor | None, self_coef: float, lam: float
) -> None:
    op = "graph_mix_backward"
    _graph_device(op, "grad", grad, x)
    check_graph_mix(op, x, A, cache, self_coef, lam)
    _graph_dtype(op, "grad", grad, x)
    check(tuple(grad.shape) == tuple(x.shape), op, "grad must have x's shape [B, S, E] = ",
          sizes(x), ", got ", sizes(grad))  # fmt: skip


# ---- MomentumSMoE / AdamSMoE / Robust Momentum (checks_momentum.h) ---------------------------
MOMENTUM_KINDS = ("heavy_ball", "adam", "robust")


# (name, rule) in the kernel's order; each rule a range that NaN fails
_MOMENTUM_RANGES = (
    ("mu", "unit"), ("gamma", "nonneg"), ("sign", "sign"), ("beta1", "unit"), ("beta2", "unit"),
    ("gamma1", "nonneg"), ("eps", "positive"), ("robust_a", "positive"), ("robust_b", "unit"),
)  # fmt: skip
_RULES = {
    "unit": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "nonneg": (lambda x: 0 <= x < math.inf, "must be finite and >= 0"),
    "positive": (lambda x: 0 < x < math.inf, "must be finite and > 0"),
    "sign": (lambda x: x in (1.0, -1.0), "must be -1 or +1"),
}


def momentum_option_error(o: dict) -> str | None:
    """The first bad option of momentum_update (``o``: kind, mu, gamma, ...) in the kernel's order
    and words, or None. Comparisons only (dynamo traces the wrapper's call): the wrapper raises
    it as a ValueError, the fakes as the kernel's RuntimeError."""
    if o["kind"] not in MOMENTUM_KINDS:
        return f"kind must be 'heavy_ball', 'adam' or 'robust', got '{o['kind']}'"
    for name, rule in _MOMENTUM_RANGES:
        ok, says = _RULES[rule]
        if not ok(o[name]):
            return f"{name} {says}, got {num(o[name])}"
    return None


def _momentum_like(op: str, name: str, t: Tensor, u: Tensor, dtype, what: str) -> None:
    check(t.device == u.device, op, name, " must be on ", u.device, " like u, got ", t.device)
    check(t.dtype == dtype, op, name, " must be ", scalar_name(dtype), " (", what, " for ",
          scalar_name(u.dtype), " u), got ", scalar_name(t.dtype))  # fmt: skip
    check(tuple(t.shape) == tuple(u.shape), op, name, " must have u's shape ", sizes(u),
          ", got ", sizes(t))  # fmt: skip


def check_momentum_update(
    op: str, u: Tensor, m: Tensor, p: Tensor | None, v: Tensor | None, kw: dict
) -> bool:
    """``kw``: the op's keyword options (kind, mu, ...). Returns True for kind='adam'."""
    problem = momentum_option_error(kw)
    check(problem is None, op, problem)
    check_float(op, "u", u)
    state = acc_dtype(u)
    _momentum_like(op, "m", m, u, state, "the state dtype")
    adam = kw["kind"] == "adam"
    for name, t in (("p", p), ("v", v)):
        check(not adam or t is not None, op, name,
              " must be given when kind='adam' (the Adam state)")  # fmt: skip
        check(adam or t is None, op, name, " must be None unless kind='adam', got a tensor")
        if adam:
            _momentum_like(op, name, t, u, state, "the state dtype")
    return adam


def check_momentum_update_backward(
    grad_delta: Tensor,
    grad_m: Tensor,
    grad_p: Tensor,
    grad_v: Tensor,
    u: Tensor,
    m: Tensor,
    p: Tensor | None,
    v: Tensor | None,
    kw: dict,
) -> bool:
    op = "momentum_update_backward"
    adam = check_momentum_update(op, u, m, p, v, kw)
    state = acc_dtype(u)
    _momentum_like(op, "grad_delta", grad_delta, u, u.dtype, "delta's dtype")
    _momentum_like(op, "grad_m", grad_m, u, state, "the state dtype")
    for name, g in (("grad_p", grad_p), ("grad_v", grad_v)):
        if adam:
            _momentum_like(op, name, g, u, state, "the state dtype")
            continue
        ok = g.device == u.device and g.dtype == state and g.dim() == 1 and g.numel() == 0
        check(ok, op, name, " must be an empty [0] ", scalar_name(state), " tensor on ", u.device,
              " unless kind='adam' (the op returns no p, v), got ", sizes(g), " ",
              scalar_name(g.dtype), " on ", g.device)  # fmt: skip
    return adam


# ---- S2MoE (checks_s2moe.h) -------------------------------------------------------------------
def check_s2moe_perturb(op: str, x: Tensor, n1: Tensor, n2: Tensor, stats: dict) -> None:
    """check_s2moe_perturb, then perturb_view's checks of the statistics ``stats`` (mu, s_mul,
    s_add, in that order)."""
    check_float(op, "x", x)
    for name, t in {"n1": n1, "n2": n2, **stats}.items():
        check(t.device == x.device, op, name, " must be on ", x.device, " like x, got ", t.device)
        check(t.dtype == x.dtype, op, name, " must have x's dtype ", scalar_name(x.dtype),
              ", got ", scalar_name(t.dtype))  # fmt: skip
    check(x.dim() >= 1, op, "x must have at least one dim, got a 0-dim tensor")
    for name, t in (("n1", n1), ("n2", n2)):
        check(tuple(t.shape) == tuple(x.shape), op, name, " must have x's shape ", sizes(x),
              ", got ", sizes(t))  # fmt: skip


def check_s2moe_perturb_backward(grad: Tensor, x: Tensor) -> None:
    op = "s2moe_perturb_backward"
    ok = tuple(grad.shape) == tuple(x.shape) and grad.dtype == x.dtype and grad.device == x.device
    check(ok, op, "grad must match x's shape ", sizes(x), ", dtype and device, got ",
          sizes(grad), " ", scalar_name(grad.dtype), " on ", grad.device)  # fmt: skip


def check_perturb_view(op: str, x: Tensor, stats: dict) -> None:
    D = x.dim()
    run = None  # the broadcast run [p, q) of the first statistic that is not one value
    for name, t in stats.items():
        if t.numel() == 1:
            continue
        check(t.dim() == D, op, name, " must have x's rank ", D,
              " (size 1 along the dims it is broadcast over) or one element, got shape ",
              sizes(t))  # fmt: skip
        dims = []
        for d in range(D):
            broadcast = t.shape[d] == 1 and x.shape[d] != 1
            check(broadcast or t.shape[d] == x.shape[d], op, name,
                  " must broadcast to x's shape ", sizes(x), ", got ", sizes(t))  # fmt: skip
            if broadcast:
                dims.append(d)
        p, q = (dims[0], dims[-1] + 1) if dims else (D, D)
        for d in range(p, q):
            check(t.shape[d] == 1 or x.shape[d] == 1, op, name,
                  " must be broadcast over one run of consecutive dims of x, got shape ",
                  sizes(t), " for x ", sizes(x))  # fmt: skip
        run = (p, q) if run is None else run
        check(run == (p, q), op, "mu, s_mul and s_add must be broadcast over the same dims of x ",
              "(or be one value), got ", name, " of shape ", sizes(t))  # fmt: skip
