"""bench_precision.py's bf16 training comparison: the QuickDraw MoE classifier trained in fp32, in
bf16 with smoe's ops and in bf16 with torch's ops (same seed, weights and batches; fp32 master
weights for the optimizer), its curves' distances as a table and a plot."""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.low_precision import use_torch_ops  # noqa: E402

PLOT = ROOT / "benchmarks" / "plots" / "precision_bf16_training.png"


def train_curve(variant: str, seed: int, steps: int, device: str, batch: int = 128) -> list[float]:
    """Task loss per step of the QuickDraw MoE classifier; variant fp32, smoe-bf16, torch-bf16."""
    from smoe.data.quickdraw import load_subset
    from smoe.examples.quickdraw_moe import MoEClassifier

    torch.manual_seed(seed)
    data = load_subset("train")
    images, labels = data.images.to(device), data.labels.to(device)
    master = MoEClassifier(len(data.categories)).to(device)
    opt = torch.optim.AdamW(master.parameters(), lr=2e-3, weight_decay=0.01)
    bf16 = variant != "fp32"
    work = copy.deepcopy(master).to(torch.bfloat16) if bf16 else master
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    switch = use_torch_ops() if variant == "torch-bf16" else contextlib.nullcontext()
    losses = []
    with switch:
        for step in range(steps):
            idx = order[(step * batch) % len(order) :][:batch].to(device)
            if bf16:
                with torch.no_grad():
                    for pw, pm in zip(work.parameters(), master.parameters()):
                        pw.copy_(pm)
            x = images[idx].to(torch.bfloat16) if bf16 else images[idx]
            logits, aux_loss, _ = work(x)
            loss = F.cross_entropy(logits.float(), labels[idx])
            work.zero_grad(set_to_none=True)
            (loss + aux_loss.float()).backward()
            if bf16:
                for pw, pm in zip(work.parameters(), master.parameters()):
                    pm.grad = None if pw.grad is None else pw.grad.float()
            opt.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"{variant} seed {seed}: loss {losses[-1]} at step {step}")
    return losses


def training(device: str, seeds: int, steps: int) -> dict:
    curves: dict[str, list[list[float]]] = {"fp32": [], "smoe-bf16": [], "torch-bf16": []}
    times: dict[str, float] = {}
    for seed in range(seeds):
        for variant in curves:
            t0 = time.perf_counter()
            curves[variant].append(train_curve(variant, seed, steps, device))
            times[variant] = times.get(variant, 0.0) + time.perf_counter() - t0
            print(f"seed {seed} {variant}: final loss {curves[variant][-1][-1]:.4f}", flush=True)
    tail = min(20, steps)
    stats = {}
    for variant in ("smoe-bf16", "torch-bf16"):
        dist, gap = [], []
        for c, ref in zip(curves[variant], curves["fp32"]):
            dist.append(statistics.fmean(abs(a - b) for a, b in zip(c, ref)))
            gap.append(abs(statistics.fmean(c[-tail:]) - statistics.fmean(ref[-tail:])))
        stats[variant] = dict(mean_abs_diff=dist, final_gap=gap)
    between = [
        statistics.fmean(abs(a - b) for a, b in zip(s, t))
        for s, t in zip(curves["smoe-bf16"], curves["torch-bf16"])
    ]
    return dict(
        steps=steps, seeds=seeds, curves=curves, stats=stats, smoe_vs_torch=between, seconds=times
    )


def _pm(v: list[float]) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.4f} ± {sd:.4f}"


def training_markdown(res: dict) -> str:
    tail = min(20, res["steps"])
    final = {v: [statistics.fmean(c[-tail:]) for c in res["curves"][v]] for v in res["curves"]}
    lines = [
        f"QuickDraw MoE classifier (`smoe.examples.quickdraw_moe.MoEClassifier`, 2 MoE layers, "
        f"E=8, k=2, d=128, d_ff=256, batch 128, AdamW lr 2e-3), {res['steps']} steps, "
        f"{res['seeds']} seeds (mean ± std over seeds). bf16 = forward and backward in bf16 "
        "with fp32 master weights; `torch-bf16` is the same model under `use_torch_ops()` "
        "(torch's ops in bf16 instead of smoe's). Distance to the fp32 curve of the same seed: "
        f"mean over steps of |loss - loss_fp32|; final gap: |difference of the last-{tail}-step "
        "mean losses|.",
        "",
        "| run | final loss | mean abs diff to fp32 | final-loss gap to fp32 |",
        "|---|---:|---:|---:|",
        f"| fp32 | {_pm(final['fp32'])} | - | - |",
    ]
    for v in ("smoe-bf16", "torch-bf16"):
        st = res["stats"][v]
        lines.append(
            f"| {v} | {_pm(final[v])} | {_pm(st['mean_abs_diff'])} | {_pm(st['final_gap'])} |"
        )
    lines += [
        "",
        f"smoe-bf16 vs torch-bf16, mean abs diff per step: {_pm(res['smoe_vs_torch'])}. "
        "Wall time (all seeds): "
        + ", ".join(f"{v} {s:.0f} s" for v, s in res["seconds"].items())
        + ".",
    ]
    return "\n".join(lines)


def plot_training(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, w=10):
        return [statistics.fmean(v[max(0, i - w + 1) : i + 1]) for i in range(len(v))]

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for v, color in (("fp32", "k"), ("smoe-bf16", "C0"), ("torch-bf16", "C1")):
        mean = [statistics.fmean(s) for s in zip(*res["curves"][v])]
        a.plot(smooth(mean), color=color, label=v)
    a.set(xlabel="step", ylabel="train loss (seed mean, 10-step avg)", yscale="log")
    a.legend()
    for v, color in (("smoe-bf16", "C0"), ("torch-bf16", "C1")):
        diffs = [
            [abs(x - y) for x, y in zip(c, ref)]
            for c, ref in zip(res["curves"][v], res["curves"]["fp32"])
        ]
        b.plot(smooth([statistics.fmean(s) for s in zip(*diffs)]), color=color, label=v)
    b.set(xlabel="step", ylabel="|loss - loss_fp32| (seed mean, 10-step avg)")
    b.legend()
    fig.suptitle(f"QuickDraw MoE classifier, bf16 vs fp32 ({res['seeds']} seeds)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
