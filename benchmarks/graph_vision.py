"""Similarity-Aware and Attention-Aware routing against softmax top-2 on QuickDraw (issue 24, the
vision arm of Nguyen, Tran, Nguyen & Baraniuk 2025, arXiv 2505.00792; specs/graph_routing.md
§6, §9).

    python benchmarks/graph_vision.py [--seeds 0 1 2] [--epochs 2] [--threads 1] [--quick]

Arms (same backbone, initial weights per seed, data order, optimiser and steps; only the router
differs): the leaderboard's ViT task (``router_zoo.py``): the QuickDraw ViT of ``smoe.models``
(6 blocks, d = 64, 50 tokens per image), MoE every other block (1, 3, 5), E = 8, k = 2, fresh
experts, each router's balance + z losses, AdamW lr 2e-3, 2 epochs of batch 128;
- ``topk``: the softmax top-2 baseline (renormalised weights);
- ``similarity_aware``: gate logits mixed over the token-similarity graph of each image
  (non-causal; spec §4 defaults: poe, λ = 1, dot similarity, τ = 1);
- ``attention_aware``: gate logits mixed over the block's own head-averaged attention
  probabilities (non-causal, poe, λ = 1), handed on by ``smoe.models.vit_attention``.

Metrics: test accuracy, clean and under Gaussian pixel noise of std ``--noise`` (the fixed draw
of ``momentum_vision.gaussian_noise``); the mean routing entropy on the clean test set, of the
distribution that routes (H(p̃) for the graph arms, H(p) for top-k; ``smoe.metrics``), and the
graph arms' plain-gate H(p) (``routing_stats()``). Verdicts use ``router_zoo.verdict`` against
top-k (a difference must exceed two standard errors over seeds).

Each run's JSON goes to ``benchmarks/results/graph_vision/`` (``--quick``: ``benchmarks/out/``);
a run whose JSON exists with the same setup is reused, so an interrupted study resumes. The
markdown table is printed and written to ``table.md`` beside the runs (and between the
``graph-vision`` markers of ``--results`` when given); the plot goes to
``benchmarks/plots/graph_vision.png``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from arm_study import parse_study_args, stored_or_run, study_parser  # benchmarks/arm_study.py
from common import machine, pm, shown, write_block  # benchmarks/common.py
from momentum_vision import TRAIN, gaussian_noise  # benchmarks/momentum_vision.py
from router_zoo import mean_std, verdict, vit_data, vit_epochs  # benchmarks/router_zoo.py
from vmoe_capacity import evaluate, train  # benchmarks/vmoe_capacity.py
from zoo_entries import ZOO, Claim  # benchmarks/zoo_entries.py

from smoe.metrics import RoutingRecorder
from smoe.models import moe_blocks, quickdraw_vit, vmoe_vit

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- graph-vision:begin -->", "<!-- graph-vision:end -->"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "graph_vision"
DEFAULT_PLOT = ROOT / "benchmarks" / "plots" / "graph_vision.png"


@dataclass(frozen=True)
class Arm:
    label: str
    router: str
    options: dict[str, Any] = field(default_factory=dict)


ARMS = {
    "topk": Arm("SMoE (softmax top-2)", "topk"),
    "similarity_aware": Arm(
        "Similarity-Aware (poe, dot, τ = 1, λ = 1)", "similarity_aware", {"causal": False}
    ),
    "attention_aware": Arm(
        "Attention-Aware (poe, head mean, λ = 1)", "attention_aware", {"causal": False}
    ),
}
CLAIMS = tuple(
    (arm, Claim(f"{short}: {text}", metric, direction))
    for arm, short in (
        ("similarity_aware", "Similarity-Aware"),
        ("attention_aware", "Attention-Aware"),
    )
    for text, metric, direction in (
        ("higher top-1 (clean)", "clean", "higher"),
        ("higher top-1 under Gaussian noise (mean over σ)", "corrupted", "higher"),
        ("lower routing entropy, H(p̃) vs top-k's H(p)", "entropy", "lower"),
    )
)


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
def setup(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a run's result depends on; a stored run with another setup is run again."""
    a = ARMS[arm]
    return {
        "arm": arm,
        "router": a.router,
        "router_options": {**ZOO[a.router].vit, **a.options},
        "num_experts": 8,
        "k": 2,
        "every": 2,
        "group_images": 8,
        "epochs": args.epochs,
        **TRAIN,
        "noise": args.noise,
        "quick": args.quick,
    }


def build(cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # every arm starts from the same weights for a seed
    return vmoe_vit(
        quickdraw_vit(9),
        num_experts=cfg["num_experts"],
        k=cfg["k"],
        every=cfg["every"],
        group_images=cfg["group_images"],
        upcycle=False,
        router=cfg["router"],
        **cfg["router_options"],
    )


def routing_entropies(model: torch.nn.Module, images, labels) -> dict[str, Any]:
    """Clean test accuracy and mean routing entropies (nats, mean over the MoE layers): of the
    distribution that routes (``entropy``) and of the plain gate (``entropy_gate``)."""
    routers = [layer.moe.router for layer in moe_blocks(model).values()]
    for r in routers:
        if hasattr(r, "reset_routing_stats"):
            r.reset_routing_stats()
    rec = RoutingRecorder(model, keep_inputs=False)
    with rec:
        ev = evaluate(model, images, labels)
    routed = [s["entropy"] for s in rec.summary(rc=False).values()]
    gate = [
        r.routing_stats()["entropy_gate"] if hasattr(r, "routing_stats") else h
        for r, h in zip(routers, routed)
    ]
    return {
        "clean": ev["accuracy"],
        "entropy": sum(routed) / len(routed),
        "entropy_gate": sum(gate) / len(gate),
        "entropy_layers": routed,
        "entropy_gate_layers": gate,
    }


def run_one(cfg: dict[str, Any], seed: int, data, progress: bool) -> dict[str, Any]:
    (x, y), (tx, ty) = data
    t0 = time.perf_counter()
    model = build(cfg, seed)
    loss, sps = train(
        cfg["arm"], model, x, y, epochs=cfg["epochs"], seed=seed, progress=progress, **TRAIN
    )
    out = routing_entropies(model, tx, ty)
    noisy = {
        f"noise {s:g}": evaluate(model, gaussian_noise(tx, s), ty)["accuracy"] for s in cfg["noise"]
    }
    return {
        "arm": cfg["arm"],
        "seed": seed,
        "setup": cfg,
        **out,
        "by_noise": noisy,
        "corrupted": sum(noisy.values()) / max(len(noisy), 1),
        "train_loss": loss,
        "step_s": sps,
        "seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }


# ---------------------------------------------------------------------------------------------
# table, verdicts, plot
# ---------------------------------------------------------------------------------------------
METRICS = ("clean", "corrupted", "entropy", "entropy_gate", "train_loss", "step_s")


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for arm, by_seed in runs.items():
        recs = list(by_seed.values())
        row: dict[str, Any] = {"n": len(recs)}
        for m in METRICS:
            row[m] = mean_std([r[m] for r in recs])
        for name in recs[0]["by_noise"] if recs else ():
            row[name] = mean_std([r["by_noise"][name] for r in recs])
        table[arm] = row
    base = table.get("topk")
    for arm, row in table.items():
        row["verdicts"] = [
            verdict(c, row, base, min(row["n"], base["n"]) if base else 0)
            for a, c in CLAIMS
            if a == arm
        ]
    return table


def render(table: dict[str, dict], runs: dict[str, dict[int, dict]], args, out: Path) -> str:
    cfg = next(r["setup"] for by in runs.values() for r in by.values())
    names = [n for n in next(iter(table.values())) if n.startswith("noise ")]
    m = machine()
    size = "quick (CI-sized, not a measurement)" if args.quick else "full"
    seeds = sorted({s for by in runs.values() for s in by})
    images = "256 training images, test on 200" if args.quick else "19,200 training images, "
    images += "" if args.quick else "test on 1,800"
    lines = [
        f"## Graph-of-tokens routing vs softmax top-2 on QuickDraw "
        f"({datetime.date.today().isoformat()}, `graph_vision.py`, {size})",
        "",
        f"Table written at commit `{m['commit']}` on {m.get('cpu', '?')}, "
        f"{torch.get_num_threads()} thread(s); seeds {seeds} (mean ± std over seeds). QuickDraw "
        f"ViT (6 blocks, d = 64, 50 tokens per image), MoE every other block, E = "
        f"{cfg['num_experts']}, k = {cfg['k']}, fresh experts, each router's balance + z losses; "
        f"AdamW lr {cfg['lr']}, weight decay 0.05, warm-up and cosine, grad clip 1, batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epoch(s) on {images} (router_zoo's ViT task). "
        "Graph arms non-causal, spec §4 defaults (poe, λ = 1; similarity: dot, τ = 1, per image; "
        "attention: the block's pre-dropout probabilities averaged over heads). Test accuracy "
        "(%) clean and under Gaussian pixel noise of std σ (our stand-in for ImageNet-C). "
        "Entropy: mean routing entropy (nats, max ln 8 = 2.079) on the clean test set of the "
        "distribution that routes (H(p̃) for the graph arms, H(p) for top-k), and of the plain "
        f"gate H(p). Runs: `{shown(out)}`.",
        "",
        "| arm | clean | " + " | ".join(names) + " | mean noisy | H routed | H(p) gate | "
        "train loss | s / step |",
        "|---|" + "---|" * (len(names) + 6),
    ]
    for arm, row in table.items():
        cells = [pm(row[n], 100, 1) for n in ("clean", *names, "corrupted")]
        cells += [pm(row["entropy"]), pm(row["entropy_gate"])]
        cells += [pm(row["train_loss"]), pm(row["step_s"])]
        lines.append(f"| {ARMS[arm].label} (n = {row['n']}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| claim (Nguyen et al. 2025, V-MoE on ImageNet-1K) | metric | Δ vs top-k | verdict |",
        "|---|---|---|---|",
    ]
    for row in table.values():
        for v in row["verdicts"]:
            if v["delta"] is None:
                d = "–"
            else:
                scale, unit = (1.0, " nats") if v["metric"] == "entropy" else (100.0, " points")
                d = f"{scale * v['delta']:+.3f} (± {scale * v['se']:.3f}){unit}"
            lines.append(f"| {v['claim']} | {v.get('metric', '–')} | {d} | {v['verdict']} |")
    lines += [
        "",
        "Verdict rule (`router_zoo.verdict`): a difference counts when it exceeds two standard "
        "errors over seeds (± shows one); otherwise inconclusive at this scale. Step times share "
        "a loaded machine: no compute claim is judged from them.",
        "",
    ]
    if not args.quick:
        lines += ["![accuracy vs noise, routing entropy](plots/graph_vision.png)", ""]
    return "\n".join(lines) + "\n"


def render_plot(table: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j, (arm, row) in enumerate(table.items()):
        keys = sorted((float(n.split()[1]), n) for n in row if n.startswith("noise "))
        shift = 0.01 * (j - (len(table) - 1) / 2) * max((s for s, _ in keys), default=1.0)
        xs = [shift + x for x in (0.0, *(s for s, _ in keys))]  # apart, so none hides
        ms = [row["clean"], *(row[n] for _, n in keys)]
        label = f"{ARMS[arm].label} (n = {row['n']})"
        ax.errorbar(xs, [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o",
                    capsize=3, label=label)  # fmt: skip
        for dx, key, hatch in ((-0.2, "entropy", None), (0.2, "entropy_gate", "//")):
            m, s = row[key]
            ax2.bar(j + dx, m, 0.4, yerr=s, capsize=3, color=f"C{j}", hatch=hatch,
                    alpha=0.9 if hatch is None else 0.5)  # fmt: skip
    ax.set_xlabel("Gaussian pixel noise σ")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("QuickDraw V-MoE ViT: clean and noisy")
    ax.legend(fontsize=8)
    ax2.axhline(math.log(8), color="k", ls=":", lw=1)
    low = min(row[k][0] for row in table.values() for k in ("entropy", "entropy_gate"))
    ax2.set_ylim(max(0.0, low - 0.3) if not math.isnan(low) else 0.0, 1.03 * math.log(8))
    ax2.set_xticks(range(len(table)), [ARMS[a].label.split(" (")[0] for a in table], fontsize=8)
    ax2.set_ylabel("mean routing entropy (nats)")
    ax2.set_title("routed distribution (solid) vs plain gate H(p) (hatched)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, ARMS, epochs_help="default router_zoo's (quick: 1)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    args = parse_study_args(
        p, argv, ARMS, name="graph_vision", out=DEFAULT_OUT, results=None, plot=DEFAULT_PLOT
    )
    if any(s <= 0 for s in args.noise):
        p.error("--noise severities must be > 0")
    args.epochs = args.epochs or vit_epochs(args.quick)
    start, data = time.perf_counter(), functools.cache(lambda: vit_data(args.quick))
    arms = ["topk", *[a for a in args.arms if a != "topk"]]  # the baseline of every verdict
    runs, _ = stored_or_run(
        "graph_vision",
        [(a, s) for a in arms for s in args.seeds],
        args.out,
        lambda arm: setup(arm, args),
        lambda cfg, seed, progress: run_one(cfg, seed, data(), progress),
        lambda r: f"clean {r['clean']:.3f}, noisy {r['corrupted']:.3f}, H {r['entropy']:.3f}",
    )
    table = summarize(runs)
    block = render(table, runs, args, args.out)
    (args.out / "table.md").write_text(block)
    if args.results is not None:
        write_block(args.results, block, BEGIN, END)
    render_plot(table, args.plot)
    print(block)
    elapsed = time.perf_counter() - start
    print(f"graph_vision: {elapsed:.0f} s in this invocation; table in {args.out / 'table.md'}")
    return {"table": table, "seconds": elapsed, "out": str(args.out)}


if __name__ == "__main__":
    main()
