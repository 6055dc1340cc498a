"""Figures of the SMoE-VAE QuickDraw example (:mod:`smoe.examples.quickdraw_vae`).

matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from smoe.data.quickdraw import QuickDraw
from smoe.examples.quickdraw_vae_train import (
    ACTIVE_MIN,
    EVAL_SEED,
    Config,
    Evaluation,
    ModelReport,
    StudyRow,
)
from smoe.models import SMoEVAE


def _show(ax, img: Tensor, title: str | None = None) -> None:
    ax.imshow(img.squeeze().numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _per_class_indices(labels: Tensor, per_class: int) -> list[int]:
    picks = [(labels == c).nonzero().flatten()[:per_class] for c in labels.unique().tolist()]
    return torch.cat(picks).tolist()


def plot_reconstructions(
    test_set: QuickDraw, evals: dict[str, Evaluation], reports: dict[str, ModelReport], path: Path
) -> Path:
    """Test drawings (top row) and each model's top-1 reconstruction, with its expert."""
    idx = _per_class_indices(test_set.labels, 2)
    rows = 1 + len(evals)
    fig = Figure(figsize=(0.9 * len(idx), 1.1 * rows))
    axes = fig.subplots(rows, len(idx), squeeze=False)
    for j, i in enumerate(idx):
        _show(axes[0, j], test_set.images[i], test_set.categories[int(test_set.labels[i])])
        for r, ev in enumerate(evals.values(), start=1):
            _show(axes[r, j], ev.recon[i], f"e{int(ev.expert[i])}")
    for r, name in enumerate(["input", *evals], start=0):
        label = name if r == 0 else f"{name}\n{reports[name].test_recon:.1f}"
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("Test drawings and top-1 reconstructions (eN: routed expert)", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_samples_per_expert(
    model: SMoEVAE, test_set: QuickDraw, ev: Evaluation, name: str, path: Path, n: int = 6
) -> Path:
    """Per expert: test drawings routed to it (left) and samples of its decoder (right).

    The samples decode ``z ~ N(m_e, diag(s_e^2))``, a Gaussian fitted to the latents of the test
    drawings routed to expert e (to all test latents for an expert with fewer than 2). With the
    paper's small KL weight (beta = 0.01) the latents stay far from N(0, I), so decoding prior
    samples would show little.
    """
    E = model.num_experts
    fig = Figure(figsize=(0.75 * 2 * n + 0.5, 0.8 * E + 0.6))
    axes = fig.subplots(E, 2 * n, squeeze=False)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(EVAL_SEED)
    for e in range(E):
        routed = (ev.expert == e).nonzero().flatten()
        for j in range(n):
            if j < routed.numel():
                _show(axes[e, j], test_set.images[routed[j]])
            else:
                axes[e, j].axis("off")
        z = ev.z[routed] if routed.numel() >= 2 else ev.z
        eps = torch.randn(n, z.shape[1], generator=gen, dtype=z.dtype)
        samples = model.experts.decode_one(e, (z.mean(0) + z.std(0) * eps).to(device)).cpu()
        for j in range(n):
            _show(axes[e, n + j], samples[j])
        axes[e, 0].axis("on")
        axes[e, 0].set_xticks([])
        axes[e, 0].set_yticks([])
        axes[e, 0].set_ylabel(f"e{e} ({routed.numel()})", fontsize=8)
    fig.suptitle(
        f"{name}: per expert, test drawings routed to it (left, count in brackets) and samples "
        "of its decoder (right)",
        fontsize=9,
    )
    return _save(fig, path)


def plot_tsne(
    evals: dict[str, Evaluation], labels: Tensor, categories: list[str], path: Path, cfg: Config
) -> Path:
    """t-SNE of the sampled test latents, coloured by routed expert and by class (spec §10)."""
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.tsne_points, len(labels))
    sel = torch.randperm(len(labels), generator=g)[:n]
    fig = Figure(figsize=(9, 4.2 * len(evals)))
    axes = fig.subplots(len(evals), 2, squeeze=False)
    for r, (name, ev) in enumerate(evals.items()):
        z = ev.z[sel].double().numpy()
        emb = TSNE(
            2, perplexity=min(30.0, (n - 1) / 3), max_iter=300, init="pca", random_state=42
        ).fit_transform(z)
        for col, (values, title, names) in enumerate(
            (
                (ev.expert[sel], "routed expert", None),
                (labels[sel], "class", categories),
            )
        ):
            ax = axes[r, col]
            cmap = "tab10" if int(values.max()) < 10 else "tab20"
            for v in values.unique().tolist():
                m = (values == v).numpy()
                label = names[v] if names else f"e{v}"
                ax.scatter(emb[m, 0], emb[m, 1], s=4, label=label, color=_color(cmap, v))
            ax.set_title(f"{name}: coloured by {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    return _save(fig, path)


def _color(cmap: str, v: int):
    import matplotlib

    return matplotlib.colormaps[cmap](v % 20 if cmap == "tab20" else v % 10)


def plot_confusion(reports: dict[str, ModelReport], categories: list[str], path: Path) -> Path:
    """Expert-vs-class counts on the test set, one panel per model."""
    fig = Figure(figsize=(4.8 * len(reports), 4.5))
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    for ax, r in zip(axes, reports.values()):
        conf = np.asarray(r.confusion)
        ax.imshow(conf, cmap="Blues")
        for (e, c), v in np.ndenumerate(conf):
            if v:
                color = "white" if v > conf.max() / 2 else "black"
                ax.text(c, e, str(v), ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(range(len(categories)), categories, rotation=45, fontsize=7)
        ax.set_yticks(range(conf.shape[0]), [f"e{e}" for e in range(conf.shape[0])], fontsize=7)
        ax.set_title(f"{r.name}: purity {r.purity:.2f}, {r.active_experts} active", fontsize=9)
        ax.set_xlabel("class")
        ax.set_ylabel("expert")
    return _save(fig, path)


def plot_curves(reports: dict[str, ModelReport], path: Path) -> Path:
    """Training loss and reconstruction per image, test reconstruction and active experts."""
    fig = Figure(figsize=(13, 3.6))
    ax_loss, ax_test, ax_active = fig.subplots(1, 3)
    for r in reports.values():
        h = r.history
        w = max(1, min(25, len(h.step_recon) // 10))
        smooth = np.convolve(h.step_recon, np.ones(w) / w, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + w - 1, smooth, label=f"{r.name} recon (train)")
        epochs = np.arange(1, len(h.epoch_test_recon) + 1)
        ax_test.plot(epochs, h.epoch_test_recon, "o-", label=r.name)
        ax_active.plot(epochs, h.epoch_active, "o-", label=f"{r.name} (E = {r.num_experts})")
    ax_loss.set(xlabel="step", ylabel="recon error per image", title="training (moving average)")
    ax_test.set(xlabel="epoch", ylabel="recon error per image", title="test, top-1 routing")
    ax_active.set(xlabel="epoch", ylabel="experts", title=f"active experts (>= {ACTIVE_MIN})")
    for ax in (ax_test, ax_active):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_active.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_test, ax_active):
        ax.legend(fontsize=7)
    return _save(fig, path)


def save_figures(
    out: Path,
    models: dict[str, SMoEVAE],
    reports: dict[str, ModelReport],
    evals: dict[str, Evaluation],
    test_set: QuickDraw,
    cfg: Config,
) -> dict[str, Path]:
    """All figures of a run as PNG files in ``out``; returns their paths by name."""
    cats = test_set.categories
    figures = {
        "reconstructions": plot_reconstructions(
            test_set, evals, reports, out / "reconstructions.png"
        ),
    }
    for name, model in models.items():
        figures[f"samples_{name}"] = plot_samples_per_expert(
            model, test_set, evals[name], name, out / f"samples_per_expert_{name}.png"
        )
    figures["tsne"] = plot_tsne(evals, test_set.labels, cats, out / "tsne.png", cfg)
    figures["confusion"] = plot_confusion(reports, cats, out / "confusion.png")
    figures["curves"] = plot_curves(reports, out / "training_curves.png")
    return figures


def plot_dataset_study(rows: list[StudyRow], fractions: tuple[float, ...], path: Path) -> Path:
    """Test error vs active experts, and vs training images per active expert, per fraction."""
    fig = Figure(figsize=(10, 3.8))
    ax_e, ax_s = fig.subplots(1, 2)
    for i, frac in enumerate(fractions):
        unsup = sorted(
            (r for r in rows if r.fraction == frac and r.model == "unsupervised"),
            key=lambda r: r.active_experts,
        )
        sup = next(r for r in rows if r.fraction == frac and r.model == "supervised")
        color = _color("tab10", i)
        label = f"{frac:g} ({unsup[0].train_images} images)"
        ax_e.plot(
            [r.active_experts for r in unsup],
            [r.test_recon for r in unsup],
            "o-",
            color=color,
            label=label,
        )
        ax_e.axhline(sup.test_recon, color=color, ls="--", lw=1)
        ax_s.plot(
            [r.train_images / max(r.active_experts, 1) for r in unsup],
            [r.test_recon for r in unsup],
            "o",
            color=color,
            label=label,
        )
    ax_e.set(
        xlabel="active experts",
        ylabel="test recon error",
        title="unsupervised (dashed: supervised)",
    )
    ax_s.set(xlabel="training images per active expert", ylabel="test recon error", xscale="log")
    ax_e.legend(fontsize=7, title="train fraction", title_fontsize=7)
    return _save(fig, path)
