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
- ``rc_change``: RC at the end minus RC at the first checkpoint (> 0: rising over training);
- ``rc_late``: RC at the end minus RC at mid-training (the second half's trend).

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
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from claims_report import render, render_plot  # benchmarks/claims_report.py
from claims_studies import STUDIES, Arm, Study  # benchmarks/claims_studies.py
from common import machine, same_setup, write_block  # benchmarks/common.py
from router_zoo import mean_std, verdict  # benchmarks/router_zoo.py
from tqdm.auto import tqdm

from smoe.examples.charlm import CharLMConfig, quick_config
from smoe.routing import router_info

ROOT = Path(__file__).resolve().parents[1]
_DEFAULTS = asdict(CharLMConfig())  # a field added since a run was stored takes its default
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def charlm_config(study: Study, arm: Arm, quick: bool) -> CharLMConfig:
    base = {
        **study.charlm,
        **arm.charlm,
        "router": arm.router,
        "router_options": dict(arm.options),
    }
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
        "bpc_attacked": f["val_bpc_attacked"],
        "max_vio": f["max_vio"],
        "cv": f["cv"],
        "entropy": f.get("entropy", float("nan")),
        "step_s": f["step_time_s"],
        "router_stats": f.get("router_stats", {}),
        "max_vio_curve": [_mean(m["max_vio"] for m in ls.values()) for ls in layers],
        "steps": [h["step"] for h in r["history"]],
        "bpc_curve": [h["val_bpc"] for h in r["history"]],
        "rc_curve": rc,
        "rf_steps": r["rf"]["steps"],
        "rf_curve": r["rf"]["previous"],
        "seconds": time.perf_counter() - t0,
        "threads": r["threads"],
        "machine": machine(),
    }


def time_arms(study: Study, names: list[str], quick: bool, rounds: int = 4, steps: int = 5):
    """Seconds per char-LM training step of each arm, in this process: two warm-up steps each,
    then ``rounds`` rounds of ``steps`` steps per arm, interleaved (drift and load hit all
    alike); the median over rounds. An arm with ``p`` in its options also gets the expected
    step time ``(1 − p) t + p t_always`` where the study has an arm with p = 1."""
    import statistics

    import torch

    from smoe.data.text import random_batch, tiny_shakespeare
    from smoe.examples.charlm import build_model, build_optimizer, train_step

    corpus = tiny_shakespeare()
    state = {}
    for a in names:
        cfg = charlm_config(study, study.arms[a], quick)
        torch.manual_seed(0)
        model = build_model(cfg, len(corpus.vocab))
        state[a] = [cfg, model, build_optimizer(model, cfg), torch.Generator().manual_seed(0), 0]

    def step(a: str) -> None:
        cfg, model, opt, gen, i = state[a]
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.context, gen)
        train_step(model, opt, x, y, cfg, i)
        state[a][4] = i + 1

    for a in names:
        for _ in range(2):
            step(a)
    samples: dict[str, list[float]] = {a: [] for a in names}
    for _ in range(rounds):
        for a in names:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(a)
            samples[a].append((time.perf_counter() - t0) / steps)
    out = {a: {"step_s": statistics.median(v)} for a, v in samples.items()}
    always = [a for a in names if study.arms[a].options.get("p") == 1.0]
    for a in names:
        p = study.arms[a].options.get("p")
        if p is not None and always and p < 1.0:
            t_always = out[always[0]]["step_s"]
            out[a]["expected_s"] = (1 - p) * out[a]["step_s"] + p * t_always
    return out


def timing_verdicts(study: Study, timing: dict) -> list[dict]:
    rows = []
    for arm, base, text, op, bound in study.timing:
        if arm not in timing or base not in timing:
            continue
        t = timing[arm].get("expected_s", timing[arm]["step_s"])
        ratio = t / timing[base]["step_s"]
        ok = ratio <= bound if op == "<=" else ratio >= bound
        rows.append(
            {
                "claim": text,
                "ratio": ratio,
                "bound": f"{op} {bound}",
                "verdict": "held" if ok else "did not hold",
            }
        )
    return rows


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


METRICS = (
    "bpc",
    "bpc_attacked",
    "bpc_early",
    "late_rf",
    "rc",
    "rc_change",
    "rc_late",
    "max_vio",
    "cv",
    "entropy",
    "step_s",
)


def derived(rec: dict) -> dict:
    """A run's metrics computed from its stored curves (so older JSONs get them too)."""
    rc = rec.get("rc_curve") or []
    late = rc[-1] - rc[len(rc) // 2 - 1] if len(rc) >= 2 else float("nan")
    # the early learning curve: mean validation bpc over the evaluations in the first quarter of
    # training, step 0 (the untrained model) left out
    quarter = (rec.get("setup") or {}).get("steps", 0) / 4
    early = [b for s, b in zip(rec.get("steps", []), rec.get("bpc_curve", [])) if 0 < s <= quarter]
    return {**rec, "rc_late": late, "bpc_early": _mean(early)}


def summarize(study: Study, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean ± std over seeds per arm and metric, and a verdict per comparison."""
    runs = {a: [derived(r) for r in rs] for a, rs in runs.items()}
    table = {a: {m: mean_std([r.get(m) for r in rs]) for m in METRICS} for a, rs in runs.items()}
    for a, rs in runs.items():
        table[a]["n"] = len(rs)
    zero = {m: (0.0, 0.0) for m in METRICS}
    verdicts = []
    for c in study.comparisons:
        if c.arm not in table or (c.baseline is not None and c.baseline not in table):
            continue
        base = zero if c.baseline is None else table[c.baseline]
        n = table[c.arm]["n"] if c.baseline is None else min(table[c.arm]["n"], base["n"])
        v = verdict(c.claim, table[c.arm], base, n)
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
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: render the stored runs (an unfinished study's partial table)",
    )
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
            if path.exists() and same_setup(
                json.loads(path.read_text()).get("setup"), cfg, _DEFAULTS
            ):
                runs[a].append(json.loads(path.read_text()))
            else:
                todo.append((a, seed, cfg, path))
    if todo and args.report_only:
        missing = ", ".join(f"{a} seed {seed}" for a, seed, _, _ in todo)
        print(f"claims: --report-only: not run: {missing}")
        todo = []
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
    if study.timing:
        timing = time_arms(study, arms, args.quick)
        summary["timing"] = timing
        summary["timing_verdicts"] = timing_verdicts(study, timing)
        (out / "timing.json").write_text(
            json.dumps({"timing": timing, "machine": machine()}, indent=1)
        )
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
