"""Inference latency of one MoE block, forward only, from generation (T = 1) to prefill (T = 4096).

    python benchmarks/bench_inference.py [--quick] [--device cpu|cuda] [--dtype fp32 bf16]
                                         [--tokens 1 8 64 512 4096] [--threads N] [--exported]
                                         [--out DIR]

Two transformers blocks built from their config classes at real widths, random weights, no hub:

- ``mixtral``: ``MixtralSparseMoeBlock``, d 1024, d_ff 3584, E 8, k 2 (issue 25's Mixtral-like
  shape);
- ``olmoe``: ``OlmoeSparseMoeBlock``, fine-grained: d 1024, d_ff 512, E 64, k 8.

Implementations, all on the same weights, each called as ``block(x [1, T, d])`` under
``torch.inference_mode``:

- ``eager`` / ``grouped_mm``: the block with transformers' own experts implementation;
- ``smoe-experts``: the block with ``experts_implementation="smoe"`` (transformers' router, smoe's
  dispatch and GEMMs);
- ``smoe``: the block converted by :func:`smoe.convert` (a ``MoELayer`` subclass that aliases the
  block's tensors: smoe's ``topk_softmax`` router op, plan, permute, grouped_mm, swiglu, combine).
- ``smoe-exported`` (with ``--exported``): that converted block exported once per (block, dtype)
  by ``torch.export`` without gradients, the token count a dynamic ``Dim``, and the program's
  module called at every T (a deployment's one program for prefill and decoding).

Outputs are checked against ``eager`` before timing (max abs difference relative to eager's
largest value, printed in the table).

Timing: for each (block, dtype, T) the implementations are measured in ``--rounds`` interleaved
rounds (the order rotates each round, so drift in the machine's load hits all alike);
``common.measure`` gives each a median per round. ms is the median over rounds; "vs eager" and
"vs grouped_mm" are the medians over rounds of the same round's time ratios (> 1 is faster).

Targets (issue 25): smoe >= 1.0x eager and grouped_mm at T = 1, 8, 64 and >= 1.1x at T >= 512.

Writes ``bench_inference_<device>[_quick].md`` and ``.json`` under ``--out`` (default
``benchmarks/out/``, git-ignored). Never writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from common import Clock, log, machine  # benchmarks/common.py

import smoe
import smoe.integrations.transformers  # noqa: F401  (registers "smoe")

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("eager", "grouped_mm", "smoe-experts", "smoe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENS = (1, 8, 64, 512, 4096)
HEADER = "| block | dtype | T | impl | ms | tokens/s | vs eager | vs grouped_mm | max rel. Δ |"


def configs(quick: bool) -> dict[str, tuple[str, dict]]:
    """Block name -> (transformers prefix, config kwargs)."""
    d, ff, ff_fine = (64, 128, 32) if quick else (1024, 3584, 512)
    E_fine, k_fine = (8, 4) if quick else (64, 8)
    return {
        "mixtral": ("Mixtral", dict(hidden_size=d, intermediate_size=ff, num_local_experts=8,
                                    num_experts_per_tok=2)),
        "olmoe": ("Olmoe", dict(hidden_size=d, intermediate_size=ff_fine, num_experts=E_fine,
                                num_experts_per_tok=k_fine)),
    }  # fmt: skip


def build_block(prefix: str, kw: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    import transformers

    cfg = getattr(transformers, f"{prefix}Config")(**kw, num_hidden_layers=1)
    module = getattr(transformers.models, prefix.lower())
    block_cls = getattr(getattr(module, f"modeling_{prefix.lower()}"), f"{prefix}SparseMoeBlock")
    torch.manual_seed(0)
    block = block_cls(cfg)
    for p in block.parameters():  # transformers leaves expert weights uninitialised
        torch.nn.init.normal_(p, std=0.02)
    return block.to(device=device, dtype=dtype).eval()


def implementations(block: torch.nn.Module, exported: bool = False) -> dict[str, callable]:
    """impl -> fn(x) -> y; all on ``block``'s tensors."""
    experts = block.experts
    converted = smoe.convert(block)  # aliases the block's tensors; the block itself is unchanged

    def with_experts(impl: str):
        def run(x):
            experts.config._experts_implementation = impl
            out = block(x)
            return out[0] if isinstance(out, tuple) else out

        return run

    def run_smoe(x):
        out = converted(x)
        return out[0] if isinstance(out, tuple) else out

    fns = {impl: with_experts(impl) for impl in ("eager", "grouped_mm")}
    fns["smoe-experts"] = with_experts("smoe")
    fns["smoe"] = run_smoe
    if exported:
        example = torch.zeros(1, 16, experts.config.hidden_size, dtype=experts.gate_up_proj.dtype,
                              device=experts.gate_up_proj.device)  # fmt: skip
        with torch.no_grad():
            program = torch.export.export(
                converted, (example,), dynamic_shapes=({1: torch.export.Dim("T")},)
            ).module()

        def run_exported(x):
            out = program(x)
            return out[0] if isinstance(out, tuple) else out

        fns["smoe-exported"] = run_exported
    return fns


def bench_case(fns: dict, x: torch.Tensor, rounds: int, clock: Clock) -> dict[str, dict]:
    with torch.inference_mode():
        want = fns["eager"](x).float()
        scale = want.abs().max().clamp_min(1e-30)
        diff = {n: float((fn(x).float() - want).abs().max() / scale) for n, fn in fns.items()}
        per_round: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                per_round[n].append(clock(lambda n=n: fns[n](x)).median)
    out = {}
    for n in fns:
        t = per_round[n]
        out[n] = dict(
            ms=1e3 * statistics.median(t),
            vs_eager=statistics.median(a / b for a, b in zip(per_round["eager"], t)),
            vs_grouped_mm=statistics.median(a / b for a, b in zip(per_round["grouped_mm"], t)),
            max_rel_diff=diff[n],
        )
    return out


def table(results: list[dict]) -> str:
    rows = [HEADER, "|---" * (HEADER.count("|") - 1) + "|"]
    for r in results:
        for impl, v in r["impls"].items():
            bold = "**" if impl == "smoe" else ""
            rows.append(
                f"| {r['block']} | {r['dtype']} | {r['T']} | {impl} | {v['ms']:.3f} | "
                f"{r['T'] / v['ms'] * 1e3:,.0f} | {bold}{v['vs_eager']:.2f}{bold} | "
                f"{bold}{v['vs_grouped_mm']:.2f}{bold} | {v['max_rel_diff']:.1e} |"
            )
    return "\n".join(rows)


def verdicts(results: list[dict]) -> list[str]:
    """Issue 25's inference targets, one line per (block, dtype)."""
    lines = []
    keys = sorted({(r["block"], r["dtype"]) for r in results})
    for block, dtype in keys:
        misses = []
        for r in results:
            if (r["block"], r["dtype"]) != (block, dtype):
                continue
            need = 1.1 if r["T"] >= 512 else 1.0
            v = r["impls"]["smoe"]
            worst = min(v["vs_eager"], v["vs_grouped_mm"])
            if worst < need:
                misses.append(f"T={r['T']}: {worst:.2f}x < {need}x")
        lines.append(
            f"- {block} {dtype}: " + ("met" if not misses else "missed at " + "; ".join(misses))
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    p.add_argument("--blocks", nargs="+", default=None, help="a subset of: mixtral olmoe")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help=f"default {TOKENS}")
    p.add_argument("--quick", action="store_true", help="tiny blocks, T 1 and 8, 1 round (a test)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--exported", action="store_true", help="add the exported converted block")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_inference: --device cuda needs a CUDA GPU")
    if a.threads:
        torch.set_num_threads(a.threads)
    tokens = a.tokens or ((1, 8) if a.quick else TOKENS)
    if min(tokens) < 1:
        raise SystemExit(f"bench_inference: --tokens must be >= 1, got {tokens}")
    rounds = a.rounds or (1 if a.quick else 3)
    clock = Clock(0.01, 2, 1e-3) if a.quick else Clock(0.4, 5, 2e-3, slow_s=0.25)
    cfgs = configs(a.quick)
    unknown = set(a.blocks or ()) - set(cfgs)
    if unknown:
        raise SystemExit(f"bench_inference: unknown --blocks {sorted(unknown)}; known {list(cfgs)}")
    info = machine(a.device)
    info["load_start"] = os.getloadavg()[0]
    log(f"bench_inference on {info['cpu']} ({info['threads']} threads), commit {info['commit']}")
    results = []
    for name in a.blocks or list(cfgs):
        prefix, kw = cfgs[name]
        for dt in a.dtype:
            block = build_block(prefix, kw, DTYPES[dt], a.device)
            fns = implementations(block, a.exported)
            for T in tokens:
                g = torch.Generator().manual_seed(T)
                x = torch.randn(1, T, kw["hidden_size"], generator=g).to(a.device, DTYPES[dt])
                impls = bench_case(fns, x, rounds, clock)
                results.append(dict(block=name, dtype=dt, T=T, impls=impls, config=kw))
                s = impls["smoe"]
                log(
                    f"{name} {dt} T={T}: smoe {s['ms']:.3f} ms, {s['vs_eager']:.2f}x eager, "
                    f"{s['vs_grouped_mm']:.2f}x grouped_mm"
                )
            del block, fns
    info["load_end"] = os.getloadavg()[0]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = "\n".join(
        [
            f"## Inference latency of one MoE block ({stamp}, `bench_inference.py`"
            f"{', quick' if a.quick else ''}, {a.device})",
            "",
            f"Commit `{info['commit']}`, torch {info['torch']}, transformers "
            f"{info['transformers']}, {info['cpu']}, threads {info['threads']}, load average "
            f"{info['load_start']:.1f} at the start and {info['load_end']:.1f} at the end; "
            f"{rounds} interleaved rounds.",
            "",
            table(results),
            "",
            "Targets (smoe vs both eager and grouped_mm: >= 1.0x at T <= 64, >= 1.1x at T >= 512):",
            *verdicts(results),
            "",
        ]
    )
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_inference_{a.device}{'_quick' if a.quick else ''}"
    (a.out / f"{stem}.md").write_text(md)
    payload = dict(machine=info, rounds=rounds, results=results)
    (a.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    log(md)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
