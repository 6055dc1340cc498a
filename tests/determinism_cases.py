"""The determinism cases of tests/test_determinism.py, shared with the child process it starts.

Each case builds its inputs from a fixed seed (never from the global RNG state), runs one smoe op,
or an :class:`smoe.MoELayer` forward and backward, and returns its results by name. The shapes are
big enough that every CPU kernel splits its work into several work items: the ops see T = 3000
tokens, E = 8, k = 2, d = 64, and grouped_mm 6000 rows in uneven groups (one empty, padding rows
past offsets[E]) and 384 output columns, in fp32, bf16 and fp16 (expert_mlp likewise:
tests/determinism_cases_expert_mlp.py); cosine_scores sees T = 700
tokens, N = 16 experts, d_e = 8, d = 96, in fp32 and bf16; sinkhorn T = 1500, E = 16, 20
iterations in fp32 and bf16; momentum_update [24, 4096] (12 CPU blocks) of every kind in fp32 and
bf16; graph_mix B = 3 sequences of 200 tokens with 56 cached rows, E = 160 (13 row tiles, 2 column
tiles, 4 grad_A column tiles per sequence) in fp32 and bf16; unified_topk 48 groups of 512 tied
scores (tests/determinism_cases_usmoe.py); gate_linear 4100 tokens x 300 experts
(tests/determinism_cases_gate.py); s2moe_perturb 262144 elements with sequence, token,
batch and scalar statistics (tests/determinism_cases_s2moe.py); the layers route 1536 tokens
(attention-aware routing with causal attention probabilities [6, 4, 256, 256]).

Run as ``python -m tests.determinism_cases OUT N1 [N2 ...] [--layers-only]`` from the repository
root, it saves ``{n: {case: results}}`` to OUT with :func:`torch.save`: every case (or only the
layer cases) run at ``torch.set_num_threads(n)`` for each n.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

import smoe  # noqa: F401  (loads the ops)
from smoe import MoELayer, RoutingContext
from smoe.routing.registry import available_routers, router_info
from tests.determinism_cases_expert_mlp import OP_CASES as EXPERT_MLP_CASES
from tests.determinism_cases_gate import OP_CASES as GATE_CASES
from tests.determinism_cases_s2moe import OP_CASES as S2MOE_CASES
from tests.determinism_cases_usmoe import OP_CASES as USMOE_CASES

T, E, K, D = 3000, 8, 2, 64
M, D_OUT = T * K, 384  # grouped_mm rows and output columns (column blocks of 256 and 128)
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # MKL, and oneDNN on CPU
COS_T, COS_N, COS_DE, COS_D = 700, 16, 8, 96  # cosine_scores: tokens, experts, d_e, d
COS_DTYPES = (torch.float32, torch.bfloat16)
SEED = 1234

Results = dict[str, Tensor]


def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def _randn(*shape: int, salt: int, device: str, dtype=torch.float32, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=_gen(salt)) * scale).to(device=device, dtype=dtype)


def _logits(device: str) -> Tensor:
    return _randn(T, E, salt=1, device=device, scale=3.0)


def _topk(device: str):
    return torch.ops.smoe.topk_softmax.default(_logits(device), K, renormalize=True)


def _plan(device: str, capacity: int | None = 700):
    """A plan with dropped slots (capacity 700 < the 750 a balanced expert gets)."""
    _, expert = _topk(device)
    priority = _randn(T, salt=2, device=device)
    return torch.ops.smoe.make_plan.default(expert, E, capacity=capacity, priority=priority)


def _offsets(device: str) -> Tensor:
    """Uneven groups over M rows: one group empty, one over 1000 rows, 100 padding rows."""
    sizes = [900, 0, 1100, 300, 700, 1000, 1200, 700]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == M - 100
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def _weights(device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    w = _randn(E, D_OUT, D, salt=3, device=device, dtype=dtype, scale=0.1)
    return {"wT": w.transpose(1, 2), "w": w.transpose(1, 2).contiguous()}


# ---- one case per op: name -> fn(device) -> results ------------------------------------------
def _topk_softmax(device: str) -> Results:
    out = {}
    for renorm in (True, False):
        w, ex = torch.ops.smoe.topk_softmax.default(_logits(device), K, renormalize=renorm)
        out |= {f"weight_{renorm}": w, f"expert_{renorm}": ex}
    return out


def _topk_softmax_backward(device: str) -> Results:
    _, expert = _topk(device)
    g = _randn(T, K, salt=4, device=device)
    return {
        f"grad_{renorm}": torch.ops.smoe.topk_softmax_backward.default(
            g, _logits(device), expert, renorm
        )
        for renorm in (True, False)
    }


def _topk_sigmoid(device: str) -> Results:
    out = {}
    bias = _randn(E, salt=6, device=device, scale=0.1)
    for renorm, b in ((True, bias), (False, None)):
        w, ex = torch.ops.smoe.topk_sigmoid.default(
            _logits(device), K, b, n_group=4, topk_group=2, renormalize=renorm, scale=2.5
        )
        out |= {f"weight_{renorm}": w, f"expert_{renorm}": ex}
    return out


def _topk_sigmoid_backward(device: str) -> Results:
    logits = _logits(device)
    _, expert = torch.ops.smoe.topk_sigmoid.default(logits, K, n_group=4, topk_group=2)
    g = _randn(T, K, salt=4, device=device)
    return {
        f"grad_{renorm}": torch.ops.smoe.topk_sigmoid_backward.default(
            g, logits, expert, renorm, 2.5
        )
        for renorm in (True, False)
    }


def _expert_choice(device: str) -> Results:
    out = {}
    for group in (None, 1000):
        res = torch.ops.smoe.expert_choice.default(_logits(device), T * K // E, group_size=group)
        out |= {f"{i}_{group}": t for i, t in enumerate(res)}
    return out


def _expert_choice_backward(device: str) -> Results:
    logits = _logits(device)
    *_, row = torch.ops.smoe.expert_choice.default(logits, T * K // E)
    g = _randn(T, E, salt=5, device=device)
    return {"grad": torch.ops.smoe.expert_choice_backward.default(g, logits, row)}


def _make_plan(device: str) -> Results:
    out = {f"{i}_free": t for i, t in enumerate(_plan(device, capacity=None))}
    return out | {f"{i}_bpr": t for i, t in enumerate(_plan(device))}


def _permute(device: str) -> Results:
    _, token, _, row, _ = _plan(device)
    x = _randn(T, D, salt=6, device=device)
    return {"out": torch.ops.smoe.permute.default(x, token, row)}


def _permute_backward(device: str) -> Results:
    *_, row, _ = _plan(device)
    g = _randn(M, D, salt=7, device=device)
    return {"grad": torch.ops.smoe.permute_backward.default(g, row)}


def _combine(device: str) -> Results:
    weight, _ = _topk(device)
    _, token, slot, row, _ = _plan(device)
    ys = _randn(M, D, salt=8, device=device)
    return {"out": torch.ops.smoe.combine.default(ys, weight, token, slot, row)}


def _combine_backward(device: str) -> Results:
    weight, _ = _topk(device)
    _, token, slot, row, _ = _plan(device)
    ys = _randn(M, D, salt=8, device=device)
    g = _randn(T, D, salt=9, device=device)
    gys, gw = torch.ops.smoe.combine_backward.default(g, ys, weight, token, slot, row)
    return {"grad_y_sorted": gys, "grad_weight": gw}


def _grouped_mm(device: str) -> Results:
    out = {}
    for dtype in GEMM_DTYPES:
        x = _randn(M, D, salt=10, device=device, dtype=dtype)
        for layout, w in _weights(device, dtype).items():
            out[f"{layout}_{dtype}"] = torch.ops.smoe.grouped_mm.default(x, w, _offsets(device))
        b = _randn(w.shape[0], D_OUT, salt=13, device=device, dtype=dtype)
        out[f"bias_{dtype}"] = torch.ops.smoe.grouped_mm.default(x, w, _offsets(device), b)
    return out


def _grouped_mm_bias_backward(device: str) -> Results:
    out = {}
    for dtype in GEMM_DTYPES:
        g = _randn(M, D_OUT, salt=11, device=device, dtype=dtype)
        out[str(dtype)] = torch.ops.smoe.grouped_mm_bias_backward.default(g, _offsets(device))
    return out


def _grouped_mm_backward(device: str) -> Results:
    out = {}
    for dtype in GEMM_DTYPES:
        x = _randn(M, D, salt=10, device=device, dtype=dtype)
        g = _randn(M, D_OUT, salt=11, device=device, dtype=dtype)
        for layout, w in _weights(device, dtype).items():
            gx, gw = torch.ops.smoe.grouped_mm_backward.default(
                g, x, w, _offsets(device), True, True
            )
            out |= {f"gx_{layout}_{dtype}": gx, f"gw_{layout}_{dtype}": gw}
    return out


def _swiglu(device: str) -> Results:
    return {"out": torch.ops.smoe.swiglu.default(_randn(M, 2 * D, salt=12, device=device))}


def _swiglu_backward(device: str) -> Results:
    h = _randn(M, 2 * D, salt=12, device=device)
    g = _randn(M, D, salt=13, device=device)
    return {"grad": torch.ops.smoe.swiglu_backward.default(g, h)}


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
    **GATE_CASES,  # tests/determinism_cases_gate.py
    "topk_softmax": _topk_softmax,
    "topk_softmax_backward": _topk_softmax_backward,
    "topk_sigmoid": _topk_sigmoid,
    "topk_sigmoid_backward": _topk_sigmoid_backward,
    "expert_choice": _expert_choice,
    "expert_choice_backward": _expert_choice_backward,
    "make_plan": _make_plan,
    "permute": _permute,
    "permute_backward": _permute_backward,
    "combine": _combine,
    "combine_backward": _combine_backward,
    "grouped_mm": _grouped_mm,
    "grouped_mm_backward": _grouped_mm_backward,
    "grouped_mm_bias_backward": _grouped_mm_bias_backward,
    "swiglu": _swiglu,
    "swiglu_backward": _swiglu_backward,
    "cosine_scores": _cosine_scores,
    "cosine_scores_backward": _cosine_scores_backward,
    "sinkhorn": _sinkhorn,
    "sinkhorn_backward": _sinkhorn_backward,
    "momentum_update": _momentum_update,
    "momentum_update_backward": _momentum_update_backward,
    "graph_mix": _graph_mix,
    "graph_mix_backward": _graph_mix_backward,
    **USMOE_CASES,  # tests/determinism_cases_usmoe.py
    **S2MOE_CASES,  # tests/determinism_cases_s2moe.py
    **EXPERT_MLP_CASES,  # tests/determinism_cases_expert_mlp.py
}


# ---- MoELayer forward + backward, one case per registered router -----------------------------
LAYER_B, LAYER_S, LAYER_H = 6, 256, 4  # the layer's x [B, S, D]; heads of the attention


def _causal_attention(device: str) -> Tensor:
    """Causal softmax probabilities [6, 4, 256, 256] (for a router that needs attention)."""
    scores = _randn(LAYER_B, LAYER_H, LAYER_S, LAYER_S, salt=16, device=device, scale=2.0)
    future = torch.ones(LAYER_S, LAYER_S, dtype=torch.bool, device=device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def layer_case(router: str, device: str) -> Results:
    """MoELayer(64, 128, E=8, k=2, swiglu) in training mode on x [6, 256, 64] (3072 expert rows),
    with a causal attention [6, 4, 256, 256] for a router that needs one: output, aux and every
    gradient."""
    torch.manual_seed(SEED)  # parameters and the noisy routers' noise
    layer = MoELayer(D, 2 * D, E, K, activation="swiglu", router=router).to(device)
    x = _randn(LAYER_B, LAYER_S, D, salt=14, device=device).requires_grad_()
    context = None
    if router_info(router).needs_attention:
        context = RoutingContext(attention=_causal_attention(device))
    y, aux = layer(x, context)
    roots, grads = [y], [_randn(*y.shape, salt=15, device=device)]
    if aux.loss().requires_grad:  # expert choice has no auxiliary loss
        roots, grads = [y, aux.loss()], [grads[0], None]
    torch.autograd.backward(roots, grads)
    out = {"y": y.detach(), "grad_x": x.grad}
    out |= {f"loss_{k}": v.detach() for k, v in aux.losses.items()}
    out |= {"tokens_per_expert": aux.tokens_per_expert, "dropped": aux.dropped_fraction.detach()}
    return out | {f"grad_{n}": p.grad for n, p in layer.named_parameters()}


def all_cases(device: str = "cpu", *, ops: bool = True) -> dict[str, Results]:
    """Every op case (unless ops=False) and every router's layer case, by name."""
    out = {f"op:{name}": fn(device) for name, fn in OP_CASES.items()} if ops else {}
    return out | {f"layer:{r}": layer_case(r, device) for r in available_routers()}


def main(argv: list[str]) -> None:
    layers_only = "--layers-only" in argv
    path, *threads = [a for a in argv if a != "--layers-only"]
    results = {}
    for n in map(int, threads):
        torch.set_num_threads(n)
        results[n] = all_cases(ops=not layers_only)
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1:])
