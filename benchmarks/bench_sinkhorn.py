"""What does Sinkhorn routing cost next to plain top-k routing?

    python benchmarks/bench_sinkhorn.py [--device cpu|cuda] [--quick | --full] [--threads N]

For each token count T and expert count E (router width d = 256, k = 2), in one process:

- ``topk``: :class:`smoe.TopKRouter` forward + backward on ``x [T, d]`` (the logits GEMM,
  ``topk_softmax`` and their backwards): the baseline of every ratio;
- ``sinkhorn/iter``: the op's time per iteration, forward and forward + backward, from the
  slope between 1 and 10 iterations (``tol = 0``: exactly that many);
- ``sinkhorn@100``: forward + backward at the routers' ``max_iter = 100`` (measured where
  cheap or with ``--full``, else 1 iteration + 99 slopes, marked "predicted");
- ``ssr p=0`` and ``ssr p=1``: :class:`smoe.SelectiveSinkhornRouter` forward + backward on its
  plain branch and on a Sinkhorn forward (its defaults: softmax cost, ξ = 0.05, max_iter 100,
  tol 1e-4 checked every 10 iterations);
- ``ssr avg``: the expected routing cost at the default p = 0.001,
  ``(1 − p) · t(p=0) + p · t(p=1)``, as a ratio to top-k. Target (issue 22): ≤ 1.2.

Median of repeated calls (``common.measure``). JSON in ``benchmarks/results/sinkhorn/``, the table
in RESULTS.md between the ``sinkhorn-bench`` markers. Never run inside the tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from common import Clock, log, machine, write_block  # benchmarks/common.py

from smoe import SelectiveSinkhornRouter, TopKRouter, ops

ROOT = Path(__file__).resolve().parents[1]
D, K, P_DEFAULT = 256, 2, 0.001
BEGIN, END = "<!-- sinkhorn-bench:begin -->", "<!-- sinkhorn-bench:end -->"


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        r = module(x)
        (r.weight.sum() + r.logits.sum() * 0).backward()

    return run


def _op(scores: torch.Tensor, iters: int, backward: bool):
    def run() -> None:
        out = ops.sinkhorn(scores, eps=0.05, max_iter=iters)
        if backward:
            out.log_plan.exp().sum().backward()

    return run


def bench_one(T: int, E: int, device: str, clock: Clock, measure_100: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, D, generator=g).to(device).requires_grad_()
    scores = torch.softmax(torch.randn(T, E, generator=g), -1).to(device).requires_grad_()
    row: dict = {"T": T, "E": E}
    topk = TopKRouter(D, E, K).to(device)
    row["topk_s"] = clock(_fwd_bwd(topk, x)).median
    fwd1, fwd10 = clock(_op(scores, 1, False)).median, clock(_op(scores, 10, False)).median
    fb1, fb10 = clock(_op(scores, 1, True)).median, clock(_op(scores, 10, True)).median
    row["iter_fwd_s"] = max(fwd10 - fwd1, 0.0) / 9
    row["iter_fwd_bwd_s"] = max(fb10 - fb1, 0.0) / 9
    if measure_100:
        row["at100_s"], row["at100_predicted"] = clock(_op(scores, 100, True)).median, False
    else:
        row["at100_s"], row["at100_predicted"] = fb1 + 99 * row["iter_fwd_bwd_s"], True
    torch.manual_seed(0)
    plain = SelectiveSinkhornRouter(D, E, K, p=0.0).to(device).train()
    always = SelectiveSinkhornRouter(D, E, K, p=1.0).to(device).train()
    always.load_state_dict(plain.state_dict())
    row["ssr_p0_s"] = clock(_fwd_bwd(plain, x)).median
    row["ssr_p1_s"] = clock(_fwd_bwd(always, x)).median
    row["ssr_p1_iters"] = int(always.last_transport.iters_done) if always.last_transport else None
    row["ssr_avg_s"] = (1 - P_DEFAULT) * row["ssr_p0_s"] + P_DEFAULT * row["ssr_p1_s"]
    for key in ("iter_fwd_bwd_s", "at100_s", "ssr_p0_s", "ssr_p1_s", "ssr_avg_s"):
        row[key.removesuffix("_s") + "_ratio"] = row[key] / row["topk_s"]
    return row


def _load_note(meta: dict) -> str:
    """Says when the machine was busy (load above the threads used); quiet otherwise."""
    threads = meta.get("threads")
    if isinstance(threads, int) and meta["load"] <= threads:
        return ""
    return (
        " (above the thread count: a shared machine, every figure noisy; the ratios come from "
        "one process, so load hits both sides)"
    )


def render(rows: list[dict], meta: dict, quick: bool) -> str:
    size = "quick (not a measurement)" if quick else "full"
    lines = [
        f"## Sinkhorn routing cost ({datetime.date.today().isoformat()}, `bench_sinkhorn.py`, "
        f"{size}, {meta['device']})",
        "",
        f"Commit `{meta['commit']}` on {meta.get('cpu', '?')}, {meta.get('threads', '?')} threads"
        f"{', ' + meta['gpu'] if meta.get('gpu') else ''}, load average {meta['load']:.1f} at the "
        f"start{_load_note(meta)}. Router width d = {D}, k = {K}; every "
        "time is forward + backward, as a ratio to TopKRouter's (the first column, in ms). "
        "`ssr avg` is the expected cost at the default p = 0.001: (1 − p) t(p = 0) + p t(p = 1); "
        "the target is ≤ 1.2. `@100` marked * is 1 iteration + 99 measured slopes.",
        "",
        "| T | E | top-k ms | Sinkhorn / iter | Sinkhorn @100 | SSR p=0 | SSR p=1 (iters) "
        "| **SSR avg (p=0.001)** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = "*" if r["at100_predicted"] else ""
        lines.append(
            f"| {r['T']} | {r['E']} | {r['topk_s'] * 1e3:.2f} | {r['iter_fwd_bwd_ratio']:.2f} | "
            f"{r['at100_ratio']:.1f}{star} | {r['ssr_p0_ratio']:.2f} | {r['ssr_p1_ratio']:.1f} "
            f"({r['ssr_p1_iters']}) | **{r['ssr_avg_ratio']:.3f}** |"
        )
    worst = max(r["ssr_avg_ratio"] for r in rows)
    verdict = "met" if worst <= 1.2 else "not met"
    lines += ["", f"Target SSR avg ≤ 1.2 x top-k: **{verdict}** (worst {worst:.3f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="two small sizes, short timing (CI)")
    p.add_argument("--full", action="store_true", help="T up to 65536, E up to 128, @100 measured")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes, clock = [(512, 8), (1024, 16)], Clock(0.05, 3, 2e-3)
    elif args.full or args.device == "cuda":
        sizes = [(T, E) for T in (4096, 16384, 65536) for E in (8, 32, 128)]
        clock = Clock(0.5, 5, 2e-3, slow_s=1.0)
    else:
        sizes = [(T, E) for T in (4096, 16384) for E in (8, 32, 128)]
        clock = Clock(0.5, 5, 2e-3, slow_s=1.0)
    scratch = ROOT / "benchmarks" / "out"
    out = args.out or (scratch if args.quick else ROOT / "benchmarks" / "results" / "sinkhorn")
    results = args.results or (
        scratch / "RESULTS_sinkhorn_quick.md" if args.quick else ROOT / "benchmarks" / "RESULTS.md"
    )
    load = os.getloadavg()[0]
    rows = []
    for T, E in sizes:
        cheap = T * E <= 4096 * 32 or args.full or args.device == "cuda"
        rows.append(bench_one(T, E, args.device, clock, measure_100=cheap))
        r = rows[-1]
        log(
            f"T={T} E={E}: top-k {r['topk_s'] * 1e3:.2f} ms, Sinkhorn/iter "
            f"{r['iter_fwd_bwd_ratio']:.2f}x, @100 {r['at100_ratio']:.1f}x, SSR avg "
            f"{r['ssr_avg_ratio']:.3f}x"
        )
    meta = machine(args.device)
    meta["device"] = args.device
    meta["load"] = load
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_sinkhorn_{args.device}{'_quick' if args.quick else ''}.json"
    (out / name).write_text(json.dumps({"rows": rows, "machine": meta}, indent=1))
    block = render(rows, meta, args.quick)
    write_block(
        results,
        block,
        BEGIN.replace("bench", f"bench-{args.device}"),
        END.replace("bench", f"bench-{args.device}"),
    )
    print(block)
    return {"rows": rows}


if __name__ == "__main__":
    main()
