"""smoe: sparse mixture-of-experts routers and expert dispatch as PyTorch custom ops."""

__version__ = "0.1.0"

from smoe._info import info
from smoe.allocator import (
    cpu_allocator_settings,
    cpu_cache_info,
    release_cpu_cache,
    tune_cpu_allocator,
)
from smoe.balance import ExpertBiasUpdater
from smoe.experts import Experts
from smoe.layer import MoEAux, MoELayer
from smoe.losses import (
    DEFAULT_LOSS_WEIGHTS,
    importance_loss,
    load_loss,
    router_z_loss,
    switch_balance_loss,
    xmoe_balance_loss,
    xmoe_community_balance_loss,
)
from smoe.models import SMoEVAE
from smoe.momentum import MomentumMoE, MomentumState
from smoe.ops import (
    ExpertChoice,
    Plan,
    TopK,
    combine,
    cosine_scores,
    expert_choice,
    grouped_mm,
    make_plan,
    permute,
    s2moe_perturb,
    swiglu,
    topk_sigmoid,
    topk_softmax,
    unified_topk,
)
from smoe.routing import (
    MOMENTUM_ROUTERS,
    AttentionAwareRouter,
    ExpertChoiceRouter,
    Routing,
    RoutingContext,
    SelectiveSinkhornRouter,
    SimilarityAwareRouter,
    SinkhornRouter,
    StableMoECommunityRouter,
    TopKRouter,
    USMoERouter,
    VMoERouter,
    XMoERouter,
    available_routers,
    build_router,
    expert_choice_capacity,
    register_router,
    vmoe_capacity,
)
from smoe.s2moe import S2MoELayer
from smoe.upcycle import MoEFFN, moefy  # noqa: E402  (after the routers register)

__all__ = [
    "AttentionAwareRouter",
    "DEFAULT_LOSS_WEIGHTS",
    "ExpertChoice",
    "ExpertChoiceRouter",
    "ExpertBiasUpdater",
    "MOMENTUM_ROUTERS",
    "Experts",
    "MoEAux",
    "MoEFFN",
    "MoELayer",
    "MomentumMoE",
    "MomentumState",
    "Plan",
    "Routing",
    "RoutingContext",
    "S2MoELayer",
    "SMoEVAE",
    "SelectiveSinkhornRouter",
    "SimilarityAwareRouter",
    "SinkhornRouter",
    "StableMoECommunityRouter",
    "TopK",
    "TopKRouter",
    "USMoERouter",
    "VMoERouter",
    "XMoERouter",
    "available_routers",
    "build_router",
    "combine",
    "convert",
    "cosine_scores",
    "cpu_allocator_settings",
    "cpu_cache_info",
    "expert_choice",
    "expert_choice_capacity",
    "grouped_mm",
    "importance_loss",
    "info",
    "load_loss",
    "make_plan",
    "moefy",
    "permute",
    "register_router",
    "router_z_loss",
    "s2moe_perturb",
    "swiglu",
    "switch_balance_loss",
    "topk_sigmoid",
    "topk_softmax",
    "release_cpu_cache",
    "tune_cpu_allocator",
    "unconvert",
    "unified_topk",
    "vmoe_capacity",
    "xmoe_balance_loss",
    "xmoe_community_balance_loss",
]


def convert(model, router=None, **options):
    """Replace the MoE blocks of a transformers model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
    GPT-OSS) by smoe layers, in place: see :func:`smoe.integrations.convert.convert` (imported
    on first use: ``import smoe`` never imports transformers)."""
    from smoe.integrations.convert import convert as _convert

    return _convert(model, router, **options)


def unconvert(model):
    """Undo :func:`convert`: see :func:`smoe.integrations.convert.unconvert`."""
    from smoe.integrations.convert import unconvert as _unconvert

    return _unconvert(model)
