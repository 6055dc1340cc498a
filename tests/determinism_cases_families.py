"""The determinism cases of the router families' ops, joined into tests/determinism_cases.py's
OP_CASES: cosine_scores (X-MoE) T = 700 tokens, N = 16 experts, d_e = 8, d = 96; sinkhorn T = 1500,
E = 16, 20 iterations; momentum_update [24, 4096] (12 CPU blocks) of every kind; graph_mix B = 3
sequences of 200 tokens with 56 cached rows, E = 160 (13 row tiles, 2 column tiles, 4 grad_A
column tiles per sequence); each in fp32 and bf16, forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tests.determinism_inputs import Results
from tests.determinism_inputs import randn as _randn

COS_T, COS_N, COS_DE, COS_D = 700, 16, 8, 96  # cosine_scores: tokens, experts, d_e, d
COS_DTYPES = (torch.float32, torch.bfloat16)


def _cosine_inputs(device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h [700, 96], proj [8, 96], expert_emb [16, 8] in dtype and a float32 temperature."""
    h = _randn(COS_T, COS_D, salt=16, device=device, dtype=dtype)
    proj = _randn(COS_DE, COS_D, salt=17, device=device, dtype=dtype, scale=0.1)
    emb = _randn(COS_N, COS_DE, salt=18, device=device, dtype=dtype)
    return h, proj, emb, torch.tensor(0.3, device=device)


def _cosine_scores(device: str) -> Results:
    out = {}
    for dtype in COS_DTYPES:
        for norm in (True, False):
            cos, logits = torch.ops.smoe.cosine_scores.default(
                *_cosine_inputs(device, dtype), normalize_tokens=norm
            )
            out |= {f"cos_{dtype}_{norm}": cos, f"logits_{dtype}_{norm}": logits}
    return out


def _cosine_scores_backward(device: str) -> Results:
    out = {}
    g_cos = _randn(COS_T, COS_N, salt=19, device=device)
    g_logits = _randn(COS_T, COS_N, salt=20, device=device)
    for dtype in COS_DTYPES:
        for norm in (True, False):
            grads = torch.ops.smoe.cosine_scores_backward.default(
                g_cos, g_logits, *_cosine_inputs(device, dtype), 1e-4, norm
            )
            names = ("h", "proj", "expert_emb", "temperature")
            out |= {f"grad_{n}_{dtype}_{norm}": g for n, g in zip(names, grads)}
    return out


SK_T, SK_E, SK_ITERS = 1500, 16, 20  # sinkhorn: tokens (6 reduction chunks), experts, iterations
SK_DTYPES = (torch.float32, torch.bfloat16)


def _sinkhorn(device: str) -> Results:
    out = {}
    for dtype in SK_DTYPES:
        scores = _randn(SK_T, SK_E, salt=21, device=device, dtype=dtype)
        res = torch.ops.smoe.sinkhorn.default(scores, eps=0.1, max_iter=SK_ITERS)
        names = ("log_plan", "f", "g", "iters_done", "row_err", "col_err", "f_hist", "g_hist")
        out |= {f"{n}_{dtype}": t for n, t in zip(names, res)}
    return out


def _sinkhorn_backward(device: str) -> Results:
    out = {}
    for dtype in SK_DTYPES:
        scores = _randn(SK_T, SK_E, salt=21, device=device, dtype=dtype)
        res = torch.ops.smoe.sinkhorn.default(scores, eps=0.1, max_iter=SK_ITERS)
        grads = (
            _randn(SK_T, SK_E, salt=22, device=device),
            _randn(SK_T, salt=23, device=device),
            _randn(SK_E, salt=24, device=device),
        )
        out[f"grad_{dtype}"] = torch.ops.smoe.sinkhorn_backward.default(
            *grads, scores, res[6], res[7], res[3], 0.1
        )
    return out


MOM_SHAPE = (24, 4096)  # momentum_update: 98304 elements, 12 blocks of the CPU kernel
MOM_DTYPES = (torch.float32, torch.bfloat16)
MOM_KINDS = ("heavy_ball", "adam", "robust")


def _momentum_inputs(device: str, dtype: torch.dtype, kind: str):
    """u [24, 4096] in dtype, the float32 state m (and Adam's p, v >= 0)."""
    u = _randn(*MOM_SHAPE, salt=25, device=device, dtype=dtype)
    m = _randn(*MOM_SHAPE, salt=26, device=device)
    if kind != "adam":
        return u, m, None, None
    p = _randn(*MOM_SHAPE, salt=27, device=device, scale=0.3)
    return u, m, p, _randn(*MOM_SHAPE, salt=28, device=device).abs()


def _momentum_update(device: str) -> Results:
    out = {}
    for dtype in MOM_DTYPES:
        for kind in MOM_KINDS:
            res = torch.ops.smoe.momentum_update.default(
                *_momentum_inputs(device, dtype, kind), kind=kind
            )
            out |= {f"{n}_{kind}_{dtype}": t for n, t in zip(("delta", "m", "p", "v"), res)}
    return out


def _momentum_update_backward(device: str) -> Results:
    out = {}
    g = [_randn(*MOM_SHAPE, salt=29 + i, device=device) for i in range(4)]
    empty = torch.empty(0, device=device)
    for dtype in MOM_DTYPES:
        for kind in MOM_KINDS:
            adam = kind == "adam"
            grads = torch.ops.smoe.momentum_update_backward.default(
                g[0].to(dtype),
                g[1],
                g[2] if adam else empty,
                g[3] if adam else empty,
                *_momentum_inputs(device, dtype, kind),
                kind=kind,
            )
            out |= {f"grad_{n}_{kind}_{dtype}": t for n, t in zip(("u", "m", "p", "v"), grads)}
    return out


GM_B, GM_S, GM_E, GM_C = 3, 200, 160, 56  # graph_mix: batch, tokens, experts, cached rows
GM_DTYPES = (torch.float32, torch.bfloat16)


def _graph_inputs(device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x [3, 200, 160], A [3, 200, 256] (softmax rows), cache [3, 56, 160]."""
    x = _randn(GM_B, GM_S, GM_E, salt=33, device=device, dtype=dtype)
    logits = _randn(GM_B, GM_S, GM_C + GM_S, salt=34, device=device, scale=2.0)
    cache = _randn(GM_B, GM_C, GM_E, salt=35, device=device, dtype=dtype)
    return x, torch.softmax(logits, dim=-1).to(dtype), cache


def _graph_mix(device: str) -> Results:
    out = {}
    for dtype in GM_DTYPES:
        for lam in (1.0, 0.0):
            res = torch.ops.smoe.graph_mix.default(
                *_graph_inputs(device, dtype), self_coef=0.5, lam=lam
            )
            out[f"out_lam{lam}_{dtype}"] = res
    return out


def _graph_mix_backward(device: str) -> Results:
    out = {}
    for dtype in GM_DTYPES:
        g = _randn(GM_B, GM_S, GM_E, salt=36, device=device, dtype=dtype)
        grads = torch.ops.smoe.graph_mix_backward.default(
            g, *_graph_inputs(device, dtype), self_coef=0.5, lam=1.5
        )
        out |= {f"grad_{n}_{dtype}": t for n, t in zip(("x", "A"), grads)}
    return out


OP_CASES: dict[str, Callable[[str], Results]] = {
    "cosine_scores": _cosine_scores,
    "cosine_scores_backward": _cosine_scores_backward,
    "sinkhorn": _sinkhorn,
    "sinkhorn_backward": _sinkhorn_backward,
    "momentum_update": _momentum_update,
    "momentum_update_backward": _momentum_update_backward,
    "graph_mix": _graph_mix,
    "graph_mix_backward": _graph_mix_backward,
}
