"""XMoERouter (specs/xmoe.md §3-§5, §9, §11): gates, selection, balance loss, freezing, the
expert-norm projection, the fastmoe community variant, interpolation in the layer, errors."""

from __future__ import annotations

import math

import pytest
import torch

from smoe import MoELayer, XMoERouter, ops, xmoe_balance_loss, xmoe_community_balance_loss
from smoe import reference as ref
from smoe.losses import DEFAULT_LOSS_WEIGHTS
from smoe.metrics import representation_collapse
from smoe.routing import available_routers, build_router, router_info

D, N = 12, 8


def _scores(router: XMoERouter, x: torch.Tensor) -> torch.Tensor:
    """The float64 reference scores of a router on x."""
    return ref.cosine_scores(
        x.double(),
        router.proj.double(),
        router.expert_emb.double(),
        router.temperature.double(),
        normalize_tokens=not router.community,
    ).cos


# --- construction and defaults ----------------------------------------------------------------


def test_xmoe_router_defaults():
    r = XMoERouter(D, N)
    assert r.k == 1 and r.routing_dim == N // 2 and r.proj.shape == (N // 2, D)
    assert r.expert_emb.shape == (N, N // 2) and r.expert_norm == 0.1
    assert r.temperature.item() == pytest.approx(0.3) and r.temperature.requires_grad
    assert r.balance_temperature.item() == pytest.approx(0.3)
    assert "balance_temperature" in r.state_dict()
    s = XMoERouter(D, N, gate="sigmoid")
    assert s.temperature.item() == pytest.approx(0.07)
    assert s.balance_temperature.item() == pytest.approx(0.07)
    assert XMoERouter(D, 1).routing_dim == 1
    # W ~ N(0, 0.02), rows of E at norm 0.1 from the start
    big = XMoERouter(512, 64)
    assert big.proj.std().item() == pytest.approx(0.02, rel=0.05)
    norms = torch.linalg.vector_norm(big.expert_emb, dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1))


def test_xmoe_community_defaults():
    r = XMoERouter(D, 32, 2, variant="fastmoe_community")
    assert r.routing_dim == 8 and r.expert_norm == 1.5 and r.community
    assert "temperature" not in r.state_dict() and r.temperature.item() == 1.0
    assert not any(n == "temperature" for n, _ in r.named_parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"k": 9}, "k must be in", id="k>N"),
        pytest.param({"k": 0}, "k must be in", id="k0"),
        pytest.param({"gate": "relu"}, "gate must be one of", id="gate"),
        pytest.param({"variant": "torchscale"}, "variant must be one of", id="variant"),
        pytest.param({"mix": "add"}, "mix must be one of", id="mix"),
        pytest.param({"temperature_init": 0.0}, "temperature_init must be finite and > 0", id="t0"),
        pytest.param({"temperature_init": -0.3}, "temperature_init must be", id="t-neg"),
        pytest.param({"expert_norm": 0.0}, "expert_norm must be finite and > 0", id="norm0"),
        pytest.param({"expert_norm": float("inf")}, "expert_norm must be", id="norm-inf"),
        pytest.param({"routing_dim": 0}, "routing_dim must be >= 1", id="de0"),
        pytest.param(
            {"variant": "fastmoe_community", "gate": "sigmoid"}, "no temperature", id="comm-gate"
        ),
    ],
)
def test_xmoe_router_rejects_bad_options(kwargs, match):
    k = kwargs.pop("k", 1)
    with pytest.raises(ValueError, match=match):
        XMoERouter(D, N, k, **kwargs)
    with pytest.raises(ValueError, match=match):
        build_router("xmoe", D, N, k, **kwargs)


# --- selection and gates (§9.3, §9.4) ---------------------------------------------------------


@pytest.mark.parametrize(
    "gate, k", [("softmax", 1), ("softmax", 2), ("softmax", 8), ("sigmoid", 1), ("sigmoid", 3)]
)
def test_xmoe_router_selection_and_gates_match_reference(gate, k):
    r = XMoERouter(D, N, k, gate=gate).double()
    x = torch.randn(200, D, dtype=torch.float64)
    out = r(x)
    cos = _scores(r, x)
    expert, weight = ref.xmoe_gate(cos, r.temperature.item(), k, gate=gate)
    assert torch.equal(out.expert, expert)
    torch.testing.assert_close(out.weight, weight)
    torch.testing.assert_close(out.logits, cos / r.temperature.double())
    if gate == "softmax" and k > 1:
        torch.testing.assert_close(out.weight.sum(-1), torch.ones(200, dtype=torch.float64))
    if gate == "softmax" and k == 1:  # the normaliser runs over all N experts
        p = torch.softmax(cos / r.temperature.double(), -1)
        torch.testing.assert_close(out.weight[:, 0], p.max(-1).values)
    if gate == "sigmoid":
        picked = torch.gather(cos, 1, out.expert.long()) / r.temperature.double()
        torch.testing.assert_close(out.weight, torch.sigmoid(picked))


def test_xmoe_router_selection_equals_float64_argmax_from_float32():
    # §9.3: the top-1 expert is argmax of (h W^T / |h W^T|) . E_hat, computed in float64.
    r = XMoERouter(D, N)
    x = torch.randn(300, D)
    cos = _scores(r, x)
    top2 = cos.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # float32 cannot separate closer scores
    assert clear.float().mean() > 0.95
    assert torch.equal(r(x).expert[clear, 0].long(), cos.argmax(-1)[clear])


def test_xmoe_router_weights_are_float32_under_bf16_autocast():
    r = XMoERouter(D, N, 2)
    x = torch.randn(10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x.bfloat16())
    assert out.weight.dtype == out.logits.dtype == torch.float32
    assert out.aux["xmoe_balance"].dtype == torch.float32


# --- expert norm (§3.7, §9.8) -----------------------------------------------------------------


def test_xmoe_router_projects_experts_to_their_norm_in_training_only():
    r = XMoERouter(D, N, expert_norm=0.1)
    with torch.no_grad():
        r.expert_emb.mul_(torch.rand(N, 1) * 5)  # an optimiser step moved the rows
    before = r.expert_emb.detach().clone()
    r.eval()(torch.randn(4, D))
    assert torch.equal(r.expert_emb, before)  # eval mutates nothing
    r.train()(torch.randn(4, D))
    norms = torch.linalg.vector_norm(r.expert_emb, dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1))


def test_xmoe_router_expert_norm_never_changes_outputs():
    torch.manual_seed(3)
    a = XMoERouter(D, N, 2, expert_norm=0.1)
    torch.manual_seed(3)
    b = XMoERouter(D, N, 2, expert_norm=4.0)
    x = torch.randn(50, D)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.expert, rb.expert)
    torch.testing.assert_close(ra.weight, rb.weight)
    torch.testing.assert_close(ra.aux["xmoe_balance"], rb.aux["xmoe_balance"])


def test_xmoe_router_two_forwards_then_one_backward():
    # The in-place projection of E must not invalidate a graph saved by an earlier forward.
    r = XMoERouter(D, N, 2)
    x = torch.randn(6, D)
    loss = r(x).weight.sum() + r(x * 2).weight.sum()
    loss.backward()
    assert r.expert_emb.grad is not None and torch.isfinite(r.expert_emb.grad).all()


# --- balance loss (§4, §9.6) ------------------------------------------------------------------


def test_xmoe_balance_loss_spec_values_and_gradient_through_p_only():
    T = 16
    balanced = torch.arange(T, dtype=torch.int32).remainder(N).unsqueeze(1)
    uniform = torch.zeros(T, N, requires_grad=True)
    assert xmoe_balance_loss(uniform, balanced, N, 0.3).item() == pytest.approx(1.0)
    collapsed = torch.full((T, N), -1.0)
    collapsed[:, 0] = 1.0
    on_zero = torch.zeros(T, 1, dtype=torch.int32)
    assert xmoe_balance_loss(collapsed, on_zero, N, 0.01).item() == pytest.approx(N, rel=1e-6)
    # gradient through P only: equal to d/ds of N * sum_i f_i P_i(s) with f held constant
    cos = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    expert = ops.topk_softmax(cos.detach(), 2).expert
    (g,) = torch.autograd.grad(xmoe_balance_loss(cos, expert, N, 0.07), cos)
    f = torch.bincount(expert[:, 0].long(), minlength=N).double() / T
    (want,) = torch.autograd.grad(N * (f * torch.softmax(cos / 0.07, -1).mean(0)).sum(), cos)
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        xmoe_balance_loss(cos, expert, N, 0.07).double(),
        ref.xmoe_balance_loss(cos, expert, N, 0.07),
    )


def test_xmoe_router_balance_loss_matches_reference_and_ignores_tau():
    r = XMoERouter(D, N, 2)
    x = torch.randn(40, D)
    out = r(x)
    want = ref.xmoe_balance_loss(_scores(r, x), out.expert, N, 0.3)
    torch.testing.assert_close(out.aux["xmoe_balance"].double(), want, rtol=1e-5, atol=1e-6)
    out.aux["xmoe_balance"].backward()  # uses the fixed tau0: the learnable tau gets nothing
    assert r.temperature.grad is not None and r.temperature.grad.item() == 0.0
    assert r.proj.grad.abs().sum() > 0
    r.zero_grad()
    r(x).weight.sum().backward()  # tau gets its gradient through the gate
    assert r.temperature.grad.abs().item() > 0


def test_xmoe_router_gradcheck():
    # §9.5: the gate and the balance loss w.r.t. h, W, E and tau (float64, selection fixed).
    r = XMoERouter(5, 4, 2).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    names = ("proj", "expert_emb", "temperature")
    params = tuple(getattr(r, n).detach().clone().requires_grad_() for n in names)

    def fn(x, *p):
        out = torch.func.functional_call(r.eval(), dict(zip(names, p)), (x,))
        return out.weight, out.aux["xmoe_balance"]

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


# --- freeze (§5, §9.7) ------------------------------------------------------------------------


def test_xmoe_router_freeze_stops_gradients_and_keeps_the_balance_loss():
    r = XMoERouter(D, N, 2).freeze()
    assert r.frozen and not any(p.requires_grad for p in r.parameters())
    x = torch.randn(8, D, requires_grad=True)
    out = r(x)
    out.aux["xmoe_balance"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # reaches the layers below through h


@pytest.mark.parametrize("how", ["option", "method"])
def test_moe_layer_freeze_freezes_router_and_experts(how):
    options = {"frozen": True} if how == "option" else {}
    layer = MoELayer(D, 16, N, 2, router="xmoe", router_options=options)
    if how == "method":
        assert any(p.requires_grad for p in layer.experts.parameters())
        layer.freeze()
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(2, 5, D, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.loss()).backward()
    assert "xmoe_balance" in aux.losses and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.parameters())


# --- the community variant (§11, §9.9) -------------------------------------------------------


def test_xmoe_community_variant_properties():
    r = build_router("xmoe_community", D, N, 2)
    assert r.variant == "fastmoe_community"
    x = torch.randn(30, D)
    out, out2 = r(x), r(2 * x)
    torch.testing.assert_close(out2.logits, 2 * out.logits)  # tokens not normalised
    s = _scores(r, x)
    torch.testing.assert_close(out.logits.double(), s, rtol=1e-5, atol=1e-5)
    picked = torch.gather(s, 1, out.expert.long())
    torch.testing.assert_close(out.weight.double(), torch.softmax(picked, -1), rtol=1e-5, atol=1e-6)
    norms = torch.linalg.vector_norm(r.expert_emb, dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1.5))
    want = ref.xmoe_community_balance_loss(s, out.expert, N)
    got = out.aux["xmoe_community_balance"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_xmoe_community_balance_loss_is_one_over_k_at_balance(k):
    T = 8
    expert = torch.tensor([[(t + j) % N for j in range(k)] for t in range(T)], dtype=torch.int32)
    loss = xmoe_community_balance_loss(torch.zeros(T, N), expert, N)
    assert loss.item() == pytest.approx(1.0 / k)


# --- registry and the layer -------------------------------------------------------------------


def test_xmoe_routers_are_registered():
    assert {"xmoe", "xmoe_community"} <= set(available_routers())
    for name, loss, weight in (
        ("xmoe", "xmoe_balance", 0.01),
        ("xmoe_community", "xmoe_community_balance", 0.0),
    ):
        info = router_info(name)
        assert info.aux_losses == (loss,) and DEFAULT_LOSS_WEIGHTS[loss] == weight
        assert info.is_causal(build_router(name, D, N, 2)) and info.selection == "token_choice"


def test_moe_layer_interpolate_mixes_ffn_and_input():
    # mix="interpolate": y = sum_j g_j FFN_j(x) + (1 - sum_j g_j) x over kept slots; a token
    # whose slots are all dropped passes as x (tmoe).
    torch.manual_seed(5)
    gate = MoELayer(D, 16, N, 1, router="xmoe", router_options={"gate": "sigmoid"})
    mixed = MoELayer(
        D, 16, N, 1, router="xmoe", router_options={"gate": "sigmoid", "mix": "interpolate"}
    )
    mixed.load_state_dict(gate.state_dict())
    gate.eval(), mixed.eval()
    x = torch.randn(20, D)
    y_gate, _ = gate(x)
    y_mix, _ = mixed(x)
    alpha = mixed.router(x).weight
    torch.testing.assert_close(y_mix, y_gate + (1 - alpha) * x)
    tight = MoELayer(
        D, 16, N, 1, router="xmoe", router_options={"mix": "interpolate"}, capacity_factor=0.1
    ).eval()
    y, aux = tight(x)
    plan = ops.make_plan(tight.router(x).expert, N, capacity=math.ceil(20 * 0.1 / N))
    dropped = ~plan.kept[:, 0]
    assert dropped.any() and torch.equal(y[dropped], x[dropped])


def test_xmoe_router_compiles_in_training_mode():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = XMoERouter(D, N, 2).train()
    torch.manual_seed(0)
    compiled_router = XMoERouter(D, N, 2).train()
    compiled = torch.compile(compiled_router, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for r in (eager, compiled_router):
            r.expert_emb.mul_(3.0)  # so that the in-place projection has work to do
    x = torch.randn(10, D)
    a, b = eager(x), compiled(x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.weight, b.weight)
    (a.weight.sum() + a.aux["xmoe_balance"]).backward()
    (b.weight.sum() + b.aux["xmoe_balance"]).backward()
    for p, q in zip(eager.parameters(), compiled_router.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p.grad, q.grad)


# --- representation collapse (§3.3, §9.10) ----------------------------------------------------


def test_representation_collapse_of_xmoe_routing_equals_the_float64_formula():
    r = XMoERouter(D, 4)
    h = torch.randn(400, D)
    labels = r(h).expert[:, 0].long()
    classes = labels.unique()
    K = classes.numel()
    assert K >= 2
    x = h.double()
    mu = x.mean(0)
    sw = torch.zeros(D, D, dtype=torch.float64)
    sb = torch.zeros(D, D, dtype=torch.float64)
    for c in classes:
        xc = x[labels == c]
        mc = xc.mean(0)
        sw += (xc - mc).T @ (xc - mc)
        sb += torch.outer(mc - mu, mc - mu)
    want = torch.trace((sw / x.shape[0]) @ torch.linalg.pinv(sb / K)).item()
    assert representation_collapse(h, labels) == pytest.approx(want, rel=1e-6)
    assert representation_collapse(h, labels, nc1_scale=True) == pytest.approx(want / K, rel=1e-6)


# --- paper-parity experts (§3.1) --------------------------------------------------------------


def test_moe_layer_base_stack_experts_match_a_per_token_loop():
    torch.manual_seed(2)
    layer = MoELayer(D, 16, N, 1, router="xmoe", experts="base_stack", depth=3).eval()
    ex = layer.experts
    with torch.no_grad():  # non-trivial norms
        ex.norm_weight.uniform_(0.5, 1.5)
        ex.norm_bias.normal_(0, 0.1)
    x = torch.randn(9, D)
    y, _ = layer(x)
    routing = layer.router(x)
    want = torch.zeros_like(x, dtype=torch.float64)
    for t in range(9):
        e = int(routing.expert[t, 0])
        v = x[t].double()
        for i, ffn in enumerate(ex.ffns):
            n = torch.nn.functional.layer_norm(v, (D,), eps=1e-5)
            n = n * ex.norm_weight[i, e].double() + ex.norm_bias[i, e].double()
            v = v + ref.expert_ffn(n[None], ffn.w_in[e].double(), ffn.w_out[e].double(), "gelu")[0]
        want[t] = routing.weight[t, 0].double() * v
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="experts must be 'ffn' or 'base_stack'"):
        MoELayer(D, 16, N, 1, experts="stack")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MoELayer(D, 16, N, 1, experts="base_stack", depth=0)
