"""SelectiveSinkhornRouter (specs/sinkhorn_ssr.md §3-§5, §10): gates from the plan, the plain
branch, the seeded draws, gradients, large logits, load. S-BASE, scopes, padding, compile, the
registry and the layer: tests/test_sinkhorn_router_more.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from smoe import SelectiveSinkhornRouter, TopKRouter, ops
from smoe import reference as ref
from smoe.routing import RoutingContext
from smoe.routing.sinkhorn import sinkhorn_draw

D, E = 8, 4


def _ssr(k: int = 2, **kw) -> SelectiveSinkhornRouter:
    kw.setdefault("p", 1.0)
    return SelectiveSinkhornRouter(D, E, k, **kw).train()


def _ref_plan(logits: torch.Tensor, r: SelectiveSinkhornRouter, max_iter: int) -> torch.Tensor:
    z = logits.double()
    C = torch.softmax(z, -1) if r.cost == "softmax" else z
    return ref.sinkhorn(C, eps=r.xi, max_iter=max_iter)[0].exp()


# --- gates from the plan (§4) -----------------------------------------------------------------


@pytest.mark.parametrize("T, E_, cost", [(17, 5, "softmax"), (64, 8, "logits"), (30, 4, "softmax")])
def test_sinkhorn_forward_solves_the_ssr_marginals(T, E_, cost):
    r = SelectiveSinkhornRouter(D, E_, 2, p=1.0, cost=cost, xi=0.5 if cost == "logits" else 0.05)
    r.train()(torch.randn(T, D))
    tr = r.last_transport
    assert r.last_used_sinkhorn and tr is not None and not tr.log_plan.requires_grad
    plan = tr.log_plan.exp()
    assert tr.row_err <= r.tol and tr.col_err <= r.tol
    torch.testing.assert_close(plan.sum(1), torch.ones(T), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((E_,), T / E_), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k, route_scale", [(1, 1.0), (2, 1.0), (3, 2.5), (4, 0.5)])
def test_gates_have_k_experts_summing_to_route_scale(k, route_scale):
    r = _ssr(k, route_scale=route_scale)
    out = r(torch.randn(40, D))
    assert out.expert.shape == out.weight.shape == (40, k) and out.aux == {}
    assert ((out.expert >= 0) & (out.expert < E)).all()
    assert (out.expert.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    assert (out.weight > 0).all()
    torch.testing.assert_close(out.weight.sum(-1), torch.full((40,), route_scale))


@pytest.mark.parametrize("cost, xi, route_scale", [("softmax", 0.05, 1.0), ("logits", 1.0, 2.0)])
def test_gates_are_the_k_largest_plan_entries_renormalised(cost, xi, route_scale):
    # tol = 0: the router runs exactly max_iter iterations, as the reference does
    r = _ssr(2, cost=cost, xi=xi, route_scale=route_scale, tol=0.0, max_iter=50)
    out = r(torch.randn(33, D))
    expert, weight = ref.plan_gates(_ref_plan(out.logits, r, 50), 2, route_scale)
    assert torch.equal(out.expert, expert)
    torch.testing.assert_close(out.weight.double(), weight, atol=1e-5, rtol=1e-5)


def test_topk_softmax_of_the_log_plan_is_the_renormalised_plan_top_k():
    # The identity the router relies on: softmax over the k selected entries of a row of log Π
    # equals Π_k / Σ Π_k, and the op's top-k of log Π is the top-k of Π (ties: lower expert).
    for T, E_, k in [(17, 5, 2), (9, 3, 1), (20, 6, 6)]:
        log_plan = ops.sinkhorn(torch.randn(T, E_).softmax(-1), eps=0.05, max_iter=30).log_plan
        weight, expert = ops.topk_softmax(log_plan, k, renormalize=True)
        e_ref, w_ref = ref.plan_gates(log_plan.double().exp(), k)
        assert torch.equal(expert, e_ref)
        torch.testing.assert_close(weight.double(), w_ref, atol=1e-6, rtol=1e-6)


def test_router_softmax_weights_are_the_renormalised_router_softmax_at_the_plan_selection():
    r = _ssr(2, weights_from="router_softmax", route_scale=3.0, tol=0.0)
    x = torch.randn(24, D)
    out = r(x)
    expert, _ = ref.plan_gates(_ref_plan(out.logits, r, r.max_iter), 2)
    assert torch.equal(out.expert, expert)
    probs = torch.gather(torch.softmax(out.logits, -1), 1, out.expert.long())
    torch.testing.assert_close(out.weight, 3.0 * probs / probs.sum(-1, keepdim=True))
    (out.weight * torch.randn(24, 2)).sum().backward()
    assert r.weight.grad.abs().sum() > 0  # the weights carry gradient, not the plan


# --- the plain branch ---------------------------------------------------------------------------


def test_p0_is_the_topk_router_bit_for_bit_outputs_and_gradients():
    x = torch.randn(3, 10, D)  # also with a [B, S] context
    plain = TopKRouter(D, E, 2).train()
    ssr = SelectiveSinkhornRouter(D, E, 2, p=0.0).train()
    ssr.load_state_dict(plain.state_dict())
    proj = torch.randn(30, 2)
    for step in range(3):
        a = plain(x.reshape(-1, D))
        ctx = RoutingContext(batch_shape=(3, 10), step=step, layer_index=1)
        b = ssr(x.reshape(-1, D), ctx)
        assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight)
        assert torch.equal(a.logits, b.logits)
        ((a.weight * proj).sum() + a.logits.square().sum()).backward()
        ((b.weight * proj).sum() + b.logits.square().sum()).backward()
        assert torch.equal(plain.weight.grad, ssr.weight.grad)
    assert ssr.train_steps == 3 and ssr.sinkhorn_steps == 0 and not ssr.last_used_sinkhorn


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("logit_noise_std", [0.0, 3.0])
def test_eval_is_the_plain_router_for_any_p_and_noise(p, logit_noise_std):
    r = SelectiveSinkhornRouter(D, E, 2, p=p, logit_noise_std=logit_noise_std, noise_std=1.0)
    r.eval()
    x = torch.randn(20, D)
    out = r(x, RoutingContext(step=0, layer_index=0))
    w, e = ops.topk_softmax(x @ r.weight.T, 2, renormalize=True)
    assert torch.equal(out.expert, e) and torch.equal(out.weight, w)
    assert r.train_steps == 0 and r.last_transport is None  # eval neither draws nor solves


def test_logit_noise_perturbs_the_plain_branch_in_training_only():
    r = SelectiveSinkhornRouter(D, E, 2, p=0.0, logit_noise_std=5.0).train()
    x = torch.randn(200, D)
    clean = ops.topk_softmax(x @ r.weight.T, 2, renormalize=True)
    out = r(x)
    torch.testing.assert_close(out.logits, x @ r.weight.T)  # the logits stay clean
    assert not torch.equal(out.expert, clean.expert)
    torch.testing.assert_close(out.weight.sum(-1), torch.ones(200))


def test_cost_noise_changes_the_plan_and_follows_the_torch_seed():
    x = torch.randn(40, D)
    base = _ssr(2, tol=0.0)
    noisy = _ssr(2, noise_std=0.5, tol=0.0)
    noisy.load_state_dict(base.state_dict())
    a = base(x)
    torch.manual_seed(3)
    b = noisy(x)
    torch.manual_seed(3)
    c = noisy(x)
    assert not torch.equal(a.weight, b.weight)
    assert torch.equal(b.expert, c.expert) and torch.equal(b.weight, c.weight)


# --- draws (§5) -----------------------------------------------------------------------------------


def _decisions(router: SelectiveSinkhornRouter, steps, layer_index=None) -> list[bool]:
    x = torch.randn(8, D)
    out = []
    for step in steps:
        router(x, RoutingContext(step=step, layer_index=layer_index))
        out.append(router.last_used_sinkhorn)
    return out


def test_draw_is_a_pure_function_of_seed_step_and_layer():
    assert sinkhorn_draw(0, 5, 2) == sinkhorn_draw(0, 5, 2)
    values = {
        sinkhorn_draw(s, t, layer) for s in (0, 1) for t in range(50) for layer in (None, 0, 1)
    }
    assert len(values) == 300 and all(0.0 <= u < 1.0 for u in values)
    assert sinkhorn_draw(0, 2**70, -3) < 1.0  # any int folds into 64 bits


def test_seeded_draw_sequences_reproduce_and_depend_on_the_seed():
    steps = list(range(200))
    a = _decisions(SelectiveSinkhornRouter(D, E, p=0.3, seed=7), steps, 2)
    b = _decisions(SelectiveSinkhornRouter(D, E, p=0.3, seed=7), steps, 2)
    c = _decisions(SelectiveSinkhornRouter(D, E, p=0.3, seed=8), steps, 2)
    assert a == b and a != c
    assert a == [sinkhorn_draw(7, s, 2) < 0.3 for s in steps]
    # steps given out of order: the decision depends on the step, not on the call count
    assert _decisions(SelectiveSinkhornRouter(D, E, p=0.3, seed=7), steps[::-1], 2) == a[::-1]


def test_per_step_draws_are_shared_by_every_layer():
    steps = range(100)
    runs = [
        _decisions(SelectiveSinkhornRouter(D, E, p=0.3, draw="per_step"), steps, i)
        for i in range(3)
    ]
    assert runs[0] == runs[1] == runs[2] and 10 < sum(runs[0]) < 60


def test_per_layer_rates_match_p_and_layers_draw_independently():
    n, p = 400, 0.3
    layers = [_decisions(SelectiveSinkhornRouter(D, E, p=p), range(n), i) for i in range(4)]
    bound = 4 * math.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
    for used in layers:
        assert abs(sum(used) - n * p) < bound
    for i in range(4):
        for j in range(i + 1, 4):
            both = sum(a and b for a, b in zip(layers[i], layers[j]))
            assert abs(both - n * p * p) < 4 * math.sqrt(n * p * p * (1 - p * p))
            assert layers[i] != layers[j]


def test_without_a_step_the_router_counts_its_own_training_forwards():
    r = SelectiveSinkhornRouter(D, E, p=0.4, seed=3)
    x = torch.randn(8, D)
    used = []
    for _ in range(30):
        r(x)  # no context: step = forward count, shared layer slot
        used.append(r.last_used_sinkhorn)
    assert used == [sinkhorn_draw(3, s, None) < 0.4 for s in range(30)]
    r.eval()(x)  # eval does not count
    r.train()(x, RoutingContext(layer_index=1))  # a context without a step: still counted
    assert r.last_used_sinkhorn == (sinkhorn_draw(3, 30, 1) < 0.4)


def test_counters_and_rate():
    r = SelectiveSinkhornRouter(D, E, p=0.5)
    assert r.sinkhorn_rate == 0.0
    used = _decisions(r, range(40), 0)
    assert r.train_steps == 40 and r.sinkhorn_steps == sum(used)
    assert r.sinkhorn_rate == sum(used) / 40
    r.reset_sinkhorn_stats()
    assert (r.train_steps, r.sinkhorn_steps, r.sinkhorn_rate) == (0, 0, 0.0)


# --- gradients, large logits, load ---------------------------------------------------------------


@pytest.mark.parametrize("cost, xi", [("softmax", 0.3), ("logits", 1.0)])
def test_unrolled_gradient_of_the_router_weight_passes_gradcheck(cost, xi):
    torch.manual_seed(1)
    r = _ssr(2, cost=cost, xi=xi, max_iter=10, tol=0.0).double()
    x = torch.randn(6, D, dtype=torch.float64)
    w0 = r.weight.detach().clone().requires_grad_()

    def gates(w):
        return functional_call(r, {"weight": w}, (x,)).weight

    assert torch.autograd.gradcheck(gates, (w0,), atol=1e-6)
    (grad,) = torch.autograd.grad((gates(w0) * torch.randn(6, 2, dtype=torch.float64)).sum(), w0)
    assert grad.abs().sum() > 1e-6


def test_unrolled_gradient_matches_autograd_through_the_reference():
    r = _ssr(2, max_iter=20, tol=0.0)
    x = torch.randn(16, D)
    proj = torch.randn(16, 2)
    out = r(x)
    (out.weight * proj).sum().backward()
    w = r.weight.detach().double().requires_grad_()
    logits = x.double() @ w.T
    plan = ref.sinkhorn(torch.softmax(logits, -1), eps=r.xi, max_iter=20)[0].exp()
    expert, _ = ref.plan_gates(plan.detach(), 2)
    assert torch.equal(expert, out.expert)
    picked = torch.gather(plan, 1, expert.long())
    ((picked / picked.sum(-1, keepdim=True)) * proj.double()).sum().backward()
    torch.testing.assert_close(r.weight.grad.double(), w.grad, atol=1e-3, rtol=1e-3)


def test_detach_with_plan_weights_gives_the_router_exactly_zero_gradient():
    r = _ssr(2, grad_mode="detach")
    x = torch.randn(20, D, requires_grad=True)
    out = r(x)
    assert r.last_used_sinkhorn
    # the gates are a constant of the graph: no path from them to the router weight or x
    assert not out.weight.requires_grad
    out.logits.sum().backward()  # the logits themselves still carry gradient
    assert torch.count_nonzero(r.weight.grad) > 0


@pytest.mark.parametrize("grad_mode", ["unrolled", "detach"])
def test_large_logits_stay_finite_forward_and_backward(grad_mode):
    r = _ssr(2, cost="logits", xi=0.05, grad_mode=grad_mode)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D) * 4e3)
    x = torch.randn(32, D)
    out = r(x)
    assert out.logits.abs().max() > 1e4
    assert torch.isfinite(out.weight).all() and torch.isfinite(r.last_transport.log_plan).all()
    torch.testing.assert_close(out.weight.sum(-1), torch.ones(32))
    (out.weight * torch.randn(32, 2) + out.logits.mean()).sum().backward()
    assert torch.isfinite(r.weight.grad).all()


@pytest.mark.parametrize(
    "cost, xi, bound", [("softmax", 0.05, 0.5), ("softmax", 0.01, 0.15), ("logits", 0.05, 0.15)]
)
def test_sinkhorn_forwards_balance_the_top1_load(cost, xi, bound):
    # Top-1 of a soft plan is only roughly balanced: at the default (softmax cost, xi = 0.05) the
    # small logits at init give C / xi a span of a few units, so the bound is loose there.
    T = 128
    x = torch.randn(T, D)
    x[:, 0] = 1.0
    r = _ssr(1, cost=cost, xi=xi)
    with torch.no_grad():
        r.weight[0, 0] += 2.0  # every token prefers expert 0
    plain = torch.bincount(ops.topk_softmax(x @ r.weight.T, 1).expert[:, 0].long(), minlength=E)
    assert plain[0] > 0.9 * T
    load = torch.bincount(r(x).expert[:, 0].long(), minlength=E)
    assert (load - T / E).abs().max() <= bound * T / E, load


def test_gate_dtype_float64_stays_and_autocast_stays_float32():
    r = _ssr(2).double()
    out = r(torch.randn(10, D, dtype=torch.float64))
    assert out.weight.dtype == out.logits.dtype == torch.float64
    r = _ssr(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(torch.randn(10, D).bfloat16())
    assert out.weight.dtype == out.logits.dtype == torch.float32


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"xi": 0.0}, "xi must be finite and > 0", id="xi0"),
        pytest.param({"xi": -1.0}, "xi must be", id="xi-neg"),
        pytest.param({"xi": math.nan}, "xi must be", id="xi-nan"),
        pytest.param({"max_iter": 0}, "max_iter must be >= 1", id="max_iter"),
        pytest.param({"tol": -1e-4}, "tol must be finite and >= 0", id="tol"),
        pytest.param({"p": -0.1}, r"p must be in \[0, 1\]", id="p-neg"),
        pytest.param({"p": 1.5}, r"p must be in \[0, 1\]", id="p>1"),
        pytest.param({"p": math.nan}, r"p must be in \[0, 1\]", id="p-nan"),
        pytest.param({"draw": "per_batch"}, "draw must be one of", id="draw"),
        pytest.param({"grad_mode": "implicit"}, "grad_mode must be one of", id="grad_mode"),
        pytest.param({"cost": "cosine"}, "cost must be one of", id="cost"),
        pytest.param({"weights_from": "gate"}, "weights_from must be one of", id="weights_from"),
        pytest.param({"scope": "node"}, "scope must be one of", id="scope"),
        pytest.param({"k": 0}, r"k must be in \[1, num_experts=4\]", id="k0"),
        pytest.param({"k": 5}, r"k must be in \[1, num_experts=4\]", id="k>E"),
        pytest.param({"noise_std": -1.0}, "noise_std must be finite and >= 0", id="noise"),
        pytest.param({"logit_noise_std": -0.5}, "logit_noise_std must be", id="logit_noise"),
        pytest.param({"route_scale": 0.0}, "route_scale must be finite and > 0", id="scale0"),
        pytest.param({"route_scale": -2.0}, "route_scale must be", id="scale-neg"),
        pytest.param({"init_scale": 0.0}, "init_scale must be", id="init_scale"),
        pytest.param({"d_model": 0}, "d_model must be >= 1", id="d_model"),
        pytest.param({"num_experts": 0}, "num_experts must be >= 1", id="num_experts"),
    ],
)
def test_ssr_rejects_bad_options(kwargs, match):
    args = {"d_model": D, "num_experts": E, "k": 2}
    for name in list(args):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(ValueError, match=f"SelectiveSinkhornRouter: {match}"):
        SelectiveSinkhornRouter(args["d_model"], args["num_experts"], args["k"], **kwargs)


def test_ssr_rejects_a_seed_that_is_not_an_int():
    with pytest.raises(TypeError, match="SelectiveSinkhornRouter: seed must be an int"):
        SelectiveSinkhornRouter(D, E, seed=1.5)  # type: ignore[arg-type]
