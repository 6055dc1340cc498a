"""Train a small MoE classifier on the shipped QuickDraw subset.

    python -m smoe.examples.quickdraw_moe [--epochs 5] [--experts 8] [--k 2] [--device cpu]

Each 28x28 drawing is one token: a linear embedding, two residual MoE feed-forward layers, and a
linear head over 9 categories. Prints loss, test accuracy and per-expert load per epoch.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smoe import MoELayer
from smoe.data.quickdraw import load_subset


class MoEClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        d_model: int = 128,
        d_ff: int = 256,
        num_experts: int = 8,
        k: int = 2,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(28 * 28, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth))
        self.moes = nn.ModuleList(MoELayer(d_model, d_ff, num_experts, k) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, num_classes))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        h = self.embed(images.flatten(1))
        aux_loss, loads = h.new_zeros(()), []
        for norm, moe in zip(self.norms, self.moes):
            y, aux = moe(norm(h))
            h = h + y
            aux_loss = aux_loss + aux.loss()
            loads.append(aux.tokens_per_expert)
        return self.head(h), aux_loss, loads


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_accuracy: float
    load: list[float]  # share of assignments per expert in the last layer over the epoch


def evaluate(model: MoEClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits, _, _ = model(images[i : i + batch_size])
            correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    model.train()
    return correct / max(len(images), 1)


def train(
    epochs: int = 3,
    num_experts: int = 8,
    k: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> list[EpochResult]:
    torch.manual_seed(seed)
    train_set, test_set = load_subset("train"), load_subset("test")
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    if limit:  # a random subset: the file is grouped by class
        keep = torch.randperm(len(images), device=device)[:limit]
        images, labels = images[keep], labels[keep]
    test_x, test_y = test_set.images.to(device), test_set.labels.to(device)
    model = MoEClassifier(len(train_set.categories), num_experts=num_experts, k=k).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    results = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(images), device=device)
        total, steps = 0.0, 0
        load = torch.zeros(num_experts, device=device)
        bar = tqdm(
            range(0, len(images), batch_size), desc=f"epoch {epoch}/{epochs}", disable=not progress
        )
        for i in bar:
            idx = perm[i : i + batch_size]
            logits, aux_loss, loads = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            (loss + aux_loss).backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            load += loads[-1].float()
            bar.set_postfix(loss=f"{total / steps:.3f}")
        share = (load / load.sum().clamp_min(1)).tolist()
        results.append(
            EpochResult(epoch, total / max(steps, 1), evaluate(model, test_x, test_y), share)
        )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = train(
        args.epochs, args.experts, args.k, args.batch_size, seed=args.seed, device=args.device
    )
    print(
        f"\n{'epoch':>5} {'train loss':>10} {'test acc':>9}  "
        "per-expert load (last MoE layer, % of slots)"
    )
    for r in results:
        load = " ".join(f"{100 * s:4.1f}" for s in r.load)
        print(f"{r.epoch:>5} {r.train_loss:>10.4f} {r.test_accuracy:>9.3f}  {load}")
    print(f"done in {time.perf_counter() - start:.0f} s on {args.device}")


if __name__ == "__main__":
    main()
