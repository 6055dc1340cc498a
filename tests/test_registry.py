"""The router registry: every registered router by name, registration and its errors.

How MoELayer hands a RoutingContext to its router and enforces what a router declares:
tests/test_layer_context.py."""

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
from tests.router_helpers import (
    CUSTOM,
    D_FF,
    D,
    E,
    K,
    _PlainRouter,
    _RecordingRouter,
    _x,
    attention_context,
)

# Collected at import, so a router registered later in the package is tested automatically.
ROUTERS = list(available_routers())


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
    y, aux = layer(x, attention_context(name, x))
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


# Routers whose scores are not a linear gate of x (cosine scores of a projection, through
# smoe::cosine_scores); every other router's gate GEMM is smoe::gate_linear (StableMoE's too: x
# against the normalised expert embeddings).
COSINE_GATES = {"xmoe", "xmoe_community"}


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_gate_runs_gate_linear_with_float32_logits(name):
    layer = MoELayer(D, D_FF, E, K, router=name).to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x, attention_context(name, x))
    ran = {e.name for e in prof.events()}
    want = "smoe::cosine_scores" if name in COSINE_GATES else "smoe::gate_linear"
    assert want in ran, f"{name}: its gate did not run {want}"


@pytest.mark.parametrize("name", ROUTERS)
def test_registered_router_state_dict_round_trips(name):
    torch.manual_seed(1)
    src = MoELayer(D, D_FF, E, K, router=name).eval()
    torch.manual_seed(2)
    dst = MoELayer(D, D_FF, E, K, router=name).eval()
    x = _x()
    ctx = attention_context(name, x)
    with torch.no_grad():
        assert not torch.equal(src(x, ctx)[0], dst(x, ctx)[0])
        dst.load_state_dict(src.state_dict())
        (y1, a1), (y2, a2) = src(x, ctx), dst(x, ctx)
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
    ctx = attention_context(name, x)
    (y1, a1), (y2, a2) = layer(x, ctx), compiled(x, ctx)
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
        pytest.param("usmoe", {"alpha": 2.0}, "alpha must be in", id="usmoe-alpha"),
    ],
)
def test_build_router_bad_option_value_raises_the_routers_error(name, options, match):
    k = options.pop("k", K)
    with pytest.raises(ValueError, match=match):
        build_router(name, D, E, k, **options)


def test_usmoe_is_unified_and_causal_only_when_each_token_routes_alone():
    info = router_info("usmoe")
    assert info.selection == "unified" and not info.needs_sequence and info.aux_losses == ()
    causal = {
        (selection, score, alpha): info.is_causal(
            build_router("usmoe", D, E, K, selection=selection, expert_score=score, alpha=alpha)
        )
        for selection in ("joint", "per_token", "per_expert")
        for score in ("sigmoid", "token_softmax")
        for alpha in (0.0, 0.5)
    }
    # per token: the sigmoid score, or none of the token-softmax one (α = 0), reads one token
    assert {key for key, yes in causal.items() if yes} == {
        ("per_token", "sigmoid", 0.0),
        ("per_token", "sigmoid", 0.5),
        ("per_token", "token_softmax", 0.0),
    }
    assert not info.is_causal(build_router("usmoe", D, E, K))  # joint by default
    # the tokens at one position of the batch compete: causal whatever the selection and score
    for selection in ("joint", "per_token", "per_expert"):
        for score in ("sigmoid", "token_softmax"):
            router = build_router(
                "usmoe", D, E, K, group="position", selection=selection, expert_score=score
            )
            assert info.is_causal(router)


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
