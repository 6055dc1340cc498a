"""The router leaderboard: every registered router on the same tasks, at equal active expert
compute and equal steps, over several seeds.

    python benchmarks/router_zoo.py [--seeds 0 1 2] [--routers topk vmoe] [--quick]

Tasks (same backbone, widths, optimiser and steps for every router):
- charlm: the causal char-level LM of ``smoe.examples.charlm`` on Tiny Shakespeare (4 MoE layers,
  d = 128, E = 8, k = 2, expert width 4d/k): validation bits per character, clean and on
  word-swap-attacked text (rate 0.04), late-training routing fluctuation (mean RF against the
  previous checkpoint over the second half of training) and MaxVio at the end. Routers that are not
  causal as configured would see the future and are not run here: V-MoE's row runs without
  capacity in the LM for that reason (a capacity at k = 2 is filled rank-major), expert choice's
  and USMoE's grouped by position (the batch's tokens at one position compete).
- step time: every invocation times training steps of each router's char-LM in the same process,
  interleaved in rounds (so drift and load hit all alike), as a ratio to top-k's.
- vit: the QuickDraw V-MoE ViT of ``smoe.models`` ("Every 2", E = 8, k = 2, groups of 8 images,
  fresh experts): test accuracy, clean and with Gaussian pixel noise of std ``--noise-std``. The
  stack-level methods (momentum, adam, robust_momentum) run their gate in a momentum stack
  (``smoe.models.momentum_vit``: the V-MoE pre-LN layout of specs/momentum_smoe.md §6); the
  layer-level S2MoE runs its gate inside S2MoE layers (``smoe.models.s2moe_vit``; in the LM,
  ``smoe.models.moe_layer``).

Each run's JSON goes to ``--out`` (default ``benchmarks/results/router_zoo``, committed; with
``--quick``, ``benchmarks/out/``, which git ignores, and so do its table and plot). A task whose
JSON exists with the same setup (config, options, noise) is skipped, so an interrupted leaderboard
resumes; a changed setup reruns it. The table (mean ± std over seeds), the
paper claim of each row with the measured direction and a verdict go into RESULTS.md between the
``router-zoo`` markers, the plot into ``benchmarks/plots/router_zoo.png``. A new router adds its
row by registering itself (``smoe.routing.register_router``) and an entry in ``ZOO``
(benchmarks/zoo_entries.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from common import machine, same_setup, write_block  # benchmarks/common.py
from vmoe_capacity import evaluate as vit_evaluate  # benchmarks/vmoe_capacity.py
from vmoe_capacity import train as vit_train
from zoo_entries import ZOO, Claim, ZooEntry  # benchmarks/zoo_entries.py
from zoo_report import render, render_plot  # benchmarks/zoo_report.py

from smoe.data.quickdraw import load_subset
from smoe.data.text import random_batch, tiny_shakespeare
from smoe.examples.charlm import (
    CharLMConfig,
    build_model,
    build_optimizer,
    quick_config,
    train_step,
)
from smoe.examples.charlm import run as charlm_run
from smoe.models import momentum_vit, quickdraw_vit, s2moe_vit, vmoe_vit
from smoe.routing import available_routers, build_router, router_info

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- router-zoo:begin -->", "<!-- router-zoo:end -->"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "router_zoo"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_PLOT = ROOT / "benchmarks" / "plots" / "router_zoo.png"


def _defaults(task: str) -> dict | None:
    """The values a stored setup lacking a field (added since) is compared with."""
    return asdict(CharLMConfig()) if task == "charlm" else None


def charlm_config(name: str, quick: bool) -> CharLMConfig:
    """The charlm run of the leaderboard: 600 steps, evaluated every 50."""
    options, extra = ZOO[name].charlm, ZOO[name].charlm_config
    if quick:
        return quick_config(router=name, router_options=options, steps=20, eval_every=5, **extra)
    return CharLMConfig(router=name, router_options=options, steps=600, eval_every=50, **extra)


def runs_in_charlm(name: str) -> bool:
    """Whether the router, built with its leaderboard options, is causal (a decoder may use it)."""
    cfg = charlm_config(name, quick=True)
    router = build_router(name, cfg.d_model, cfg.num_experts, cfg.k, **cfg.router_options)
    if not cfg.causal_training:  # only its evaluation must be causal
        router.eval()
    return router_info(name).is_causal(router)


def runs_in_vit(name: str) -> bool:
    """Whether the V-MoE ViT can run the router: every registered router. Those that read the
    block's attention probabilities get them from the explicit attention of their blocks
    (``smoe.models.vit_attention``); the stack-level methods (MomentumSMoE and its kin) run as a
    momentum stack (``smoe.models.momentum_vit``)."""
    router_info(name)  # an unknown name is a clear error
    return True


def setup(task: str, name: str, quick: bool, noise_std: float) -> dict:
    """What a task's result depends on; a stored run with another setup is run again."""
    if task == "charlm":
        return asdict(charlm_config(name, quick))
    out = {"options": ZOO[name].vit, "epochs": vit_epochs(quick), "noise_std": noise_std}
    stack, layer = router_info(name).stack, router_info(name).layer
    if stack is not None:  # only the stack rows carry the field: the others' runs stay valid
        out["stack"] = stack
    if layer is not None:  # likewise for the layer-level methods (S2MoE)
        out["layer"] = layer
    return out


def run_charlm(name: str, seed: int, quick: bool, corpus) -> dict:
    cfg = charlm_config(name, quick)
    r = charlm_run(cfg, seed, corpus=corpus, progress=not quick)
    f = r["final"]
    return {
        "bpc": f["val_bpc"],
        "bpc_attacked": f["val_bpc_attacked"],
        "late_rf": f["late_rf"],
        "max_vio": f["max_vio"],
        "step_s": f["step_time_s"],
        "rf_steps": r["rf"]["steps"],
        "rf": r["rf"]["previous"],
        "load": r["history"][-1]["load"],
        "setup": r["config"],
        "attack": r["attack"],
    }


def vit_epochs(quick: bool) -> int:
    return 1 if quick else 2


def run_vit(name: str, seed: int, quick: bool, data, noise_std: float) -> dict:
    (x, y), (tx, ty) = data
    torch.manual_seed(seed)
    vit = quickdraw_vit(9)
    model = vmoe_vit(
        vit,
        num_experts=8,
        k=2,
        every=2,
        group_images=8,
        upcycle=False,
        router=name,
        **ZOO[name].vit,
    )
    stack = router_info(name).stack
    if stack is not None:  # the registered gate inside a momentum stack, at the paper's defaults
        model = momentum_vit(model, stack)
    if router_info(name).layer == "s2moe":  # the gate inside S2MoE layers, at the spec's defaults
        model = s2moe_vit(model)
    loss, sps = vit_train(
        name,
        model,
        x,
        y,
        epochs=vit_epochs(quick),
        batch_size=128,
        lr=2e-3,
        seed=seed,
        progress=not quick,
    )
    clean = vit_evaluate(model, tx, ty)["accuracy"]
    g = torch.Generator().manual_seed(1234)  # the same noise for every router and seed
    noisy_x = tx + noise_std * torch.randn(tx.shape, generator=g)
    noisy = vit_evaluate(model, noisy_x, ty)["accuracy"]
    return {
        "vit_acc": clean,
        "vit_acc_noisy": noisy,
        "vit_train_loss": loss,
        "vit_step_s": sps,
        "setup": setup("vit", name, quick, noise_std),
    }


def time_steps(names: list[str], quick: bool, corpus, rounds: int = 4, steps: int = 5) -> dict:
    """Seconds per char-LM training step of each router, measured in this process: after two
    warm-up steps each, ``rounds`` rounds of ``steps`` steps per router, interleaved; the median
    over rounds. Returns ``{name: {"step_s", "ratio"}}`` with the ratio to top-k."""
    models, opts, gens = {}, {}, {}
    for name in names:
        cfg = charlm_config(name, quick)
        torch.manual_seed(0)
        models[name] = build_model(cfg, len(corpus.vocab))
        opts[name] = build_optimizer(models[name], cfg)
        gens[name] = torch.Generator().manual_seed(0)

    def step(name: str) -> None:
        cfg = charlm_config(name, quick)
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.context, gens[name])
        train_step(models[name], opts[name], x, y, cfg)  # the training step charlm times

    for name in names:
        for _ in range(2):
            step(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            samples[name].append((time.perf_counter() - t0) / steps)
    med = {name: statistics.median(v) for name, v in samples.items()}
    return {name: {"step_s": med[name], "ratio": med[name] / med["topk"]} for name in names}


def vit_data(quick: bool):
    train, test = load_subset("train"), load_subset("test")
    x, y, tx, ty = train.images, train.labels, test.images, test.labels
    if quick:
        g = torch.Generator().manual_seed(0)
        keep, keep_test = (
            torch.randperm(len(x), generator=g)[:256],
            torch.randperm(len(tx), generator=g)[:200],
        )
        x, y, tx, ty = x[keep], y[keep], tx[keep_test], ty[keep_test]
    return (x, y), (tx, ty)


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--routers", nargs="+", default=None, help="default: every registered one")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=["charlm", "vit"], choices=["charlm", "vit"])
    p.add_argument("--noise-std", type=float, default=0.5, help="Gaussian pixel noise (ViT)")
    p.add_argument("--quick", action="store_true", help="CI size: seconds per run, 1 seed")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    p.add_argument("--results", type=Path, default=None, help=f"default {DEFAULT_RESULTS}")
    p.add_argument("--plot", type=Path, default=None, help=f"default {DEFAULT_PLOT}")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    routers = args.routers or [n for n in available_routers() if n in ZOO]
    for name in routers:
        router_info(name)  # a clear error for an unknown name
        if name not in ZOO:
            raise SystemExit(f"router_zoo: {name!r} has no entry in ZOO (benchmarks/router_zoo.py)")
    # top-k first: the baseline of every ratio and verdict
    routers = ["topk", *[n for n in routers if n != "topk"]]
    seeds = args.seeds[:1] if args.quick else args.seeds
    scratch = ROOT / "benchmarks" / "out"
    out = args.out or (scratch / "router_zoo_quick" if args.quick else DEFAULT_OUT)
    results = args.results or (scratch / "RESULTS_quick.md" if args.quick else DEFAULT_RESULTS)
    plot = args.plot or (scratch / "router_zoo_quick.png" if args.quick else DEFAULT_PLOT)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus = tiny_shakespeare() if "charlm" in args.tasks else None
    data = vit_data(args.quick) if "vit" in args.tasks else None
    in_lm = {name: runs_in_charlm(name) for name in routers}
    runs: dict[str, dict[int, dict]] = {name: {} for name in routers}
    for name in routers:
        for seed in seeds:
            path = out / f"{name}_seed{seed}.json"
            rec = json.loads(path.read_text()) if path.exists() else {"router": name, "seed": seed}
            for task in args.tasks:
                if task == "charlm" and not in_lm[name]:
                    rec["charlm"] = None  # not causal as configured: never trained as a decoder
                    continue
                if task == "vit" and not runs_in_vit(name):
                    rec["vit"] = None  # (every registered router runs in the ViT today)
                    continue
                want = setup(task, name, args.quick, args.noise_std)
                if rec.get(task) and same_setup(rec[task].get("setup"), want, _defaults(task)):
                    continue
                t0 = time.perf_counter()
                if task == "charlm":
                    rec["charlm"] = run_charlm(name, seed, args.quick, corpus)
                else:
                    rec["vit"] = run_vit(name, seed, args.quick, data, args.noise_std)
                rec[f"{task}_seconds"] = time.perf_counter() - t0
                rec["machine"] = machine()
                path.write_text(json.dumps(rec, indent=1))
                print(
                    f"router_zoo: {name} seed {seed} {task} done in {rec[f'{task}_seconds']:.0f} s"
                )
            runs[name][seed] = rec
    timing = None
    if corpus is not None:
        timing = time_steps([n for n in routers if in_lm[n]], args.quick, corpus)
        # a router not run now keeps the ratio of the invocation that timed it (each ratio is
        # measured against top-k in one process)
        old = out / "timing.json"
        kept = json.loads(old.read_text())["timing"] if old.exists() else {}
        timing = {**{n: t for n, t in kept.items() if n not in timing}, **timing}
        (out / "timing.json").write_text(
            json.dumps({"timing": timing, "machine": machine()}, indent=1)
        )
    elif (out / "timing.json").exists():  # no LM run now: the stored ratios stay in the table
        timing = json.loads((out / "timing.json").read_text())["timing"]
    # the table shows every router with stored runs of the current setup, not only those run now
    for name in ZOO:
        if name in runs:
            continue
        stored = {}
        for seed in seeds:
            path = out / f"{name}_seed{seed}.json"
            rec = json.loads(path.read_text()) if path.exists() else None
            if rec and all(
                rec.get(t) is None
                or same_setup(
                    rec[t].get("setup"), setup(t, name, args.quick, args.noise_std), _defaults(t)
                )
                for t in args.tasks
            ):
                stored[seed] = rec
        if stored:
            runs[name] = stored
    runs = {name: runs[name] for name in [*ZOO, *runs] if name in runs}  # the zoo's order
    table = summarize(runs, ZOO, timing)
    block = render(
        table, ZOO, runs, seeds=seeds, noise_std=args.noise_std, quick=args.quick, out=out
    )
    write_block(results, block, BEGIN, END)
    render_plot(table, runs, plot)
    print(block)
    elapsed = time.perf_counter() - start
    print(f"router_zoo: {elapsed:.0f} s in this invocation; results in {results}")
    return {"table": table, "seconds": elapsed, "out": str(out)}


def summarize(
    runs: dict[str, dict[int, dict]], zoo: dict[str, ZooEntry], timing: dict | None
) -> dict[str, dict]:
    """Mean ± std over seeds of every metric, the step-time ratio to top-k, the verdicts."""
    metrics = ("bpc", "bpc_attacked", "late_rf", "max_vio")
    table: dict[str, dict] = {}
    for name, by_seed in runs.items():
        lm = {s: r.get("charlm") for s, r in by_seed.items()}
        row: dict[str, Any] = {"n": len(by_seed), "in_lm": any(lm.values())}
        # why a row has no LM columns: a router that cannot run in a decoder, or one not run yet
        row["lm_missing"] = "not run yet" if runs_in_charlm(name) else "not causal"
        for m in metrics:
            row[m] = mean_std([v[m] for v in lm.values() if v])
        t = (timing or {}).get(name)
        row["step_ratio"] = t["ratio"] if t else float("nan")
        for m in ("vit_acc", "vit_acc_noisy"):
            row[m] = mean_std([r["vit"][m] for r in by_seed.values() if r.get("vit")])
        table[name] = row
    for name, row in table.items():
        row["verdicts"] = [verdict(c, row, table.get("topk"), row["n"]) for c in zoo[name].claims]
    return table


def verdict(claim: Claim, row: dict, base: dict | None, n: int) -> dict[str, Any]:
    """Measured difference against top-k and a verdict.

    With d = mean − mean_topk and s = sqrt(std²/n + std_topk²/n) (the standard error of the
    difference over seeds): a "lower"/"higher" claim holds when d points the claimed way by more
    than 2 s, does not hold when it points the other way by more than 2 s, and is inconclusive
    otherwise. A "same" claim (no worse) holds when |d| + 2 s stays within the claim's margin or
    d is better by more than 2 s, does not hold when d is worse by more than both 2 s and the
    margin, and is inconclusive otherwise (too few seeds to tell).
    """
    m, sd = row[claim.metric]
    if base is None or math.isnan(m) or math.isnan(base[claim.metric][0]):
        return {"claim": claim.text, "delta": None, "verdict": "not measured"}
    mb, sb = base[claim.metric]
    d = m - mb
    s = math.sqrt((sd**2 + sb**2) / max(n, 1))
    lower_is_better = claim.metric in ("bpc", "bpc_attacked", "late_rf", "max_vio")
    better = -d if lower_is_better else d  # > 0: better than top-k
    if claim.direction == "same":
        if abs(d) + 2 * s <= claim.margin or better > 2 * s:
            v = "held"
        elif -better > max(2 * s, claim.margin):
            v = "did not hold"
        else:
            v = "inconclusive at this scale"
    elif abs(d) <= 2 * s:
        v = "inconclusive at this scale"
    else:
        v = "held" if (d < 0) == (claim.direction == "lower") else "did not hold"
    return {"claim": claim.text, "metric": claim.metric, "delta": d, "se": s, "verdict": v}


if __name__ == "__main__":
    main()
