"""SMoE-VAE: a VAE whose decoder is a sparse mixture of convolutional experts.

Spec: specs/smoe_vae_quickdraw.md (Nikolic, Oguz, Psaltis, arXiv 2509.10025; reference code
``strajdzsha/smoe-vae``). One shared convolutional encoder, E "lite" convolutional decoders and a
small MLP gate that reads the sampled latent. Training mixes all E decoder outputs with the gate's
softmax (one batched computation, no loop over experts); inference runs only the arg-max decoder,
through the package's dispatch ops (``make_plan`` / ``permute`` / ``combine``).

The losses are plain functions (:func:`recon_loss`, :func:`kl_loss`, :func:`balance_loss`,
:func:`entropy_loss`, :func:`gate_ce_loss`); :meth:`SMoEVAE.loss` weights them as the spec does.
They, :func:`mix_experts` and the two networks (:class:`ConvEncoder`, :class:`DecoderExperts`)
live in :mod:`smoe.models.vae_parts` and are re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from smoe import ops
from smoe.models.vae_parts import (
    IMAGE,
    REDUCTIONS,
    ConvEncoder,
    DecoderExperts,
    balance_loss,
    entropy_loss,
    gate_ce_loss,
    kl_loss,
    mix_experts,
    recon_loss,
)

__all__ = [
    "ConvEncoder",
    "DecoderExperts",
    "SMoEVAE",
    "VAELoss",
    "VAEOutput",
    "balance_loss",
    "entropy_loss",
    "gate_ce_loss",
    "kl_loss",
    "mix_experts",
    "recon_loss",
]

ROUTINGS = ("unsupervised", "supervised")


class VAEOutput(NamedTuple):
    """What :meth:`SMoEVAE.forward` returns.

    Fields:
        recon: ``[B, 1, 28, 28]`` in [0, 1]: the softmax mixture (unsupervised, training) or the
            routed decoder's output (top-1 inference; supervised routing always).
        mu, log_var: ``[B, L]`` encoder outputs (log_var after the optional clamp).
        z: ``[B, L]`` the latent the gate and decoders read (sampled, or mu; see SMoEVAE).
        logits: ``[B, E]`` gate logits.
        expert: ``[B]`` int64: the routed expert (argmax of the gate, or the label's expert for
            ``oracle_eval``); in dense training it is the argmax, for statistics only.
    """

    recon: Tensor
    mu: Tensor
    log_var: Tensor
    z: Tensor
    logits: Tensor
    expert: Tensor


class VAELoss(NamedTuple):
    """Loss terms of :meth:`SMoEVAE.loss`, unweighted except ``total`` (spec §4, §5).

    ``total`` = recon + beta * kl + c_lb * balance + c_ent * entropy (unsupervised), or
    recon + beta * kl + c_lb * gate_ce (supervised). The terms that a routing does not use are
    still reported (``gate_ce`` is 0 without labels).
    """

    total: Tensor
    recon: Tensor
    kl: Tensor
    balance: Tensor
    entropy: Tensor
    gate_ce: Tensor


class SMoEVAE(nn.Module):
    """VAE with a sparse mixture of E convolutional decoder experts (specs/smoe_vae_quickdraw.md).

    Encoder (spec §2, "medium") -> ``mu, log_var`` -> ``z = mu + exp(log_var / 2) * eps`` ->
    gate MLP ``L -> 64 -> 32 -> E`` on z -> decoders ("lite", :class:`DecoderExperts`).

    Routing (spec §3, §5):

    - ``"unsupervised"`` (the paper's model). Training: all E decoders run as one batched
      computation and are mixed with ``softmax(logits)``. Inference (``eval()``): top-1, only
      the arg-max decoder runs for each image.
    - ``"supervised"`` (the label-routed baseline). The gate is trained with cross-entropy to
      predict ``label mod E`` and routes by its argmax in training and inference, so the
      reconstruction gradient never reaches the gate. In training all E decoders still run
      batched and the routed output is selected. With ``oracle_eval=True`` inference routes by
      the given labels instead of the gate (not in the reference code).

    Top-1 inference uses the package's dispatch: ``make_plan`` sorts the images by expert,
    ``permute`` gathers their latents, each expert with a non-empty slice decodes that slice
    once (:meth:`DecoderExperts.decode_one`), and ``combine`` scatters the rows back to batch
    order. No decoder sees an image routed elsewhere.

    Args:
        num_experts: E >= 1 (spec §7: 5 in the paper's preset).
        latent_dim: L (32).
        routing: ``"unsupervised"`` or ``"supervised"``.
        beta: KL weight (0.01).
        balance_coef: c_lb, weight of :func:`balance_loss`, and of :func:`gate_ce_loss` in the
            supervised baseline (200).
        entropy_coef: c_ent, weight of :func:`entropy_loss` (400).
        reduction: ``"sum"`` (the reference: recon, KL and gate CE summed over the batch, balance
            and entropy batch means, so their per-sample weight is c/B) or ``"mean"`` (every term
            a batch mean: per-image recon and KL, and c_lb, c_ent act per sample).
        sample_in_eval: sample z in eval as the reference does (True); False uses ``z = mu`` in
            eval, which makes inference deterministic. Training always samples.
        oracle_eval: supervised only: route by ``labels mod E`` at inference when labels are given.
        log_var_clamp: ``(lo, hi)`` to clamp log_var to (spec §9 suggests ``(-30, 20)``), or None
            (the reference: no clamp).

    Note:
        Top-1 inference reads ``plan.offsets`` on the host once per forward, a device sync (the
        slice bounds decide which decoders run); training has no host sync.
    """

    _version = 1  # state_dict format: bump it with a conversion in _load_from_state_dict

    def __init__(
        self,
        num_experts: int = 5,
        latent_dim: int = 32,
        *,
        routing: str = "unsupervised",
        beta: float = 0.01,
        balance_coef: float = 200.0,
        entropy_coef: float = 400.0,
        reduction: str = "sum",
        sample_in_eval: bool = True,
        oracle_eval: bool = False,
        log_var_clamp: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"SMoEVAE: routing must be one of {ROUTINGS}, got {routing!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"SMoEVAE: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if num_experts < 1:
            raise ValueError(f"SMoEVAE: num_experts must be >= 1, got {num_experts}")
        if oracle_eval and routing != "supervised":
            raise ValueError("SMoEVAE: oracle_eval needs routing='supervised'")
        self.num_experts, self.latent_dim, self.routing = num_experts, latent_dim, routing
        self.beta, self.balance_coef, self.entropy_coef = beta, balance_coef, entropy_coef
        self.reduction, self.sample_in_eval, self.oracle_eval = (
            reduction,
            sample_in_eval,
            oracle_eval,
        )
        self.log_var_clamp = log_var_clamp
        self.encoder = ConvEncoder(latent_dim)
        self.gate = nn.Sequential(
            nn.Linear(latent_dim, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, num_experts),
        )
        self.experts = DecoderExperts(num_experts, latent_dim)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, latent_dim={self.latent_dim}, "
            f"routing={self.routing!r}, beta={self.beta}, balance_coef={self.balance_coef}, "
            f"entropy_coef={self.entropy_coef}, reduction={self.reduction!r}"
        )

    def reset_parameters(self) -> None:
        """PyTorch default init everywhere (spec §2)."""
        self.encoder.reset_parameters()
        for m in self.gate:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        self.experts.reset_parameters()

    # -- pieces ---------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1, 28, 28]`` -> ``(mu, log_var)``, each ``[B, L]`` (log_var clamped if set)."""
        mu, log_var = self.encoder(x)
        if self.log_var_clamp is not None:
            log_var = log_var.clamp(*self.log_var_clamp)
        return mu, log_var

    def decode(
        self, z: Tensor, *, top1: bool | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gate and decoders on a given latent.

        Args:
            z: ``[B, L]``.
            top1: True for top-1 dispatch, False for the training path; None follows
                ``self.training`` (training path in train mode).
            labels: ``[B]`` class labels, used only by supervised ``oracle_eval`` inference.

        Returns:
            ``(recon [B, 1, 28, 28], logits [B, E], expert [B] int64)``.
        """
        top1 = (not self.training) if top1 is None else top1
        logits = self.gate(z)
        expert = logits.argmax(dim=-1)
        if top1:
            if self.oracle_eval and labels is not None:
                expert = labels.to(expert.device).long() % self.num_experts
            return self.decode_top1(z, expert), logits, expert
        y = self.experts(z)  # [B, E, 28, 28], all decoders in one batched computation
        if self.routing == "supervised":
            recon = y[torch.arange(y.shape[0], device=y.device), expert].unsqueeze(1)
        else:
            recon = mix_experts(torch.softmax(logits, dim=-1), y)
        return recon, logits, expert

    def decode_top1(self, z: Tensor, expert: Tensor) -> Tensor:
        """Each latent through its own expert only, via the dispatch ops.

        Args:
            z: ``[B, L]``.
            expert: ``[B]`` integer expert of each row, in ``[0, E)``.

        Returns:
            ``[B, 1, 28, 28]``: row b is ``decoder(expert[b])(z[b])``.

        Note:
            Reads ``plan.offsets`` on the host (one device sync) to slice the sorted rows.
        """
        B = z.shape[0]
        if B == 0:
            return z.new_empty(0, 1, IMAGE, IMAGE)
        plan = ops.make_plan(expert.to(torch.int32).reshape(B, 1), self.num_experts)
        z_sorted = ops.permute(z, plan)  # [B, L] grouped by expert, token order within
        offsets = plan.offsets.tolist()  # host sync: the slice bounds
        pieces = [
            self.experts.decode_one(e, z_sorted[offsets[e] : offsets[e + 1]]).flatten(1)
            for e in range(self.num_experts)
            if offsets[e + 1] > offsets[e]
        ]
        y_sorted = torch.cat(pieces)  # k = 1, no capacity: every row is kept, N = B
        y = ops.combine(y_sorted, y_sorted.new_ones(B, 1), plan)
        return y.reshape(B, 1, IMAGE, IMAGE)

    # -- model ----------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> VAEOutput:
        """Encode, sample, route, decode.

        Args:
            x: ``[B, 1, 28, 28]`` images in [0, 1].
            labels: ``[B]`` class labels: needed by :meth:`loss` in supervised mode, and used
                here only by ``oracle_eval``.
            generator: RNG for the reparameterisation noise (for reproducible sampling).

        Returns:
            :class:`VAEOutput`.
        """
        mu, log_var = self.encode(x)
        if self.training or self.sample_in_eval:
            eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
            z = mu + torch.exp(0.5 * log_var) * eps
        else:
            z = mu
        recon, logits, expert = self.decode(z, labels=labels)
        return VAEOutput(recon, mu, log_var, z, logits, expert)

    def loss(self, out: VAEOutput, x: Tensor, labels: Tensor | None = None) -> VAELoss:
        """The training objective (spec §4; supervised §5), weighted by the module's coefficients.

        In eval, ``out.recon`` is the top-1 reconstruction, so ``recon`` is the test loss of
        spec §10; balance and entropy always use the soft probabilities.

        Args:
            out: :meth:`forward`'s output for ``x``.
            x: ``[B, 1, 28, 28]`` targets.
            labels: ``[B]`` class labels; required for the supervised routing.

        Returns:
            :class:`VAELoss`.

        Raises:
            ValueError: supervised routing without labels.
        """
        recon = recon_loss(out.recon, x, self.reduction)
        kl = kl_loss(out.mu, out.log_var, self.reduction)
        balance = balance_loss(out.logits)
        entropy = entropy_loss(out.logits)
        if self.routing == "supervised":
            if labels is None:
                raise ValueError("SMoEVAE.loss: supervised routing needs labels")
            gate_ce = gate_ce_loss(out.logits, labels, self.reduction)
            total = recon + self.beta * kl + self.balance_coef * gate_ce
        else:
            gate_ce = recon.new_zeros(())
            total = (
                recon + self.beta * kl + self.balance_coef * balance + self.entropy_coef * entropy
            )
        return VAELoss(total, recon, kl, balance, entropy, gate_ce)
