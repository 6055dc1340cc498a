"""The CUDA cases ``.ci/sanitize`` runs under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck): every op forward and backward on a few representative shapes, small enough that each
tool finishes within minutes (the sanitizers slow kernels down 10-100x). Selected with
``-m "cuda and sanitize"``; on a GPU they also run in the ordinary ``-m cuda`` pass."""

from __future__ import annotations

import pytest
import torch

from smoe import _loader, ops

# (T, E, k, d): an empty batch, one token, one expert, k = E, a ragged mid size with empty experts
# and a size past one thread block per expert.
SHAPES = [
    pytest.param(0, 4, 2, 8, id="T0-E4-k2"),
    pytest.param(1, 4, 1, 8, id="T1-E4-k1"),
    pytest.param(7, 1, 1, 5, id="T7-E1-k1"),
    pytest.param(33, 4, 4, 24, id="T33-E4-k4"),
    pytest.param(300, 16, 2, 40, id="T300-E16-k2"),
]
DTYPES = [torch.float32, torch.bfloat16]

# Each op of the smoe namespace is exercised by one case below; the gate test keeps this honest.
COVERED = {
    "gate_linear": "test_gate_linear_forward_backward",  # ATen GEMMs on CUDA: no kernel of ours
    "gate_linear_backward": "test_gate_linear_forward_backward",
    "topk_softmax": "test_routing_dispatch_experts_forward_backward",
    "topk_softmax_backward": "test_routing_dispatch_experts_forward_backward",
    "make_plan": "test_routing_dispatch_experts_forward_backward",
    "permute": "test_routing_dispatch_experts_forward_backward",
    "permute_backward": "test_routing_dispatch_experts_forward_backward",
    "combine": "test_routing_dispatch_experts_forward_backward",
    "combine_backward": "test_routing_dispatch_experts_forward_backward",
    "grouped_mm": "test_routing_dispatch_experts_forward_backward",
    "grouped_mm_backward": "test_routing_dispatch_experts_forward_backward",
    "grouped_mm_bias_backward": "test_routing_dispatch_experts_forward_backward",
    "swiglu": "test_routing_dispatch_experts_forward_backward",
    "swiglu_backward": "test_routing_dispatch_experts_forward_backward",
    "expert_mlp": "test_expert_mlp_forward_backward",
    "gather_mm": "test_gather_mm_forward_backward",
    "gather_mm_backward": "test_gather_mm_forward_backward",
    "topk_sigmoid": "test_topk_sigmoid_forward_backward",
    "topk_sigmoid_backward": "test_topk_sigmoid_forward_backward",
    "expert_choice": "test_expert_choice_forward_backward",
    "expert_choice_backward": "test_expert_choice_forward_backward",
    "cosine_scores": "test_cosine_scores_forward_backward",
    "cosine_scores_backward": "test_cosine_scores_forward_backward",
    "sinkhorn": "test_sinkhorn_forward_backward",
    "sinkhorn_backward": "test_sinkhorn_forward_backward",
    "momentum_update": "test_momentum_update_forward_backward",
    "momentum_update_backward": "test_momentum_update_forward_backward",
    "graph_mix": "test_graph_mix_forward_backward",
    "graph_mix_backward": "test_graph_mix_forward_backward",
    "unified_topk": "test_unified_topk_forward",  # index-only: no backward
    "s2moe_perturb": "test_s2moe_perturb_forward_backward",
    "s2moe_perturb_backward": "test_s2moe_perturb_forward_backward",
    "router_stats": "test_router_stats_forward_backward",
    "router_stats_backward": "test_router_stats_forward_backward",
}


def test_every_op_has_a_sanitizer_case():
    missing = sorted(set(_loader.registered_ops()) - set(COVERED))
    assert not missing, f"ops without a .ci/sanitize case in {__name__}: {missing}"


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, k, d", SHAPES)
def test_routing_dispatch_experts_forward_backward(T, E, k, d, dtype):
    dev = "cuda"
    logits = torch.randn(T, E, device=dev, dtype=dtype, requires_grad=True)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    w_in = torch.randn(E, d, 2 * d, device=dev, dtype=dtype, requires_grad=True)
    w_out = torch.randn(E, d, d, device=dev, dtype=dtype, requires_grad=True)  # [E, d_out, d_in]
    b_out = torch.randn(E, d, device=dev, dtype=dtype, requires_grad=True)  # the fused bias
    for capacity in (None, max(1, T * k // (2 * E))):
        weight, expert = ops.topk_softmax(logits, k)
        priority = weight.detach()[:, 0].float() if capacity else None
        plan = ops.make_plan(expert, E, capacity=capacity, priority=priority)
        xs = ops.permute(x, plan)
        h = ops.swiglu(ops.grouped_mm(xs, w_in, plan.offsets))
        y_sorted = ops.grouped_mm(h, w_out.transpose(1, 2), plan.offsets, b_out)
        y = ops.combine(y_sorted, weight, plan)
        y.float().square().sum().backward()
    torch.cuda.synchronize()
    for g in (x.grad, logits.grad, w_in.grad, w_out.grad, b_out.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, k, d", SHAPES)
def test_expert_mlp_forward_backward(T, E, k, d, dtype):
    x = torch.randn(T, d, device="cuda", dtype=dtype, requires_grad=True)
    w_in = torch.randn(E, 2 * d, d, device="cuda", dtype=dtype, requires_grad=True)
    w_out = torch.randn(E, d, d, device="cuda", dtype=dtype, requires_grad=True)
    expert = torch.rand(T, E, device="cuda").argsort(dim=-1)[:, :k].int()
    for capacity in (None, max(1, T * k // (2 * E))):
        plan = ops.make_plan(expert, E, capacity=capacity)
        y = ops.expert_mlp(
            x, plan.offsets, w_in.transpose(1, 2), w_out.transpose(1, 2), plan=plan, fused=True
        )
        y.float().square().sum().backward()
    torch.cuda.synchronize()
    for g in (x.grad, w_in.grad, w_out.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, k, d", SHAPES)
def test_gather_mm_forward_backward(T, E, k, d, dtype):
    x = torch.randn(T, d, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(E, 2 * d, d, device="cuda", dtype=dtype, requires_grad=True)  # [E, out, in]
    b = torch.randn(E, 2 * d, device="cuda", dtype=dtype, requires_grad=True)
    expert = torch.rand(T, E, device="cuda").argsort(dim=-1)[:, :k].int()
    for capacity in (None, max(1, T * k // (2 * E))):
        plan = ops.make_plan(expert, E, capacity=capacity)
        ops.gather_mm(x, plan, w.transpose(1, 2), b).float().square().sum().backward()
    torch.cuda.synchronize()
    for g in (x.grad, w.grad, b.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, group_size", [(0, 4, None), (5, 3, None), (257, 8, 64)])
def test_expert_choice_forward_backward(T, E, group_size, dtype):
    logits = torch.randn(T, E, device="cuda", dtype=dtype, requires_grad=True)
    for capacity in (1, 3, T + 1):
        routed = ops.expert_choice(logits, capacity, group_size=group_size)
        (routed.weight.float() * torch.arange(E, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, E, k, n_group, topk_group",
    [
        (0, 4, 2, 2, 1),
        (1, 1, 1, 1, 1),
        (33, 16, 5, 4, 2),
        (300, 64, 8, 8, 4),  # DeepSeek-V3's grouping, scaled down
        (7, 40, 33, 1, 1),  # k past the single-pass selection
        (5, 40, 33, 40, 34),  # topk_group past it too
    ],
)
def test_topk_sigmoid_forward_backward(T, E, k, n_group, topk_group, dtype):
    wide = torch.randn(T, 2 * E, device="cuda", dtype=dtype, requires_grad=True)
    logits = wide[:, ::2]  # strided rows
    bias = torch.randn(E, device="cuda") * 0.1
    for renormalize, b in ((True, bias), (False, None)):
        kw = dict(n_group=n_group, topk_group=topk_group, renormalize=renormalize, scale=2.5)
        weight, _ = ops.topk_sigmoid(logits, k, selection_bias=b, **kw)
        (weight.float() * torch.arange(k, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(wide.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E", [(0, 4), (1, 1), (33, 40), (300, 300)])  # 1 to 10 row blocks
def test_router_stats_forward_backward(T, E, dtype):
    wide = torch.randn(T, 2 * E, device="cuda", dtype=dtype, requires_grad=True)
    prob_sum, lse = ops.router_stats(wide[:, ::2])  # strided rows
    (prob_sum.square().sum() + lse.square().sum()).backward()
    prob_sum_only = ops.router_stats(wide[:, 1::2]).prob_sum  # the backward with gp alone
    prob_sum_only.square().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(wide.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, N, de, d", [(0, 4, 2, 8), (1, 1, 1, 5), (33, 16, 8, 40), (300, 4, 40, 70)]
)
def test_cosine_scores_forward_backward(T, N, de, d, dtype):
    kw = {"device": "cuda", "dtype": dtype, "requires_grad": True}
    wide = torch.randn(T, 2 * d, **kw)
    h = wide[:, ::2]  # strided rows
    proj, emb = torch.randn(de, d, **kw), torch.randn(N, de, **kw)
    temp = torch.tensor(0.3, device="cuda", requires_grad=True)
    for normalize in (True, False):
        cos, logits = ops.cosine_scores(h, proj, emb, temp, normalize_tokens=normalize)
        (cos * torch.arange(N, device="cuda") + logits).sum().backward()
    torch.cuda.synchronize()
    for g in (wide.grad, proj.grad, emb.grad, temp.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E, d", [(0, 4, 8), (1, 1, 8), (300, 16, 24)])
def test_gate_linear_forward_backward(T, E, d, dtype):
    x = torch.randn(T, 2 * d, device="cuda", dtype=dtype)[:, ::2].requires_grad_()  # strided rows
    w = torch.randn(E, d, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(E, device="cuda", dtype=dtype, requires_grad=True)
    logits = ops.gate_linear(x, w, b)
    (logits * torch.arange(E, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    assert logits.dtype == torch.float32
    assert torch.isfinite(w.grad.float()).all() and torch.isfinite(b.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, E", [(0, 4), (1, 1), (33, 16), (600, 8)])
def test_sinkhorn_forward_backward(T, E, dtype):
    wide = torch.randn(T, 2 * E, device="cuda", dtype=dtype, requires_grad=True)
    scores = wide[:, ::2]  # strided rows
    for tol in (0.0, 1e-3):  # fixed iterations; checked every 4 (the host sync path)
        out = ops.sinkhorn(scores, eps=0.3, max_iter=12, tol=tol, check_every=4)
        (out.log_plan.exp() * torch.arange(E, device="cuda") + out.f.sum()).sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(wide.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 8), (), (1, 1), (33, 40), (300, 257)], ids=str)
def test_momentum_update_forward_backward(shape, dtype):
    kw = {"device": "cuda", "requires_grad": True}
    wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, **kw) if shape else None
    u = wide[..., ::2] if shape else torch.randn((), dtype=dtype, **kw)  # strided rows
    m, p = torch.randn(shape, **kw), torch.randn(shape, **kw)
    v = torch.rand(shape, device="cuda").requires_grad_()
    leaf = wide if shape else u
    for kind in ("heavy_ball", "adam", "robust"):
        pv = (p, v) if kind == "adam" else (None, None)
        out = ops.momentum_update(u, m, *pv, kind=kind)
        (out.delta.float().square().sum() + out.m.sum()).backward()
    torch.cuda.synchronize()
    for g in (leaf.grad, m.grad, p.grad, v.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, S, E, C", [(0, 4, 3, None), (2, 0, 3, 2), (1, 1, 1, None), (2, 33, 20, 7), (2, 300, 40, 64)]
)
def test_graph_mix_forward_backward(B, S, E, C, dtype):
    kw = {"device": "cuda", "dtype": dtype, "requires_grad": True}
    wide = torch.randn(B, S, 2 * E, **kw)
    x = wide[..., ::2]  # strided rows
    A = torch.randn(B, S, S + (C or 0), **kw)
    cache = torch.randn(B, C, E, device="cuda", dtype=dtype) if C is not None else None
    for lam in (1.0, 0.0):  # lam = 0 reads neither A nor the cache
        out = ops.graph_mix(x, A.softmax(dim=-1), self_coef=0.5, lam=lam, cache=cache)
        (out.float().square().sum()).backward()
    torch.cuda.synchronize()
    for g in (wide.grad, A.grad):
        assert torch.isfinite(g.float()).all()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "G, L, n",
    [
        (0, 8, 3),
        (1, 1, 1),
        (3, 16, 0),
        (4, 40, 40),  # n = L
        (5, 300, 40),  # more scores than threads of a block
        (2, 1030, 1029),  # several tiles of the compaction, all but one chosen
    ],
)
def test_unified_topk_forward(G, L, n, dtype):
    g = torch.Generator().manual_seed(0)
    scores = (torch.round(torch.randn(G, L, generator=g) * 2) / 2).to(dtype)  # many exact ties
    scores[::2, L // 2 :] = -torch.inf  # padding
    counts = torch.randint(0, n + 1, (G,), generator=g)
    offset = torch.zeros(G, L + 3, device="cuda", dtype=dtype)
    offset[:, :L] = scores.cuda()
    strided = torch.zeros(G, 2 * L, device="cuda", dtype=dtype)
    strided[:, ::2] = scores.cuda()
    for view in (offset[:, :L], strided[:, ::2]):  # row stride L + 3 (read in place); a copy
        for c in (None, counts):
            got = ops.unified_topk(view, n, counts=None if c is None else c.cuda())
            assert torch.equal(got.cpu(), ops.unified_topk(scores, n, counts=c))
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, stat",
    [
        ((0, 7, 8), (0, 1, 8)),  # empty
        ((3, 0, 8), (3, 1, 8)),  # empty x, statistics not: zero gradients
        ((1,), ()),  # one element, scalars
        ((3, 33, 40), (3, 1, 40)),  # DSU sequence statistics
        ((33, 3, 40), (1, 3, 40)),  # time-major
        ((300, 257), (300, 1)),  # token
        ((300, 257), (1, 257)),  # batch: one thread per feature sums 300 tokens
        ((4, 300, 257), ()),  # scalars: the one-block reduction over A * C > its threads
        ((2, 5, 3, 4), (2, 1, 1, 4)),  # a run of two dims
    ],
    ids=str,
)
def test_s2moe_perturb_forward_backward(shape, stat, dtype):
    kw = {"device": "cuda", "dtype": dtype}
    wide = torch.randn(*shape[:-1], 2 * shape[-1], requires_grad=True, **kw)
    x = wide[..., ::2]  # strided rows
    n1, n2 = torch.randn(shape, **kw), torch.randn(shape, **kw)
    mu = torch.randn(stat, requires_grad=True, **kw)
    s_mul, s_add = (torch.rand(stat, **kw).add(0.1).requires_grad_() for _ in range(2))
    for s_first in (s_mul, torch.tensor(0.5, **kw)):  # s_mul broadcast, then one value
        out = ops.s2moe_perturb(x, n1, n2, mu, s_first, s_add)
        out.float().square().sum().backward()
    grads = torch.ops.smoe.s2moe_perturb_backward.default(
        torch.randn(shape, **kw), x.detach(), n1, n2, mu, s_mul, s_add, [False, True, False, True]
    )
    torch.cuda.synchronize()
    assert grads[0].numel() == 0 and grads[2].numel() == 0
    for g in (wide.grad, mu.grad, s_mul.grad, s_add.grad, grads[1], grads[3]):
        assert torch.isfinite(g.float()).all()
