"""Models built on smoe's ops: SMoE-VAE (specs/smoe_vae_quickdraw.md)."""

from smoe.models.vae import SMoEVAE, VAELoss, VAEOutput

__all__ = ["SMoEVAE", "VAELoss", "VAEOutput"]
