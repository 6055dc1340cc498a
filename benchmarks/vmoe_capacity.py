"""V-MoE on QuickDraw: how accuracy degrades as the expert capacity drops, with and without
Batch Prioritized Routing (Riquelme et al. 2021, specs/vmoe.md §3, §7, §11).

    python benchmarks/vmoe_capacity.py [--epochs 5] [--quick] [--json out.json]

Trains, on the QuickDraw subset shipped in the repo (28x28, patch 4: 50 tokens per image), with
the same seed, data order and optimiser:
- a small dense timm ViT (6 blocks, d = 64, MLP 128);
- the same ViT as a V-MoE: "Every 2" MoE blocks (1, 3, 5), E = 8 experts, k = 2, V-MoE's noisy
  softmax-then-top-k router, groups of 8 images (S = 400 tokens), training capacity ratio 1.05,
  importance + load losses (0.005 each);
- the same ViT with expert-choice routing at equal expert compute (c = k = 2 experts per token on
  average, each expert takes ceil(S c / E) = 100 tokens per group).

Then evaluates the V-MoE at capacity ratios C from 0.1 to 1.5 with vanilla routing and with BPR
(no retraining: §7), and reports the effective capacity, i.e. the slots the experts can take per
group over the slots routed, ``E * C_e / (k * S)``: vmoe's padding of C_e to a multiple of 4
inflates it at small C. The paper's claim, in direction: with BPR accuracy degrades far more
gracefully as C drops. Writes a markdown table, JSON and ``benchmarks/plots/vmoe_capacity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine  # benchmarks/common.py
from torch import Tensor, nn
from tqdm.auto import tqdm

from smoe.data.quickdraw import load_subset
from smoe.models import (
    moe_aux_loss,
    moe_auxes,
    moe_blocks,
    quickdraw_vit,
    set_batch_priority,
    set_capacity_factor,
    tokens_per_image,
    vmoe_vit,
)
from smoe.routing.vmoe import vmoe_capacity

ROOT = Path(__file__).resolve().parents[1]
CAPACITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5)


@dataclass
class Trained:
    name: str
    model: nn.Module
    train_loss: float  # mean task loss of the last epoch
    seconds_per_step: float
    accuracy: float  # test accuracy at the training configuration


def train(
    name: str,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[float, float]:
    """AdamW with a linear warm-up and cosine decay; returns (last epoch's loss, s / step)."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(images) // batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    )
    has_moe = bool(moe_blocks(model))
    model.train()
    start, last = time.perf_counter(), 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        running, n = 0.0, 0
        bar = tqdm(
            range(0, len(images), batch_size),
            desc=f"{name} epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for i in bar:
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            total = loss + moe_aux_loss(model) if has_moe else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running, n = running + loss.item(), n + 1
            bar.set_postfix(loss=f"{running / n:.3f}")
        last = running / max(n, 1)
    return last, (time.perf_counter() - start) / max(total_steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 400) -> dict:
    """Test accuracy and, for an MoE, the fraction of routed slots the experts kept."""
    model.eval()
    correct, kept, routed = 0, 0.0, 0
    has_moe = bool(moe_blocks(model))
    for i in range(0, len(images), batch_size):
        out = model(images[i : i + batch_size])
        correct += int((out.argmax(-1) == labels[i : i + batch_size]).sum())
        if has_moe:
            for aux in moe_auxes(model).values():
                kept += 1.0 - float(aux.dropped_fraction)
                routed += 1
    return {"accuracy": correct / len(images), "kept": kept / routed if routed else 1.0}


def build(kind: str, args: argparse.Namespace, num_classes: int) -> nn.Module:
    torch.manual_seed(args.seed)  # every model starts from the same dense weights
    vit = quickdraw_vit(num_classes)
    if kind == "dense":
        return vit
    common = dict(num_experts=args.experts, k=args.k, every=2, group_images=8, upcycle=False)
    if kind == "vmoe":
        return vmoe_vit(vit, router="vmoe", capacity_factor=1.05, **common)
    return vmoe_vit(vit, router="expert_choice", **common)  # c = k: equal expert compute


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for bpr, style in ((False, "o-"), (True, "s-")):
        pts = [r for r in rows if r["bpr"] == bpr]
        label = "BPR" if bpr else "vanilla"
        ax.plot([r["C"] for r in pts], [100 * r["accuracy"] for r in pts], style, label=label)
        ax2.plot([r["C"] for r in pts], [100 * r["kept"] for r in pts], style, label=label)
    ax.axhline(100 * summary["dense"], color="k", ls="--", lw=1, label="dense ViT")
    ax.axhline(100 * summary["vmoe_no_capacity"], color="gray", ls=":", lw=1, label="V-MoE, no cap")
    ax.axhline(
        100 * summary["expert_choice"], color="tab:green", ls="-.", lw=1, label="expert choice"
    )
    ax.set_xlabel("inference capacity ratio C")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("V-MoE on QuickDraw: accuracy vs capacity")
    ax.legend(fontsize=8)
    eff = sorted({(r["C"], r["effective"]) for r in rows})
    ax2.plot(
        [c for c, _ in eff],
        [100 * min(e, 1.0) for _, e in eff],
        "k--",
        lw=1,
        label="effective capacity (cap 100)",
    )
    ax2.set_xlabel("inference capacity ratio C")
    ax2.set_ylabel("% of routed slots kept")
    ax2.set_title("slots kept (mean over MoE blocks)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capacities", type=float, nargs="+", default=list(CAPACITIES))
    p.add_argument("--quick", action="store_true", help="CI size: 1 epoch on 512 images")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "plots" / "vmoe_capacity.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_set, test_set = load_subset("train"), load_subset("test")
    x, y = train_set.images, train_set.labels
    tx, ty = test_set.images, test_set.labels
    if args.quick:
        args.epochs = 1
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512]
        x, y, tx, ty = x[keep], y[keep], tx[:400], ty[:400]
    n_cls = len(train_set.categories)

    trained = {}
    for kind in ("dense", "vmoe", "expert_choice"):
        model = build(kind, args, n_cls)
        loss, sps = train(
            kind,
            model,
            x,
            y,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=not args.no_progress,
        )
        acc = evaluate(model, tx, ty)["accuracy"]
        trained[kind] = Trained(kind, model, loss, sps, acc)
        ms = 1000 * sps
        print(
            f"{kind:>14}: train loss {loss:.3f}, test accuracy {100 * acc:.1f}%, {ms:.0f} ms/step"
        )

    vmoe = trained["vmoe"].model
    S = 8 * tokens_per_image(vmoe)
    set_capacity_factor(vmoe, None, mode="train")  # no capacity at all: the upper line
    set_capacity_factor(vmoe, None, mode="eval")
    free = evaluate(vmoe, tx, ty)
    rows = []
    for C in tqdm(args.capacities, desc="capacity sweep", disable=args.no_progress, leave=False):
        cap = vmoe_capacity(S, args.experts, args.k, C)
        for bpr in (False, True):
            set_capacity_factor(vmoe, C, mode="eval")
            set_batch_priority(vmoe, bpr)
            r = evaluate(vmoe, tx, ty)
            rows.append(
                {
                    "C": C,
                    "bpr": bpr,
                    "capacity": cap,
                    "effective": args.experts * cap / (args.k * S),
                    **r,
                }
            )
    summary = {
        "dense": trained["dense"].accuracy,
        "vmoe_train_C": trained["vmoe"].accuracy,
        "vmoe_no_capacity": free["accuracy"],
        "expert_choice": trained["expert_choice"].accuracy,
    }
    print(
        f"\nV-MoE (E={args.experts}, k={args.k}, S={S} tokens per group) at inference capacity C:\n"
    )
    print(
        "| C | C_e (slots per expert per group) | effective capacity | vanilla acc % "
        "| vanilla kept % | BPR acc % | BPR kept % |"
    )
    print("|---|---|---|---|---|---|---|")
    for C in args.capacities:
        v, b = (next(r for r in rows if r["C"] == C and r["bpr"] == m) for m in (False, True))
        print(
            f"| {C:g} | {v['capacity']} | {v['effective']:.3f} | {100 * v['accuracy']:.1f} | "
            f"{100 * v['kept']:.1f} | {100 * b['accuracy']:.1f} | {100 * b['kept']:.1f} |"
        )
    print("\n| model | test acc % | train loss (last epoch) | ms / train step |")
    print("|---|---|---|---|")
    for kind, label in (
        ("dense", "dense ViT"),
        ("vmoe", "V-MoE top-2, C = 1.05 (train and eval)"),
        ("expert_choice", "expert choice, c = 2 (equal expert compute)"),
    ):
        t = trained[kind]
        ms = 1000 * t.seconds_per_step
        print(f"| {label} | {100 * t.accuracy:.1f} | {t.train_loss:.3f} | {ms:.0f} |")
    print(f"| V-MoE top-2, no capacity at eval | {100 * free['accuracy']:.1f} | | |")
    plot(rows, summary, args.plot)
    elapsed = time.perf_counter() - start
    print(f"\nplot: {args.plot}; {elapsed:.0f} s in all, {torch.get_num_threads()} threads")
    result = {
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "group_tokens": S,
        "rows": rows,
        "summary": summary,
        "trained": {
            k: {kk: vv for kk, vv in asdict(t).items() if kk != "model"} for k, t in trained.items()
        },
        "seconds": elapsed,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
