"""The CPU benchmark suite: smoe's MoE layer, routers and dispatch ops against their baselines.

    python benchmarks/suite.py [--quick] [--malloc tuned] [--dtype fp32 bf16] [--section ...]
        [--json F] [--results F] [--plots DIR] [--render JSON]

One command, one process: every contender of a row runs in the same process and the same run,
and every row is reported as ratios (baseline time / smoe time, > 1 means smoe is ahead; and
efficiency = dense-GEMM time of the same FLOPs / layer time). Each time is the median of at
least 5 samples after a warm-up call (3 in --quick), with its interquartile range.

Sections (``--section``):

- ``layer``: MoELayer at four shapes (dispatch overhead: tiny d, many tokens; Mixtral-like
  scaled to CPU: E = 8, k = 2, d_ff = 3.5 d; fine-grained OLMoE/Qwen3-MoE-like: E = 64, k = 8,
  small d_ff; V-MoE: E = 8, k = 2, GELU, capacity factor 1.25), fp32 and bf16, four load
  patterns (balanced, natural, skewed, degenerate), forward and forward+backward. Baselines
  (baselines.py, same weights, same routing): torchtitan's sort + ``torch._grouped_mm``,
  GShard's capacity-padded one-hot einsum, transformers' experts with each
  ``experts_implementation`` (batched_mm where its gathered weights fit in 1 GiB), and the
  limit: dense ``torch.mm`` GEMMs with the FLOPs of the kept assignments. Also the time share
  of route / plan / permute / experts / combine (each stage timed alone) and peak memory
  (natural load).
- ``vae``: the SMoE-VAE decoder experts (smoe.models.SMoEVAE, E = 5 conv decoders): top-1
  dispatch through make_plan / permute / combine vs all decoders batched (the training path)
  vs a per-expert mask loop, and one decoder over every row as the limit.
- ``routers``: every router in smoe.routing (TopKRouter plain and noisy, VMoERouter in training
  and with BPR at C = 0.5, ExpertChoiceRouter at c = k), the topk_softmax op against softmax +
  topk in torch, the router_stats op against softmax column sums + logsumexp in torch, and the
  expert_choice op against softmax + top-C over tokens in torch.
- ``ops``: make_plan / permute / combine alone against their torch equivalents.
- ``scaling``: layer time as tokens grow (1k to 64k) and as experts grow (8 to 256) at fixed
  FLOPs per token, plotted.
- ``compile``: graph breaks under ``torch._dynamo.explain`` for every contender, and whether
  smoe's layer compiles forward+backward with ``fullgraph=True`` (aot_eager).

Peak memory is the peak of bytes held by torch's CPU allocator during one call above what was
live before (torch.profiler memory events): tensors only, not the Python heap.

Outputs: JSON (``--json``), PNG plots (``--plots``), and markdown tables written into
``--results`` between ``<!-- suite:begin -->`` and ``<!-- suite:end -->`` (appended when the
markers are absent; text outside them is left alone). ``--quick`` runs tiny shapes in under a
minute and by default writes under benchmarks/out/, never to the committed RESULTS.md.
``--render JSON`` rewrites the tables and plots from a saved run without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_layer import DTYPES, TUNED_MALLOC  # noqa: E402
from common import MODES, Clock, log, machine, maybe_reexec_tuned_malloc, table  # noqa: E402
from suite_layer import (  # noqa: E402
    BASELINE_ORDER,
    FULL_SHAPES,
    QUICK_SHAPES,
    VAE,
    Shape,
    bench_layer_shape,
    bench_vae,
    make_layer,
)
from suite_ops import ROUTER_SHAPES, bench_ops, bench_routers  # noqa: E402
from suite_report import (  # noqa: E402
    evaluate_targets,
    render_markdown,
    render_plots,
    write_results,
)
from suite_scaling import SCALING, bench_compile, bench_scaling  # noqa: E402

# What bench_gpu.py and the tests import from here.
__all__ = ["BASELINE_ORDER", "MODES", "Clock", "Shape", "make_layer", "table", "write_results"]

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("layer", "vae", "routers", "ops", "scaling", "compile")


def run(args: argparse.Namespace) -> dict:
    size = "quick" if args.quick else "full"
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    shapes = {n: s for n, s in shapes.items() if n in args.shape}
    if args.quick:  # exercise every path, not measure: 3 single-call samples after a warm-up
        clock = Clock(args.min_run_time or 0.0, 3, 0.0)
    else:
        clock = Clock(args.min_run_time or 0.3, 5, 2e-3, slow_s=0.15)
    sections: dict = {}
    walls: dict[str, float] = {}
    start = time.perf_counter()

    def section(name: str, fn: Callable[[], object]) -> None:
        if name not in args.section:
            return
        log(f"== {name}")
        t = time.perf_counter()
        sections[name] = fn()
        walls[name] = time.perf_counter() - t
        log(f"   ({walls[name]:.1f} s)")

    def layer() -> list[dict]:
        rows, profiles = [], []
        for name, shape in shapes.items():
            for dname in args.dtype:
                r, p = bench_layer_shape(name, shape, dname, clock)
                rows += r
                if p:
                    profiles.append(p)
        sections["profiles"] = profiles
        return rows

    section("layer", layer)
    section("vae", lambda: bench_vae(VAE[size], args.dtype, clock))
    section("routers", lambda: bench_routers(ROUTER_SHAPES[size], args.dtype, clock))
    section("ops", lambda: bench_ops(shapes, args.dtype, clock))
    section("scaling", lambda: bench_scaling(SCALING[size], args.dtype[0], clock))
    section("compile", lambda: bench_compile(args.dtype))
    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        quick=args.quick,
        malloc=args.malloc,
        env=TUNED_MALLOC if args.malloc == "tuned" else {},
        machine=machine("cpu"),
        min_samples=clock.min_samples,
        shapes={n: asdict(s) for n, s in shapes.items()},
        sections=sections,
        section_wall_s=walls,
        targets=evaluate_targets(sections.get("layer") or []),
        wall_s=time.perf_counter() - start,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (< 1 min)")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="GPU: bench_gpu.py")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(FULL_SHAPES), choices=list(FULL_SHAPES))
    p.add_argument("--section", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--malloc", choices=["default", "tuned"], default="default")
    p.add_argument("--json", default=None, help="default benchmarks/out/suite[.quick].json")
    p.add_argument("--results", default=None, help="markdown file (default: RESULTS.md; "
                   "--quick: benchmarks/out/RESULTS.quick.md)")  # fmt: skip
    p.add_argument("--plots", default=None, help="default benchmarks/plots (--quick: out/)")
    p.add_argument("--render", metavar="JSON", help="only re-render tables and plots from JSON")
    args = p.parse_args()
    maybe_reexec_tuned_malloc(args.malloc, TUNED_MALLOC)
    quick = args.quick
    out = os.path.join(HERE, "out")
    args.json = args.json or os.path.join(out, "suite.quick.json" if quick else "suite.json")
    args.results = args.results or (
        os.path.join(out, "RESULTS.quick.md") if quick else os.path.join(HERE, "RESULTS.md")
    )
    args.plots = args.plots or (os.path.join(out, "plots-quick") if quick else
                                os.path.join(HERE, "plots"))  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
    else:
        log(f"machine: {machine('cpu')}")
        data = run(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    plots = render_plots(data, args.plots)
    block = render_markdown(data)
    write_results(args.results, block)
    print()
    print(block)
    print(f"json: {args.json}\nresults: {args.results}\nplots: {', '.join(plots)}")
    print(f"wall: {data['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
