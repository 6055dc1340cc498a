"""V-MoE's router (noisy softmax-then-top-k, capacity in training, BPR; specs/vmoe.md §3, §7) and
the MoE layer built on it. Capacity, grouped plans and losses: test_vmoe.py."""

import pytest
import torch

from smoe import (
    MoELayer,
    VMoERouter,
    load_loss,
    make_plan,
    ops,
    topk_softmax,
    vmoe_capacity,
)
from smoe import reference as ref


# ---------------------------------------------------------------------------------------------
# router (§3, §7)
# ---------------------------------------------------------------------------------------------
def test_router_eval_weights_are_softmax_at_topk_not_renormalised():
    r = VMoERouter(16, 6, 2, capacity_factor=None).eval()
    x = torch.randn(40, 16)
    out = r(x)
    probs = torch.softmax(x @ r.weight.T, dim=-1)
    torch.testing.assert_close(out.weight, torch.gather(probs, 1, out.expert.long()))
    assert (out.weight.sum(1) < 1).all()
    assert set(out.aux) == {"importance"}
    out2 = r(x)
    assert torch.equal(out.weight, out2.weight) and torch.equal(out.expert, out2.expert)


def test_router_training_noise_has_std_one_over_E():
    E = 8
    r = VMoERouter(16, E, 2, capacity_factor=None).train()
    x = torch.randn(64, 16)
    torch.manual_seed(123)
    out = r(x)
    torch.manual_seed(123)
    eps = torch.randn(64, E)
    noisy = x @ r.weight.T + eps / E
    w, e = topk_softmax(noisy, 2, renormalize=False)
    assert torch.equal(out.expert, e)
    torch.testing.assert_close(out.weight, w)
    assert set(out.aux) == {"importance", "load"}
    torch.testing.assert_close(out.aux["load"], load_loss(out.logits, noisy, 2, 1 / E))
    assert r.sigma == pytest.approx(1 / E)


def test_router_capacity_switches_between_train_and_eval():
    r = VMoERouter(8, 4, 2, capacity_factor=1.05, eval_capacity_factor=4.0, group_size=100)
    assert r.capacity(400) == vmoe_capacity(100, 4, 2, 1.05)
    r.eval()
    assert r.capacity(400) == vmoe_capacity(100, 4, 2, 4.0)
    assert r.capacity(30) == vmoe_capacity(30, 4, 2, 4.0)  # one short group


def test_router_bpr_uses_the_top1_weight_as_priority():
    r = VMoERouter(8, 4, 2, capacity_factor=0.3, group_size=10, batch_priority=True).eval()
    x = torch.randn(30, 8)
    out = r(x)
    want = make_plan(
        out.expert, 4, capacity=r.capacity(30), priority=out.weight[:, 0], group_size=10
    )
    assert all(torch.equal(a, b) for a, b in zip(out.plan, want))
    r.priority = "sum_topk"
    out = r(x)
    want = make_plan(
        out.expert, 4, capacity=r.capacity(30), priority=out.weight.sum(1), group_size=10
    )
    assert all(torch.equal(a, b) for a, b in zip(out.plan, want))


def test_router_rejects_bad_configuration():
    with pytest.raises(ValueError, match="k must be in"):
        VMoERouter(8, 4, 5)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        VMoERouter(8, 4, noise_std=-1.0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        VMoERouter(8, 4, group_size=0)
    with pytest.raises(ValueError, match="priority must be one of"):
        VMoERouter(8, 4, priority="mean")
    with pytest.raises(ValueError, match="eval_capacity_factor must be > 0"):
        VMoERouter(8, 4, eval_capacity_factor=0.0)
    with pytest.raises(ValueError, match="rounding must be one of"):
        VMoERouter(8, 4, rounding="floor")


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
def vmoe_layer(E=4, k=2, **router_kwargs):
    router = VMoERouter(12, E, k, **router_kwargs)
    return MoELayer(12, 24, E, k, router=router, bias=True).double()


def reference_output(layer, x, routing):
    ex = layer.experts
    return ref.routed_moe(
        x,
        routing.expert,
        routing.weight,
        routing.plan.kept,
        ex.w_in,
        ex.w_out,
        b_in=ex.b_in,
        b_out=ex.b_out,
    )


@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("factor", [0.3, 1.05, None])
def test_layer_matches_reference(factor, bpr):
    layer = vmoe_layer(capacity_factor=factor, group_size=10, batch_priority=bpr).eval()
    x = torch.randn(25, 12, dtype=torch.float64)
    y, aux = layer(x)
    routing = layer.router(x)
    torch.testing.assert_close(y, reference_output(layer, x, routing))
    cap = layer.router.capacity(25)
    assert cap is None or (aux.tokens_per_expert <= 3 * cap).all()  # 3 groups
    if factor is None:
        assert aux.dropped_fraction.item() == 0.0


def test_layer_with_large_capacity_bpr_and_vanilla_equal_no_capacity():
    layer = vmoe_layer(capacity_factor=None, group_size=8).eval()
    x = torch.randn(30, 12, dtype=torch.float64)
    y_free, _ = layer(x)
    for bpr in (False, True):
        layer.router.capacity_factor, layer.router.batch_priority = 2.0, bpr  # C >= E / k
        y, aux = layer(x)
        assert torch.equal(y, y_free) and aux.dropped_fraction.item() == 0.0


def test_layer_bpr_degrades_more_gracefully_than_vanilla():
    # the same routing, C far below 1: BPR keeps the tokens the router is most sure of, so the
    # kept routing weight is larger than vanilla's, which keeps the earliest tokens
    layer = vmoe_layer(E=8, capacity_factor=0.2, group_size=64).float().eval()
    x = torch.randn(256, 12)
    kept_mass = {}
    for bpr in (False, True):
        layer.router.batch_priority = bpr
        r = layer.router(x)
        kept_mass[bpr] = (r.weight * r.plan.kept).sum().item()
    assert kept_mass[True] > kept_mass[False]


def test_layer_gradients_reach_router_through_weights_and_losses():
    layer = vmoe_layer(capacity_factor=1.05, group_size=10).train()
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    (y.square().sum() + aux.loss()).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert set(aux.losses) == {"importance", "load"}
    torch.testing.assert_close(
        aux.loss(), 5e-3 * aux.losses["importance"] + 5e-3 * aux.losses["load"]
    )
    assert aux.loss({"load": 0.0}).item() == pytest.approx(5e-3 * aux.losses["importance"].item())


def test_layer_compiles_fullgraph():
    layer = vmoe_layer(capacity_factor=1.05, group_size=10, batch_priority=True).float().eval()
    x = torch.randn(30, 12)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (y1, a1), (y2, a2) = layer(x), compiled(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(a1.loss(), a2.loss())


def test_layer_refuses_its_own_capacity_with_a_plan_router():
    router = VMoERouter(12, 4, 2)
    layer = MoELayer(12, 24, 4, router=router, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor must be None when the router builds"):
        layer(torch.randn(5, 12))


def test_layer_state_dict_round_trip():
    a = vmoe_layer(capacity_factor=1.05, group_size=10).eval()
    b = vmoe_layer(capacity_factor=1.05, group_size=10).eval()
    x = torch.randn(20, 12, dtype=torch.float64)
    assert not torch.equal(a(x)[0], b(x)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x)[0], b(x)[0])
    assert set(a.state_dict()) == {
        "router.weight",
        "experts.w_in",
        "experts.w_out",
        "experts.b_in",
        "experts.b_out",
    }


@pytest.mark.cuda
def test_layer_cuda_matches_cpu():
    layer = vmoe_layer(capacity_factor=0.5, group_size=16, batch_priority=True).float().eval()
    x = torch.randn(50, 12)
    y_cpu, a_cpu = layer(x)
    y_gpu, a_gpu = layer.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    assert torch.equal(a_gpu.tokens_per_expert.cpu(), a_cpu.tokens_per_expert)
    assert ops.make_plan is make_plan
