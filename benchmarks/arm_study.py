"""What the arm x seed studies share (graph_vision.py, momentum_vision.py, expert_bias.py): their
command line, each (arm, seed) run stored as ``<out>/<arm>_seed<seed>.json`` and reused while its
setup is unchanged (so an interrupted study resumes), and a progress line per run with the time
left. Each study keeps its own arms, setup, run, table and plot."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import ROOT, same_setup  # benchmarks/common.py

SCRATCH = ROOT / "benchmarks" / "out"


def study_parser(
    doc: str | None, arms: Iterable[str], *, epochs_help: str
) -> argparse.ArgumentParser:
    """The options every study takes: ``--arms --seeds --epochs --quick --out --results --plot
    --threads`` (a study adds its own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(arms))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help=epochs_help)
    p.add_argument("--quick", action="store_true", help="CI size: seconds per run")
    p.add_argument("--out", type=Path, default=None, help="where each run's JSON goes")
    p.add_argument("--results", type=Path, default=None, help="the markdown the block goes into")
    p.add_argument("--plot", type=Path, default=None, help="the plot's PNG")
    p.add_argument("--threads", type=int, default=None)
    return p


def parse_study_args(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    arms: Iterable[str],
    *,
    name: str,
    out: Path,
    results: Path | None,
    plot: Path,
) -> argparse.Namespace:
    """Parse, refuse an unknown arm or ``--epochs`` below 1, set ``--threads``, and fill in the
    defaults: seeds 0 1 2 (``--quick``: 0); ``out``, ``results`` and ``plot`` (``--quick``: under
    ``benchmarks/out/``, so that a CI-sized run never touches the tracked results; ``results``
    None: the block is written only where ``--results`` says)."""
    args = p.parse_args(argv)
    known = list(arms)
    for arm in args.arms:
        if arm not in known:
            p.error(f"unknown arm {arm!r}; choose from {known}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick:
        out, plot = SCRATCH / f"{name}_quick", SCRATCH / f"{name}_quick.png"
        results = results and SCRATCH / f"RESULTS_{name}_quick.md"
    args.out, args.plot = args.out or out, args.plot or plot
    args.results = args.results or results
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def stored_or_run(
    name: str,
    todo: Sequence[tuple[str, int]],
    out: Path,
    setup: Callable[[str], dict[str, Any]],
    run: Callable[[dict[str, Any], int, bool], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, dict[int, dict]], int]:
    """Every ``(arm, seed)`` of ``todo``, in its order: the stored run when it holds
    ``setup(arm)``, else ``run(setup, seed, progress)`` (a record with ``seconds``), stored and
    reported with ``summary(record)`` and the time left. Returns ``(runs[arm][seed], trained)``."""
    start, trained = time.perf_counter(), 0
    runs: dict[str, dict[int, dict]] = {arm: {} for arm, _ in todo}
    for i, (arm, seed) in enumerate(todo):
        path = out / f"{arm}_seed{seed}.json"
        cfg = setup(arm)
        rec = json.loads(path.read_text()) if path.exists() else None
        if rec is None or not same_setup(rec.get("setup"), cfg):
            rec = run(cfg, seed, sys.stderr.isatty())
            path.write_text(json.dumps(rec, indent=1))
            trained += 1
            left = sum(1 for a, s in todo[i + 1 :] if not (out / f"{a}_seed{s}.json").exists())
            eta = (time.perf_counter() - start) / trained * left
            print(
                f"{name}: {arm} seed {seed} done in {rec['seconds']:.0f} s ({summary(rec)}); "
                f"about {eta / 60:.0f} min left",
                flush=True,
            )
        runs[arm][seed] = rec
    return runs, trained
