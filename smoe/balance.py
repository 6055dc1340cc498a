"""Aux-loss-free load balancing (DeepSeek-V3; Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664): a per-expert bias steers the
top-k selection towards under-loaded experts, moved by a fixed step at every optimizer step.

    model = ...  # routers built with expert_bias=True, e.g. MoELayer(..., router_options=
                 # {"expert_bias": True, "aux": False})
    updater = smoe.ExpertBiasUpdater(model, coeff=1e-3)
    updater.attach(optimizer)  # runs before every optimizer.step()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ExpertBiasUpdater"]


def _bias_name(module: nn.Module) -> str:
    """The buffer a router keeps its selection bias in: ``expert_bias`` (smoe's routers), or the
    name it declares in ``expert_bias_buffer`` (``e_score_correction_bias`` of a converted
    DeepSeek-V3 block)."""
    return getattr(module, "expert_bias_buffer", "expert_bias")


class ExpertBiasUpdater:
    """Moves every ``expert_bias`` buffer of ``model`` by ``coeff · sign(mean load − load)``.

    The loads are the routers' ``expert_counts``, accumulated by their training forwards since the
    last update (so gradient accumulation over micro-batches counts the whole step's tokens, as
    one batch would). With torch.distributed initialised, the counts are first all-reduced (sum)
    over ``process_group`` (default: the world), so every data-parallel rank applies the same
    update. ``center=True`` (torchtitan) subtracts the mean of the update, so the biases keep a
    zero mean; ``center=False`` is the paper's form. The counts are zeroed after each update.

    Args:
        model: a module holding routers with ``expert_bias=True`` (:class:`smoe.TopKRouter`), or
            DeepSeek-V3 blocks converted by :func:`smoe.convert` (their
            ``e_score_correction_bias``).
        coeff: the update rate u (1e-3 in the paper).
        center: subtract the mean of each update.
        process_group: the data-parallel group of the all-reduce.

    Raises:
        ValueError: no router with an expert bias in ``model``, or ``coeff`` not > 0.
    """

    def __init__(
        self,
        model: nn.Module,
        coeff: float = 1e-3,
        *,
        center: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not (isinstance(coeff, (int, float)) and coeff > 0):
            raise ValueError(f"ExpertBiasUpdater: coeff must be > 0, got {coeff!r}")
        self.routers = [
            m
            for m in model.modules()
            if isinstance(m._buffers.get(_bias_name(m)), torch.Tensor)
            and isinstance(m._buffers.get("expert_counts"), torch.Tensor)
        ]
        if not self.routers:
            raise ValueError(
                "ExpertBiasUpdater: the model has no router with an expert bias; build its "
                "routers with expert_bias=True (e.g. router_options={'expert_bias': True})"
            )
        self.coeff, self.center, self.process_group = float(coeff), bool(center), process_group

    @torch.no_grad()
    def step(self) -> None:
        """Update every bias from its counts, then zero the counts. No host sync."""
        distributed = dist.is_available() and dist.is_initialized()
        for router in self.routers:
            counts = router.expert_counts
            if distributed:
                dist.all_reduce(counts, group=self.process_group)
            delta = self.coeff * torch.sign(counts.mean() - counts)
            if self.center:
                delta = delta - delta.mean()
            getattr(router, _bias_name(router)).add_(delta)
            counts.zero_()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`step` before every ``optimizer.step()``; returns the hook's handle."""
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step())
