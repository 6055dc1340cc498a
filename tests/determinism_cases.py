"""The determinism cases of tests/test_determinism.py, shared with the child process it starts.

Each case builds its inputs from a fixed seed (never from the global RNG state), runs one smoe op,
or an :class:`smoe.MoELayer` forward and backward, and returns its results by name. The shapes are
big enough that every CPU kernel splits its work into several work items: the ops see T = 3000
tokens, E = 8, k = 2, d = 64, and grouped_mm 6000 rows in uneven groups (one empty, padding rows
past offsets[E]) and 384 output columns, in fp32, bf16 and fp16 (expert_mlp and gather_mm
likewise: tests/determinism_cases_expert_mlp.py); cosine_scores, sinkhorn, momentum_update and
graph_mix their own shapes (tests/determinism_cases_families.py); unified_topk 48 groups of 512 tied
scores (tests/determinism_cases_usmoe.py); gate_linear 4100 tokens x 300 experts
(tests/determinism_cases_gate.py), and router_stats 4100 x 300 there too; s2moe_perturb 262144
elements with sequence, token,
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
from tests.determinism_cases_families import OP_CASES as FAMILY_CASES
from tests.determinism_cases_gate import OP_CASES as GATE_CASES
from tests.determinism_cases_s2moe import OP_CASES as S2MOE_CASES
from tests.determinism_cases_usmoe import OP_CASES as USMOE_CASES
from tests.determinism_inputs import SEED, Results
from tests.determinism_inputs import randn as _randn

T, E, K, D = 3000, 8, 2, 64
M, D_OUT = T * K, 384  # grouped_mm rows and output columns (column blocks of 256 and 128)
GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # MKL, and oneDNN on CPU


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
    **FAMILY_CASES,  # tests/determinism_cases_families.py: cosine_scores, sinkhorn, momentum, graph
    **USMOE_CASES,  # tests/determinism_cases_usmoe.py
    **S2MOE_CASES,  # tests/determinism_cases_s2moe.py
    **EXPERT_MLP_CASES,  # tests/determinism_cases_expert_mlp.py: expert_mlp, gather_mm
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
