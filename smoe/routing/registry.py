"""The router registry: every router family registers a factory under a name, with what it is.

``build_router("vmoe", d_model, num_experts, k, capacity_factor=1.25)`` builds one by name;
:class:`smoe.MoELayer` accepts the same names (``router="vmoe", router_options={...}``), and the
router lab (``python -m smoe.examples.charlm``, ``benchmarks/router_zoo.py``) runs whatever is
registered. A router module registers itself at its bottom::

    register_router(
        "mine", MyRouter.build, description="...", selection="token_choice", causal=True,
        aux_losses=("balance",),
    )

where the factory is called as ``factory(d_model, num_experts, k, **options)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from smoe.losses import DEFAULT_LOSS_WEIGHTS

__all__ = [
    "RouterInfo",
    "available_routers",
    "build_router",
    "register_router",
    "registered_info",
    "router_info",
]

_SELECTIONS = ("token_choice", "expert_choice", "unified")
_STACKS = ("heavy_ball", "adam", "robust")  # smoe.ops.momentum.KINDS (routing sits below ops)
_LAYERS = ("s2moe",)  # layer-level methods: the layer class a model builds (smoe.models.moe_layer)


@dataclass(frozen=True)
class RouterInfo:
    """What a registered router is.

    Fields:
        name: the registry name.
        factory: ``factory(d_model, num_experts, k, **options) -> nn.Module``; the module's
            ``forward(x [T, d], context=None)`` returns a :class:`smoe.Routing`.
        description: one line for :func:`available_routers`.
        selection: ``"token_choice"`` (each token picks k experts), ``"expert_choice"`` (each
            expert picks its tokens) or ``"unified"`` (the best token-expert pairs of a group,
            either axis: USMoE).
        causal: safe in an autoregressive decoder (a token's routing never depends on later
            tokens). Expert choice is not. A callable ``causal(router) -> bool`` decides on the
            built router module as it is configured now (V-MoE: not with Batch Prioritized
            Routing, nor with a capacity at k > 1, whose rank-major filling lets later tokens'
            first choices take a token's second place).
        needs_sequence: needs ``context.batch_shape`` to be ``(B, S)`` sequences.
        needs_attention: needs ``context.attention``, the block's attention probabilities.
        aux_losses: the names of the auxiliary losses its ``Routing.aux`` may hold; each has a
            default weight in :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS`.
        compiles: traces under ``torch.compile(fullgraph=True)``.
        defaults: the options the registry passes unless the caller overrides them.
        stack: None for a router on its own; a stack-level method names the
            :class:`smoe.momentum.MomentumMoE` kind (``"heavy_ball"``, ``"adam"``, ``"robust"``)
            a model wraps each of its MoE layers in, the router inside being this entry's.
        layer: None for a router on its own; a layer-level method names the layer a model builds
            in place of :class:`smoe.MoELayer` (``"s2moe"``: :class:`smoe.S2MoELayer`, two
            paths and a gate around one router and one set of experts), the router inside
            being this entry's. :func:`smoe.models.moe_layer` builds either.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    selection: str = "token_choice"
    causal: bool | Callable[[nn.Module], bool] = True
    needs_sequence: bool = False
    needs_attention: bool = False
    aux_losses: tuple[str, ...] = ()
    compiles: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)
    stack: str | None = None
    layer: str | None = None

    def is_causal(self, router: nn.Module | None = None) -> bool:
        """Whether ``router`` (a module this entry built) is causal as configured now; without a
        router, whether this kind of router can be (a callable ``causal`` then answers True)."""
        if callable(self.causal):
            return True if router is None else bool(self.causal(router))
        return self.causal

    def option_names(self) -> tuple[str, ...] | None:
        """The keyword options the factory accepts (None if it takes ``**kwargs``)."""
        params = list(inspect.signature(self.factory).parameters.values())[3:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


_REGISTRY: dict[str, RouterInfo] = {}


def register_router(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    description: str,
    selection: str = "token_choice",
    causal: bool | Callable[[nn.Module], bool] = True,
    needs_sequence: bool = False,
    needs_attention: bool = False,
    aux_losses: tuple[str, ...] = (),
    aux_weights: Mapping[str, float] | None = None,
    compiles: bool = True,
    defaults: Mapping[str, Any] | None = None,
    stack: str | None = None,
    layer: str | None = None,
    replace: bool = False,
) -> RouterInfo:
    """Register a router factory under ``name`` (see :class:`RouterInfo` for the fields).

    ``aux_weights`` gives the default coefficient of each new auxiliary loss name; they join
    :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS`, which :meth:`smoe.MoEAux.loss` uses.

    Raises:
        ValueError: an empty or taken name (unless ``replace``), an unknown ``selection`` or
            ``stack`` or ``layer``, a
            factory that does not take ``(d_model, num_experts, k, ...)``, an aux loss without a
            default weight, or a weight that contradicts an existing one.
        TypeError: a factory that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_router: name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_router: {name!r} is already registered (pass replace=True)")
    if not callable(factory):
        raise TypeError(f"register_router: factory must be callable, got {type(factory).__name__}")
    if selection not in _SELECTIONS:
        raise ValueError(
            f"register_router: selection must be one of {_SELECTIONS}, got {selection!r}"
        )
    positional = [
        p
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < 3:
        raise ValueError(
            f"register_router: the factory of {name!r} must take (d_model, num_experts, k, "
            "**options)"
        )
    weights = dict(aux_weights or {})
    for loss, w in weights.items():
        if DEFAULT_LOSS_WEIGHTS.get(loss, w) != w:
            raise ValueError(
                f"register_router: aux loss {loss!r} already has the default weight "
                f"{DEFAULT_LOSS_WEIGHTS[loss]}, not {w}"
            )
    missing = [
        loss for loss in aux_losses if loss not in DEFAULT_LOSS_WEIGHTS and loss not in weights
    ]
    if missing:
        raise ValueError(
            f"register_router: aux losses {missing} of {name!r} have no default weight; pass "
            "aux_weights={name: coefficient}"
        )
    if stack is not None and stack not in _STACKS:
        raise ValueError(f"register_router: stack must be None or one of {_STACKS}, got {stack!r}")
    if layer is not None and layer not in _LAYERS:
        raise ValueError(f"register_router: layer must be None or one of {_LAYERS}, got {layer!r}")
    if layer is not None and stack is not None:
        raise ValueError("register_router: a method is stack-level or layer-level, not both")
    DEFAULT_LOSS_WEIGHTS.update(weights)
    info = RouterInfo(
        name,
        factory,
        description,
        selection,
        causal,
        needs_sequence,
        needs_attention,
        tuple(aux_losses),
        compiles,
        dict(defaults or {}),
        stack,
        layer,
    )
    _REGISTRY[name] = info
    return info


def available_routers() -> dict[str, str]:
    """The registered router names, sorted, each with its one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def registered_info(router: nn.Module) -> RouterInfo | None:
    """The :class:`RouterInfo` of a module built by :func:`build_router` (None otherwise)."""
    name = getattr(router, "registry_name", None)
    return _REGISTRY.get(name) if isinstance(name, str) else None


def router_info(name: str) -> RouterInfo:
    """The :class:`RouterInfo` of a registered router.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown router {name!r}; registered routers: {known}")
    return _REGISTRY[name]


def build_router(
    name: str, d_model: int, num_experts: int, k: int = 2, **options: Any
) -> nn.Module:
    """Build the router registered as ``name``.

    Args:
        name: a name from :func:`available_routers`.
        d_model: token width.
        num_experts: E.
        k: experts per token (an expert-choice router takes it as its capacity factor unless the
            options say otherwise, which keeps the active expert compute equal).
        **options: the router's own keyword options (see its class), over the registry defaults.

    Raises:
        ValueError: an unknown router name or an option the router does not take (both messages
            list what is accepted), and whatever the router's constructor refuses.
    """
    info = router_info(name)
    accepted = info.option_names()
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"build_router({name!r}): unknown option(s) {unknown}; it accepts "
                f"{sorted(accepted)}"
            )
    router = info.factory(d_model, num_experts, k, **{**info.defaults, **options})
    # The layer reads the registry entry back from the module, also when a router built here is
    # handed over as a module (as smoe.models.vmoe_vit does).
    router.registry_name = name
    return router
