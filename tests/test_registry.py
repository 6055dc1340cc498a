"""The router registry, RoutingContext, and MoELayer's router-by-name / context plumbing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import smoe.routing.registry as registry
from smoe import MoELayer
from smoe.routing import (
    RouterInfo,
    RoutingContext,
    TopKRouter,
    available_routers,
    build_router,
    register_router,
    router_info,
)

D, D_FF, E, K, B, S = 8, 16, 4, 2, 2, 6
# Collected at import, so a router registered later in the package is tested automatically.
ROUTERS = list(available_routers())
CUSTOM = "test_registry_custom"


def _x(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(B, S, D, requires_grad=requires_grad)


class _RecordingRouter(nn.Module):
    """A top-k router that records the context it is handed."""

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__()
        self.inner = TopKRouter(d_model, num_experts, k)
        self.contexts: list[RoutingContext | None] = []

    def forward(self, x, context=None):
        self.contexts.append(context)
        return self.inner(x)


class _PlainRouter(nn.Module):
    """A router whose forward takes only x."""

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__()
        self.inner = TopKRouter(d_model, num_experts, k)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def custom_name():
    yield CUSTOM
    registry._REGISTRY.pop(CUSTOM, None)


# --- every registered router -----------------------------------------------------------------


def test_available_routers_are_sorted_and_described():
    names = available_routers()
    assert list(names) == sorted(names)
    assert {"topk", "switch", "noisy_topk", "vmoe", "expert_choice"} <= set(names)
    assert all(isinstance(d, str) and d.strip() for d in names.values())


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_info_is_consistent(name):
    info = router_info(name)
    assert isinstance(info, RouterInfo) and info.name == name
    assert info.selection in registry._SELECTIONS
    accepted = info.option_names()
    if accepted is not None:
        assert set(info.defaults) <= set(accepted)


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_builds_by_name(name):
    router = build_router(name, D, E, K)
    assert isinstance(router, nn.Module)
    layer = MoELayer(D, D_FF, E, K, router=name)
    assert layer.router_name == name
    assert type(layer.router) is type(router)


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_forward_backward_through_layer(name):
    layer = MoELayer(D, D_FF, E, K, router=name).train()
    x = _x(requires_grad=True)
    y, aux = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert set(aux.losses) <= set(router_info(name).aux_losses)
    (y.square().sum() + aux.loss()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for module in (layer.router, layer.experts):
        params = [p for p in module.parameters() if p.requires_grad]
        assert params
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        # Dropped tokens (capacity) may give zero rows, never an all-zero gradient.
        assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_state_dict_round_trips(name):
    torch.manual_seed(1)
    src = MoELayer(D, D_FF, E, K, router=name).eval()
    torch.manual_seed(2)
    dst = MoELayer(D, D_FF, E, K, router=name).eval()
    x = _x()
    with torch.no_grad():
        assert not torch.equal(src(x)[0], dst(x)[0])
        dst.load_state_dict(src.state_dict())
        (y1, a1), (y2, a2) = src(x), dst(x)
    assert torch.equal(y1, y2)
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_compiles_fullgraph(name):
    if not router_info(name).compiles:
        pytest.skip(f"router {name!r} declares compiles=False")
    torch._dynamo.reset()
    layer = MoELayer(D, D_FF, E, K, router=name).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = _x()
    (y1, a1), (y2, a2) = layer(x), compiled(x)
    torch.testing.assert_close(y2, y1)
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)
    assert a1.losses.keys() == a2.losses.keys()


# --- registry errors and custom routers --------------------------------------------------------


def test_build_router_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown router 'nope'.*topk"):
        build_router("nope", D, E, K)
    with pytest.raises(ValueError, match="unknown router 'nope'.*vmoe"):
        MoELayer(D, D_FF, E, K, router="nope")


def test_build_router_rejects_unknown_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*renormalize"):
        build_router("topk", D, E, K, bogus=1)
    with pytest.raises(ValueError, match=r"'bogus'.*capacity_factor"):
        MoELayer(D, D_FF, E, K, router="vmoe", router_options={"bogus": 1})


@pytest.mark.parametrize(
    "name, options, match",
    [
        pytest.param("topk", {"k": 0}, "TopKRouter: k must be", id="topk-k0"),
        pytest.param("vmoe", {"capacity_factor": -1}, "capacity_factor must be > 0", id="vmoe-c"),
        pytest.param("expert_choice", {"capacity_factor": -1}, "capacity_factor", id="ec-c"),
    ],
)
def test_build_router_bad_option_value_raises_the_routers_error(name, options, match):
    k = options.pop("k", K)
    with pytest.raises(ValueError, match=match):
        build_router(name, D, E, k, **options)


def test_registry_defaults_apply_and_can_be_overridden():
    assert build_router("switch", D, E, K).renormalize is False
    assert build_router("switch", D, E, K, renormalize=True).renormalize is True
    assert build_router("noisy_topk", D, E, K).noisy is True
    assert build_router("topk", D, E, K).renormalize is True


def test_register_router_rejects_bad_registrations():
    before = dict(available_routers())
    with pytest.raises(ValueError, match="already registered"):
        register_router("topk", TopKRouter, description="again")
    with pytest.raises(ValueError, match="selection must be one of"):
        register_router(CUSTOM, TopKRouter, description="x", selection="random")
    with pytest.raises(TypeError, match="callable"):
        register_router(CUSTOM, 42, description="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"d_model, num_experts, k"):
        register_router(CUSTOM, lambda d_model, num_experts: None, description="x")
    with pytest.raises(ValueError, match="non-empty"):
        register_router("", TopKRouter, description="x")
    assert available_routers() == before
    assert router_info("topk").factory is TopKRouter


def test_custom_router_registers_builds_and_runs(custom_name):
    info = register_router(
        custom_name, _RecordingRouter, description="recorder", aux_losses=("balance", "z")
    )
    assert available_routers()[custom_name] == "recorder" and info.option_names() == ()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['foo'\]"):
        build_router(custom_name, D, E, K, foo=1)
    layer = MoELayer(D, D_FF, E, K, router=custom_name, layer_index=1)
    assert isinstance(layer.router, _RecordingRouter)
    x = _x(requires_grad=True)
    y, aux = layer(x)
    assert set(aux.losses) <= set(info.aux_losses)
    (y.sum() + aux.loss()).backward()
    assert torch.isfinite(x.grad).all() and layer.router.inner.weight.grad is not None
    assert layer.router.contexts[-1].layer_index == 1
    with pytest.raises(ValueError, match="already registered"):
        register_router(custom_name, _PlainRouter, description="again")
    register_router(custom_name, _PlainRouter, description="plain", causal=False, replace=True)
    layer = MoELayer(D, D_FF, E, K, router=custom_name)
    assert isinstance(layer.router, _PlainRouter)
    with pytest.raises(ValueError, match="not causal"):
        layer(_x(), RoutingContext(causal=True))


def test_custom_router_with_var_keyword_factory_takes_any_option(custom_name):
    def factory(d_model, num_experts, k, **options):
        assert options == {"anything": 1}
        return TopKRouter(d_model, num_experts, k)

    info = register_router(custom_name, factory, description="kwargs")
    assert info.option_names() is None
    assert isinstance(build_router(custom_name, D, E, K, anything=1), TopKRouter)


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


def test_register_router_aux_weights(custom_name):
    from smoe.losses import DEFAULT_LOSS_WEIGHTS

    with pytest.raises(ValueError, match="no default weight"):
        register_router(custom_name, _RecordingRouter, description="x", aux_losses=("zz",))
    with pytest.raises(ValueError, match="already has the default weight"):
        register_router(custom_name, _RecordingRouter, description="x", aux_weights={"z": 0.5})
    try:
        register_router(
            custom_name,
            _RecordingRouter,
            description="x",
            aux_losses=("zz_test",),
            aux_weights={"zz_test": 0.25},
        )
        assert DEFAULT_LOSS_WEIGHTS["zz_test"] == 0.25
    finally:
        DEFAULT_LOSS_WEIGHTS.pop("zz_test", None)


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
