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

__all__ = [
    "RouterInfo",
    "available_routers",
    "build_router",
    "register_router",
    "router_info",
]

_SELECTIONS = ("token_choice", "expert_choice")


@dataclass(frozen=True)
class RouterInfo:
    """What a registered router is.

    Fields:
        name: the registry name.
        factory: ``factory(d_model, num_experts, k, **options) -> nn.Module``; the module's
            ``forward(x [T, d], context=None)`` returns a :class:`smoe.Routing`.
        description: one line for :func:`available_routers`.
        selection: ``"token_choice"`` (each token picks k experts) or ``"expert_choice"`` (each
            expert picks its tokens).
        causal: safe in an autoregressive decoder (a token's routing never depends on later
            tokens). Expert choice is not. A callable decides from the router's options
            (V-MoE is causal unless Batch Prioritized Routing ranks the whole group).
        needs_sequence: needs ``context.batch_shape`` to be ``(B, S)`` sequences (or attention).
        aux_losses: the names of the auxiliary losses its ``Routing.aux`` may hold.
        compiles: traces under ``torch.compile(fullgraph=True)``.
        defaults: the options the registry passes unless the caller overrides them.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    selection: str = "token_choice"
    causal: bool | Callable[[Mapping[str, Any]], bool] = True
    needs_sequence: bool = False
    aux_losses: tuple[str, ...] = ()
    compiles: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def is_causal(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether the router built with ``options`` (over the defaults) is causal."""
        if callable(self.causal):
            return bool(self.causal({**self.defaults, **(options or {})}))
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
    causal: bool | Callable[[Mapping[str, Any]], bool] = True,
    needs_sequence: bool = False,
    aux_losses: tuple[str, ...] = (),
    compiles: bool = True,
    defaults: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> RouterInfo:
    """Register a router factory under ``name`` (see :class:`RouterInfo` for the fields).

    Raises:
        ValueError: an empty or taken name (unless ``replace``), an unknown ``selection``, or a
            factory that does not take ``(d_model, num_experts, k, ...)``.
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
    info = RouterInfo(
        name,
        factory,
        description,
        selection,
        causal,
        needs_sequence,
        tuple(aux_losses),
        compiles,
        dict(defaults or {}),
    )
    _REGISTRY[name] = info
    return info


def available_routers() -> dict[str, str]:
    """The registered router names, sorted, each with its one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


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
    return info.factory(d_model, num_experts, k, **{**info.defaults, **options})
