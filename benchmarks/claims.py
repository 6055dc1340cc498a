"""A router paper's own comparison at small scale: its method against its baseline, same backbone,
equal steps, equal active expert compute, several seeds, mean ± std, and a verdict per claim.

    python benchmarks/claims.py xmoe [--seeds 0 1 2] [--jobs 2] [--quick]

A study (``STUDIES`` below) is a set of arms (a registered router with options) trained as the
char-LM of ``smoe.examples.charlm`` and a list of claims, each comparing one arm with its baseline
arm on one metric:

- ``bpc``: validation bits per character at the end;
- ``late_rf``: mean routing fluctuation (share of held-out tokens whose top-1 expert changed since
  the previous checkpoint) over the second half of training;
- ``rc``: representation collapse measure Tr(Σ_W Σ_B^†) of the router input h, grouped by top-1
  expert, at the end (higher = less collapsed; ``smoe.metrics``);
- ``rc_change``: RC at the end minus RC at the first checkpoint (> 0: rising over training).

Verdicts use ``router_zoo.verdict`` (the difference must exceed two standard errors over seeds).
Each run's JSON goes to ``benchmarks/results/claims/<study>/`` (``--quick``: ``benchmarks/out/``);
an existing JSON with the same setup is reused, so an interrupted study resumes. The table goes into
``benchmarks/RESULTS.md`` between the ``claims-<study>`` markers, the plot (bpc, RF and RC over
training, mean ± std over seeds) into ``benchmarks/plots/claims_<study>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from claims_report import render, render_plot  # benchmarks/claims_report.py
from common import machine, write_block  # benchmarks/common.py
from router_zoo import Claim, mean_std, verdict  # benchmarks/router_zoo.py
from tqdm.auto import tqdm

from smoe.examples.charlm import CharLMConfig, quick_config
from smoe.routing import router_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"


@dataclass(frozen=True)
class Arm:
    """One trained configuration: a registered router with its options."""

    router: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class Comparison:
    """A claim of the paper: ``arm`` against ``baseline`` on ``claim.metric``."""

    arm: str
    baseline: str
    claim: Claim


@dataclass(frozen=True)
class Study:
    title: str
    spec: str
    arms: dict[str, Arm]
    comparisons: tuple[Comparison, ...]
    charlm: dict[str, Any] = field(default_factory=dict)  # CharLMConfig overrides for every arm


STUDIES: dict[str, Study] = {
    # specs/xmoe.md §10: X-MoE vs SMoE (their Switch), same gate type, top-1.
    "xmoe": Study(
        title="X-MoE vs SMoE (Switch), top-1, softmax and sigmoid gates",
        spec="specs/xmoe.md §10",
        arms={
            "smoe_softmax": Arm("switch", {}, "SMoE (Switch), softmax"),
            "xmoe_softmax": Arm("xmoe", {"gate": "softmax"}, "X-MoE, softmax"),
            "smoe_sigmoid": Arm("switch", {"gate": "sigmoid"}, "SMoE (Switch), sigmoid"),
            "xmoe_sigmoid": Arm("xmoe", {"gate": "sigmoid"}, "X-MoE, sigmoid"),
        },
        comparisons=tuple(
            c
            for gate, ppl in (("softmax", "18.72 vs 19.02"), ("sigmoid", "19.12 vs 19.59"))
            for c in (
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(
                        f"{gate}: lower validation loss (MLM PPL {ppl}, T2; expect 1.5-2.5 %)",
                        "bpc",
                        "lower",
                    ),
                ),
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(f"{gate}: much lower RF late in training (Fig 3a)", "late_rf", "lower"),
                ),
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(f"{gate}: larger RC on h (Fig 2c)", "rc", "higher"),
                ),
                Comparison(
                    f"xmoe_{gate}",
                    f"smoe_{gate}",
                    Claim(
                        f"{gate}: RC rises for X-MoE while SMoE's declines (Fig 2c)",
                        "rc_change",
                        "higher",
                    ),
                ),
            )
        ),
        charlm={"k": 1, "steps": 600, "eval_every": 50},
    ),
}


def charlm_config(study: Study, arm: Arm, quick: bool) -> CharLMConfig:
    base = {**study.charlm, "router": arm.router, "router_options": dict(arm.options)}
    if quick:
        return quick_config(**{**base, "steps": 20, "eval_every": 5})
    return CharLMConfig(**base)


def run_one(cfg_dict: dict[str, Any], seed: int, threads: int | None) -> dict[str, Any]:
    """One training run (in a worker process); returns the trimmed record the study keeps."""
    import torch

    from smoe.examples.charlm import run as charlm_run

    if threads:
        torch.set_num_threads(threads)
    cfg = CharLMConfig(**cfg_dict)
    t0 = time.perf_counter()
    r = charlm_run(cfg, seed, progress=False)
    layers = [h["layers"] for h in r["history"]]
    rc = [_mean(m["rc"] for m in ls.values()) for ls in layers]
    f = r["final"]
    return {
        "setup": cfg_dict,
        "seed": seed,
        "bpc": f["val_bpc"],
        "late_rf": f["late_rf"],
        "rc": f["rc"],
        "rc_change": rc[-1] - rc[0],
        "max_vio": f["max_vio"],
        "step_s": f["step_time_s"],
        "steps": [h["step"] for h in r["history"]],
        "bpc_curve": [h["val_bpc"] for h in r["history"]],
        "rc_curve": rc,
        "rf_steps": r["rf"]["steps"],
        "rf_curve": r["rf"]["previous"],
        "seconds": time.perf_counter() - t0,
        "threads": r["threads"],
        "machine": machine(),
    }


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


METRICS = ("bpc", "late_rf", "rc", "rc_change", "max_vio")


def summarize(study: Study, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean ± std over seeds per arm and metric, and a verdict per comparison."""
    table = {a: {m: mean_std([r[m] for r in rs]) for m in METRICS} for a, rs in runs.items()}
    for a, rs in runs.items():
        table[a]["n"] = len(rs)
    verdicts = []
    for c in study.comparisons:
        if c.arm not in table or c.baseline not in table:
            continue
        n = min(table[c.arm]["n"], table[c.baseline]["n"])
        v = verdict(c.claim, table[c.arm], table[c.baseline], n)
        v.update(arm=c.arm, baseline=c.baseline)
        verdicts.append(v)
    return {"table": table, "verdicts": verdicts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=None, help="default: every arm of the study")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="CI size: seconds per run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help=f"default {DEFAULT_RESULTS}")
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"claims: --jobs must be >= 1, got {args.jobs}")
    study = STUDIES[args.study]
    arms = args.arms or list(study.arms)
    for a in arms:
        if a not in study.arms:
            raise SystemExit(f"claims: unknown arm {a!r}; {args.study} has {sorted(study.arms)}")
        router_info(study.arms[a].router)  # a clear error for an unregistered router
    scratch = ROOT / "benchmarks" / "out"
    out = args.out or (
        scratch / f"claims_{args.study}_quick"
        if args.quick
        else ROOT / "benchmarks" / "results" / "claims" / args.study
    )
    results = args.results or (
        scratch / f"RESULTS_claims_{args.study}_quick.md" if args.quick else DEFAULT_RESULTS
    )
    plot = args.plot or (
        scratch / f"claims_{args.study}_quick.png"
        if args.quick
        else ROOT / "benchmarks" / "plots" / f"claims_{args.study}.png"
    )
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    todo, runs = [], {a: [] for a in arms}
    for a in arms:
        cfg = asdict(charlm_config(study, study.arms[a], args.quick))
        for seed in args.seeds:
            path = out / f"{a}_seed{seed}.json"
            if path.exists() and json.loads(path.read_text()).get("setup") == cfg:
                runs[a].append(json.loads(path.read_text()))
            else:
                todo.append((a, seed, cfg, path))
    if todo:
        ctx = get_context("spawn")  # no forked OpenMP/MKL state in the workers
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(run_one, cfg, seed, args.threads): (a, seed, path)
                for a, seed, cfg, path in todo
            }
            bar = tqdm(as_completed(futures), total=len(futures), desc=f"claims {args.study}")
            for fut in bar:
                a, seed, path = futures[fut]
                rec = fut.result()
                path.write_text(json.dumps(rec, indent=1))
                runs[a].append(rec)
                bar.write(f"claims: {a} seed {seed}: bpc {rec['bpc']:.4f} ({rec['seconds']:.0f} s)")
    for a in arms:
        runs[a].sort(key=lambda r: r["seed"])
    summary = summarize(study, runs)
    block = render(args.study, study, summary, runs, quick=args.quick, out=out, plot=plot)
    write_block(
        results, block, f"<!-- claims-{args.study}:begin -->", f"<!-- claims-{args.study}:end -->"
    )
    render_plot(study, runs, plot)
    print(block)
    elapsed = time.perf_counter() - start
    print(f"claims: {elapsed:.0f} s in this invocation; results in {results}")
    return {"summary": summary, "seconds": elapsed, "out": str(out)}


if __name__ == "__main__":
    main()
