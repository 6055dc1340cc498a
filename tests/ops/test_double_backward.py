"""Every op's backward is itself not differentiable: a second derivative raises a clear error
naming the op (STYLE.md §8), never autograd's "not used in the graph" or a silent None. The ops
without a backward (index outputs only: make_plan, unified_topk) have no first derivative either:
their outputs are integers outside the graph, even for inputs that require grad. An op whose
backward runs other smoe ops (expert_mlp recomputes through permute, grouped_mm and swiglu) hits
their refusal. gate_linear and router_stats are the exceptions: their backward ops serve first
derivatives, and under create_graph their backwards run the same formulas as ATen ops, so they
are twice differentiable, and checked so."""

import pytest
import torch

from smoe import ops
from tests.ops.test_make_plan import random_experts


def _plan():
    return ops.make_plan(random_experts(6, 2, 3), 3)


def topk_softmax():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    return x, ops.topk_softmax(x, 2).weight


def topk_sigmoid():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    return x, ops.topk_sigmoid(x, 3, n_group=4, topk_group=2, renormalize=True, scale=2.5).weight


def expert_choice():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    return x, ops.expert_choice(x, 3).weight


def permute():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    return x, ops.permute(x, _plan())


def combine():
    plan = _plan()
    y_sorted = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    return y_sorted, ops.combine(y_sorted, torch.rand(6, 2, dtype=torch.float64), plan)


def swiglu():
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    return h, ops.swiglu(h)


def grouped_mm():
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    return x, ops.grouped_mm(x, w, torch.tensor([0, 2, 6, 9]))


def grouped_mm_bias():
    # the bias's gradient (grouped_mm_bias_backward) depends on it through the output
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(9, 4, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    return b, ops.grouped_mm(x, w, torch.tensor([0, 2, 6, 9]), b)


def gather_mm():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    return x, ops.gather_mm(x, _plan(), w)


def cosine_scores():
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    proj, emb = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    return h, ops.cosine_scores(h, proj, emb, torch.tensor(0.3)).logits


def sinkhorn():
    s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    return s, ops.sinkhorn(s, eps=0.5, max_iter=4).log_plan.exp()


def momentum_update():  # Adam: its backward depends on u (heavy ball's is linear)
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    m, p, v = (torch.zeros(6, 5, dtype=torch.float64) for _ in range(3))
    return u, ops.momentum_update(u, m, p, v, kind="adam").delta


def graph_mix():  # linear in x, but d/dx of a square of it depends on x (the upstream 2y)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    A = torch.rand(2, 5, 7, dtype=torch.float64, requires_grad=True)
    return x, ops.graph_mix(x, A, cache=torch.randn(2, 2, 3, dtype=torch.float64))


def s2moe_perturb():  # linear in x, as graph_mix: the upstream 2y of the square carries x
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    n1, n2 = torch.randn_like(x), torch.randn_like(x)
    mu, s_mul, s_add = (torch.rand(2, 1, 3, dtype=torch.float64) for _ in range(3))
    return x, ops.s2moe_perturb(x, n1, n2, mu, s_mul, s_add)


MAKERS = [
    topk_softmax,
    topk_sigmoid,
    expert_choice,
    permute,
    combine,
    swiglu,
    grouped_mm,
    grouped_mm_bias,
    gather_mm,
    cosine_scores,
    sinkhorn,
    momentum_update,
    graph_mix,
    s2moe_perturb,
]


def test_every_op_with_a_backward_is_checked():
    from smoe import _loader

    ops_ = set(_loader.registered_ops())
    forwards = {op.removesuffix("_backward") for op in ops_ if op.endswith("_backward")}
    assert forwards == {f.__name__ for f in MAKERS} | set(TWICE)


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("allow_unused", [False, True])
def test_double_backward_errors_clearly(make, allow_unused):
    x, y = make()
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g.requires_grad  # the first derivative depends on x through the op's backward
    with pytest.raises(RuntimeError, match=rf"smoe::{make.__name__}: double backward is not"):
        torch.autograd.grad(g.square().sum(), x, allow_unused=allow_unused)


# Ops without a backward op -> a call on float inputs that require grad, returning its outputs.
NO_BACKWARD = {
    "make_plan": lambda x: ops.make_plan(random_experts(6, 2, 3), 3, capacity=2, priority=x[:, 0]),
    "unified_topk": lambda x: ops.unified_topk(x, 5, counts=torch.tensor([0, 5, 3, 1, 2, 4])),
}


def _expert_mlp():
    plan = _plan()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w_in, w_out = (
        torch.randn(3, 5, 8, dtype=torch.float64),
        torch.randn(3, 4, 5, dtype=torch.float64),
    )
    return x, ops.expert_mlp(x, plan.offsets, w_in, w_out, plan=plan, fused=True)


# Ops whose backward is made of other smoe ops -> a maker (input, output) as in MAKERS.
COMPOSED = {"expert_mlp": _expert_mlp}


@pytest.mark.parametrize("op", sorted(COMPOSED))
def test_double_backward_of_a_composed_backward_errors_clearly(op):
    x, y = COMPOSED[op]()
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match=r"smoe::\w+: double backward is not supported"):
        torch.autograd.grad(g.square().sum(), x)


# Ops with a backward op whose create_graph backward is made of ATen ops -> (inputs, fn): twice
# differentiable.
def _gate_linear():
    x, w, b = (
        torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((7, 5), (3, 5), (3,))
    )
    return (x, w, b), ops.gate_linear


def _router_stats():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    return (x,), ops.router_stats


TWICE = {"gate_linear": _gate_linear, "router_stats": _router_stats}


@pytest.mark.parametrize("op", sorted(TWICE))
def test_ops_with_an_aten_backward_are_twice_differentiable(op):
    inputs, fn = TWICE[op]()
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_every_op_without_a_backward_is_listed():
    from smoe import _loader

    ops_ = set(_loader.registered_ops())
    with_backward = {op for op in ops_ if op.endswith("_backward")}
    with_backward |= {op.removesuffix("_backward") for op in with_backward}
    assert ops_ - with_backward == set(NO_BACKWARD) | set(COMPOSED)


@pytest.mark.parametrize("op", sorted(NO_BACKWARD))
def test_ops_without_a_backward_return_integers_outside_the_graph(op):
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    out = NO_BACKWARD[op](x)
    for t in out if isinstance(out, tuple) else (out,):
        assert not t.is_floating_point() and not t.requires_grad and t.grad_fn is None
