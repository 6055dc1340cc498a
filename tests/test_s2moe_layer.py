"""S2MoELayer: the test properties of specs/s2moe.md §7 (1–9). State dict, wrapping, training on
real data, low precision, compile and errors are in tests/test_s2moe_layer_more.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import smoe
from smoe import MoELayer, S2MoELayer
from smoe.s2moe import info_nce, kl_uniform_loss

D, D_FF, E = 16, 32, 4


def _pair(k=1, dtype=torch.float32, **options):
    """A MoELayer and an S2MoELayer around its router and experts (same weights)."""
    base = MoELayer(D, D_FF, E, k, **options.pop("moe", {})).to(dtype)
    return base, S2MoELayer.from_moe_layer(base, **options)


def _zero_noise(layer, monkeypatch):
    monkeypatch.setattr(layer, "_draw", lambda like: (torch.zeros_like(like),) * 2)


def _seeded(fn, seed=1):
    torch.manual_seed(seed)
    return fn()


# ---- 1. eval: plain SMoE(x) bit-exactly ("clean"), g ⊙ SMoE(x) ("gated"); no RNG -------------
@pytest.mark.parametrize(
    "k, moe",
    [
        (1, {}),
        (2, {"capacity_factor": 1.0}),
        (2, {"activation": "swiglu", "shared_experts": 1, "shared_gate": "sigmoid"}),
        (2, {"router": "xmoe"}),
    ],
    ids=["topk1", "capacity", "swiglu-shared", "xmoe"],
)
def test_eval_clean_is_bit_equal_to_moe_layer_and_draws_no_noise(k, moe):
    base, s2 = _pair(k, moe=moe)
    base.eval(), s2.eval()
    x = torch.randn(3, 10, D)
    y, aux = base(x)
    rng = torch.get_rng_state()
    out, s2_aux = s2(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(out, y)
    assert torch.equal(s2_aux.tokens_per_expert, aux.tokens_per_expert)
    assert torch.equal(s2_aux.dropped_fraction, aux.dropped_fraction)
    assert s2_aux.losses.keys() == aux.losses.keys()  # no s2moe_unc in eval
    assert all(torch.equal(s2_aux.losses[n], v) for n, v in aux.losses.items())


def test_eval_gated_is_the_gate_times_the_moe_output():
    base, s2 = _pair(eval_output="gated")
    base.eval(), s2.eval()
    x = torch.randn(2, 9, D)
    rng = torch.get_rng_state()
    out, _ = s2(x)
    assert torch.equal(torch.get_rng_state(), rng)
    g = torch.sigmoid(s2.s2moe_gate(x))
    assert torch.equal(out, g * base(x)[0])


# ---- 2. n1 = n2 = 0 and μ = 0: x̂ = x, ŷ = y, out = y for any g ------------------------------
@pytest.mark.parametrize("route_noisy", ["own", "shared"])
def test_zero_noise_and_zero_mean_gives_the_clean_output(route_noisy, monkeypatch):
    base, s2 = _pair(2, torch.float64, route_noisy=route_noisy)
    s2.double()
    _zero_noise(s2, monkeypatch)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    x = x - x.mean(dim=1, keepdim=True)  # μ = 0 over the sequence
    torch.nn.init.normal_(s2.s2moe_gate.weight, std=3.0)  # g spread over (0, 1)
    torch.testing.assert_close(s2.perturb(x), x)
    out, aux = s2(x)
    torch.testing.assert_close(out, base(x)[0])
    unit = F.normalize(x.reshape(-1, D))
    want = F.cross_entropy(unit @ unit.T / 0.1, torch.arange(14))  # InfoNCE(x, x), τ = 0.1
    torch.testing.assert_close(aux.losses["s2moe_unc"], want)


# ---- 3. g = 1: out = y; g = 0: out = ŷ = SMoE(x̂) (routed on x̂) --------------------------------
@pytest.mark.parametrize("moe", [{}, {"capacity_factor": 1.0}], ids=["free", "capacity"])
def test_forced_gate_selects_one_path(moe):
    base, s2 = _pair(2, torch.float64, moe=moe)
    s2.double()
    x = torch.randn(2, 8, D, dtype=torch.float64) * 3
    torch.nn.init.zeros_(s2.s2moe_gate.weight)
    torch.nn.init.constant_(s2.s2moe_gate.bias, 100.0)  # sigmoid = 1.0 exactly
    torch.testing.assert_close(_seeded(lambda: s2(x)[0]), base(x)[0], rtol=1e-12, atol=1e-12)
    torch.nn.init.constant_(s2.s2moe_gate.bias, -100.0)  # sigmoid = 4e-44
    x_hat = _seeded(lambda: s2.perturb(x))
    assert not torch.allclose(x_hat, x)
    torch.testing.assert_close(_seeded(lambda: s2(x)[0]), base(x_hat)[0], rtol=1e-9, atol=1e-9)


# ---- 4. Monte-Carlo moments of "dsu": E[x̂] = x + μ, Var[x̂] = σ²(x² + 1) ----------------------
@pytest.mark.parametrize("stats", ["sequence", "token", "batch"])
def test_dsu_noise_has_the_spec_moments(stats):
    n, d = 4000, 3
    layer = S2MoELayer(d, 4, 2, noise_stats=stats, eps=1e-5).double()
    x = torch.randn(2, 4, d, dtype=torch.float64) * 2 + 0.5
    xr = x.expand(n, *x.shape)  # n copies; each draw sees the same statistics
    dims = {"sequence": (-2,), "token": (-1,), "batch": (0, 1, 2)}[stats]
    src = xr if stats == "batch" else x  # "batch" pools every token of the call
    var, mu = torch.var_mean(src, dim=dims, keepdim=True)
    mu, sigma = mu[0] if stats == "batch" else mu, (var + 1e-5).sqrt()
    sigma = sigma[0] if stats == "batch" else sigma
    if stats == "sequence":  # constant along the sequence axis
        assert mu.shape == (2, 1, d)
    draws = layer.perturb(xr)
    mean, variance = draws.mean(0), draws.var(0)
    want_var = sigma**2 * (x**2 + 1)
    # The spec's 3σ, widened to 4σ: 24 elements x 2 moments jointly (Bonferroni, < 0.4 %).
    assert ((mean - (x + mu)).abs() < 4 * (want_var / n).sqrt()).all()
    assert ((variance - want_var).abs() < 4 * want_var * math.sqrt(2 / (n - 1))).all()


def test_seq_dim_zero_on_time_major_equals_seq_dim_one_on_the_transpose():
    base, s0 = _pair(seq_dim=0)
    s1 = S2MoELayer.from_moe_layer(base, seq_dim=1)
    s1.s2moe_gate.load_state_dict(s0.s2moe_gate.state_dict())
    x = torch.randn(9, 3, D)  # [S, B, d]
    a = _seeded(lambda: s0.perturb(x))
    assert torch.equal(a.transpose(0, 1), _seeded(lambda: s1.perturb(x.transpose(0, 1))))
    (y0, aux0), (y1, aux1) = _seeded(lambda: s0(x)), _seeded(lambda: s1(x.transpose(0, 1)))
    torch.testing.assert_close(y0.transpose(0, 1), y1)
    torch.testing.assert_close(aux0.losses["s2moe_unc"], aux1.losses["s2moe_unc"])


# ---- 5. route_noisy="shared": identical experts for both paths -------------------------------
@pytest.mark.parametrize("route_noisy", ["shared", "own"])
def test_shared_routing_reuses_the_clean_experts(route_noisy, monkeypatch):
    _, s2 = _pair(2, route_noisy=route_noisy)
    plans, calls = [], []
    make_plan = smoe.ops.make_plan
    monkeypatch.setattr(
        smoe.ops, "make_plan", lambda e, *a, **kw: plans.append(e) or make_plan(e, *a, **kw)
    )
    s2.router.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 16, D) * torch.linspace(0.1, 4, 16).unsqueeze(-1)  # large σ: reroutes
    s2(x)
    (expert,) = plans
    T = x.shape[0] * x.shape[1]
    assert expert.shape == (2 * T, 2)
    shared = route_noisy == "shared"
    assert torch.equal(expert[:T], expert[T:]) == shared and len(calls) == (1 if shared else 2)


# ---- 6. InfoNCE ----------------------------------------------------------------------------------
def test_info_nce_is_the_mean_negative_log_softmax_diagonal():
    q, k = torch.randn(11, 5), torch.randn(11, 5)
    logits = F.normalize(q.double()) @ F.normalize(k.double()).T / 0.3
    want = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(info_nce(q, k, 0.3).double(), want)
    assert info_nce(q, k, 0.3).dtype == torch.float32


def test_info_nce_of_identical_keys_is_log_t_and_tends_to_zero_with_tau():
    q = torch.randn(13, 6)
    keys = torch.randn(1, 6).expand(13, 6)
    torch.testing.assert_close(info_nce(q, keys, 0.1), torch.tensor(math.log(13)))
    losses = [info_nce(q, q, tau).item() for tau in (1.0, 0.1, 0.01, 1e-3)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1e-6
    assert info_nce(q[:0], q[:0], 0.1) == 0


# ---- 7. the balance loss is the deterministic path's ---------------------------------------------
@pytest.mark.parametrize("balance", ["switch", "kl_uniform"])
def test_balance_loss_does_not_depend_on_the_noisy_path(balance, monkeypatch):
    _, s2 = _pair(balance=balance)
    x = torch.randn(3, 10, D)
    _, aux1 = _seeded(lambda: s2(x), 1)
    monkeypatch.setattr(s2, "perturb", lambda x: torch.randn_like(x) * 100)  # wild x̂ logits
    _, aux2 = _seeded(lambda: s2(x), 2)
    assert not torch.equal(aux1.losses["s2moe_unc"], aux2.losses["s2moe_unc"])
    names = {"switch": ["balance", "z"], "kl_uniform": ["kl_uniform", "z"]}[balance]
    assert set(aux1.losses) == {*names, "s2moe_unc"}
    assert all(torch.equal(aux1.losses[n], aux2.losses[n]) for n in names)
    routing = s2.router(x.reshape(-1, D))
    if balance == "kl_uniform":
        torch.testing.assert_close(aux1.losses["kl_uniform"], kl_uniform_loss(routing.logits))
    else:
        assert torch.equal(aux1.losses["balance"], routing.aux["balance"])


def test_kl_uniform_is_zero_for_uniform_routing_and_log_e_for_one_expert():
    assert kl_uniform_loss(torch.zeros(7, 5)).abs() < 1e-7
    rows = torch.eye(4)[torch.arange(8) % 4] * 50  # each token on one expert, uniform on average
    assert kl_uniform_loss(rows).abs() < 1e-6
    torch.testing.assert_close(
        kl_uniform_loss(torch.tensor([[60.0, 0, 0]] * 3)), torch.tensor(math.log(3))
    )
    _, s2 = _pair(balance="kl_uniform")
    torch.nn.init.zeros_(s2.router.weight)
    assert s2(torch.randn(2, 5, D))[1].losses["kl_uniform"].abs() < 1e-7


# ---- 8. reproducibility --------------------------------------------------------------------------
def _run(layer, x):
    y, aux = layer(x)
    loss = y.square().mean() + aux.loss()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [y, *aux.losses.values(), aux.tokens_per_expert, *grads]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("form", ["dsu", "instnorm"])
def test_same_seed_gives_identical_outputs_losses_and_gradients(device, form):
    layer = S2MoELayer(D, D_FF, E, 2, noise_form=form, capacity_factor=1.25).to(device)
    x = torch.randn(4, 30, D, device=device, requires_grad=True)
    a, b = _seeded(lambda: _run(layer, x), 7), _seeded(lambda: _run(layer, x), 7)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _seeded(lambda: _run(layer, x), 8)
    assert not torch.equal(a[0], c[0])  # the noise is fresh each forward


# ---- 9. gradcheck (float64) of the gate mix, the noise path and the InfoNCE loss -----------------
@pytest.mark.parametrize(
    "options",
    [{}, {"detach_stats": False, "unc_pair": "outputs"}, {"noise_form": "instnorm"}],
    ids=["dsu", "dsu-stats-grad", "instnorm"],
)
def test_gradcheck_of_the_layer_in_float64(options):
    # E = k = 2 with renormalised weights: every token uses both experts, no discrete choice flips
    layer = S2MoELayer(4, 6, 2, 2, **options).double()
    names = [n for n, _ in layer.named_parameters()]
    # detached statistics are constants in the analytical gradient only: then x is held fixed
    x = torch.randn(
        2,
        3,
        4,
        dtype=torch.float64,
        requires_grad=not (layer.detach_stats and layer.noise_form == "dsu"),
    )
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(x, *ps):
        torch.manual_seed(3)
        y, aux = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return y, aux.losses["s2moe_unc"]

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)
