"""Models built on smoe's ops: SMoE-VAE (specs/smoe_vae_quickdraw.md) and V-MoE on timm's ViT
(specs/vmoe.md; timm is imported only when a ViT is built), and MomentumV-MoE / Robust
MomentumV-MoE on it (specs/momentum_smoe.md §6), and Transformer-XL attention (the char-LM's
``attention="xl"``, specs/graph_routing.md §2.3)."""

from smoe.models.moe_factory import layer_kind, moe_layer
from smoe.models.vae import SMoEVAE, VAELoss, VAEOutput
from smoe.models.vit import MoEMlp, moe_block_indices, quickdraw_vit, tokens_per_image, vmoe_vit
from smoe.models.vit_control import (
    moe_aux_loss,
    moe_auxes,
    moe_blocks,
    set_batch_priority,
    set_capacity_factor,
)
from smoe.models.vit_momentum import MomentumBlock, MomentumViT, momentum_vit, momentum_vmoe_vit
from smoe.models.vit_s2moe import s2moe_vit
from smoe.models.xl import XLAttention

__all__ = [
    "MoEMlp",
    "MomentumBlock",
    "MomentumViT",
    "SMoEVAE",
    "VAELoss",
    "VAEOutput",
    "XLAttention",
    "layer_kind",
    "moe_aux_loss",
    "moe_auxes",
    "moe_block_indices",
    "moe_blocks",
    "moe_layer",
    "momentum_vit",
    "momentum_vmoe_vit",
    "quickdraw_vit",
    "s2moe_vit",
    "set_batch_priority",
    "set_capacity_factor",
    "tokens_per_image",
    "vmoe_vit",
]
