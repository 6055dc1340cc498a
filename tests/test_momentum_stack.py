"""MomentumSMoE / AdamSMoE / Robust MomentumSMoE across a stack of MoE layers (issue 23).

specs/momentum_smoe.md §11 at the stack level (the op's own tests are tests/ops/test_momentum*.py):
parity with plain SMoE, the closed form, Adam's first step, no state leak, gradcheck through a
3-layer stack, bf16 with fp32 state, every router, the registry entries on the char LM.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smoe import MoELayer, MomentumMoE, MomentumState, RoutingContext, TopKRouter
from smoe.examples.charlm import quick_config, run
from smoe.models.charlm import LAYOUTS, CharLM, DenseFFN, LMBlock
from smoe.ops import robust_coefficients
from smoe.routing import MOMENTUM_ROUTERS, available_routers, register_router, router_info

D, B, S = 8, 2, 5
KINDS = ("heavy_ball", "adam", "robust")


class ConstantMoE(nn.Module):
    """A stand-in MoE layer whose output is a fixed tensor; records its inputs."""

    def __init__(self, u: torch.Tensor) -> None:
        super().__init__()
        self.u, self.inputs = u, []

    def forward(self, x, context=None):
        self.inputs.append(x)
        return self.u.to(x.dtype).expand_as(x), None


def _moe(seed: int, bias: bool = True, dtype=torch.float32, router: str = "topk") -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, 12, 4, 2, bias=bias, router=router).to(dtype)


def _stack(layers, x, kind=None):
    """Plain ``x + u`` over MoE layers (kind None) or the momentum stack over MomentumMoE."""
    state = MomentumState.zeros(x, kind) if kind else None
    for layer in layers:
        if kind:
            delta, state, _ = layer(x, state)
            x = x + delta
        else:
            x = x + layer(x)[0]
    return x


def _lm(router: str = "momentum", seed: int = 0, **kw) -> CharLM:
    torch.manual_seed(seed)
    kw = {"d_model": 16, "n_layers": 3, "n_heads": 2, "context": 8, "num_experts": 4, **kw}
    return CharLM(20, router=router, **kw)


IDX = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mu0_gamma1_sign_plus_is_plain_smoe_exactly(layout):
    mom = _lm(layout=layout, momentum_options={"mu": 0.0, "gamma": 1.0, "sign": 1.0}).eval()
    plain = _lm("topk", layout=layout, router_options={"bias": True, "aux": False}).eval()
    sd = {k.replace(".ffn.moe.", ".ffn."): v for k, v in mom.state_dict().items()}
    plain.load_state_dict(sd)
    assert torch.equal(mom(IDX)[0], plain(IDX)[0])


def test_post_ln_block_is_the_reference_double_residual():
    # h <- LN2(h + LN_m(h + delta)) after h <- LN1(h + Attn(h)) (specs/momentum_smoe.md §6)
    torch.manual_seed(0)
    u = torch.randn(D)
    block = LMBlock(D, 2, MomentumMoE(ConstantMoE(u)), layout="post_ln")
    for ln in (block.ln1, block.ln2, block.ln_m):
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    x = torch.randn(B, S, D)
    state = MomentumState.zeros(x, "heavy_ball")
    out, _, new = block(x, RoutingContext(batch_shape=(B, S), causal=True), state)
    h = block.ln1(x + block.attn(x)[0])
    delta = -(0.7 * state.m + u)
    torch.testing.assert_close(out, block.ln2(h + block.ln_m(h + delta)))
    torch.testing.assert_close(new.m, -delta)


def test_pre_ln_out_block_is_the_vmoe_momentum_block():
    # x <- x + Attn(LN1(x)); then LN_out(x + delta) with delta from LN2(x) (V-MoE, §6), and the
    # dense blocks of that layout get the same LayerNorm after the residual, state untouched
    torch.manual_seed(0)
    u = torch.randn(D)
    moe = ConstantMoE(u)
    block = LMBlock(D, 2, MomentumMoE(moe), layout="pre_ln_out")
    dense = LMBlock(D, 2, DenseFFN(D, 16), layout="pre_ln_out")
    for ln in (block.ln1, block.ln2, block.ln_out, dense.ln_out):
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    x = torch.randn(B, S, D)
    ctx = RoutingContext(batch_shape=(B, S), causal=True)
    state = MomentumState.zeros(x, "heavy_ball")
    state = state._replace(m=torch.randn_like(state.m))
    out, _, new = block(x, ctx, state)
    h = x + block.attn(block.ln1(x))[0]
    torch.testing.assert_close(moe.inputs[-1], block.ln2(h))
    delta = -(0.7 * state.m + u)
    torch.testing.assert_close(out, block.ln_out(h + delta))
    torch.testing.assert_close(new.m, -delta)
    out, _, same = dense(x, ctx, state)
    h = x + dense.attn(dense.ln1(x))[0]
    torch.testing.assert_close(out, dense.ln_out(h + dense.ffn(dense.ln2(h))))
    assert same is state


def test_reference_experts_relu_biases_and_dropout_inside():
    model = _lm(activation="relu", expert_bias=True, expert_dropout=0.3)
    for layer in model.moe_layers():
        ex = layer.experts
        assert ex.activation == "relu" and ex.b_in is not None and ex.drop.p == 0.3
    model.train()
    torch.manual_seed(0)
    a = model(IDX)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, model(IDX)[0])  # the experts' dropout draws
    model.eval()
    assert torch.equal(model(IDX)[0], model(IDX)[0])


def test_sign_minus_is_plain_smoe_with_negated_expert_outputs():
    x = torch.randn(B, S, D)
    plain = [_moe(i) for i in range(3)]
    mom = [MomentumMoE(_moe(i), moe_index=i, mu=0.0, gamma=1.0, sign=-1.0) for i in range(3)]
    with torch.no_grad():
        for layer in plain:
            layer.experts.w_out.neg_()
            layer.experts.b_out.neg_()
    assert torch.equal(_stack(mom, x, "heavy_ball"), _stack(plain, x))


@pytest.mark.parametrize("kind", KINDS)
def test_first_layer_output_is_independent_of_mu(kind):
    x = torch.randn(B, S, D)
    moe = _moe(0)
    out = [
        MomentumMoE(moe, kind=kind, mu=mu)(x, MomentumState.zeros(x, kind))[0] for mu in (0, 0.9)
    ]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("mu, gamma", [(0.7, 1.0), (0.9, 0.5), (0.0, 2.0)])
def test_closed_form_over_identical_layers_with_constant_u(mu, gamma):
    u = torch.randn(D, dtype=torch.float64)
    x = torch.zeros(B, S, D, dtype=torch.float64)
    state = MomentumState.zeros(x, "heavy_ball")
    for t in range(6):
        layer = MomentumMoE(ConstantMoE(u), moe_index=t, mu=mu, gamma=gamma)
        delta, state, _ = layer(x, state)
        expected = gamma * u * (1 - mu ** (t + 1)) / (1 - mu)
        torch.testing.assert_close(state.m, expected.expand_as(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(delta, -state.m)


def test_dense_layers_leave_the_state_untouched():
    block = LMBlock(D, 2, DenseFFN(D, 16))
    x = torch.randn(B, S, D)
    state = MomentumState.zeros(x, "adam")
    _, aux, out = block(x, RoutingContext(batch_shape=(B, S), causal=True), state)
    assert out is state and aux is None
    model = _lm("adam", n_layers=4, moe_every=2)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["DenseFFN", "MomentumMoE"] * 2
    assert [b.ffn.moe_index for b in model.blocks[1::2]] == [0, 1]
    assert [b.ffn.step_kind for b in model.blocks[1::2]] == ["adam", "heavy_ball"]
    assert [m.layer_index for m in model.moe_layers()] == [1, 3]


def test_adam_first_step_is_sign_like_and_later_layers_are_heavy_ball():
    gen = torch.Generator().manual_seed(0)
    u = (torch.rand(D, generator=gen) + 0.1) * torch.randn(D, generator=gen).sign()
    x = torch.zeros(B, S, D)
    first = MomentumMoE(ConstantMoE(u), kind="adam", gamma1=0.8, mu=0.7, gamma=1.0)
    delta, state, _ = first(x, MomentumState.zeros(x, "adam"))
    step = 0.8 * (1 - 0.9) / math.sqrt(1 - 0.999) * u.sign()
    torch.testing.assert_close(delta, (-step).expand_as(x), rtol=1e-3, atol=0)
    torch.testing.assert_close(state.m, u.expand_as(x))
    second = MomentumMoE(ConstantMoE(u), kind="adam", moe_index=1, mu=0.7)
    delta2, state2, _ = second(x, state)
    assert state2.p is state.p and state2.v is state.v
    torch.testing.assert_close(state2.m, 1.7 * u.expand_as(x))
    torch.testing.assert_close(delta2, -state2.m)


def test_robust_layers_read_the_look_ahead_point():
    u = torch.randn(D)
    x = torch.randn(B, S, D)
    layers = [MomentumMoE(ConstantMoE(u), kind="robust", moe_index=i) for i in range(2)]
    a, b, c = robust_coefficients(0.2, 1.25)
    state = MomentumState.zeros(x, "robust")
    d0, state, _ = layers[0](x, state)
    assert torch.equal(layers[0].moe.inputs[0], x)  # the first look-ahead is h itself
    torch.testing.assert_close(state.m, -u.expand_as(x))
    torch.testing.assert_close(d0, -a * u.expand_as(x))
    d1, state1, _ = layers[1](x, state)
    torch.testing.assert_close(layers[1].moe.inputs[0], x + c * a * state.m)
    torch.testing.assert_close(state1.m, -u + b * state.m)
    assert (a, b) == pytest.approx((0.96, 0.04), abs=1e-12)


@pytest.mark.parametrize("router", sorted(MOMENTUM_ROUTERS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_forwards_are_bitwise_equal_and_the_state_is_not_kept(router, layout):
    model = _lm(router, layout=layout).eval()
    assert torch.equal(model(IDX)[0], model(IDX)[0])
    assert not list(model.buffers())
    for block in model.blocks:
        assert {id(p) for p in block.ffn.parameters()} == {
            id(p) for p in block.ffn.moe.parameters()
        }
    assert all(".ffn.moe." in k for k in model.state_dict() if ".ffn." in k)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_through_a_three_layer_float64_stack(kind):
    layers = [
        MomentumMoE(_moe(i, dtype=torch.float64), kind=kind, moe_index=i, adam_layers=2)
        for i in range(3)
    ]
    x = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    b = layers[0].moe.experts.b_out  # reaches the later layers through the state and the input
    assert torch.autograd.gradcheck(lambda x, b: _stack(layers, x, kind), (x, b), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_with_fp32_state_stays_finite_for_large_u(kind):
    x = torch.zeros(B, S, D, dtype=torch.bfloat16)
    state = MomentumState.zeros(x, kind)
    assert state.m.dtype == torch.float32
    for i, scale in enumerate((1e4, -1e4, 1e4)):
        u = torch.linspace(-scale, scale, D)
        layer = MomentumMoE(ConstantMoE(u), kind=kind, moe_index=i, mu=0.9)
        delta, state, _ = layer(x, state)
        assert delta.dtype == torch.bfloat16 and state.m.dtype == torch.float32
        assert all(t.isfinite().all() for t in (delta, *state) if t is not None)


@pytest.mark.parametrize("router", sorted(available_routers()))
def test_the_stack_works_with_every_registered_router(router):
    torch.manual_seed(0)
    needs = router_info(router).needs_attention
    layers = [
        MomentumMoE(MoELayer(D, 12, 4, 2, router=router, layer_index=i), moe_index=i)
        for i in range(2)
    ]
    x = torch.randn(B, S, D, requires_grad=True)
    attention = torch.softmax(torch.randn(B, 2, S, S), -1) if needs else None
    context = RoutingContext(batch_shape=(B, S), causal=False, attention=attention)
    state = MomentumState.zeros(x, "heavy_ball")
    h = x
    for layer in layers:
        delta, state, aux = layer(h, state, context)
        h = h + delta
    h.sum().backward()
    assert h.isfinite().all() and x.grad.isfinite().all()


@pytest.fixture(scope="module")
def corpus():
    from smoe.data.text import tiny_shakespeare

    return tiny_shakespeare()


@pytest.mark.parametrize("router", sorted(MOMENTUM_ROUTERS))
def test_registry_entries_train_a_quick_charlm(router, corpus):
    info = router_info(router)
    assert info.stack == MOMENTUM_ROUTERS[router] and info.aux_losses == ()
    result = run(quick_config(router=router, layout="post_ln"), corpus=corpus, progress=False)
    losses = [h["val_loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result["config"]["layout"] == "post_ln"


def test_state_dict_round_trip_of_a_momentum_charlm():
    a, b = _lm("adam", seed=0).eval(), _lm("adam", seed=1).eval()
    assert not torch.equal(a(IDX)[0], b(IDX)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(IDX)[0], b(IDX)[0])


def test_topk_router_bias_and_aux_options():
    assert list(TopKRouter(D, 4).state_dict()) == ["weight"]
    router = TopKRouter(D, 4, bias=True, aux=False)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    x = torch.randn(6, D)
    routing = router(x)
    torch.testing.assert_close(routing.logits, x @ router.weight.T + router.bias)
    assert routing.aux == {} and (routing.expert == 1).any(dim=1).all()


BAD_OPTIONS = [
    ("kind", "nesterov"),
    ("mu", 1.0),
    ("mu", -0.1),
    ("gamma", -1.0),
    ("sign", 0.5),
    ("beta1", 1.0),
    ("beta2", -0.5),
    ("gamma1", -1.0),
    ("eps", 0.0),
    ("adam_layers", -1),
    ("moe_index", -1),
    ("kappa", 1.0),
    ("rho", 1.0),
    ("lipschitz", 0.0),
    ("dropout", 1.0),
]


@pytest.mark.parametrize("name, value", BAD_OPTIONS)
def test_bad_option_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        MomentumMoE(ConstantMoE(torch.zeros(D)), **{name: value})


def test_bad_stack_inputs_are_refused_by_name():
    layer = MomentumMoE(ConstantMoE(torch.zeros(D)), kind="adam")
    x = torch.zeros(B, S, D)
    with pytest.raises(ValueError, match="state.m"):
        layer(x, MomentumState.zeros(x[:1], "adam"))
    with pytest.raises(ValueError, match="state.p"):
        layer(x, MomentumState.zeros(x, "heavy_ball"))
    with pytest.raises(TypeError, match="state"):
        layer(x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="kind"):
        MomentumState.zeros(x, "nesterov")
    with pytest.raises(ValueError, match="layout"):
        _lm(layout="sandwich")
    with pytest.raises(ValueError, match="momentum_options"):
        _lm("topk", momentum_options={"mu": 0.5})
    with pytest.raises(ValueError, match="momentum_options"):
        _lm(momentum_options={"kind": "adam"})
    with pytest.raises(ValueError, match="mu"):
        _lm(momentum_options={"mu": 1.5})
    with pytest.raises(ValueError, match="stack"):
        register_router("test_registry_custom", TopKRouter, description="x", stack="nesterov")


@pytest.mark.parametrize("kind", KINDS)
def test_stack_compiles_fullgraph_forward_and_backward(kind):
    torch._dynamo.reset()
    layers = nn.ModuleList(MomentumMoE(_moe(i), kind=kind, moe_index=i) for i in range(3))
    x = torch.randn(B, S, D, requires_grad=True)
    compiled = torch.compile(lambda x: _stack(layers, x, kind), fullgraph=True, backend="aot_eager")
    y1, y2 = _stack(layers, x, kind), compiled(x)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *layers.parameters()])
    g2 = torch.autograd.grad(y2.square().sum(), [x, *layers.parameters()])
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)
