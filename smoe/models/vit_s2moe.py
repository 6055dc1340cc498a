"""S2MoE on a V-MoE ViT (specs/s2moe.md; issue 27): every MoE block's layer becomes an
:class:`smoe.S2MoELayer` around the same router and experts, the noise statistics taken over an
image's patches (the MoE input of timm's block is ``[B, N, d]``: ``seq_dim=-2``)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from smoe.models.vit import MoEMlp
from smoe.s2moe import S2MoELayer

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = ["s2moe_vit"]


def s2moe_vit(
    model: VisionTransformer, *, copy_model: bool = False, **options: Any
) -> VisionTransformer:
    """Turn the MoE blocks of a V-MoE (from :func:`smoe.models.vmoe_vit`) into S2MoE layers.

    Each ``block.mlp`` (a :class:`MoEMlp`) keeps its router, experts and their state-dict keys;
    the S2MoE gate (and InstanceNorm with ``noise_form="instnorm"``) is added beside them under
    ``blocks.{i}.mlp.moe.s2moe_*``. In eval mode with ``eval_output="clean"`` (the default) the
    model computes what it computed before.

    Args:
        model: a timm ``VisionTransformer`` with at least one :class:`MoEMlp` block. Modified in
            place unless ``copy_model``.
        copy_model: work on a deep copy and leave ``model`` untouched.
        **options: :class:`smoe.S2MoELayer`'s options (noise_form, noise_stats, route_noisy,
            eval_output, balance, unc_pair, unc_temperature, ...), the same for every block.

    Raises:
        ValueError: a model without MoE blocks, a block already converted, a router S2MoE cannot
            take (not token choice), or a bad option (the message names it).
    """
    mlps = [b.mlp for b in getattr(model, "blocks", ()) if isinstance(b.mlp, MoEMlp)]
    if not mlps:
        raise ValueError("s2moe_vit: model has no MoEMlp block (build it with vmoe_vit first)")
    if any(isinstance(m.moe, S2MoELayer) for m in mlps):
        raise ValueError("s2moe_vit: model already has S2MoE layers")
    if copy_model:
        model = copy.deepcopy(model)
        mlps = [b.mlp for b in model.blocks if isinstance(b.mlp, MoEMlp)]
    new = [S2MoELayer.from_moe_layer(m.moe, **options) for m in mlps]  # all checked first
    for mlp, layer in zip(mlps, new):
        mlp.moe = layer
    return model
