"""MoELayer's router plumbing: the RoutingContext it hands over, what a registered router declares
(causality, sequences, attention) enforced, router-by-name errors and back-compatibility."""

from __future__ import annotations

import pytest
import torch

from smoe import MoELayer
from smoe.routing import RoutingContext, TopKRouter, build_router, register_router, router_info
from tests.router_helpers import D_FF, B, D, E, K, S, _PlainRouter, _RecordingRouter, _x

# --- RoutingContext through MoELayer -----------------------------------------------------------


def test_layer_fills_context_and_passes_user_fields():
    router = _RecordingRouter(D, E, K)
    layer = MoELayer(D, D_FF, E, K, router=router, layer_index=3)
    assert layer.router_name is None
    layer(_x())
    assert router.contexts[-1] == RoutingContext(batch_shape=(B, S), layer_index=3)
    layer(_x(), RoutingContext(step=5, causal=True))
    ctx = router.contexts[-1]
    assert (ctx.batch_shape, ctx.layer_index, ctx.step, ctx.causal) == ((B, S), 3, 5, True)
    layer(_x(), RoutingContext(batch_shape=(B * S,), layer_index=9))
    assert router.contexts[-1].batch_shape == (B * S,)
    assert router.contexts[-1].layer_index == 9


def test_layer_calls_a_router_without_context_with_x_only():
    router = _PlainRouter(D, E, K)
    layer = MoELayer(D, D_FF, E, K, router=router)
    y, _ = layer(_x(), RoutingContext(step=1, causal=True))
    assert router.calls == 1 and y.shape == (B, S, D)


def test_reassigning_router_updates_context_passing_and_clears_name():
    layer = MoELayer(D, D_FF, E, K, router="expert_choice")
    assert layer.router_name == "expert_choice" and layer._router_takes_context
    plain = _PlainRouter(D, E, K)
    layer.router = plain
    assert layer.router_name is None and not layer._router_takes_context
    layer(_x(), RoutingContext(causal=True))  # the hand-set router declares no causality
    assert plain.calls == 1
    recorder = _RecordingRouter(D, E, K)
    layer.router = recorder
    assert layer._router_takes_context
    layer(_x())
    assert recorder.contexts[-1].batch_shape == (B, S)


def test_expert_choice_refuses_a_causal_context():
    layer = MoELayer(D, D_FF, E, K, router="expert_choice")
    with pytest.raises(ValueError, match="not causal"):
        layer(_x(), RoutingContext(causal=True))
    y, _ = layer(_x(), RoutingContext(causal=False))
    assert y.shape == (B, S, D)


def test_layer_compiles_fullgraph_with_an_explicit_context():
    torch._dynamo.reset()
    layer = MoELayer(D, D_FF, E, K, router="topk", layer_index=2).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, ctx = _x(), RoutingContext(step=5, causal=True)
    (y1, a1), (y2, a2) = layer(x, ctx), compiled(x, ctx)
    torch.testing.assert_close(y2, y1)
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)


# --- MoELayer errors and back-compat -----------------------------------------------------------


def test_layer_rejects_a_router_of_the_wrong_type():
    with pytest.raises(TypeError, match="router"):
        MoELayer(D, D_FF, E, K, router=3)  # type: ignore[arg-type]


def test_layer_rejects_router_options_with_a_module():
    with pytest.raises(ValueError, match="router_options"):
        MoELayer(D, D_FF, E, K, router=TopKRouter(D, E, K), router_options={"noisy": True})


def test_layer_rejects_a_context_that_is_not_a_routing_context():
    layer = MoELayer(D, D_FF, E, K)
    with pytest.raises(TypeError, match="RoutingContext"):
        layer(_x(), {"step": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RoutingContext"):
        layer(_x(), (None, None, True))  # type: ignore[arg-type]


def test_layer_renormalize_false_builds_a_raw_topk_router():
    layer = MoELayer(D, D_FF, E, K, renormalize=False)
    assert isinstance(layer.router, TopKRouter) and layer.router_name == "topk"
    assert layer.router.renormalize is False
    routing = layer.router(_x().reshape(-1, D))
    assert (routing.weight.sum(-1) < 1 - 1e-4).all()
    assert MoELayer(D, D_FF, E, K).router.renormalize is True


def test_vmoe_causality_follows_its_configuration():
    info = router_info("vmoe")
    assert info.is_causal()  # some V-MoE routers are causal
    no_capacity = MoELayer(D, D_FF, E, K, router="vmoe", router_options={"capacity_factor": None})
    assert info.is_causal(no_capacity.router)
    y, _ = no_capacity(_x(), RoutingContext(causal=True))
    assert torch.isfinite(y).all()
    capacity = MoELayer(D, D_FF, E, K, router="vmoe")  # C = 1.05 at k = 2: rank-major filling
    assert not info.is_causal(capacity.router)
    with pytest.raises(ValueError, match="not causal"):
        capacity(_x(), RoutingContext(causal=True))
    top1 = MoELayer(D, D_FF, E, 1, router="vmoe")  # k = 1: kept in token order
    assert info.is_causal(top1.router)
    top1.router.batch_priority = True  # switched on later, as set_batch_priority does
    with pytest.raises(ValueError, match="not causal"):
        top1(_x(), RoutingContext(causal=True))


def test_capacity_factor_at_k2_refuses_a_causal_context():
    layer = MoELayer(D, D_FF, E, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor with k > 1 is not causal"):
        layer(_x(), RoutingContext(causal=True))
    y, _ = MoELayer(D, D_FF, E, 1, capacity_factor=1.0)(_x(), RoutingContext(causal=True))
    assert torch.isfinite(y).all()


def test_router_built_by_name_and_handed_over_keeps_its_declaration():
    router = build_router("expert_choice", D, E, K)
    layer = MoELayer(D, D_FF, E, K, router=router)
    assert layer.router_name == "expert_choice"
    with pytest.raises(ValueError, match="not causal"):
        layer(_x(), RoutingContext(causal=True))


def test_needs_sequence_and_attention_are_enforced(custom_name):
    register_router(custom_name, _RecordingRouter, description="seq", needs_sequence=True)
    layer = MoELayer(D, D_FF, E, K, router=custom_name)
    layer(_x())  # [B, S, d]: sequences
    with pytest.raises(ValueError, match=r"needs \[B, S\] sequences"):
        layer(torch.randn(B * S, D))
    register_router(
        custom_name, _RecordingRouter, description="att", needs_attention=True, replace=True
    )
    layer = MoELayer(D, D_FF, E, K, router=custom_name)
    with pytest.raises(ValueError, match="attention probabilities"):
        layer(_x())
    attention = torch.softmax(torch.randn(B, 2, S, S), -1)
    layer(_x(), RoutingContext(attention=attention))
    assert layer.router.contexts[-1].attention is attention


def test_renormalize_only_applies_to_topk():
    with pytest.raises(ValueError, match="renormalize applies to the default 'topk' router"):
        MoELayer(D, D_FF, E, K, router="switch", renormalize=False)


def test_default_layer_state_dict_is_unchanged():
    # the keys and values of a default layer are those of a hand-built TopKRouter layer
    torch.manual_seed(0)
    by_name = MoELayer(D, D_FF, E, K)
    torch.manual_seed(0)
    by_hand = MoELayer(D, D_FF, E, K, router=TopKRouter(D, E, K, renormalize=True))
    a, b = by_name.state_dict(), by_hand.state_dict()
    assert list(a) == list(b) == ["router.weight", "experts.w_in", "experts.w_out"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_compiled_layer_trains_without_recompiling_per_step():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = MoELayer(D, D_FF, E, K, router="noisy_topk")  # train mode: draws noise
    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = _x()
    for step in range(5):  # a new step in the context every call, as CharLM passes it
        y, aux = compiled(x, RoutingContext(step=step, causal=True))
        (y.square().sum() + aux.loss()).backward()
        assert torch.isfinite(layer.router.weight.grad).all()
    assert counter.frame_count == 1
