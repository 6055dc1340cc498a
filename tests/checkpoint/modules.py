"""The catalogue of public modules at small fixed configs, and what the checkpoint tests need to
know about each: how to build it, a forward's inputs, the forward's outputs, its schema.

Never change the config of an existing entry: committed fixtures are loaded into the module it
builds. Add an entry instead (and its fixture: ``python -m tests.checkpoint.make_fixtures``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import smoe.models
from smoe import (
    MOMENTUM_ROUTERS,
    AttentionAwareRouter,
    ExpertChoiceRouter,
    Experts,
    MoEFFN,
    MoELayer,
    MomentumMoE,
    MomentumState,
    RoutingContext,
    S2MoELayer,
    SelectiveSinkhornRouter,
    SimilarityAwareRouter,
    SinkhornRouter,
    SMoEVAE,
    TopKRouter,
    USMoERouter,
    VMoERouter,
    XMoERouter,
)
from smoe.models.charlm import CharLM
from smoe.routing import registry

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema.json"
FIXTURES = HERE / "fixtures"
FIXTURE_FORMAT = 1  # the layout of a .pt fixture's payload (make_fixtures.py writes it)

D, D_FF, E, K, VOCAB = 8, 16, 4, 2, 12

# Every registered router, as MoELayer builds it by name: registry name -> router_options.
LAYER_ROUTERS: dict[str, dict[str, Any]] = {
    "topk": {},
    "switch": {},
    "noisy_topk": {},
    "vmoe": {"capacity_factor": 1.5},
    "expert_choice": {},
    "xmoe": {},
    "xmoe_community": {},
    "stablemoe_community": {},
    "ssr": {},
    "sinkhorn": {},
    "similarity_aware": {},
    "attention_aware": {},
    "usmoe": {},
    "s2moe": {},
    "momentum": {},
    "adam": {},
    "robust_momentum": {},
}

Outputs = dict[str, Tensor]


@dataclass(frozen=True)
class Entry:
    """One catalogue entry.

    Fields:
        name: the entry's name, also its fixtures' file name.
        build: builds the module (parameters from torch's global RNG).
        inputs: a forward's inputs (float32 or integer tensors) drawn from the generator.
        run: ``run(module, *inputs) -> {name: tensor}``, what a forward produces.
        fixture_dtype: the dtype of the floating tensors its fixture is saved in.
        safetensors: a ``.safetensors`` fixture is committed next to the ``.pt``.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[Tensor, ...]]
    run: Callable[..., Outputs]
    fixture_dtype: torch.dtype = torch.float32
    safetensors: bool = True


def _tokens(*shape: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randn(*shape, generator=g),)


def _expert_rows(g: torch.Generator) -> tuple[Tensor, ...]:
    return torch.randn(7, D, generator=g), torch.tensor([0, 2, 2, 5, 7])


def _run_experts(experts: nn.Module, x: Tensor, offsets: Tensor) -> Outputs:
    return {"y": experts(x, offsets)}


def _run_router(router: nn.Module, x: Tensor) -> Outputs:
    r = router(x)
    return {"expert": r.expert, "weight": r.weight, "logits": r.logits}


def _run_layer(layer: nn.Module, x: Tensor, attention: Tensor | None = None) -> Outputs:
    y, aux = layer(x, None if attention is None else RoutingContext(attention=attention))
    return {"y": y, "tokens_per_expert": aux.tokens_per_expert}


def _tokens_and_attention(g: torch.Generator) -> tuple[Tensor, ...]:
    """x [2, 3, D] and causal attention probabilities [2, 2, 3, 3] (2 heads)."""
    scores = torch.randn(2, 2, 3, 3, generator=g)
    future = torch.ones(3, 3, dtype=torch.bool).triu(1)
    return torch.randn(2, 3, D, generator=g), scores.masked_fill(future, -torch.inf).softmax(-1)


def _run_graph_router(router: nn.Module, x: Tensor, attention: Tensor | None = None) -> Outputs:
    """A graph-of-tokens router on x [2, 3, D] flattened: two causal sequences of 3 tokens."""
    context = RoutingContext(batch_shape=(2, 3), causal=True, attention=attention)
    r = router(x.reshape(-1, x.shape[-1]), context)
    return {"expert": r.expert, "weight": r.weight, "logits": r.logits}


def _run_sequences(router: nn.Module, x: Tensor) -> Outputs:
    """A router that groups tokens per sequence (USMoE) on x [2, 3, D] flattened: two sequences
    of 3 tokens."""
    r = router(x.reshape(-1, x.shape[-1]), RoutingContext(batch_shape=(2, 3)))
    return {"expert": r.expert, "weight": r.weight, "logits": r.logits}


def _run_momentum(layer: nn.Module, x: Tensor) -> Outputs:
    delta, state, aux = layer(x, MomentumState.zeros(x, layer.kind))
    return {"delta": delta, "m": state.m, "p": state.p, "v": state.v}


def _layer(router: str) -> Entry:
    options = LAYER_ROUTERS[router]
    attention = registry.router_info(router).needs_attention
    return Entry(
        f"MoELayer-{router}",
        lambda: MoELayer(D, D_FF, E, K, router=router, router_options=options),
        _tokens_and_attention if attention else _tokens(2, 3, D),
        _run_layer,
        # the momentum routers' layers differ from top-k's by a bias: .pt only, to stay small
        safetensors=router not in MOMENTUM_ROUTERS,
    )


def _build_vit() -> nn.Module:
    from smoe.models import quickdraw_vit, vmoe_vit

    vit = quickdraw_vit(3, embed_dim=D, depth=2, num_heads=2, patch_size=4, img_size=8)
    return vmoe_vit(vit, E, K, every=2, group_images=2)


def _build_attention_vit() -> nn.Module:
    from smoe.models import quickdraw_vit, vmoe_vit

    vit = quickdraw_vit(3, embed_dim=D, depth=2, num_heads=2, patch_size=4, img_size=8)
    return vmoe_vit(vit, E, K, every=2, group_images=2, router="attention_aware")


def _build_momentum_vit() -> nn.Module:
    from smoe.models import momentum_vit

    return momentum_vit(_build_vit(), "robust")


def _run_vit(vit: nn.Module, images: Tensor) -> Outputs:
    return {"logits": vit(images)}


def _run_vae(vae: nn.Module, images: Tensor) -> Outputs:
    out = vae(images)
    return {"recon": out.recon, "mu": out.mu, "log_var": out.log_var, "logits": out.logits}


def _run_charlm(lm: nn.Module, idx: Tensor) -> Outputs:
    return {"logits": lm(idx)[0]}


CATALOGUE: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("Experts-gelu", lambda: Experts(E, D, D_FF), _expert_rows, _run_experts),
        Entry(
            "Experts-swiglu-bias",
            lambda: Experts(E, D, D_FF, "swiglu", bias=True),
            _expert_rows,
            _run_experts,
        ),
        Entry("TopKRouter", lambda: TopKRouter(D, E, K), _tokens(6, D), _run_router),
        Entry("VMoERouter", lambda: VMoERouter(D, E, K), _tokens(6, D), _run_router),
        # aux-loss-free balancing (issue 26): the expert_bias buffer is saved
        Entry(
            "TopKRouter-expert_bias",
            lambda: TopKRouter(D, E, K, expert_bias=True, aux=False),
            _tokens(6, D),
            _run_router,
        ),
        # smoe.moefy's drop-in FFN (issue 26): a MoELayer returning a tensor
        Entry(
            "MoEFFN",
            lambda: MoEFFN(MoELayer(D, D_FF, E, K)),
            _tokens(2, 3, D),
            lambda m, x: {"y": m(x)},
        ),
        Entry("ExpertChoiceRouter", lambda: ExpertChoiceRouter(D, E), _tokens(6, D), _run_router),
        Entry("XMoERouter", lambda: XMoERouter(D, E, K), _tokens(6, D), _run_router),
        Entry(
            "SelectiveSinkhornRouter",
            lambda: SelectiveSinkhornRouter(D, E, K),
            _tokens(6, D),
            _run_router,
        ),
        Entry("SinkhornRouter", lambda: SinkhornRouter(D, E, K), _tokens(6, D), _run_router),
        Entry(
            "SimilarityAwareRouter",
            lambda: SimilarityAwareRouter(D, E, K, bias=True),
            _tokens(2, 3, D),
            _run_graph_router,
        ),
        Entry(
            "AttentionAwareRouter",
            lambda: AttentionAwareRouter(D, E, K, bias=True),
            _tokens_and_attention,
            _run_graph_router,
        ),
        Entry("USMoERouter", lambda: USMoERouter(D, E, K), _tokens(2, 3, D), _run_sequences),
        *(_layer(name) for name in LAYER_ROUTERS),
        # shared experts (issue 26): a dense expert run by the grouped kernels, sigmoid-gated
        Entry(
            "MoELayer-shared",
            lambda: MoELayer(D, D_FF, E, K, shared_experts=2, shared_gate="sigmoid"),
            _tokens(2, 3, D),
            _run_layer,
        ),
        # S2MoE (issue 27): the gate acts in eval with eval_output="gated"; "instnorm" adds
        # InstanceNorm's affine and the noise scales alpha, beta
        Entry(
            "S2MoELayer",
            lambda: S2MoELayer(D, D_FF, E, 1, noise_form="instnorm", eval_output="gated"),
            _tokens(2, 3, D),
            _run_layer,
        ),
        Entry("vmoe_vit", _build_vit, lambda g: (torch.randn(2, 1, 8, 8, generator=g),), _run_vit),
        # attention-aware routing in the ViT (issue 24): its block hands on explicit attention
        Entry(
            "attention_vit",
            _build_attention_vit,
            lambda g: (torch.randn(2, 1, 8, 8, generator=g),),
            _run_vit,
        ),
        Entry(
            "momentum_vit",
            _build_momentum_vit,
            lambda g: (torch.randn(2, 1, 8, 8, generator=g),),
            _run_vit,
        ),
        # The VAE's convolutional encoder has a fixed width (93 k parameters at any latent size):
        # its fixture is saved in bf16 and only as .pt, to keep the committed fixtures small.
        Entry(
            "SMoEVAE",
            lambda: SMoEVAE(num_experts=2, latent_dim=1, sample_in_eval=False),
            lambda g: (torch.rand(2, 1, 28, 28, generator=g),),
            _run_vae,
            fixture_dtype=torch.bfloat16,
            safetensors=False,
        ),
        # Tied embeddings: tok.weight and head.weight share one tensor.
        Entry(
            "CharLM",
            lambda: CharLM(
                VOCAB, d_model=D, n_layers=2, n_heads=2, context=8, num_experts=E, k=K, moe_every=2
            ),
            lambda g: (torch.randint(0, VOCAB, (2, 6), generator=g),),
            _run_charlm,
        ),
        # Transformer-XL attention (issue 24): key_pe, no position embeddings; without a
        # carried memory, so that a forward is a function of its inputs.
        Entry(
            "CharLM-xl",
            lambda: CharLM(
                VOCAB,
                d_model=D,
                n_layers=2,
                n_heads=2,
                context=8,
                num_experts=E,
                k=K,
                router="attention_aware",
                attention="xl",
                attn_span=4,
                xl_memory=False,
            ),
            lambda g: (torch.randint(0, VOCAB, (2, 6), generator=g),),
            _run_charlm,
        ),
        # A momentum stack's layer (AdamSMoE, issue 23): no parameters of its own. .pt only, as
        # the momentum routers' MoELayer fixtures, to keep the committed fixtures small.
        Entry(
            "MomentumMoE-adam",
            lambda: MomentumMoE(MoELayer(D, D_FF, E, K, router="adam"), kind="adam"),
            _tokens(2, 3, D),
            _run_momentum,
            safetensors=False,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# What is public
# ---------------------------------------------------------------------------------------------
def smoe_routers() -> list[str]:
    """The registered routers that smoe itself defines (not ones a test or a user added)."""
    return [
        name
        for name in registry.available_routers()
        if registry.router_info(name).factory.__module__.startswith("smoe.")
    ]


def public_module_classes() -> set[type[nn.Module]]:
    """Every nn.Module class in the ``__all__`` of smoe, smoe.routing, smoe.models and its
    submodules, plus the class of every router smoe registers."""
    names = ["smoe", "smoe.routing", "smoe.models"]
    names += [f"smoe.models.{m.name}" for m in pkgutil.iter_modules(smoe.models.__path__)]
    found: set[type[nn.Module]] = set()
    for name in names:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if inspect.isclass(obj) and issubclass(obj, nn.Module):
                found.add(obj)
    found |= {type(registry.build_router(name, D, E, K)) for name in smoe_routers()}
    return found


# ---------------------------------------------------------------------------------------------
# Schema, versions, outputs
# ---------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def versions_of(state_dict: Mapping[str, Any]) -> dict[str, int | None]:
    """The ``_version`` each submodule recorded in ``state_dict._metadata``, by key prefix."""
    metadata = getattr(state_dict, "_metadata", {})
    return {prefix: meta.get("version") for prefix, meta in metadata.items()}


def schema_of(module: nn.Module) -> dict[str, Any]:
    """What the golden file pins of a module: its class, every submodule's version, and every
    state_dict entry's dtype and shape."""
    state = module.state_dict()
    cls = type(module)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "versions": versions_of(state),
        "tensors": {k: f"{dtype_name(v.dtype)} {list(v.shape)}" for k, v in state.items()},
    }


def cast_state_dict(state: Mapping[str, Tensor], dtype: torch.dtype) -> OrderedDict:
    """A copy with floating tensors in ``dtype``, keeping ``_metadata`` (the versions)."""
    out = OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata  # type: ignore[attr-defined]
    return out


def reference_outputs(entry: Entry, module: nn.Module, inputs: tuple[Tensor, ...]) -> Outputs:
    """The entry's forward in float64 and eval mode (``module`` is converted in place)."""
    module.double().eval()
    args = [x.double() if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        return {k: v.detach() for k, v in entry.run(module, *args).items()}


def fixture_files(suffix: str = ".pt") -> list[Path]:
    """Every committed fixture of every version, ``fixtures/v<version>/<entry><suffix>``."""
    return sorted(FIXTURES.glob(f"v*/*{suffix}"))
