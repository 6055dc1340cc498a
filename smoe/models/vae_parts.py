"""Building blocks of the SMoE-VAE (:mod:`smoe.models.vae`): its losses and its two networks.

Spec: specs/smoe_vae_quickdraw.md. The losses (§4, §5, §9) are pure, unweighted functions;
:meth:`smoe.models.SMoEVAE.loss` weights them. The modules are the shared convolutional encoder
(:class:`ConvEncoder`) and the E "lite" convolutional decoders, stored stacked and run as one
batched computation (:class:`DecoderExperts`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvEncoder",
    "DecoderExperts",
    "balance_loss",
    "entropy_loss",
    "gate_ce_loss",
    "kl_loss",
    "mix_experts",
    "recon_loss",
]

REDUCTIONS = ("sum", "mean")
IMAGE = 28  # QuickDraw bitmaps are 28 x 28
_SEED_CH, _SEED_HW, _HIDDEN_CH = 8, 7, 16  # lite decoder: Linear L -> 8x7x7, conv 8 -> 16 -> 1


# ---------------------------------------------------------------------------------------------
# Losses (spec §4, §5, §9): pure functions, unweighted
# ---------------------------------------------------------------------------------------------
def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def recon_loss(x_hat: Tensor, x: Tensor, reduction: str = "sum") -> Tensor:
    """Squared error summed over pixels (spec §4: MSE with sum reduction, not BCE).

    Args:
        x_hat: ``[B, 1, 28, 28]`` reconstruction.
        x: ``[B, 1, 28, 28]`` target.
        reduction: ``"sum"`` over the batch (the reference) or ``"mean"`` over the batch (the
            per-image error, the paper's reported metric).

    Returns:
        A scalar.
    """
    return _reduce((x_hat - x).pow(2).flatten(1).sum(dim=1), reduction)


def kl_loss(mu: Tensor, log_var: Tensor, reduction: str = "sum") -> Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) in closed form, summed over the latent (spec §4).

    Args:
        mu: ``[B, L]``.
        log_var: ``[B, L]``.
        reduction: ``"sum"`` or ``"mean"`` over the batch.

    Returns:
        A scalar: ``-0.5 * sum_l (1 + log_var - mu^2 - exp(log_var))`` reduced over the batch.
    """
    per_sample = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(dim=1)
    return _reduce(per_sample, reduction)


def balance_loss(logits: Tensor) -> Tensor:
    """MSE-to-uniform load balance ``E * sum_e (pbar_e - 1/E)^2`` (spec §4; not Switch's f*P).

    Args:
        logits: ``[B, E]`` gate logits; ``pbar`` is the batch mean of their softmax.

    Returns:
        A scalar: 0 for a uniform ``pbar``, ``E * ((1 - 1/E)^2 + (E - 1)/E^2)`` when all mass is
        on one expert. A batch mean by construction, in both reductions.
    """
    E = logits.shape[-1]
    p_bar = torch.softmax(logits, dim=-1).mean(dim=0)
    return E * (p_bar - 1.0 / E).pow(2).sum()


def entropy_loss(logits: Tensor) -> Tensor:
    """Batch mean of the per-sample gate entropy ``-sum_e p log p`` (spec §4).

    Uses ``log_softmax`` (spec §9) instead of the reference's ``log(p + 1e-8)``; the two agree to
    about ``E * 1e-8``. Minimising it makes the gates sharp.

    Args:
        logits: ``[B, E]`` finite gate logits.

    Returns:
        A scalar: ``log E`` for uniform gates, 0 for one-hot gates.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def gate_ce_loss(logits: Tensor, labels: Tensor, reduction: str = "sum") -> Tensor:
    """Cross-entropy of the gate against the target expert ``labels mod E`` (spec §5).

    Args:
        logits: ``[B, E]`` gate logits.
        labels: ``[B]`` integer class labels.
        reduction: ``"sum"`` (the reference) or ``"mean"`` over the batch.

    Returns:
        A scalar.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.cross_entropy(logits, labels.long() % logits.shape[-1], reduction=reduction)


def mix_experts(weight: Tensor, y: Tensor) -> Tensor:
    """Dense mixture ``sum_e weight[b, e] * y[b, e]`` (spec §3 and §8).

    Args:
        weight: ``[B, E]`` mixing weights (the gate's softmax).
        y: ``[B, E, H, W]`` outputs of all E decoders.

    Returns:
        ``[B, 1, H, W]``.
    """
    return torch.einsum("be,behw->bhw", weight, y).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class ConvEncoder(nn.Module):
    """The "medium" convolutional encoder (spec §2): 494,144 parameters at L = 32.

    ``[B, 1, 28, 28]`` -> conv 1->32 (s1), conv 32->64 (s2), conv 64->128 (s2), all 3x3 pad 1 with
    ReLU -> flatten 6272 -> two Linear heads ``mu [B, L]`` and ``log_var [B, L]``.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, latent_dim: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(128 * 7 * 7, latent_dim)
        self.fc_log_var = nn.Linear(128 * 7 * 7, latent_dim)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"

    def reset_parameters(self) -> None:
        """PyTorch's default init for every layer (the reference does no custom init)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1, 28, 28]`` -> ``(mu [B, L], log_var [B, L])``."""
        h = self.conv(x)
        return self.fc_mu(h), self.fc_log_var(h)


class DecoderExperts(nn.Module):
    """E "lite" convolutional decoders (spec §2), stored stacked and run as one computation.

    One decoder: Linear L->392, reshape ``[8, 7, 7]``, nearest upsample x2, conv 8->16 3x3 pad 1,
    ELU, nearest upsample x2, conv 16->1 3x3 pad 1, sigmoid -> ``[1, 28, 28]`` (14,249 parameters
    at L = 32). Parameters are kept with a leading expert dimension, in nn.Linear / nn.Conv2d
    layout per expert, so that expert e is ``fc_weight[e]``, ``conv1_weight[e]``, ...:

    - ``fc_weight [E, 392, L]``, ``fc_bias [E, 392]``
    - ``conv1_weight [E, 16, 8, 3, 3]``, ``conv1_bias [E, 16]``
    - ``conv2_weight [E, 1, 16, 3, 3]``, ``conv2_bias [E, 1]``

    :meth:`forward` runs all E decoders on every input: the linear layers as one matmul, then
    grouped convolutions (``groups=E``) on ``[B, E*8, ...]`` maps. :meth:`decode_one` runs a
    single expert on its own rows (the inference path). :meth:`decoder` builds a plain
    ``nn.Sequential`` holding a copy of one expert's weights.

    Args:
        num_experts: E >= 1.
        latent_dim: L.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(self, num_experts: int, latent_dim: int = 32) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"DecoderExperts: num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.latent_dim = num_experts, latent_dim
        E, seed = num_experts, _SEED_CH * _SEED_HW * _SEED_HW
        self.fc_weight = nn.Parameter(torch.empty(E, seed, latent_dim))
        self.fc_bias = nn.Parameter(torch.empty(E, seed))
        self.conv1_weight = nn.Parameter(torch.empty(E, _HIDDEN_CH, _SEED_CH, 3, 3))
        self.conv1_bias = nn.Parameter(torch.empty(E, _HIDDEN_CH))
        self.conv2_weight = nn.Parameter(torch.empty(E, 1, _HIDDEN_CH, 3, 3))
        self.conv2_bias = nn.Parameter(torch.empty(E, 1))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, latent_dim={self.latent_dim}"

    def reset_parameters(self) -> None:
        """PyTorch's default Linear / Conv2d init per expert: U(+-1/sqrt(fan_in)) everywhere."""
        pairs = (
            (self.fc_weight, self.fc_bias),
            (self.conv1_weight, self.conv1_bias),
            (self.conv2_weight, self.conv2_bias),
        )
        for w, b in pairs:
            bound = 1.0 / math.sqrt(w[0, 0].numel())  # fan_in of one expert's layer
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, z: Tensor) -> Tensor:
        """All E decoders on every sample: ``z [B, L]`` -> ``[B, E, 28, 28]``, no expert loop."""
        E, B = self.num_experts, z.shape[0]
        h = torch.einsum("bl,eol->beo", z, self.fc_weight) + self.fc_bias  # [B, E, 392]
        h = h.reshape(B, E * _SEED_CH, _SEED_HW, _SEED_HW)  # expert e owns channels e*8 .. e*8+7
        # channels-last makes oneDNN's grouped convolutions (and their backward) 3x faster on CPU
        h = h.contiguous(memory_format=torch.channels_last)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.conv2d(
            h,
            self.conv1_weight.reshape(E * _HIDDEN_CH, _SEED_CH, 3, 3),
            self.conv1_bias.reshape(-1),
            padding=1,
            groups=E,
        )
        h = F.interpolate(F.elu(h), scale_factor=2, mode="nearest")
        h = F.conv2d(
            h,
            self.conv2_weight.reshape(E, _HIDDEN_CH, 3, 3),
            self.conv2_bias.reshape(-1),
            padding=1,
            groups=E,
        )
        return torch.sigmoid(h)

    def decode_one(self, e: int, z: Tensor) -> Tensor:
        """Expert e alone on its rows: ``z [n, L]`` -> ``[n, 1, 28, 28]``."""
        h = F.linear(z, self.fc_weight[e], self.fc_bias[e])
        h = h.reshape(-1, _SEED_CH, _SEED_HW, _SEED_HW)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.elu(F.conv2d(h, self.conv1_weight[e], self.conv1_bias[e], padding=1))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return torch.sigmoid(F.conv2d(h, self.conv2_weight[e], self.conv2_bias[e], padding=1))

    def decoder(self, e: int) -> nn.Sequential:
        """A standalone copy of expert e as the reference's plain module (``ConvDecoderLite``)."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"decoder: expert index must be in [0, {self.num_experts}), got {e}")
        fc = nn.Linear(self.latent_dim, _SEED_CH * _SEED_HW * _SEED_HW)
        conv1 = nn.Conv2d(_SEED_CH, _HIDDEN_CH, 3, padding=1)
        conv2 = nn.Conv2d(_HIDDEN_CH, 1, 3, padding=1)
        with torch.no_grad():
            for layer, w, b in (
                (fc, self.fc_weight, self.fc_bias),
                (conv1, self.conv1_weight, self.conv1_bias),
                (conv2, self.conv2_weight, self.conv2_bias),
            ):
                layer.weight.copy_(w[e])
                layer.bias.copy_(b[e])
        seq = nn.Sequential(
            fc,
            nn.Unflatten(1, (_SEED_CH, _SEED_HW, _SEED_HW)),
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv1,
            nn.ELU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv2,
            nn.Sigmoid(),
        )
        return seq.to(device=self.fc_weight.device, dtype=self.fc_weight.dtype)
