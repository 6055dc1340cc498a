"""Train a small MoE classifier on the shipped QuickDraw subset.

    python -m smoe.examples.quickdraw_moe [--epochs 5] [--experts 8] [--k 2] [--device cpu]
        [--router-options '{"expert_bias": true, "aux": false}'] [--expert-bias-coeff 1e-3]

Each 28x28 drawing is one token: a linear embedding, two residual MoE feed-forward layers, and a
linear head over 9 categories. Prints loss, test accuracy, MaxVio (max load / mean load - 1, the
mean over the MoE layers of each training batch's, averaged over the epoch) and per-expert load
per epoch. ``--router-options`` go to every MoE layer's router (the default top-k router adds the
Switch balance loss and the z-loss); ``--expert-bias-coeff`` attaches
:class:`smoe.ExpertBiasUpdater` (aux-loss-free balancing) to the optimizer.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smoe import ExpertBiasUpdater, MoELayer
from smoe.data.quickdraw import load_subset
from smoe.metrics import max_violation


class MoEClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        d_model: int = 128,
        d_ff: int = 256,
        num_experts: int = 8,
        k: int = 2,
        depth: int = 2,
        router_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(28 * 28, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth))
        self.moes = nn.ModuleList(
            MoELayer(d_model, d_ff, num_experts, k, router_options=router_options)
            for _ in range(depth)
        )
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
    max_vio: float = float("nan")  # mean over the epoch's batches of the batch MaxVio
    step_max_vio: list[float] = field(default_factory=list)  # the batch MaxVio of every step
    test_max_vio: float = float("nan")  # MaxVio of the load summed over the test set
    expert_bias: list[list[float]] | None = None  # each layer's selection bias at the epoch's end


def batch_max_vio(loads: list[Tensor]) -> Tensor:
    """The mean over the MoE layers of each layer's MaxVio (``smoe.metrics.max_violation`` of its
    tokens per expert): a float64 scalar tensor, so the training loop does not sync."""
    return torch.stack([max_violation(load) for load in loads]).mean()


def evaluate_with_load(
    model: MoEClassifier, images: Tensor, labels: Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Test accuracy, and the MaxVio of the load summed over the whole set (the mean over the MoE
    layers; the paper's MaxVio_global)."""
    model.eval()
    correct, total = 0, None
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits, _, loads = model(images[i : i + batch_size])
            correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
            counts = torch.stack([load.double() for load in loads])
            total = counts if total is None else total + counts
    model.train()
    vio = float(batch_max_vio(list(total))) if total is not None else float("nan")
    return correct / max(len(images), 1), vio


def evaluate(model: MoEClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    return evaluate_with_load(model, images, labels, batch_size)[0]


def _expert_bias(model: MoEClassifier) -> list[list[float]] | None:
    biases = [moe.router._buffers.get("expert_bias") for moe in model.moes]
    if any(b is None for b in biases):
        return None
    return [b.tolist() for b in biases]


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
    router_options: Mapping[str, Any] | None = None,
    expert_bias_coeff: float | None = None,
) -> list[EpochResult]:
    """Train and evaluate after every epoch.

    The initial weights follow ``torch.manual_seed(seed)``; the subset (``limit``) and the data
    order come from a generator of their own seeded with ``seed``, so they are the same whatever
    the router does. ``router_options`` go to every MoE layer's router; ``expert_bias_coeff``
    (routers built with ``{"expert_bias": True}``) attaches an :class:`smoe.ExpertBiasUpdater`
    of that coefficient (centred) to the optimizer; None: no updater.
    """
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    train_set, test_set = load_subset("train"), load_subset("test")
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    if limit:  # a random subset: the file is grouped by class
        keep = torch.randperm(len(images), generator=order)[:limit].to(device)
        images, labels = images[keep], labels[keep]
    test_x, test_y = test_set.images.to(device), test_set.labels.to(device)
    model = MoEClassifier(
        len(train_set.categories), num_experts=num_experts, k=k, router_options=router_options
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if expert_bias_coeff is not None:
        ExpertBiasUpdater(model, coeff=expert_bias_coeff).attach(opt)
    results = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(images), generator=order).to(device)
        total, steps, vios = 0.0, 0, []
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
            vios.append(batch_max_vio([t.detach() for t in loads]))
            bar.set_postfix(loss=f"{total / steps:.3f}")
        share = (load / load.sum().clamp_min(1)).tolist()
        step_vio = torch.stack(vios).tolist() if vios else []
        accuracy, test_vio = evaluate_with_load(model, test_x, test_y)
        results.append(
            EpochResult(
                epoch,
                total / max(steps, 1),
                accuracy,
                share,
                max_vio=sum(step_vio) / max(len(step_vio), 1),
                step_max_vio=step_vio,
                test_max_vio=test_vio,
                expert_bias=_expert_bias(model),
            )
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
    p.add_argument(
        "--router-options",
        type=json.loads,
        default=None,
        help="JSON object, e.g. '{\"aux\": false}'",
    )
    p.add_argument("--expert-bias-coeff", type=float, default=None)
    args = p.parse_args(argv)
    if args.router_options is not None and not isinstance(args.router_options, dict):
        p.error(f"--router-options must be a JSON object, got {args.router_options!r}")
    start = time.perf_counter()
    results = train(
        args.epochs,
        args.experts,
        args.k,
        args.batch_size,
        seed=args.seed,
        device=args.device,
        router_options=args.router_options,
        expert_bias_coeff=args.expert_bias_coeff,
    )
    print(
        f"\n{'epoch':>5} {'train loss':>10} {'test acc':>9} {'MaxVio':>7}  "
        "per-expert load (last MoE layer, % of slots)"
    )
    for r in results:
        load = " ".join(f"{100 * s:4.1f}" for s in r.load)
        print(
            f"{r.epoch:>5} {r.train_loss:>10.4f} {r.test_accuracy:>9.3f} {r.max_vio:>7.3f}  {load}"
        )
    print(f"done in {time.perf_counter() - start:.0f} s on {args.device}")


if __name__ == "__main__":
    main()
