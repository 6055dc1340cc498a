"""What bounds the fine-grained MoE layer's GEMMs on CPU (issue 25): the BLAS rate of one
expert's GEMM against one dense GEMM of the same shape class, ``grouped_mm`` over 1, 8 and 64
experts with even and uneven (natural) loads, and the router's gate GEMM with float32 logits
(``smoe.ops.gate_linear``, and ``F.linear`` on float32 upcasts) against the bf16-output rate.

    python benchmarks/bench_cpu_gemm.py [--threads 1] [--quick] [--out benchmarks/out]
    python benchmarks/bench_cpu_gemm.py --warmup [--steps 70] [--threads 1]

Shapes are ``bench_layer.py``'s fine-grained layer (T = 4096, d = 256, d_ff = 128, E = 64,
k = 8: 32,768 grouped rows, about 512 per expert). Every figure is GFLOP/s (2·M·K·N over the
median time of ``common.measure``), so rows compare directly; ratios are to the dense GEMM of
the same K and N in the same dtype, measured in the same run. Writes ``bench_cpu_gemm.md``
under ``--out`` (git-ignored by default); never writes RESULTS.md.

``--warmup``: training steps (forward + backward) of the fine-grained ``MoELayer`` in bf16 with
fresh tokens, hence fresh expert-group sizes, every step, as in training: the median step time over
steps 0-9, 10-29, 30-49 and 50-69. oneDNN (ATen's bf16 GEMMs) builds a GEMM primitive per new
shape, so a new group size costs more than a repeated one; benchmarks that repeat one input never
see it. ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` in the environment sets oneDNN's cache size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, measure  # benchmarks/common.py

from smoe import MoELayer, ops

ROOT = Path(__file__).resolve().parents[1]
ROWS, D, D_FF, E = 32768, 256, 128, 64


def rate(flops: float, fn, quick: bool) -> float:
    """GFLOP/s of ``fn`` (median time)."""
    s = measure(fn, min_run_time=0.05 if quick else 0.5, min_samples=3 if quick else 7)
    return flops / s.median / 1e9


def uneven_offsets(rows: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Group sizes of a natural top-k load: about rows / experts each, ±12 %, summing to rows."""
    g = torch.Generator().manual_seed(seed)
    base = rows // experts
    sizes = base + torch.randint(-base // 8, base // 8 + 1, (experts,), generator=g)
    sizes[-1] += rows - int(sizes.sum())
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])


def run(quick: bool) -> list[tuple[str, str, float, float]]:
    """(dtype, what, GFLOP/s, ratio to dense) rows."""
    rows = ROWS // 8 if quick else ROWS
    out = []
    for dt in (torch.bfloat16, torch.float32):
        name = "bf16" if dt == torch.bfloat16 else "fp32"
        for k_in, n_out, label in ((D, 2 * D_FF, "first GEMM"), (D_FF, D, "second GEMM")):
            x = torch.randn(rows, k_in, dtype=dt)
            flops = 2.0 * rows * k_in * n_out
            dense_w = torch.randn(k_in, n_out, dtype=dt)
            dense = rate(flops, lambda x=x, w=dense_w: torch.mm(x, w), quick)
            out.append((name, f"{label}: dense [{rows}, {k_in}] x [{k_in}, {n_out}]", dense, 1.0))
            per = rows // E
            one = rate(
                flops / E, lambda x=x[:per], w=dense_w: torch.mm(x, w), quick
            )  # one expert's share
            out.append((name, f"{label}: one expert's GEMM [{per}, {k_in}]", one, one / dense))
            for experts in (1, 8, E):
                w = torch.randn(experts, n_out, k_in, dtype=dt).transpose(1, 2)  # as Experts
                even = torch.arange(experts + 1, dtype=torch.int64) * (rows // experts)
                for load, off in (("even", even), ("uneven", uneven_offsets(rows, experts))):
                    if experts == 1 and load == "uneven":
                        continue
                    r = rate(flops, lambda x=x, w=w, o=off: ops.grouped_mm(x, w, o), quick)
                    what = f"{label}: grouped_mm, {experts} experts, {load} load"
                    out.append((name, what, r, r / dense))
    # the router's gate: float32 logits whatever the model's dtype (they must not round to bf16)
    T = rows // 8
    x16, w16 = torch.randn(T, D, dtype=torch.bfloat16), torch.randn(E, D, dtype=torch.bfloat16)
    flops = 2.0 * T * D * E
    fp32 = rate(flops, lambda: F.linear(x16.float(), w16.float()), quick)
    gate = rate(flops, lambda: ops.gate_linear(x16, w16), quick)
    bf16 = rate(flops, lambda: F.linear(x16, w16), quick)
    shape = f"[{T}, {D}] x [{D}, {E}]"
    out.append(("bf16 x", f"router gate {shape}: F.linear on fp32 upcasts", fp32, fp32 / bf16))
    as_run = "router gate: smoe.ops.gate_linear (fp32 logits, as run)"
    out.append(("bf16 x", as_run, gate, gate / bf16))
    out.append(("bf16 x", "router gate, bf16 output (rounds the logits: not used)", bf16, 1.0))
    return out


def warmup(steps: int) -> list[tuple[str, float]]:
    """(steps, median ms) of fresh-routing bf16 training steps of the fine-grained layer."""
    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, 8, activation="swiglu").to(torch.bfloat16)
    times = []
    for _ in range(steps):
        x = torch.randn(ROWS // 8, D, dtype=torch.bfloat16, requires_grad=True)
        t0 = time.perf_counter()
        y, _ = layer(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - t0)
    spans = [(a, min(b, steps)) for a, b in ((0, 10), (10, 30), (30, 50), (50, 70)) if a < steps]
    return [(f"{a}-{b - 1}", 1e3 * statistics.median(times[a:b])) for a, b in spans]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="an eighth of the rows, short timings")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--warmup", action="store_true", help="fresh-routing training steps instead")
    p.add_argument("--steps", type=int, default=70, help="--warmup's steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup:
        cache = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)")
        spans = warmup(args.steps)
        print(f"oneDNN primitive cache {cache}, {torch.get_num_threads()} thread(s): " + ", ".join(
            f"steps {s} {ms:.0f} ms" for s, ms in spans))  # fmt: skip
        return {"spans": spans}
    rows = run(args.quick)
    m = machine()
    lines = [
        f"## CPU GEMM rates at the fine-grained layer's shapes (`bench_cpu_gemm.py`"
        f"{', quick' if args.quick else ''})",
        "",
        f"Commit `{m['commit']}`, {m.get('cpu', '?')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). GFLOP/s; ratio: to the dense GEMM of the same "
        "K and N and dtype (the router rows: to the bf16-output gate GEMM).",
        "",
        "| dtype | GEMM | GFLOP/s | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {dt} | {what} | {r:.0f} | {ratio:.2f} |" for dt, what, r, ratio in rows]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_cpu_gemm{'_quick' if args.quick else ''}.md"
    path.write_text(text)
    print(text)
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
