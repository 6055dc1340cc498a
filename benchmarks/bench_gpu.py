"""MoE layers at real model shapes on one GPU (bf16), against the same baselines as the CPU suite.

    python benchmarks/bench_gpu.py [--quick] [--dtype bf16] [--load natural balanced ...]
        [--json F] [--results F]
    python benchmarks/bench_gpu.py --device cpu --quick      # the script's logic, on CPU

Shapes: Mixtral 8x7B (d 4096, d_ff 14336, E 8, k 2), Qwen3-30B-A3B (d 2048, d_ff 768, E 128,
k 8), OLMoE (d 2048, d_ff 1024, E 64, k 8), T = 16384 tokens. Forward and forward+backward;
load patterns as in suite.py. Contenders, same weights and routing (baselines.py): smoe's
MoELayer, torchtitan's sort + ``torch._grouped_mm``, GShard's capacity-padded einsum,
transformers' experts (eager, grouped_mm, batched_mm where its gathered weights fit in 4 GiB;
skipped when transformers is not installed), and the limit: cuBLAS dense GEMMs (``torch.mm``)
with the FLOPs of the expert GEMMs. Also host-device syncs per forward (counted with
``torch.cuda.set_sync_debug_mode("warn")``) and peak memory (``torch.cuda.max_memory_allocated``
above what was allocated before the call).

Needs smoe built with its CUDA kernels in place (``pip install --no-build-isolation -e .``).
Prints a markdown table with the device named; ``--results`` also writes it into a markdown
file between ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->``. Runs in under 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import build_baselines  # noqa: E402
from bench_layer import DTYPES, probe_step, run_layer  # noqa: E402
from common import LOADS, machine, pattern_bias, peak_bytes, profile_top  # noqa: E402
from gpu_report import TARGETS, line, render, targets  # noqa: E402
from layer_metrics import dense_limit  # noqa: E402
from suite import MODES, Clock, Shape, make_layer, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_SHAPES = {
    "mixtral-8x7b": Shape(T=16384, d=4096, d_ff=14336, E=8, k=2),
    "qwen3-30b-a3b": Shape(T=16384, d=2048, d_ff=768, E=128, k=8),
    "olmoe": Shape(T=16384, d=2048, d_ff=1024, E=64, k=8),
}
QUICK_GPU_SHAPES = {  # the same structure, small enough for a smoke run
    "mixtral-8x7b": Shape(T=2048, d=1024, d_ff=3584, E=8, k=2),
    "qwen3-30b-a3b": Shape(T=2048, d=512, d_ff=192, E=128, k=8),
    "olmoe": Shape(T=2048, d=512, d_ff=256, E=64, k=8),
}
CPU_SHAPES = {  # --device cpu --quick: exercises the logic only
    "mixtral-8x7b": Shape(T=128, d=64, d_ff=224, E=8, k=2),
    "qwen3-30b-a3b": Shape(T=128, d=32, d_ff=16, E=128, k=8),
    "olmoe": Shape(T=128, d=32, d_ff=16, E=64, k=8),
}
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def count_syncs(fn: Callable[[], object], device: str) -> int | None:
    """Synchronising CUDA calls made by one call of ``fn`` (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one call above what was allocated before it, in MiB."""
    if not device.startswith("cuda"):
        return peak_bytes(fn) / 2**20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def profile_ops(fn: Callable[[], object], device: str, rows: int = 10) -> list[dict]:
    """The ops (CPU) or kernels (CUDA) taking most self time over one call of ``fn``."""
    if not device.startswith("cuda"):
        return profile_top(fn, rows)
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in avg) or 1.0
    avg.sort(key=lambda e: -e.self_device_time_total)
    return [
        {
            "op": e.key[:90],
            "calls": e.count,
            "ms": e.self_device_time_total / 1e3,
            "share": e.self_device_time_total / total,
        }
        for e in avg[:rows]
    ]


def bench_shape(
    name: str,
    shape: Shape,
    dname: str,
    loads: list[str],
    device: str,
    clock: Clock,
    deadline: float = float("inf"),
) -> tuple[list[dict], dict | None]:
    """Every load x mode row of one shape (loads left when ``deadline`` passes are skipped),
    and a profile of smoe's forward+backward (natural load) when a target is missed."""
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    layer, router = make_layer(shape, dtype)
    layer = layer.to(device)
    baselines, skipped = build_baselines(
        layer, shape.k, tokens=shape.T, batched_mm_max_bytes=4 << 30
    )
    x = torch.randn(shape.T, shape.d, dtype=dtype, device=device)
    dense: dict[bool, object] = {}
    rows = []
    for i, load in enumerate(loads):
        if i and time.perf_counter() > deadline:
            print(f"  {name}: time budget spent, skipping loads {loads[i:]}", flush=True)
            break
        bias = pattern_bias(load, shape.T, shape.E, shape.k)
        bias = bias.to(device) if bias is not None else None
        router.bias = bias
        for b in baselines.values():
            b.bias = bias
        for mode in MODES:
            backward = mode == "fwd+bwd"
            xin = x.clone().requires_grad_(backward)
            contenders = {"smoe": layer, **baselines}
            times: dict[str, dict | None] = {}
            syncs: dict[str, int | None] = {}
            peaks: dict[str, float] = {}
            errors = dict(skipped)
            # timed interleaved, one block of each per round (common.measure_many), so that a
            # drift of the GPU's clocks touches every contender alike; then syncs and peaks
            stats = clock.many({c: run_layer(m, xin, backward) for c, m in contenders.items()})
            for cname, module in contenders.items():
                try:
                    s = stats[cname]
                    if isinstance(s, RuntimeError):
                        raise s
                    times[cname] = {"median": s.median, "iqr": s.iqr, "n": s.n}
                    if not backward:
                        syncs[cname] = count_syncs(run_layer(module, xin, False), device)
                    peaks[cname] = peak_mib(probe_step(module, xin, backward), device)
                except RuntimeError as e:  # OOM, or a kernel this torch lacks
                    times[cname] = None
                    errors[cname] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:160]
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if backward not in dense:
                rows_ = shape.T * shape.k
                fn = dense_limit(
                    rows_, shape.d, shape.inner, shape.d_ff, dtype, backward, device=device
                )
                dense[backward] = clock(fn)
            ours = times["smoe"]
            lim = dense[backward]
            row = dict(
                shape=name,
                dtype=dname,
                load=load,
                mode=mode,
                T=shape.T,
                times=times,
                dense={"median": lim.median, "iqr": lim.iqr, "n": lim.n},
                skipped=errors,
                syncs=syncs,
                peak_mib=peaks,
                tokens_per_s=shape.T / ours["median"] if ours else None,
                efficiency=lim.median / ours["median"] if ours else None,
            )
            rows.append(row)
            print(line(row), flush=True)
    target = TARGETS.get(name, 0.0)
    missed = any(
        (r["efficiency"] or 0.0) < target
        for r in rows
        if r["mode"] == "fwd+bwd" and r["load"] != "degenerate"
    )
    profile = None
    if missed:
        router.bias = None
        try:
            ops_ = profile_ops(run_layer(layer, x.clone().requires_grad_(True), True), device)
            profile = {"shape": name, "dtype": dname, "load": "natural", "ops": ops_}
        except RuntimeError as e:
            profile = {"shape": name, "dtype": dname, "error": str(e).splitlines()[0][:160]}
    return rows, profile


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes, short timing")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(GPU_SHAPES), choices=list(GPU_SHAPES))
    p.add_argument("--load", nargs="+", default=list(LOADS), choices=list(LOADS))
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--budget-s", type=float, default=400.0, help="measuring time, all shapes")
    p.add_argument("--json", default=os.path.join(HERE, "out", "bench_gpu.json"))
    p.add_argument("--results", default=None, help="also write the tables into this markdown")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device; use --device cpu --quick to check the logic")
    if args.device == "cpu":
        shapes = CPU_SHAPES
    else:
        shapes = QUICK_GPU_SHAPES if args.quick else GPU_SHAPES
    if args.quick:
        clock = Clock(args.min_run_time or 0.0, 3, 0.0)
    else:
        clock = Clock(args.min_run_time or 0.2, 5, 2e-3)
    info = machine(args.device)
    print(f"machine: {info}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    profiles: list[dict] = []
    per = args.budget_s / (len(args.shape) * len(args.dtype))
    for name in args.shape:
        for dname in args.dtype:
            deadline = time.perf_counter() + per
            r, prof = bench_shape(
                name, shapes[name], dname, args.load, args.device, clock, deadline
            )
            rows += r
            if prof:
                profiles.append(prof)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    data = dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        quick=args.quick,
        machine=info,
        shapes={n: asdict(shapes[n]) for n in args.shape},
        rows=rows,
        profiles=profiles,
        targets=targets(rows),
        wall_s=time.perf_counter() - start,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    block = render(data)
    if args.results:
        write_results(args.results, block, BEGIN, END)
    print()
    print(block)
    print(f"json: {args.json}" + (f"\nresults: {args.results}" if args.results else ""))


if __name__ == "__main__":
    main()
