"""What the training-free router-swap studies share (usmoe_study.py on the ViT, usmoe_lm_study.py on
the char-LM): swapping one MoE layer's router for another reading the trained router's weight,
the per-seed runs stored as JSON and reused when their setup is unchanged, and the claims table
with paired verdicts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common import machine, same_setup  # benchmarks/common.py
from router_zoo import mean_std, verdict  # benchmarks/router_zoo.py
from torch import nn
from zoo_entries import Claim  # benchmarks/zoo_entries.py

from smoe.routing import build_router


def swap_router(layer: nn.Module, name: str, **options: Any) -> None:
    """``layer.router`` becomes ``name`` reading the trained router's weight (aliased: the same
    tensor, no copy), in eval mode; the trained router is kept to swap back (``name="topk"``)."""
    old = layer.__dict__.setdefault("_tc_router", layer.router)
    if name == "topk":
        layer.router = old
        return
    E, d = old.weight.shape
    new = build_router(name, d, E, old.k, **options)
    new.weight = old.weight
    layer.router = new.eval()


def stored_or_run(
    seeds: Iterable[int],
    out: Path,
    setup: dict,
    run_seed: Callable[[int], dict],
    summary: Callable[[dict], str],
    name: str,
) -> list[dict]:
    """Each seed's record: ``out/seed<s>.json`` when it holds the same setup, else ``run_seed(s)``
    (stored there with the setup and the machine, and summarised on stdout)."""
    runs = []
    for seed in seeds:
        path = out / f"seed{seed}.json"
        if path.exists() and same_setup(json.loads(path.read_text()).get("setup"), setup):
            runs.append(json.loads(path.read_text()))
            continue
        rec = {**run_seed(seed), "setup": setup, "machine": machine()}
        path.write_text(json.dumps(rec, indent=1))
        runs.append(rec)
        print(f"{name}: seed {seed}: {summary(rec)}", flush=True)
    return runs


def claim_rows(
    runs: list[dict],
    claims: Iterable[tuple[str, str, Claim]],
    present: Iterable[str],
    measured: Callable[[float, float], str],
    unit: str,
) -> list[str]:
    """The claims table's rows, ``(arm, baseline, claim)`` for arms in ``present``: the verdict of
    the per-seed differences arm − baseline, paired (every arm of a seed is the same trained
    model, so the seed-to-seed spread of training cancels); ``measured(delta, se)`` formats them,
    followed by ``unit``."""
    present = set(present)
    rows = []
    for arm, base, claim in claims:
        if arm not in present:
            continue
        diffs = [r["arms"][arm][claim.metric] - r["arms"][base][claim.metric] for r in runs]
        v = verdict(claim, {claim.metric: mean_std(diffs)}, {claim.metric: (0.0, 0.0)}, len(runs))
        text = "–" if v["delta"] is None else measured(v["delta"], v["se"])
        rows.append(f"| {claim.text} | {text} {unit} | **{v['verdict']}** |")
    return rows
