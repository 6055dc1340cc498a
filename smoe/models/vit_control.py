"""Reading and steering the MoE blocks of a V-MoE built by :func:`smoe.models.vmoe_vit`.

Training: add :func:`moe_aux_loss` (the weighted importance + load losses of every MoE block,
summed over blocks as ``vmoe``'s encoder does) to the task loss after each forward. Evaluation at
another capacity, or with Batch Prioritized Routing: :func:`set_capacity_factor` and
:func:`set_batch_priority` (specs/vmoe.md §7: C and BPR may be changed at inference without
retraining).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from smoe.layer import MoEAux
from smoe.models.vit import MoEMlp

__all__ = [
    "moe_aux_loss",
    "moe_auxes",
    "moe_blocks",
    "set_batch_priority",
    "set_capacity_factor",
]

_CAPACITY_MODES = ("train", "eval")


def moe_blocks(model: nn.Module) -> dict[int, MoEMlp]:
    """The :class:`MoEMlp` of every block that has one, by block index (empty for a dense ViT)."""
    return {
        i: b.mlp for i, b in enumerate(getattr(model, "blocks", ())) if isinstance(b.mlp, MoEMlp)
    }


def moe_auxes(model: nn.Module) -> dict[int, MoEAux]:
    """The last forward's :class:`MoEAux` of every MoE block, by block index.

    Raises:
        ValueError: ``model`` has no MoE block.
        RuntimeError: an MoE block has not run a forward yet.
    """
    layers = moe_blocks(model)
    if not layers:
        raise ValueError(f"moe_auxes: {type(model).__name__} has no MoE block")
    out = {}
    for i, layer in layers.items():
        if layer.last_aux is None:
            raise RuntimeError(f"moe_auxes: MoE block {i} has not run a forward yet")
        out[i] = layer.last_aux
    return out


def moe_aux_loss(model: nn.Module, weights: Mapping[str, float] | None = None) -> Tensor:
    """The weighted auxiliary loss of the last forward, summed over MoE blocks.

    Each block contributes :meth:`MoEAux.loss` (V-MoE: 0.005 x importance + 0.005 x load,
    specs/vmoe.md §4, §6); ``vmoe``'s encoder sums them over blocks. Add it to the task loss.

    Args:
        model: a V-MoE from :func:`vmoe_vit`, after a forward.
        weights: per-loss weights overriding :data:`smoe.losses.DEFAULT_LOSS_WEIGHTS`.

    Raises:
        ValueError, RuntimeError: see :func:`moe_auxes`.
    """
    auxes = list(moe_auxes(model).values())
    total = auxes[0].loss(weights)
    for aux in auxes[1:]:
        total = total + aux.loss(weights)
    return total


def _routers(model: nn.Module, fn: str) -> list[nn.Module]:
    layers = moe_blocks(model)
    if not layers:
        raise ValueError(f"{fn}: {type(model).__name__} has no MoE block")
    return [layer.moe.router for layer in layers.values()]


def set_capacity_factor(model: nn.Module, value: float | None, *, mode: str = "eval") -> None:
    """Set the capacity factor C of every MoE router (specs/vmoe.md §3, §7).

    Args:
        model: a V-MoE.
        value: C > 0, or None (V-MoE router: no capacity in ``"train"``; the training value in
            ``"eval"``).
        mode: ``"eval"`` sets ``eval_capacity_factor`` (used in eval mode only; the inference
            sweep), ``"train"`` sets ``capacity_factor`` (training, and eval when no eval value
            is set; for expert choice, c in both modes).

    Raises:
        ValueError: a bad value or mode, or no MoE block.
        TypeError: a router without that setting (e.g. ``"eval"`` on expert choice).
    """
    if mode not in _CAPACITY_MODES:
        raise ValueError(
            f"set_capacity_factor: mode must be one of {_CAPACITY_MODES}, got {mode!r}"
        )
    if value is not None and not value > 0:
        raise ValueError(f"set_capacity_factor: value must be > 0 or None, got {value}")
    attr = "eval_capacity_factor" if mode == "eval" else "capacity_factor"
    routers = _routers(model, "set_capacity_factor")
    for r in routers:
        if not hasattr(r, attr):
            raise TypeError(f"set_capacity_factor: {type(r).__name__} has no {attr}")
    for r in routers:
        setattr(r, attr, value)


def set_batch_priority(model: nn.Module, enabled: bool) -> None:
    """Switch Batch Prioritized Routing on or off in every MoE router (specs/vmoe.md §3, §7).

    Raises:
        ValueError: no MoE block.
        TypeError: a router without BPR (e.g. expert choice).
    """
    routers = _routers(model, "set_batch_priority")
    for r in routers:
        if not hasattr(r, "batch_priority"):
            raise TypeError(f"set_batch_priority: {type(r).__name__} has no batch_priority")
    for r in routers:
        r.batch_priority = bool(enabled)
