"""Convert the MoE blocks of a transformers model into :class:`smoe.MoELayer` s, in place.

    smoe.convert(model)                       # the model's own routers, on smoe's ops
    smoe.convert(model, router="xmoe")        # or a registered router (fresh weights) ...
    smoe.convert(model, router=my_router)     # ... or a router module (one deep copy per block)
    smoe.convert(model, layer="s2moe")        # S2MoE around the block (convert_s2moe.py)
    smoe.unconvert(model)                     # the original blocks back

Blocks: ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``,
``OlmoeSparseMoeBlock``, ``DeepseekV3MoE`` and ``GptOssMLP``. A converted block keeps the
original's experts, shared experts and (with ``router=None``) router tensors under the same
names, so the state_dict keys and values do not change and ``save_pretrained`` output loads in
plain transformers. It routes with smoe's ops (``topk_softmax``; DeepSeek-V3's sigmoid,
group-limited selection with ``e_score_correction_bias`` through ``topk_sigmoid``), runs the
experts through make_plan → permute → grouped_mm → combine (whatever the model's
``experts_implementation``) and returns what the original returned (GPT-OSS: ``(hidden,
router_scores)``). Its router logits go to transformers' ``output_router_logits`` as the
original's did, so the model's auxiliary loss is computed the same way (on the new router's
logits when one is given).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.integrations.convert_momentum import add_momentum, momentum_options_checked
from smoe.integrations.hf_routers import SigmoidGroupGate, SoftmaxTopKGate
from smoe.integrations.transformers import run_experts  # (imports transformers)
from smoe.layer import MoELayer
from smoe.routing.context import RoutingContext
from smoe.routing.registry import build_router, registered_info

__all__ = ["ConvertedMoE", "SUPPORTED_BLOCKS", "convert", "unconvert"]


@dataclass(frozen=True)
class _Block:
    """How one transformers block class routes and what it adds and returns."""

    module: str  # transformers.models.<module>.modeling_<module>
    router_attr: str = "gate"
    gate: str = "softmax"  # "softmax" or "sigmoid" (DeepSeek-V3)
    float32_weights: bool = False  # Mixtral's router returns float32 weights
    shared: str | None = None  # "qwen2" (sigmoid-gated shared_expert) or "deepseek"
    returns_scores: bool = False  # GPT-OSS returns (hidden, router_scores)


_BLOCKS: dict[str, _Block] = {
    "MixtralSparseMoeBlock": _Block("mixtral", float32_weights=True),
    "Qwen2MoeSparseMoeBlock": _Block("qwen2_moe", shared="qwen2"),
    "Qwen3MoeSparseMoeBlock": _Block("qwen3_moe"),
    "OlmoeSparseMoeBlock": _Block("olmoe"),
    "DeepseekV3MoE": _Block("deepseek_v3", gate="sigmoid", float32_weights=True, shared="deepseek"),
    "GptOssMLP": _Block("gpt_oss", router_attr="router", returns_scores=True),
}
SUPPORTED_BLOCKS = tuple(_BLOCKS)


def _block_classes() -> dict[type, str]:
    """The supported block classes of the installed transformers, by class."""
    found = {}
    for name, spec in _BLOCKS.items():
        path = f"transformers.models.{spec.module}.modeling_{spec.module}"
        module = importlib.import_module(path)
        found[getattr(module, name)] = name
    return found


def _record_router_logits(logits: Tensor) -> None:
    """Hand the router logits to transformers' output capture (``output_router_logits=True``),
    as the hook on the original router class did. Under ``torch.compile`` on a torch whose dynamo
    cannot trace ``ContextVar.get`` (2.11; 2.14 can), reading the capture is one graph break, as in
    transformers' own capture hooks."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capture: nothing asks for them
        return
    collected = _active_collector.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


class ConvertedMoE(MoELayer):
    """A transformers MoE block run by smoe (built by :func:`smoe.convert`, not by hand).

    Its children are the original block's, under the same names; the router (``gate``, GPT-OSS's
    ``router``) is an smoe router: with ``router=None`` one that aliases the original router's
    tensors. ``forward(hidden_states [B, S, d])`` returns what the original block returned. The
    routing context is causal (these blocks sit in decoders) unless converted with
    ``causal=False``; a router that would see later tokens is refused at conversion otherwise.
    """

    def __init__(self, block: nn.Module, name: str, router: nn.Module, native: bool) -> None:
        nn.Module.__init__(self)
        spec = _BLOCKS[name]
        for child_name, child in block.named_children():
            setattr(self, child_name, child)
        setattr(self, spec.router_attr, router)
        original_gate = getattr(block, spec.router_attr)
        self.d_model = int(original_gate.weight.shape[1])
        self.num_experts = int(block.experts.num_experts)
        self.capacity_factor, self.layer_index = None, None
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.causal = True  # the routing context's (convert(..., causal=False) clears it)
        self.block_class, self.native = name, native
        self._spec = spec
        self.__dict__["_original"] = block  # not a submodule: unconvert puts it back

    @property
    def router(self) -> nn.Module:  # MoELayer's name for the router module
        return self._modules[self._spec.router_attr]  # (GPT-OSS names it "router" itself)

    def extra_repr(self) -> str:
        return f"block_class={self.block_class}, native_router={self.native}"

    def _shared_output(self, flat: Tensor, hidden: Tensor) -> Tensor | None:
        if self._spec.shared == "qwen2":
            gate = torch.sigmoid(self.shared_expert_gate(flat))
            return gate * self.shared_expert(flat)
        if self._spec.shared == "deepseek":
            return self.shared_experts(hidden).reshape(flat.shape)
        return None

    def forward(self, hidden_states: Tensor):
        momentum = self.__dict__.get("_momentum")
        if momentum is None:
            return self._moe_forward(hidden_states)
        carrier = self.__dict__["_carrier"]
        if carrier.state is None:  # the first converted block of this model forward
            carrier.state = momentum.initial_state(hidden_states)
        delta, carrier.state, scores = momentum(hidden_states, carrier.state)
        return (delta, scores) if self._spec.returns_scores else delta

    def _jitter(self, hidden_states: Tensor) -> Tensor:
        """Mixtral's router jitter in training (a uniform factor in 1 ± jitter_noise)."""
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * noise
        return hidden_states

    def _moe_forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        hidden_states = self._jitter(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        if self.native:
            routing = self.router(flat)
        else:
            context = self._context(hidden_states, RoutingContext(causal=self.causal))
            routing = self.router(flat, context=context)
        _record_router_logits(routing.logits)
        plan = routing.plan
        if plan is None:
            plan = ops.make_plan(routing.expert, self.num_experts)
        out = run_experts(self.experts, flat, plan, routing.weight)
        if routing.interpolate:
            kept = (routing.weight * plan.kept).sum(dim=-1, keepdim=True)
            out = out + (1.0 - kept).to(flat.dtype) * flat
        shared = self._shared_output(flat, hidden_states)
        if shared is not None:
            out = out + shared.to(out.dtype)
        out = out.reshape(shape)
        return (out, routing.weight) if self._spec.returns_scores else out


def _native_router(block: nn.Module, spec: _Block) -> nn.Module:
    gate = getattr(block, spec.router_attr)
    if spec.gate == "sigmoid":
        return SigmoidGroupGate(gate)
    renormalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral, GPT-OSS: always
    return SoftmaxTopKGate(gate, renormalize=renormalize, float32_weights=spec.float32_weights)


def _takes_gate_weight(module: nn.Module, gate: nn.Module) -> bool:
    """Whether a router built by name has exactly the block router's parameters: one ``weight``
    of its shape (top-k, Switch, expert choice, USMoE) and the block's router has no bias."""
    params = dict(module.named_parameters())
    return (
        set(params) == {"weight"}
        and params["weight"].shape == gate.weight.shape
        and getattr(gate, "bias", None) is None
    )


def _new_router(
    block: nn.Module, spec: _Block, router: Any, options: dict, causal: bool
) -> nn.Module:
    gate = getattr(block, spec.router_attr)
    E, k = int(gate.num_experts), int(gate.top_k)
    d = int(gate.weight.shape[1])
    if isinstance(router, str):
        module = build_router(router, d, E, k, **options)
        module = module.to(device=gate.weight.device, dtype=gate.weight.dtype)
        if _takes_gate_weight(module, gate):  # the trained router weight: a training-free swap
            module.weight = gate.weight
    else:
        module = copy.deepcopy(router).to(device=gate.weight.device, dtype=gate.weight.dtype)
    info = registered_info(module)
    if info is not None:
        why = None
        if info.layer is not None:
            why = (
                f"it is a layer-level method; pass layer={info.layer!r} (with router=None the "
                "block keeps its own router)"
            )
        elif info.stack is not None:
            why = (
                f"it is a stack-level method ({info.stack!r}) whose state runs across the "
                "layers; smoe.convert replaces one block at a time"
            )
        elif causal and not info.is_causal(module):
            why = (
                "it is not causal as configured (a token's experts depend on later tokens); "
                "convert(..., causal=False) allows it where no token is generated (embeddings, "
                "scoring)"
            )
        elif info.needs_attention:
            why = (
                "it needs the block's attention probabilities, which a transformers block does "
                "not hand to its MLP"
            )
        if why is not None:
            raise ValueError(
                f"smoe.convert: router {info.name!r} cannot replace the router of "
                f"{type(block).__name__}: {why}"
            )
    return module


def convert(
    model: nn.Module,
    router: str | nn.Module | None = None,
    *,
    momentum: str | None = None,
    momentum_options: dict[str, Any] | None = None,
    causal: bool = True,
    layer: str | None = None,
    layer_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every supported transformers MoE block of ``model`` (see the module docstring) by
    a :class:`ConvertedMoE` run by smoe; returns ``model`` (or the converted block when ``model``
    is one).

    Args:
        model: a transformers model or module tree holding the blocks, or one block.
        router: None (default): the block's own router on smoe's ops, with its tensors aliased
            (Mixtral: softmax → top-k → renormalise; Qwen / OLMoE: ``norm_topk_prob``;
            DeepSeek-V3: sigmoid, ``e_score_correction_bias``, group-limited top-k,
            ``routed_scaling_factor``; GPT-OSS: biased logits, softmax over the top-k). A
            registered router's name (:func:`smoe.routing.available_routers`) builds a new
            router per block with the block's d, E and k, and ``options``; one whose only
            parameter is a ``weight [E, d]`` (``"topk"``, ``"switch"``, ``"expert_choice"``,
            ``"usmoe"``) takes the block router's weight (aliased: a training-free swap, keys
            unchanged, unless the block's router has a bias), the others start fresh. A router
            module is deep-copied into each block. The new router's parameters appear under the
            block's router name (``gate.*``).
        momentum: None, or a stack-level method across the converted blocks (issue 23,
            specs/momentum_smoe.md): ``"heavy_ball"`` (MomentumSMoE), ``"adam"`` (AdamSMoE) or
            ``"robust"`` (Robust MomentumSMoE). Each block's output u (routed + shared experts)
            goes through :class:`smoe.momentum.MomentumMoE`'s step, the state handed from block
            to block in model order: one state per model forward, reset by a forward pre-hook
            on ``model``, never a parameter or a buffer. ``sign`` defaults to +1 here, so that
            ``mu=0, gamma=1`` reproduces the unconverted model.
        causal: the blocks sit in a decoder that generates (default): routers that would let
            a token's experts depend on later tokens (expert choice, USMoE's joint selection)
            are refused. False allows them, for models used without generation (embeddings,
            scoring: USMoE's training-free protocol).
        momentum_options: MomentumMoE's options (``mu``, ``gamma``, ``sign``, ``beta1``, ...,
            ``rho``, ``kappa``, ``dropout``).
        layer: None, or ``"s2moe"``: each block becomes a
            :class:`smoe.integrations.convert_s2moe.ConvertedS2MoE`, S2MoE (specs/s2moe.md)
            around its router (the one chosen by ``router``) and experts: a noisy second path
            and a learned gate in training, the converted block in eval. Add
            :func:`smoe.integrations.convert_s2moe.s2moe_loss` (InfoNCE) to the training loss.
        layer_options: S2MoE's options (noise_form, noise_stats, route_noisy, eval_output,
            unc_pair, unc_temperature, ...; not balance: the model's own loss stays).
        **options: keyword options of a router built by name.

    Raises:
        ValueError: no supported block in ``model`` (the message lists the supported ones), or
            a model converted already (unconvert it first);
            ``options`` without a router name; a router that cannot run in a causal decoder
            (expert choice, a stack-level method, one that needs attention probabilities).
        TypeError: ``router`` of another type.
    """
    if router is not None and not isinstance(router, (str, nn.Module)):
        raise TypeError(
            "smoe.convert: router must be None, a registered router name or an nn.Module, got "
            f"{type(router).__name__}"
        )
    if options and not isinstance(router, str):
        raise ValueError(
            f"smoe.convert: router options {sorted(options)} need a router given by name"
        )
    classes = _block_classes()
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if type(child) in classes
    ]
    if type(model) in classes:
        targets.append((None, None, model))
    if not targets and any(isinstance(m, ConvertedMoE) for m in model.modules()):
        raise ValueError(
            f"smoe.convert: {type(model).__name__} is converted already; smoe.unconvert(model) "
            "first to convert it again (another router, layer or momentum)"
        )
    if not targets:
        raise ValueError(
            f"smoe.convert: no supported MoE block in {type(model).__name__}; supported: "
            f"{', '.join(SUPPORTED_BLOCKS)}"
        )
    if momentum is None and momentum_options is not None:
        raise ValueError(
            "smoe.convert: momentum_options need momentum='heavy_ball'|'adam'|'robust'"
        )
    if layer not in (None, "s2moe"):
        raise ValueError(f"smoe.convert: layer must be None or 's2moe', got {layer!r}")
    if layer is None and layer_options is not None:
        raise ValueError("smoe.convert: layer_options need layer='s2moe'")
    if layer is not None and momentum is not None:
        raise ValueError("smoe.convert: layer='s2moe' and momentum are not combined")
    block_cls, s2moe_kw = ConvertedMoE, {}
    if layer == "s2moe":
        from smoe.integrations.convert_s2moe import ConvertedS2MoE, check_s2moe_options

        block_cls, s2moe_kw = ConvertedS2MoE, check_s2moe_options(dict(layer_options or {}))
    if momentum is not None and type(model) in classes:
        raise ValueError("smoe.convert: momentum runs across the blocks of a model; give the model")
    momentum_kw = {}
    if momentum is not None:
        momentum_kw = momentum_options_checked(momentum, dict(momentum_options or {}))
    converted, blocks = model, []
    for parent, child_name, block in targets:
        name = classes[type(block)]
        spec = _BLOCKS[name]
        if router is None:
            new = block_cls(block, name, _native_router(block, spec), native=True)
        else:
            new = block_cls(block, name, _new_router(block, spec, router, options, causal), False)
            new.causal = bool(causal)
        if s2moe_kw:
            new._setup_s2moe(s2moe_kw)
        new.train(block.training)
        blocks.append(new)
        if parent is None:
            converted = new
        else:
            setattr(parent, child_name, new)
    if momentum is not None:
        add_momentum(model, blocks, momentum, momentum_kw)
    return converted


def unconvert(model: nn.Module) -> nn.Module:
    """Put the original transformers blocks back in place of every :class:`ConvertedMoE` of
    ``model``, with the converted blocks' current tensors (trained experts, and with a native
    router its weights and DeepSeek-V3's bias); a router that replaced the original is dropped
    and the original router comes back. Returns ``model`` (or the original block when ``model``
    is a converted one)."""

    def restore(new: ConvertedMoE) -> nn.Module:
        carrier = new.__dict__.get("_carrier")
        if carrier is not None and carrier.handle is not None:
            carrier.handle.remove()  # (idempotent: once per model)
        block = new._original
        for child_name, child in new.named_children():
            if child_name != new._spec.router_attr and not child_name.startswith("s2moe_"):
                setattr(block, child_name, child)
        if new.native:
            gate, adapter = getattr(block, new._spec.router_attr), new.router
            gate.weight = adapter.weight
            if isinstance(adapter, SoftmaxTopKGate) and adapter.bias is not None:
                gate.bias = adapter.bias
            if isinstance(adapter, SigmoidGroupGate):
                bias = adapter.e_score_correction_bias
                gate.e_score_correction_bias = bias.to(gate.e_score_correction_bias.dtype)
        block.train(new.training)
        return block

    if isinstance(model, ConvertedMoE):
        return restore(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ConvertedMoE):
                setattr(parent, child_name, restore(child))
    return model
