"""Config, data, training and evaluation of the SMoE-VAE QuickDraw example.

The experiment and its CLI are :mod:`smoe.examples.quickdraw_vae`, whose docstring describes the
data, the two models and the metrics; its figures are drawn by
:mod:`smoe.examples.quickdraw_vae_figures`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
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
class StudyRow:
    """One trained model of the dataset-size study (its table's row)."""

    fraction: float
    train_images: int
    model: str
    num_experts: int
    active_experts: int
    test_recon: float
