"""SMoE-VAE on QuickDraw: unsupervised expert routing vs routing by the class label.

    python -m smoe.examples.quickdraw_vae [--epochs 4] [--experts 10] [--device cpu]
        [--out runs/quickdraw_vae] [--full-dataset DIR [--download]] [--dataset-study]

Reproduces the experiment of Nikolic, Oguz & Psaltis, "Exploring Expert Specialization through
Unsupervised Training in Sparse Mixture of Experts" (arXiv 2509.10025), at demo size; the model,
losses and defaults follow specs/smoe_vae_quickdraw.md (see :class:`smoe.models.SMoEVAE`).

Two models are trained with the same encoder, decoders, optimiser and data order:

- ``unsupervised``: E = ``--experts`` decoders mixed by a learned gate (softmax in training,
  top-1 at inference), with the paper's balance and entropy losses;
- ``supervised``: one decoder per class, the gate trained to predict the class and routing by
  its argmax (the paper's baseline).

Data (default): the QuickDraw subset shipped with smoe, its six classes that have 2,800 training
images each (apple, bicycle, cat, diamond, eye, fish), i.e. a balanced 16,800 / 1,200 train/test
set. We take these six rather than all nine because three of the nine classes have only 800
training images: keeping every class would cut the balanced set to 7,200 images, and the paper
found that experts need data (spec §10: at ~17k images its best model had 3 active experts).
Images are inverted to dark strokes on white, the paper's polarity. ``--full-dataset DIR`` reads
Google's ``full_numpy_bitmap_<category>.npy`` files instead (``--download`` fetches them), with
the paper's five categories by default. Our numbers are not comparable with the paper's: other
categories (only cat and eye overlap), Google's bitmaps instead of the paper's re-rasterised
strokes, about 5 % of its data and far fewer epochs.

Printed at the end, per model: the test reconstruction error (sum of squared errors over the 784
pixels per image, averaged over the test set, top-1 routing, z sampled as in the reference: the
paper's metric, spec §10), the number of active experts (experts that receive at least
``ACTIVE_MIN = 10`` test images, the threshold of the reference notebook), and the
expert-vs-class purity (the share of test images whose expert's majority class is their own
class). Figures (PNG, under ``--out``): reconstructions, samples per expert, t-SNE of the latents
coloured by expert and by class, the expert-vs-class confusion matrices and the training curves.

``--dataset-study`` instead trains the unsupervised model for several training-set fractions and
expert counts, plus the supervised baseline per fraction (spec §10's dataset-size study), and
saves a table and a figure. It is slow: it is not part of CI.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from tqdm import tqdm

from smoe.data.quickdraw import QuickDraw, load_official, load_subset
from smoe.models import SMoEVAE

SUBSET_CATEGORIES = ("apple", "bicycle", "cat", "diamond", "eye", "fish")
PAPER_CATEGORIES = ("face", "cat", "snowflake", "pencil", "eye")
ACTIVE_MIN = 10  # an expert is "active" if it receives at least this many test images
EVAL_SEED = 1234  # the noise of the reparameterisation at evaluation (the reference samples z)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    """Everything a run depends on. The defaults are the README's main job (~4 min on 2 idle cores).

    Attributes:
        experts: E of the unsupervised model (the supervised one has one expert per class).
        epochs: passes over the training set, per model.
        batch_size, lr: Adam's batch size and learning rate (spec §7: 128, 1e-3).
        seed: model init, data order and training noise.
        device: ``"cpu"`` or ``"cuda"``.
        categories: class names; None for the default (six subset classes, or the paper's five
            with ``full_dataset``).
        train_per_class, test_per_class: images per class; None for all (subset) or the paper's
            70,000 / 2,500 (full dataset).
        full_dataset: directory of Google's ``.npy`` files; None uses the shipped subset.
        download: fetch missing files into ``full_dataset``.
        dark_on_white: invert to dark strokes on white (the paper's polarity).
        out: directory for the figures and ``summary.json``.
        tsne_points: test images in the t-SNE plots.
        progress: show tqdm progress bars.
    """

    experts: int = 10
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = field(default_factory=default_device)
    categories: tuple[str, ...] | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    full_dataset: str | None = None
    download: bool = False
    dark_on_white: bool = True
    out: str = "runs/quickdraw_vae"
    tsne_points: int = 1000
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[QuickDraw, QuickDraw]:
    """The balanced train and test sets the config asks for (see the module docstring)."""
    if cfg.full_dataset is not None:
        cats = list(cfg.categories or PAPER_CATEGORIES)
        n_train, n_test = cfg.train_per_class or 70_000, cfg.test_per_class or 2_500
        data = load_official(
            cfg.full_dataset,
            cats,
            per_category=n_train + n_test,
            download=cfg.download,
            dark_on_white=cfg.dark_on_white,
        )
        train_idx, test_idx = [], []
        for c in range(len(cats)):
            idx = (data.labels == c).nonzero().flatten()
            if idx.numel() < n_train + n_test:
                raise ValueError(
                    f"load_data: category {cats[c]!r} has {idx.numel()} images, fewer than "
                    f"train_per_class + test_per_class = {n_train + n_test}"
                )
            train_idx.append(idx[:n_train])  # the files' first rows train, the next ones test
            test_idx.append(idx[n_train : n_train + n_test])
        tr, te = torch.cat(train_idx), torch.cat(test_idx)
        return (
            QuickDraw(data.images[tr], data.labels[tr], cats),
            QuickDraw(data.images[te], data.labels[te], cats),
        )
    cats = list(cfg.categories or SUBSET_CATEGORIES)
    splits = []
    for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        full = load_subset(split, dark_on_white=cfg.dark_on_white)
        unknown = [c for c in cats if c not in full.categories]
        if unknown:
            raise ValueError(
                f"load_data: categories {unknown} are not in the shipped subset "
                f"{full.categories}; use --full-dataset for others"
            )
        old = torch.tensor([full.categories.index(c) for c in cats])
        keep = torch.isin(full.labels, old)
        relabel = torch.full((len(full.categories),), -1, dtype=torch.long)
        relabel[old] = torch.arange(len(cats))
        sub = QuickDraw(full.images[keep], relabel[full.labels[keep]], cats)
        n = per_class or int(sub.labels.bincount(minlength=len(cats)).min())
        splits.append(sub.balanced(n, seed=cfg.seed))
    return splits[0], splits[1]


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """A model on a data set, top-1 routing (spec §10).

    Attributes:
        recon_error: mean over images of the summed squared error over 784 pixels.
        expert: ``[N]`` routed expert of each image.
        z: ``[N, L]`` the sampled latents.
        recon: ``[N, 1, 28, 28]`` reconstructions.
    """

    recon_error: float
    expert: Tensor
    z: Tensor
    recon: Tensor


@torch.no_grad()
def evaluate(model: SMoEVAE, data: QuickDraw, batch_size: int = 512) -> Evaluation:
    """Top-1 reconstruction of every image (z sampled with a fixed seed, as the reference)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    err, experts, zs, recons = 0.0, [], [], []
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device)
        out = model(x, generator=gen)
        err += (out.recon - x).pow(2).flatten(1).sum().item()
        experts.append(out.expert.cpu())
        zs.append(out.z.cpu())
        recons.append(out.recon.cpu())
    model.train(was_training)
    return Evaluation(err / max(len(data), 1), torch.cat(experts), torch.cat(zs), torch.cat(recons))


def routing_stats(
    expert: Tensor, labels: Tensor, num_experts: int, num_classes: int
) -> tuple[Tensor, int, float]:
    """Expert-vs-class counts, active experts and purity.

    Args:
        expert: ``[N]`` routed expert per image.
        labels: ``[N]`` class per image.
        num_experts, num_classes: E and C.

    Returns:
        ``(confusion [E, C] int64, active, purity)``: ``confusion[e, c]`` counts images of class
        c routed to expert e; ``active`` counts experts with at least :data:`ACTIVE_MIN` images;
        ``purity = sum_e max_c confusion[e, c] / N`` (1 when every expert sees a single class).
    """
    flat = expert.long() * num_classes + labels.long()
    confusion = flat.bincount(minlength=num_experts * num_classes).reshape(num_experts, -1)
    active = int((confusion.sum(dim=1) >= ACTIVE_MIN).sum())
    purity = float(confusion.max(dim=1).values.sum()) / max(len(labels), 1)
    return confusion, active, purity


@dataclass
class History:
    """Per-step training losses (per image) and per-epoch test metrics."""

    step_loss: list[float] = field(default_factory=list)
    step_recon: list[float] = field(default_factory=list)
    epoch_test_recon: list[float] = field(default_factory=list)
    epoch_active: list[int] = field(default_factory=list)
    seconds: float = 0.0


def train_model(
    model: SMoEVAE,
    train_set: QuickDraw,
    test_set: QuickDraw | None = None,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Adam over shuffled batches (spec §7), evaluating on ``test_set`` after every epoch.

    Args:
        model: an :class:`SMoEVAE`, already on its device.
        train_set, test_set: data on the CPU (moved to the model's device here).
        epochs, batch_size, lr: spec §7 defaults are 20, 128, 1e-3.
        seed: shuffling order (the training noise comes from the global RNG).
        progress: tqdm bar per epoch.
        desc: the bar's label.

    Returns:
        The model's :class:`History` (losses divided by the batch size).
    """
    device = next(model.parameters()).device
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    hist = History()
    start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(images), generator=order).to(device)
        bar = tqdm(
            range(0, len(images), batch_size),
            desc=f"{desc} {epoch}/{epochs}",
            disable=not progress,
            leave=True,
        )
        for i in bar:
            idx = perm[i : i + batch_size]
            x, y = images[idx], labels[idx]
            out = model(x, y)
            loss = model.loss(out, x, y)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            n = len(idx) if model.reduction == "sum" else 1
            hist.step_loss.append(loss.total.item() / n)
            hist.step_recon.append(loss.recon.item() / n)
            bar.set_postfix(loss=f"{hist.step_loss[-1]:.1f}", recon=f"{hist.step_recon[-1]:.1f}")
        if test_set is not None:
            ev = evaluate(model, test_set, batch_size=max(batch_size, 512))
            _, active, _ = routing_stats(
                ev.expert, test_set.labels, model.num_experts, len(test_set.categories)
            )
            hist.epoch_test_recon.append(ev.recon_error)
            hist.epoch_active.append(active)
            if progress:
                tqdm.write(
                    f"{desc} epoch {epoch}: test recon {ev.recon_error:.2f}, {active} active"
                )
    hist.seconds = time.perf_counter() - start
    return hist


@dataclass
class ModelReport:
    """One trained model's numbers (the comparison table's row)."""

    name: str
    num_experts: int
    test_recon: float
    active_experts: int
    purity: float
    confusion: list[list[int]]
    history: History


@dataclass
class RunResult:
    """What :func:`run` returns: class names, reports and models by name, figure paths, time."""

    config: Config
    categories: list[str]
    reports: dict[str, ModelReport]
    models: dict[str, SMoEVAE]
    figures: dict[str, Path]
    seconds: float


def build_models(cfg: Config, num_classes: int) -> dict[str, SMoEVAE]:
    """The two models of the comparison, same seed (so the same encoder init)."""
    models = {}
    for name, E in (("unsupervised", cfg.experts), ("supervised", num_classes)):
        torch.manual_seed(cfg.seed)
        models[name] = SMoEVAE(E, routing=name).to(cfg.device)
    return models


def run(cfg: Config | None = None) -> RunResult:
    """Train both models, evaluate them, save the figures and ``summary.json`` under ``cfg.out``.

    Args:
        cfg: the run's :class:`Config` (default: the main job's).

    Returns:
        :class:`RunResult`.
    """
    cfg = cfg or Config()
    start = time.perf_counter()
    train_set, test_set = load_data(cfg)
    C = len(train_set.categories)
    models = build_models(cfg, C)
    reports, evals = {}, {}
    for name, model in models.items():
        torch.manual_seed(cfg.seed)
        hist = train_model(
            model,
            train_set,
            test_set,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            progress=cfg.progress,
            desc=name,
        )
        ev = evaluate(model, test_set)
        confusion, active, purity = routing_stats(ev.expert, test_set.labels, model.num_experts, C)
        reports[name] = ModelReport(
            name, model.num_experts, ev.recon_error, active, purity, confusion.tolist(), hist
        )
        evals[name] = ev
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = save_figures(out, models, reports, evals, test_set, cfg)
    seconds = time.perf_counter() - start
    summary = {
        "config": asdict(cfg),
        "models": {n: asdict(r) for n, r in reports.items()},
        "figures": {k: str(v) for k, v in figures.items()},
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(cfg, train_set.categories, reports, models, figures, seconds)


def format_table(reports: dict[str, ModelReport]) -> str:
    """The comparison table (markdown)."""
    lines = [
        "| model | E | active experts (>= 10 test images) | test recon error | purity |",
        "|---|---|---|---|---|",
    ]
    for r in reports.values():
        lines.append(
            f"| {r.name} | {r.num_experts} | {r.active_experts} | {r.test_recon:.2f} | "
            f"{r.purity:.3f} |"
        )
    return "\n".join(lines)


def format_experts(report: ModelReport, categories: list[str]) -> str:
    """One line per active expert: its share of the test set and its top classes."""
    lines = []
    conf = torch.tensor(report.confusion)
    n = int(conf.sum())
    for e in range(conf.shape[0]):
        row = conf[e]
        total = int(row.sum())
        if total < ACTIVE_MIN:
            continue
        top = row.argsort(descending=True)[:3]
        parts = ", ".join(
            f"{categories[c]} {100 * row[c] / total:.0f}%" for c in top.tolist() if row[c] > 0
        )
        lines.append(f"  expert {e}: {100 * total / n:4.1f}% of test images: {parts}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API, Agg canvas: no pyplot state, no display needed)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Dataset-size study (spec §10)
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyRow:
    fraction: float
    train_images: int
    model: str
    num_experts: int
    active_experts: int
    test_recon: float


def dataset_study(
    cfg: Config,
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
    experts: tuple[int, ...] = (1, 3, 6, 10),
) -> tuple[list[StudyRow], Path]:
    """Test error vs training-set size and expert count (the paper's sweep, one trial each).

    For each fraction of the (balanced) training set: the unsupervised model for each E in
    ``experts`` and the supervised baseline. Saves ``dataset_study.png`` and
    ``dataset_study.json`` under ``cfg.out``.

    Returns:
        The rows and the figure's path.
    """
    train_full, test_set = load_data(cfg)
    C = len(train_full.categories)
    rows = []
    for frac in fractions:
        per_class = max(1, int(round(frac * len(train_full) / C)))
        train_set = train_full.balanced(per_class, seed=cfg.seed)
        for name, E in [*(("unsupervised", e) for e in experts), ("supervised", C)]:
            torch.manual_seed(cfg.seed)
            model = SMoEVAE(E, routing=name).to(cfg.device)
            train_model(
                model,
                train_set,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed,
                progress=cfg.progress,
                desc=f"{frac:g} {name} E={E}",
            )
            ev = evaluate(model, test_set)
            _, active, _ = routing_stats(ev.expert, test_set.labels, E, C)
            rows.append(StudyRow(frac, len(train_set), name, E, active, ev.recon_error))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_study.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
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
    path = _save(fig, out / "dataset_study.png")
    return rows, path


def format_study(rows: list[StudyRow]) -> str:
    lines = [
        "| train fraction | train images | model | E | active | test recon error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.fraction:g} | {r.train_images} | {r.model} | {r.num_experts} | "
            f"{r.active_experts} | {r.test_recon:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(","))


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--experts", type=int, default=d.experts, help="E of the unsupervised model")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=d.out, help="directory for figures and summary.json")
    p.add_argument(
        "--categories",
        type=lambda s: tuple(s.split(",")),
        default=None,
        help="comma-separated class names (default: see above)",
    )
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument(
        "--full-dataset",
        metavar="DIR",
        default=None,
        help="directory of Google's full_numpy_bitmap_<category>.npy files",
    )
    p.add_argument("--download", action="store_true", help="download missing files into DIR")
    p.add_argument(
        "--white-on-black",
        action="store_true",
        help="keep Google's polarity instead of the paper's dark-on-white",
    )
    p.add_argument("--tsne-points", type=int, default=d.tsne_points)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--dataset-study",
        action="store_true",
        help="run the dataset-size x expert-count study instead (slow)",
    )
    p.add_argument("--study-fractions", type=_floats, default=(0.25, 0.5, 1.0))
    p.add_argument("--study-experts", type=_ints, default=(1, 3, 6, 10))
    a = p.parse_args(argv)
    if a.download and a.full_dataset is None:
        p.error("--download needs --full-dataset DIR")
    cfg = Config(
        experts=a.experts,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        device=a.device,
        categories=a.categories,
        train_per_class=a.train_per_class,
        test_per_class=a.test_per_class,
        full_dataset=a.full_dataset,
        download=a.download,
        dark_on_white=not a.white_on_black,
        out=a.out,
        tsne_points=a.tsne_points,
        progress=not a.no_progress,
    )
    torch.manual_seed(cfg.seed)
    if a.dataset_study:
        start = time.perf_counter()
        rows, path = dataset_study(cfg, a.study_fractions, a.study_experts)
        print("\n" + format_study(rows))
        print(f"\nfigure: {path}\ndone in {time.perf_counter() - start:.0f} s on {cfg.device}")
        return
    result = run(cfg)
    print("\n" + format_table(result.reports))
    for r in result.reports.values():
        print(f"\n{r.name} experts (>= {ACTIVE_MIN} test images):")
        print(format_experts(r, result.categories))
    print("\nfigures:")
    for path in result.figures.values():
        print(f"  {path}")
    print(f"  {Path(cfg.out) / 'summary.json'}")
    minutes = math.floor(result.seconds / 60)
    print(f"done in {minutes} min {result.seconds - 60 * minutes:.0f} s on {cfg.device}")


if __name__ == "__main__":
    main()
