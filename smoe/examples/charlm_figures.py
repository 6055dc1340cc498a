"""Figures of char-LM runs (:mod:`smoe.examples.charlm`): learning curves, routing fluctuation over
training, routing entropy and representation collapse over training, and the expert-load heat map
of the final checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_curves", "plot_load", "plot_rf", "plot_routing", "save_figures"]


def _label(r: dict[str, Any]) -> str:
    return f"{r['config']['router']} s{r['seed']}"


def plot_curves(results: Sequence[dict[str, Any]], ax=None):
    """Validation bits per character against steps, clean (solid) and attacked (dashed)."""
    ax = ax if ax is not None else Figure(figsize=(6, 4)).subplots()
    for i, r in enumerate(results):
        steps = [h["step"] for h in r["history"]]
        color = f"C{i % 10}"
        ax.plot(steps, [h["val_bpc"] for h in r["history"]], color=color, label=_label(r))
        ax.plot(steps, [h["val_bpc_attacked"] for h in r["history"]], color=color, ls="--")
    ax.set(xlabel="step", ylabel="validation bits / char", title="clean (solid), attacked (dashed)")
    ax.legend(fontsize=7)
    return ax


def plot_rf(results: Sequence[dict[str, Any]], ax=None):
    """Routing fluctuation against the previous checkpoint, mean over MoE layers."""
    ax = ax if ax is not None else Figure(figsize=(6, 4)).subplots()
    for i, r in enumerate(results):
        ax.plot(r["rf"]["steps"], r["rf"]["previous"], color=f"C{i % 10}", label=_label(r))
    ax.set(
        xlabel="step", ylabel="RF (share of tokens whose top-1 moved)", title="routing fluctuation"
    )
    ax.legend(fontsize=7)
    return ax


def _layer_mean(entry: dict[str, Any], key: str) -> float:
    vals = [m[key] for m in entry["layers"].values() if key in m and np.isfinite(m[key])]
    return float(np.mean(vals)) if vals else float("nan")


def plot_routing(results: Sequence[dict[str, Any]], axes=None):
    """Mean routing entropy (nats, left) and representation collapse RC (right) over training,
    each the mean over MoE layers."""
    axes = axes if axes is not None else Figure(figsize=(10, 3.5)).subplots(1, 2)
    for i, r in enumerate(results):
        steps = [h["step"] for h in r["history"]]
        for ax, key in zip(axes, ("entropy", "rc")):
            ax.plot(
                steps,
                [_layer_mean(h, key) for h in r["history"]],
                color=f"C{i % 10}",
                label=_label(r),
            )
    axes[0].set(xlabel="step", ylabel="mean routing entropy (nats)", title="routing entropy")
    axes[1].set(xlabel="step", ylabel="Tr(Σ_W Σ_B^†)", title="representation collapse RC")
    axes[1].legend(fontsize=7)
    return axes


def plot_load(result: dict[str, Any], ax=None):
    """Share of each expert's load per MoE layer at the final evaluation."""
    ax = ax if ax is not None else Figure(figsize=(6, 3)).subplots()
    load = result["history"][-1]["load"]
    names = list(load)
    m = np.array([load[n] for n in names], dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
    ax.set(
        xlabel="expert",
        ylabel="MoE layer",
        yticks=range(len(names)),
        yticklabels=[n.split(".")[1] if "." in n else n for n in names],
        title=f"load share, {_label(result)}",
    )
    ax.figure.colorbar(im, ax=ax)
    return ax


def save_figures(results: Sequence[dict[str, Any]], prefix: str | Path) -> list[Path]:
    """Write ``<prefix>_{curves,rf,routing,load}.png`` (the load map of the first run).

    Drawn on matplotlib ``Figure`` objects, so no pyplot backend is touched (notebooks keep
    theirs)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw, size, panels in (
        ("curves", lambda ax: plot_curves(results, ax), (6, 4), 1),
        ("rf", lambda ax: plot_rf(results, ax), (6, 4), 1),
        ("routing", lambda axes: plot_routing(results, axes), (10, 3.5), 2),
        ("load", lambda ax: plot_load(results[0], ax), (6, 3), 1),
    ):
        fig = Figure(figsize=size)
        draw(fig.subplots(1, panels))
        fig.tight_layout()
        path = prefix.with_name(f"{prefix.name}_{name}.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
