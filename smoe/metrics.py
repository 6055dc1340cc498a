"""Routing diagnostics: load, entropy, routing fluctuation, representation collapse, consistency.

Plain torch functions (each docstring gives the formula and its source) and
:class:`RoutingRecorder`, which hooks every :class:`smoe.MoELayer` of a model and collects them
per layer during evaluation. Used by the router lab (``python -m smoe.examples.charlm``,
``benchmarks/router_zoo.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from smoe.routing.base import Routing

__all__ = [
    "LayerRecord",
    "RoutingRecorder",
    "dense_weights",
    "inter_run_consistency",
    "load_stats",
    "max_violation",
    "representation_collapse",
    "routing_entropy",
    "routing_fluctuation",
    "fluctuation_series",
    "tokens_per_expert",
    "top1_expert",
]


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def tokens_per_expert(expert: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int64 number of assignments of each expert in ``expert [T, k]`` (-1 ignored)."""
    flat = expert.reshape(-1).long()
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts)[:num_experts]


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = max_e load_e / mean_e load_e - 1 (Wang et al. 2024, "Auxiliary-loss-free load
    balancing"): 0 when perfectly balanced, E - 1 when one expert takes everything. NaN for an
    all-zero load."""
    load = load.double()
    return load.max() / load.mean() - 1.0


def load_stats(load: Tensor, *, assigned: int | Tensor | None = None) -> dict[str, float]:
    """Summary of a ``[E]`` load vector (tokens per expert).

    Returns a dict with:
        ``cv``: coefficient of variation std/mean (population std, as V-MoE's losses);
        ``max_vio``: :func:`max_violation`;
        ``dead``: the number of experts with no token;
        ``dropped``: ``1 - sum(load) / assigned`` when ``assigned`` (the router's assignments
        before capacity) is given, else absent.
    """
    load_d = load.double()
    mean = load_d.mean()
    out = {
        "cv": float(load_d.std(correction=0) / mean) if mean > 0 else float("nan"),
        "max_vio": float(max_violation(load)),
        "dead": int((load == 0).sum()),
    }
    if assigned is not None:
        assigned = float(assigned)
        out["dropped"] = 1.0 - float(load_d.sum()) / assigned if assigned > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Entropy and the top-1 expert
# ---------------------------------------------------------------------------------------------
def routing_entropy(logits: Tensor) -> Tensor:
    """Mean routing entropy ``mean_t H(p_t)``, ``p_t = softmax(logits_t)``, in nats.

    ``log E`` for uniform routing, 0 for one-hot routing (specs/graph_routing.md §6). float64.
    """
    if logits.shape[0] == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    # 0 * log 0 = 0: a -inf logit (an expert with probability 0) adds nothing, not NaN.
    return -torch.where(p == 0, 0.0, p * logp).sum(dim=-1).mean()


def dense_weights(routing: Routing, num_experts: int) -> Tensor:
    """``[T, E]`` float32 combine weight of every (token, expert) pair, 0 where not routed.

    Works for token choice (``expert``/``weight`` ``[T, k]``) and expert choice (``[T, E]``
    with -1 where an expert did not choose the token) alike; capacity drops are not applied
    (this is what the router decided).
    """
    expert, weight = routing.expert, routing.weight.float()
    valid = expert >= 0
    out = weight.new_zeros((expert.shape[0], num_experts))
    return out.scatter_add_(1, expert.clamp_min(0).long(), torch.where(valid, weight, 0.0))


def top1_expert(routing: Routing, num_experts: int) -> Tensor:
    """``[T]`` int64 the expert with the largest combine weight per token (-1 if none).

    For token-choice routers this is the first choice; for expert choice, the chosen expert
    with the largest weight. Ties go to the lower expert index.
    """
    dense = dense_weights(routing, num_experts)
    top = dense.argmax(dim=1)
    return torch.where(dense.gt(0).any(dim=1), top, -1)


# ---------------------------------------------------------------------------------------------
# Routing fluctuation
# ---------------------------------------------------------------------------------------------
def routing_fluctuation(before: Tensor, after: Tensor) -> float:
    """RF: the share of tokens whose top-1 expert differs between two checkpoints.

    StableMoE (Dai et al. 2022), specs/graph_routing.md §6 and specs/xmoe.md §3.3: ``before`` and
    ``after`` are ``[N]`` top-1 experts of the same fixed held-out tokens. 0 for identical
    routing, 1 when every token moved.

    Raises:
        ValueError: different shapes or no token.
    """
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(
            "routing_fluctuation: before and after must be [N] of the same tokens, got "
            f"{tuple(before.shape)} and {tuple(after.shape)}"
        )
    if before.numel() == 0:
        raise ValueError("routing_fluctuation: no token to compare")
    return float((before != after).double().mean())


def fluctuation_series(checkpoints: Sequence[Tensor], *, against: str = "previous") -> list[float]:
    """RF of each checkpoint after the first, against the previous one (``"previous"``) or the
    final one (``"final"``, StableMoE's variant; the last entry is then 0).

    Args:
        checkpoints: top-1 experts ``[N]`` of the same held-out tokens, in training order.
    """
    if against not in ("previous", "final"):
        raise ValueError(
            f"fluctuation_series: against must be 'previous' or 'final', got {against!r}"
        )
    if against == "previous":
        return [routing_fluctuation(a, b) for a, b in zip(checkpoints[:-1], checkpoints[1:])]
    return [routing_fluctuation(a, checkpoints[-1]) for a in checkpoints[1:]]


# ---------------------------------------------------------------------------------------------
# Representation collapse and inter-run consistency
# ---------------------------------------------------------------------------------------------
def representation_collapse(
    h: Tensor, labels: Tensor, *, nc1_scale: bool = False, global_mean: str = "samples"
) -> float:
    """RC = Tr(Σ_W Σ_B^†) on the router's input (specs/xmoe.md §3.3, Chi et al. 2022 Eq. 11).

    Classes are the labels present (the top-1 expert, for routing). With class means ``μ_c``,
    global mean ``μ`` and K present classes (Papyan et al.'s NC1 definitions):
    ``Σ_W = 1/N Σ_c Σ_{i∈c} (h_i − μ_c)(h_i − μ_c)ᵀ``, ``Σ_B = 1/K Σ_c (μ_c − μ)(μ_c − μ)ᵀ``,
    ``Σ_B^†`` the Moore-Penrose pseudo-inverse. Larger means less collapse. ``nc1_scale=True``
    divides by K (NC1's factor, which Eq. 11 drops). Computed in float64.

    The spec leaves μ open [inferred]: NC1 assumes balanced classes, where the mean of all rows
    and the mean of the class means agree; experts' loads are not balanced. ``global_mean``
    chooses: ``"samples"`` (default, the mean of all N rows, as Papyan et al. write it) or
    ``"classes"`` (the mean of the K class means, so that Σ_B only sees where the classes sit).

    Args:
        h: ``[N, d]`` router inputs.
        labels: ``[N]`` integer class of each row (rows with a negative label are ignored).
        nc1_scale: divide by K.
        global_mean: ``"samples"`` or ``"classes"`` (see above).

    Raises:
        ValueError: shapes that do not match, fewer than two classes present, or an unknown
            ``global_mean``.
    """
    if global_mean not in ("samples", "classes"):
        raise ValueError(
            f"representation_collapse: global_mean must be 'samples' or 'classes', got "
            f"{global_mean!r}"
        )
    if h.dim() != 2 or labels.shape != (h.shape[0],):
        raise ValueError(
            "representation_collapse: h must be [N, d] and labels [N], got "
            f"{tuple(h.shape)} and {tuple(labels.shape)}"
        )
    keep = labels >= 0
    h, labels = h[keep].double(), labels[keep].long()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    K = classes.numel()
    if K < 2:
        raise ValueError(f"representation_collapse: needs >= 2 classes present, got {K}")
    sums = h.new_zeros((K, h.shape[1])).index_add_(0, inverse, h)
    means = sums / counts.unsqueeze(1).double()
    centred = h - means[inverse]
    sigma_w = centred.T @ centred / h.shape[0]
    between = means - (h.mean(dim=0) if global_mean == "samples" else means.mean(dim=0))
    sigma_b = between.T @ between / K
    rc = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))
    return float(rc / K if nc1_scale else rc)


def inter_run_consistency(loads: Sequence[Tensor] | Tensor) -> float:
    """Mean Pearson correlation of per-expert load vectors over all run pairs, i = j included
    (specs/xmoe.md §3.3).

    Args:
        loads: R load vectors ``[E]`` (one per run, same layer and data), or an ``[R, E]`` tensor.

    Returns:
        In [-1, 1]; 1 when every run loads the experts in the same proportions. NaN when a run's
        load is constant (its correlation is undefined).
    """
    if not isinstance(loads, Tensor):
        loads = list(loads)
        if not loads:
            raise ValueError("inter_run_consistency: expected R >= 1 load vectors [E], got none")
    stacked = torch.stack(loads) if not isinstance(loads, Tensor) else loads
    if stacked.dim() != 2 or stacked.shape[0] < 1:
        raise ValueError(
            f"inter_run_consistency: expected R >= 1 load vectors [E], got {tuple(stacked.shape)}"
        )
    corr = torch.corrcoef(stacked.double())
    return float(corr.mean())


# ---------------------------------------------------------------------------------------------
# RoutingRecorder
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What :class:`RoutingRecorder` collected for one MoE layer (CPU tensors)."""

    num_experts: int
    inputs: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    top1: list[Tensor] = field(default_factory=list)
    load: Tensor | None = None
    assigned: int = 0

    def top1_all(self) -> Tensor:
        return torch.cat(self.top1) if self.top1 else torch.empty(0, dtype=torch.long)

    def summary(self, *, rc: bool = True) -> dict[str, float]:
        """Load statistics, mean routing entropy (nats) and RC (if asked and computable)."""
        load = (
            self.load if self.load is not None else torch.zeros(self.num_experts, dtype=torch.long)
        )
        out: dict[str, float] = {"tokens": int(sum(t.numel() for t in self.top1))}
        out.update(load_stats(load, assigned=self.assigned))
        logits = torch.cat(self.logits) if self.logits else torch.empty(0, self.num_experts)
        out["entropy"] = float(routing_entropy(logits))
        out["entropy_max"] = math.log(self.num_experts)
        if rc and self.inputs:
            try:
                out["rc"] = representation_collapse(torch.cat(self.inputs), self.top1_all())
            except ValueError:  # a single expert holds every token: RC is undefined
                out["rc"] = float("nan")
        return out


class RoutingRecorder:
    """Hooks every :class:`smoe.MoELayer` of a model and records its routing per layer.

    Use it around evaluation; nothing is hooked (and nothing costs) outside the ``with``::

        rec = RoutingRecorder(model)
        with rec, torch.no_grad():
            for x in held_out:
                model(x)
        rec.summary()          # {layer name: {"cv", "max_vio", "dead", "dropped", "entropy", "rc"}}
        rec.top1()             # {layer name: [N] top-1 experts} -> routing_fluctuation

    Args:
        model: any module containing MoE layers.
        keep_inputs: keep the router inputs for RC (memory: N x d floats per layer).

    Entering clears what was recorded before.
    """

    def __init__(self, model: nn.Module, *, keep_inputs: bool = True) -> None:
        from smoe.layer import MoELayer  # the layer uses routing; metrics sit above both

        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
        if not self.layers:
            raise ValueError("RoutingRecorder: the model has no smoe.MoELayer")
        self.keep_inputs = keep_inputs
        self.records: dict[str, LayerRecord] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        """Clear the records and hook every layer (done by ``with``)."""
        self.detach()
        self.records = {n: LayerRecord(layer.num_experts) for n, layer in self.layers.items()}
        for name, layer in self.layers.items():
            self._handles.append(layer.router.register_forward_hook(self._router_hook(name)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(name)))

    def detach(self) -> None:
        """Remove the hooks (done when the ``with`` block ends)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _router_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, routing: Routing) -> None:
            rec = self.records[name]
            x = args[0]
            rec.logits.append(routing.logits.detach().float().cpu())
            rec.top1.append(top1_expert(routing, rec.num_experts).cpu())
            rec.assigned += int((routing.expert >= 0).sum())
            if self.keep_inputs:
                rec.inputs.append(x.detach().float().cpu())

        return hook

    def _layer_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            rec = self.records[name]
            load = output[1].tokens_per_expert.detach().cpu()
            rec.load = load if rec.load is None else rec.load + load

        return hook

    def top1(self) -> dict[str, Tensor]:
        """``{layer: [N] top-1 expert of every recorded token}``, in recording order."""
        return {name: rec.top1_all() for name, rec in self.records.items()}

    def summary(self, *, rc: bool = True) -> dict[str, dict[str, float]]:
        """Per-layer :meth:`LayerRecord.summary`."""
        return {name: rec.summary(rc=rc) for name, rec in self.records.items()}
