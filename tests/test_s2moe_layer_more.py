"""S2MoELayer beyond the spec's §7 properties (tests/test_s2moe_layer.py): state dict, wrapping a
MoELayer, the InstanceNorm form, the InfoNCE subset, training on real text, low precision,
compile, CUDA, and one test per error."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoe import DEFAULT_LOSS_WEIGHTS, MoELayer, S2MoELayer
from smoe.s2moe import info_nce

D, D_FF, E = 16, 32, 4
STEPS = 40


def _seeded(fn, seed=1):
    torch.manual_seed(seed)
    return fn()


# ---- state dict, from_moe_layer --------------------------------------------------------------
@pytest.mark.parametrize("form", ["dsu", "instnorm"])
def test_state_dict_round_trip(form):
    a, b = (_seeded(lambda: S2MoELayer(D, D_FF, E, noise_form=form), s) for s in (0, 1))
    keys = ["router.weight", "experts.w_in", "experts.w_out", "s2moe_gate.weight"]
    keys += ["s2moe_gate.bias"]
    if form == "instnorm":
        keys += ["s2moe_alpha", "s2moe_beta", "s2moe_norm.weight", "s2moe_norm.bias"]
    assert sorted(a.state_dict()) == sorted(keys)
    x = torch.randn(2, 6, D)
    assert not torch.equal(_seeded(lambda: a(x)[0]), _seeded(lambda: b(x)[0]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(_seeded(lambda: a(x)[0]), _seeded(lambda: b(x)[0]))
    a.eval(), b.eval()
    assert torch.equal(a(x)[0], b(x)[0])
    # a MoELayer checkpoint loads into it, missing only the S2MoE parameters
    missing = b.load_state_dict(MoELayer(D, D_FF, E, 1).state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in keys if k.startswith("s2moe_"))


def test_from_moe_layer_shares_the_tensors_and_reproduces_the_layer_in_eval():
    base = MoELayer(D, D_FF, E, 2, capacity_factor=1.5, layer_index=3, shared_experts=1)
    base = base.double().eval()
    s2 = S2MoELayer.from_moe_layer(base, route_noisy="shared", unc_temperature=0.5)
    assert s2.router is base.router and s2.experts is base.experts and s2.shared is base.shared
    assert (s2.capacity_factor, s2.layer_index, s2.training) == (1.5, 3, False)
    assert s2.route_noisy == "shared" and s2.unc_temperature == 0.5
    assert s2.s2moe_gate.weight.dtype == torch.float64
    base_state = base.state_dict()
    for name, t in s2.state_dict().items():
        if not name.startswith("s2moe_"):
            assert t.data_ptr() == base_state[name].data_ptr(), name
    x = torch.randn(3, 5, D, dtype=torch.float64)
    assert torch.equal(s2(x)[0], base(x)[0])
    with torch.no_grad():  # one set of weights: an update through s2 is the base's
        s2.experts.w_in.add_(1.0)
    assert torch.equal(s2(x)[0], base(x)[0])
    with pytest.raises(TypeError, match="layer"):
        S2MoELayer.from_moe_layer(nn.Linear(D, D))


# ---- InstanceNorm form, InfoNCE subset --------------------------------------------------------
def test_instnorm_noise_is_alpha_beta_scaled_around_the_instance_norm():
    layer = S2MoELayer(D, D_FF, E, noise_form="instnorm", seq_dim=0)
    torch.nn.init.normal_(layer.s2moe_norm.weight)
    with torch.no_grad():
        layer.s2moe_alpha.fill_(0.3), layer.s2moe_beta.fill_(0.7)
    x = torch.randn(9, 2, D)  # [S, B, d]
    x_hat = _seeded(lambda: layer.perturb(x))
    torch.manual_seed(1)
    n1, n2 = torch.randn(2, 9, D), torch.randn(2, 9, D)  # drawn batch-first
    normed = layer.s2moe_norm(x.permute(1, 2, 0)).transpose(1, 2)  # [B, S, d]
    want = (1 + 0.3 * n1) * normed + 0.7 * n2
    torch.testing.assert_close(x_hat, want.transpose(0, 1))
    y, aux = layer(x)
    (y.sum() + aux.loss()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("pair", ["inputs", "outputs"])
def test_info_nce_uses_a_strided_subset_of_the_pair(pair, monkeypatch):
    base = MoELayer(D, D_FF, E, 1)
    s2 = S2MoELayer.from_moe_layer(base, unc_max_tokens=4, unc_pair=pair)
    monkeypatch.setattr(s2, "perturb", lambda x: x.flip(-1) * 0.5)
    x = torch.randn(2, 5, D)  # T = 10 > 4: every 3rd token, 0, 3, 6, 9
    flat, x_hat = x.reshape(-1, D), x.flip(-1).reshape(-1, D) * 0.5
    a, b = (flat, x_hat) if pair == "inputs" else (base(flat)[0], base(x_hat)[0])
    want = info_nce(a[::3], b[::3], 0.1)
    torch.testing.assert_close(s2(x)[1].losses["s2moe_unc"], want)
    assert not torch.allclose(want, info_nce(a, b, 0.1))


def test_default_loss_weights_cover_the_s2moe_losses():
    assert DEFAULT_LOSS_WEIGHTS["s2moe_unc"] == 0.1 and DEFAULT_LOSS_WEIGHTS["kl_uniform"] == 0.01
    _, aux = S2MoELayer(D, D_FF, E, balance="kl_uniform")(torch.randn(2, 4, D))
    want = 0.1 * aux.losses["s2moe_unc"] + 0.01 * aux.losses["kl_uniform"]
    torch.testing.assert_close(aux.loss(), want + 1e-3 * aux.losses["z"])


# ---- training on real text --------------------------------------------------------------------
def test_training_a_char_model_on_tiny_shakespeare_lowers_the_loss():
    from smoe.data.text import eval_windows, random_batch, tiny_shakespeare

    corpus = tiny_shakespeare()
    V, d = len(corpus.vocab), 32
    emb, head = nn.Embedding(V, d), nn.Linear(d, V)
    norm, moe = nn.LayerNorm(d), S2MoELayer(d, 64, E, 1)
    params = [*emb.parameters(), *head.parameters(), *norm.parameters(), *moe.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def loss_of(idx, target):
        h = emb(idx)
        out, aux = moe(norm(h))
        logits = head(h + out)
        return F.cross_entropy(logits.reshape(-1, V), target.reshape(-1)), aux

    def val_loss():
        moe.eval()
        with torch.no_grad():
            loss = sum(loss_of(x, y)[0] for x, y in eval_windows(corpus.val, 16, 32, max_batches=4))
        moe.train()
        return loss / 4

    before, gen = val_loss(), torch.Generator().manual_seed(0)
    gate = moe.s2moe_gate.weight.detach().clone()
    for _ in range(STEPS):
        loss, aux = loss_of(*random_batch(corpus.train, 16, 32, gen))
        opt.zero_grad()
        (loss + aux.loss()).backward()
        opt.step()
    after = val_loss()
    assert after < before - 1.0, (before, after)  # from ~ln(66) = 4.2 (bigram-level model)
    assert not torch.equal(moe.s2moe_gate.weight, gate)
    assert (aux.tokens_per_expert > 0).all()


# ---- precision, compile --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_forward_is_close_to_float32(dtype, tol, autocast):
    layer = S2MoELayer(D, D_FF, 2, 2)  # k = E: no routing flip in low precision
    x = torch.randn(2, 12, D)
    y, aux = _seeded(lambda: layer(x))
    if autocast:
        with torch.autocast("cpu", dtype=dtype):
            y16, aux16 = _seeded(lambda: layer(x))
    else:
        layer16 = S2MoELayer(D, D_FF, 2, 2).to(dtype)
        layer16.load_state_dict(layer.state_dict())
        y16, aux16 = _seeded(lambda: layer16(x.to(dtype)))
    assert y16.dtype == dtype and aux16.losses["s2moe_unc"].dtype == torch.float32
    torch.testing.assert_close(y16.float(), y, atol=tol, rtol=tol)
    for name, value in aux.losses.items():
        torch.testing.assert_close(aux16.losses[name], value, atol=tol, rtol=tol)


def test_float64_stays_float64():
    layer = S2MoELayer(D, D_FF, E, noise_stats="batch").double()
    y, aux = layer(torch.randn(7, D, dtype=torch.float64))
    assert y.dtype == aux.losses["s2moe_unc"].dtype == torch.float64


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph_with_the_same_noise_as_eager(dynamic):
    layer = S2MoELayer(D, D_FF, E, 2, capacity_factor=1.5, balance="kl_uniform")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x = torch.randn(2, 10, D, requires_grad=True)
    for mode in (True, False):
        layer.train(mode)
        (y1, a1), (y2, a2) = _seeded(lambda: layer(x)), _seeded(lambda: compiled(x))
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(a1.loss(), a2.loss())
        wrt = [x, *layer.parameters()]  # (the gate is unused in eval)
        g1 = torch.autograd.grad(y1.square().sum() + a1.loss(), wrt, allow_unused=True)
        g2 = torch.autograd.grad(y2.square().sum() + a2.loss(), wrt, allow_unused=True)
        for u, v in zip(g1, g2):
            assert (u is None) == (v is None)
            if u is not None:
                torch.testing.assert_close(u, v)


# ---- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_eval_matches_cpu_and_training_has_no_host_sync():
    layer = S2MoELayer(D, D_FF, E, 2, capacity_factor=1.0, shared_experts=1).eval()
    x = torch.randn(4, 32, D)
    want = layer(x)[0]
    gpu, xg = layer.cuda(), x.cuda()
    torch.testing.assert_close(gpu(xg)[0].cpu(), want, atol=1e-4, rtol=1e-4)
    gpu.train()
    gpu(xg)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = gpu(xg)
        loss = y.square().mean() + aux.loss()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.backward()
    assert loss.isfinite()


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [
        ("noise_form", "gaussian"),
        ("noise_stats", "feature"),
        ("route_noisy", "none"),
        ("eval_output", "noisy"),
        ("balance", "importance"),
        ("unc_pair", "hidden"),
        ("seq_dim", 1.0),
        ("detach_stats", 1),
        ("eps", 0.0),
        ("eps", float("nan")),
        ("unc_temperature", 0.0),
        ("unc_temperature", -1.0),
        ("unc_max_tokens", 1),
        ("unc_max_tokens", 2.5),
    ],
)
def test_bad_option_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        S2MoELayer(D, D_FF, E, **{name: value})


@pytest.mark.parametrize(
    "options, shape, name",
    [
        ({}, (6, D), "noise_stats"),
        ({"noise_form": "instnorm"}, (6, D), "noise_form"),
        ({"seq_dim": 3}, (2, 3, D), "seq_dim"),
        ({"seq_dim": -4}, (2, 3, D), "seq_dim"),
        ({"seq_dim": -1}, (2, 3, D), "seq_dim"),
    ],
)
def test_bad_layout_is_refused_in_training_by_name(options, shape, name):
    layer = S2MoELayer(D, D_FF, E, **options)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        layer(torch.randn(shape))
    assert layer.eval()(torch.randn(shape))[0].shape == shape  # eval draws no noise


@pytest.mark.parametrize("router", ["expert_choice", "usmoe"])
def test_non_token_choice_router_is_refused(router):
    with pytest.raises(ValueError, match=r"\brouter\b.*token-choice"):
        S2MoELayer(D, D_FF, E, router=router)


def test_router_with_its_own_plan_is_refused_at_forward():
    layer = S2MoELayer(D, D_FF, E, router="vmoe", router_options={"capacity_factor": 1.0})
    with pytest.raises(ValueError, match=r"\brouter\b.*own plan"):
        layer(torch.randn(2, 4, D))
