"""ExpertChoiceRouter and the MoE layer on it (specs/classic_routers.md §5)."""

import pytest
import torch

from smoe import ExpertChoiceRouter, MoELayer, expert_choice, expert_choice_capacity
from smoe import reference as ref


def ec_layer(E=4, c=2.0, group_size=None, d=12):
    router = ExpertChoiceRouter(d, E, capacity_factor=c, group_size=group_size)
    return MoELayer(d, 2 * d, E, router=router, bias=True).double()


def reference_output(layer, x):
    """y_t = sum over experts e that chose t of p[t, e] * FFN_e(x_t), in float64."""
    ex, r = layer.experts, layer.router
    logits = x.float() @ r.weight.float().T
    S = r.group_size
    choice = ref.expert_choice(logits.double(), r.capacity(x.shape[0]), group_size=S)
    E = r.num_experts
    experts = torch.arange(E, dtype=torch.int32).expand(x.shape[0], E)
    return ref.routed_moe(
        x,
        experts,
        choice.weight,
        choice.plan.kept,
        ex.w_in,
        ex.w_out,
        b_in=ex.b_in,
        b_out=ex.b_out,
    )


def test_expert_choice_capacity_formula():
    assert expert_choice_capacity(400, 8, 2.0) == 100  # T c / E
    assert expert_choice_capacity(10, 4, 2.0) == 5  # ceil(5)
    assert expert_choice_capacity(10, 3, 2.0) == 7  # ceil(6.67)
    assert expert_choice_capacity(10, 2, 8.0) == 10  # min(T, ...)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_choice_capacity(10, 2, 0.0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        expert_choice_capacity(10, 0, 1.0)


@pytest.mark.parametrize("T,E,c,S", [(20, 4, 2.0, None), (23, 4, 1.0, 8), (9, 3, 0.5, 4)])
def test_router_every_expert_gets_exactly_its_capacity(T, E, c, S):
    r = ExpertChoiceRouter(16, E, capacity_factor=c, group_size=S)
    out = r(torch.randn(T, 16))
    S_ = T if S is None else S
    cap = expert_choice_capacity(min(S_, T), E, c)
    per_group = [min(cap, min(S_, T - g0)) for g0 in range(0, T, S_)]
    assert (out.plan.tokens_per_expert() == sum(per_group)).all()
    for g, g0 in enumerate(range(0, T, S_)):
        assert (out.plan.kept[g0 : g0 + S_].sum(0) == per_group[g]).all()
    assert torch.equal(out.expert >= 0, out.plan.kept)
    assert out.aux == {}


def test_router_matches_expert_choice_on_its_fp32_logits():
    r = ExpertChoiceRouter(16, 4, group_size=6)
    x = torch.randn(15, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x.bfloat16())
    assert out.logits.dtype == torch.float32 and out.weight.dtype == torch.float32
    want = expert_choice(out.logits, r.capacity(15), group_size=6)
    assert torch.equal(out.weight, want.weight)
    assert all(torch.equal(a, b) for a, b in zip(out.plan, want.plan))


@pytest.mark.parametrize("c,S", [(2.0, None), (1.0, 7), (0.5, 5)])
def test_layer_matches_reference(c, S):
    layer = ec_layer(c=c, group_size=S)
    x = torch.randn(19, 12, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference_output(layer, x))
    assert aux.dropped_fraction.item() == 0.0


def test_layer_with_c_equal_E_is_the_dense_soft_moe():
    E = 4
    layer = ec_layer(E=E, c=float(E))
    x = torch.randn(11, 12, dtype=torch.float64)
    y, aux = layer(x)
    p = torch.softmax(x.float() @ layer.router.weight.float().T, dim=-1).double()
    ex = layer.experts
    dense = sum(
        p[:, e : e + 1]
        * (torch.nn.functional.gelu(x @ ex.w_in[e].T + ex.b_in[e]) @ ex.w_out[e].T + ex.b_out[e])
        for e in range(E)
    )
    torch.testing.assert_close(y, dense)
    assert (aux.tokens_per_expert == 11).all()


def test_layer_backward_reaches_the_router_and_compiles():
    layer = ec_layer(group_size=8).float()
    x = torch.randn(20, 12, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (y1, _), (y2, _) = layer(x), compiled(x)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *layer.parameters()])
    g2 = torch.autograd.grad(y2.square().sum(), [x, *layer.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert g1[1].abs().sum() > 0  # router weight is the first parameter


def test_layer_state_dict_round_trip():
    a, b = ec_layer(group_size=5), ec_layer(group_size=5)
    x = torch.randn(14, 12, dtype=torch.float64)
    assert not torch.equal(a(x)[0], b(x)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x)[0], b(x)[0])


def test_router_rejects_bad_configuration():
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ExpertChoiceRouter(8, 4, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        ExpertChoiceRouter(8, 4, group_size=0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        ExpertChoiceRouter(8, 0)


@pytest.mark.cuda
def test_layer_cuda_matches_cpu():
    layer = ec_layer(group_size=16).float()
    x = torch.randn(40, 12)
    y_cpu, a_cpu = layer(x)
    y_gpu, a_gpu = layer.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    assert torch.equal(a_gpu.tokens_per_expert.cpu(), a_cpu.tokens_per_expert)
