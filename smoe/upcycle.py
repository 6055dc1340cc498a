"""FFN -> MoE conversion of timm and transformers models, with sparse upcycling.

:func:`moefy` replaces, in place, the dense feed-forward blocks of a model by
:class:`MoEFFN` modules (an :class:`smoe.MoELayer` with the dense block's call signature and
return type). With ``upcycle=True`` every expert starts as a copy of the dense block (Komatsuzaki
et al., "Sparse Upcycling", ICLR 2023): with renormalised top-k weights (the ``"topk"`` router's
default) the converted model then computes the dense model's function, up to fp rounding.

Recognised blocks (by structure; the class is named in every refusal):

- timm ``Mlp`` (fc1/act/drop1/norm/fc2/drop2; GELU or ReLU, identity norm, Linear not Conv2d),
  ``GluMlp`` with SiLU (``SwiGLUPacked``; either ``gate_last``), ``SwiGLU`` (fc1_g/fc1_x);
- transformers Llama-family MLPs (gate_proj/up_proj/down_proj/act_fn SiLU: Llama, Mistral,
  Qwen2), GPT-2's ``GPT2MLP`` (c_fc/c_proj ``Conv1D``, weights ``[in, out]``), ``fc2(act(fc1
  x))`` MLPs with children fc1/fc2/activation_fn only (ViT's ``ViTMLP`` in transformers 5,
  ``CLIPMLP``), and the ``intermediate`` + ``output`` pair of BERT-style layers: the
  ``intermediate`` becomes the MoE FFN (``dense2(act(dense1 x))``) and ``output.dense`` becomes
  ``nn.Identity``, so the output keeps its dropout, residual and LayerNorm.

Dropout is kept where it was: the hidden dropout inside each expert, the output dropout after
the MoE. A decoder's MLPs (Llama family, GPT-2) route with ``RoutingContext(causal=True)``.

transformers and timm are never imported: :mod:`smoe._dense_ffn` recognises the blocks by their
children and attributes and reads their weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from smoe._dense_ffn import SUPPORTED, DenseParts, classify, is_pair, looks_like_ffn, pair_parts
from smoe.layer import MoEAux, MoELayer
from smoe.routing.context import RoutingContext
from smoe.routing.registry import registered_info

__all__ = ["MoEFFN", "moe_aux_loss", "moe_auxes", "moefy"]


class MoEFFN(nn.Module):
    """An :class:`smoe.MoELayer` standing in for a dense FFN: ``forward(x) -> y`` like the FFN.

    Args:
        moe: the MoE layer.
        drop: the dense block's output dropout, applied to the MoE output (None: none).
        causal: route with ``RoutingContext(causal=True)`` (decoder MLPs), so that a router
            whose routing looks at later tokens is refused.

    Attributes:
        last_aux: :class:`smoe.MoEAux` of the latest forward (with its graph), None before the
            first (and in copies: deepcopy and pickling drop it). :func:`moe_aux_loss` sums them.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, moe: MoELayer, drop: nn.Module | None = None, causal: bool = False) -> None:
        super().__init__()
        self.moe, self.drop, self.causal = moe, drop, causal
        self.last_aux: MoEAux | None = None

    def reset_parameters(self) -> None:
        self.moe.reset_parameters()

    def extra_repr(self) -> str:
        return f"causal={self.causal}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_aux"] = None  # a graph cannot be deep-copied or pickled
        return state

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_model]`` -> the same shape."""
        y, self.last_aux = self.moe(x, RoutingContext(causal=True) if self.causal else None)
        return self.drop(y) if self.drop is not None else y


def moe_auxes(model: nn.Module) -> list[MoEAux]:
    """The last forward's :class:`MoEAux` of every :class:`MoEFFN` (and V-MoE ``MoEMlp``) in
    ``model``, in module order.

    Raises:
        ValueError: ``model`` has no such module.
        RuntimeError: one has not run a forward yet.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFFN) or _is_moe_mlp(m)]
    if not layers:
        raise ValueError(f"moe_auxes: {type(model).__name__} has no MoEFFN / MoEMlp module")
    if any(m.last_aux is None for m in layers):
        raise RuntimeError("moe_auxes: an MoE module has not run a forward yet")
    return [m.last_aux for m in layers]


def moe_aux_loss(model: nn.Module, weights: Mapping[str, float] | None = None) -> Tensor:
    """The weighted auxiliary loss of the last forward (:meth:`MoEAux.loss`), summed over the
    MoE modules of ``model``; add it to the task loss. Raises as :func:`moe_auxes`."""
    auxes = moe_auxes(model)
    total = auxes[0].loss(weights)
    for aux in auxes[1:]:
        total = total + aux.loss(weights)
    return total


def _is_moe_mlp(m: nn.Module) -> bool:
    return type(m).__name__ == "MoEMlp" and type(m).__module__ == "smoe.models.vit"


class _Site(NamedTuple):
    path: str
    module: nn.Module  # the dense FFN (for a pair: the intermediate)
    parts: Callable[[], DenseParts]  # raises ValueError for a configuration smoe cannot reproduce
    install: Callable[[MoEFFN], None]


def _find(parent: nn.Module, prefix: str, sites: list[_Site]) -> None:
    """Dense FFNs below ``parent``, in ``modules()`` order (skipping modules already MoE)."""
    pair = is_pair(parent)
    for name, child in parent.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (MoEFFN, MoELayer)) or _is_moe_mlp(child):
            continue
        if pair and name == "output":
            continue
        if pair and name == "intermediate":
            inter, out = child, parent.output

            def install(new: MoEFFN, p: nn.Module = parent) -> None:
                p.intermediate = new
                p.output.dense = nn.Identity()

            sites.append(_Site(path, child, partial(pair_parts, inter, out), install))
            continue
        parts = classify(child)
        if parts is not None:
            sites.append(_Site(path, child, parts, partial(setattr, parent, name)))
        elif looks_like_ffn(name, child):
            raise ValueError(
                f"moefy: {type(child).__name__} at {path!r} looks like a feed-forward block but "
                f"is not one moefy knows ({SUPPORTED})"
            )
        else:
            _find(child, f"{path}.", sites)


# ---------------------------------------------------------------------------------------------
# moefy
# ---------------------------------------------------------------------------------------------
def _select(layers: str | Sequence[int], n: int) -> list[int]:
    if layers == "all":
        return list(range(n))
    if layers == "every_other":
        return list(range(1, n, 2))
    if isinstance(layers, str) and layers.startswith("last:"):
        count = layers[5:]
        if not count.isdigit() or not 1 <= int(count) <= n:
            raise ValueError(f"moefy: layers='last:N' needs 1 <= N <= {n} FFNs, got {layers!r}")
        return list(range(n - int(count), n))
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(
            "moefy: layers must be 'all', 'every_other', 'last:N' or a list of FFN indices, got "
            f"{layers!r}"
        )
    ids = list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in ids):
        raise ValueError(f"moefy: layers must hold FFN indices in [0, {n}), got {ids}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"moefy: layers has repeated indices: {ids}")
    return sorted(ids)


def _build(
    parts: DenseParts,
    index: int,
    num_experts: int,
    k: int,
    router: str | Callable[[int], nn.Module],
    router_options: Mapping[str, Any] | None,
    layer_options: Mapping[str, Any],
) -> MoEFFN:
    inner, d_model = parts.w_in.shape
    d_ff = parts.w_out.shape[1]
    bias = parts.b_in is not None or parts.b_out is not None
    module = router if isinstance(router, str) else router(d_model)
    layer = MoELayer(
        d_model,
        d_ff,
        num_experts,
        k,
        activation=parts.activation,
        router=module,
        router_options=router_options,
        bias=bias,
        layer_index=index,
        expert_dropout=parts.hidden_dropout,
        **layer_options,
    )
    info = registered_info(layer.router)
    if parts.causal and info is not None and not info.is_causal(layer.router):
        raise ValueError(
            f"moefy: router {info.name!r} is not causal and FFN {index} sits in a decoder"
        )
    ref = parts.w_in
    layer.experts.to(device=ref.device, dtype=ref.dtype)
    return MoEFFN(layer.to(ref.device), parts.drop, parts.causal)


def _upcycle(
    moe: MoEFFN, parts: DenseParts, noise: float, generator: torch.Generator | None
) -> None:
    ex = moe.moe.experts
    with torch.no_grad():
        for dst, src in ((ex.w_in, parts.w_in), (ex.w_out, parts.w_out)):
            dst.copy_(src.unsqueeze(0).expand_as(dst))
            if noise > 0:
                dev = generator.device if generator is not None else dst.device
                eps = torch.randn(dst.shape, generator=generator, device=dev, dtype=torch.float32)
                dst.mul_((1.0 + noise * eps).to(device=dst.device, dtype=dst.dtype))
        if ex.b_in is not None:
            for dst, src in ((ex.b_in, parts.b_in), (ex.b_out, parts.b_out)):
                dst.copy_(src.unsqueeze(0).expand_as(dst) if src is not None else 0.0)


def moefy(
    model: nn.Module,
    *,
    num_experts: int,
    k: int = 2,
    layers: str | Sequence[int] = "all",
    router: str | Callable[[int], nn.Module] = "topk",
    router_options: Mapping[str, Any] | None = None,
    upcycle: bool = True,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    layer_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace, in place, the dense FFNs of ``model`` by :class:`MoEFFN` modules.

    The recognised FFNs (module docstring) are indexed 0..n-1 in ``model.modules()`` order
    (modules already MoE are skipped, not counted); ``layers`` picks among them. All of them are
    checked and built before any is replaced, so an error leaves ``model`` untouched.

    Args:
        model: a timm or transformers model (or any module holding such FFNs).
        num_experts: E.
        k: experts per token.
        layers: ``"all"``, ``"every_other"`` (the odd indices 1, 3, ..., V-MoE's "Every 2"),
            ``"last:N"`` (the last N FFNs) or a list of FFN indices.
        router: a registered router name, or a callable ``d_model -> router module`` (called once
            per replaced FFN).
        router_options: keyword options of a router given by name.
        upcycle: copy each dense FFN into all its experts (sparse upcycling); False: fresh
            experts with :meth:`smoe.Experts.reset_parameters` (global RNG).
        noise: >= 0. With upcycling, each expert's weight matrices become
            ``W_e = W * (1 + noise * eps_e)``, ``eps_e ~ N(0, 1)`` i.i.d. per element and expert
            (biases are copied without noise); breaks the experts' symmetry.
        generator: for the noise draws (default: the global RNG of the weights' device).
        layer_options: further :class:`smoe.MoELayer` options (``capacity_factor``,
            ``shared_experts``, ...; ``capacity_factor`` or shared experts break exact equality).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unknown FFN-like class (named), a recognised FFN in a configuration smoe
            cannot reproduce (its class and attribute named), no FFN at all, a bad ``layers``,
            ``noise``, or a non-causal router in a decoder.
    """
    if not noise >= 0:  # also refuses NaN
        raise ValueError(f"moefy: noise must be >= 0, got {noise}")
    if noise > 0 and not upcycle:
        raise ValueError("moefy: noise applies to upcycled experts; got upcycle=False")
    if not isinstance(router, str) and not callable(router):
        raise TypeError(f"moefy: router must be a name or a callable, got {type(router).__name__}")
    if classify(model) is not None:
        raise ValueError(
            f"moefy: model is itself a dense FFN ({type(model).__name__}); moefy replaces FFNs "
            "inside a model (use smoe.MoELayer.from_dense for a lone FFN)"
        )
    sites: list[_Site] = []
    _find(model, "", sites)
    if not sites:
        raise ValueError(f"moefy: {type(model).__name__} holds no dense FFN moefy knows")
    chosen = _select(layers, len(sites))
    if not chosen:
        raise ValueError(f"moefy: layers={layers!r} selects none of the {len(sites)} FFNs")
    built = []
    for i in chosen:
        parts = sites[i].parts()
        new = _build(parts, i, num_experts, k, router, router_options, dict(layer_options or {}))
        if upcycle:
            _upcycle(new, parts, noise, generator)
        new.train(sites[i].module.training)
        built.append((sites[i], new))
    for site, new in built:
        site.install(new)
    return model
