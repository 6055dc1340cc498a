"""The gathering first expert GEMM (``smoe.ops.gather_mm``) against the unfused permute ->
grouped_mm it replaces in training, measured side by side in one process.

    python benchmarks/bench_gather_mm.py [--tokens 4096] [--dtype fp32 bf16] [--quick] [--out D]

For each of bench_layer.py's shapes (at ``--tokens`` tokens), per dtype: (1) the first GEMM alone,
``x [T, d] -> [T k, n_in]`` through the plan, forward and forward+backward (input and weight
gradients); (2) a whole ``MoELayer`` training step (forward+backward), once as it runs (its
``Experts`` gather past the size rule) and once with the gather turned off (``smoe.experts.gathers``
patched to False: permute, then grouped_mm); (3) the bytes the layer's autograd graph saves for its
backward, both ways (distinct storages, measured with ``saved_tensors_hooks``), and the step's peak
memory (``common.peak_bytes``: torch's memory profiler, smoe's cached outputs included; the
gather's per-thread scratch, allocated on the pool's threads, is not). Ratios are unfused /
gathering (> 1: gathering ahead). Writes ``bench_gather_mm.md`` and ``.json`` under ``--out``
(git-ignored by default); never writes RESULTS.md.
"""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import torch
from bench_layer import SHAPES  # benchmarks/bench_layer.py
from common import bench_args, machine, measure, peak_bytes, table, write_report
from tqdm import tqdm

import smoe.experts
from smoe import MoELayer, ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unfused_experts():
    """Experts without the gather: permute, then grouped_mm (what ran before gather_mm)."""
    return mock.patch.object(smoe.experts, "gathers", lambda x, plan: False)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages the autograd graph of ``fn()`` saves for its backward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def time_row(shape: dict, dtype: torch.dtype, clock) -> dict:
    T, d, d_ff, E, k = (shape[n] for n in ("T", "d", "d_ff", "E", "k"))
    layer = MoELayer(d, d_ff, E, k, activation="swiglu").to(dtype)
    x = torch.randn(T, d, dtype=dtype)
    plan = ops.make_plan(torch.randn(T, E).topk(k, dim=-1).indices.int(), E)
    w_in = layer.experts.w_in.detach().transpose(1, 2)  # [E, d, 2 d_ff], a transposed view
    g = torch.randn(plan.token.shape[0], w_in.shape[2], dtype=dtype)
    xg, wg = x.clone().requires_grad_(), w_in.clone().requires_grad_()

    def first(gather: bool, backward: bool):
        def run():
            with nullcontext() if backward else torch.no_grad():
                if gather:
                    out = ops.gather_mm(xg, plan, wg)
                else:
                    out = ops.grouped_mm(ops.permute(xg, plan), wg, plan.offsets)
                if backward:
                    out.backward(g)

        return run

    xl = x.clone().requires_grad_()

    def step():
        y, aux = layer(xl)
        (y.float().square().mean() + aux.loss()).backward()

    ms = {}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        ms[f"gemm {mode} unfused"] = 1e3 * clock(first(False, backward))
        ms[f"gemm {mode} gather"] = 1e3 * clock(first(True, backward))
    with unfused_experts():
        ms["layer unfused"] = 1e3 * clock(step)
        saved_unfused = saved_bytes(lambda: layer(xl))
        peak_unfused = peak_bytes(step)
    ms["layer gather"] = 1e3 * clock(step)
    saved = dict(unfused=saved_unfused, gather=saved_bytes(lambda: layer(xl)))
    peak = dict(unfused=peak_unfused, gather=peak_bytes(step))
    return dict(ms=ms, saved=saved, peak=peak, gathers=smoe.experts.gathers(x, plan))


def main(argv: list[str] | None = None) -> dict:
    args = bench_args(__doc__, DTYPES, tokens=4096, quick_tokens=64, argv=argv)

    def clock(fn) -> float:
        return measure(fn, min_run_time=args.min_run_time).median

    torch.manual_seed(0)
    rows = []
    jobs = [(s, d) for s in SHAPES for d in args.dtype]
    for shape_name, dname in tqdm(jobs, desc="bench_gather_mm"):
        shape = dict(SHAPES[shape_name], T=args.tokens)
        rows.append(dict(shape=shape_name, dtype=dname, T=args.tokens,
                         **time_row(shape, DTYPES[dname], clock)))  # fmt: skip

    head = ["shape", "dtype", "gathers", "1st GEMM fwd: unfused ms", "gather ms", "ratio",
            "fwd+bwd: unfused ms", "gather ms", "ratio", "layer step: unfused ms", "gather ms",
            "ratio", "saved MB: unfused", "gather", "ratio", "peak MB: unfused", "gather",
            "ratio"]  # fmt: skip

    def cells(r: dict) -> list[str]:
        ms, sv = r["ms"], r["saved"]
        out = [r["shape"], r["dtype"], "yes" if r["gathers"] else "no (below the size rule)"]
        for a, b in (("gemm fwd unfused", "gemm fwd gather"),
                     ("gemm fwd+bwd unfused", "gemm fwd+bwd gather"),
                     ("layer unfused", "layer gather")):  # fmt: skip
            out += [f"{ms[a]:.2f}", f"{ms[b]:.2f}", f"{ms[a] / ms[b]:.2f}x"]
        mb = 1 / 2**20
        for v in (sv, r["peak"]):
            out += [f"{v['unfused'] * mb:.1f}", f"{v['gather'] * mb:.1f}",
                    f"{v['unfused'] / max(v['gather'], 1):.2f}x"]  # fmt: skip
        return out

    info = machine()
    lines = [
        f"machine: {info}",
        f"tokens: {args.tokens}",
        "",
        *table(head, [cells(r) for r in rows]),
    ]
    data = dict(rows=rows, machine=info, tokens=args.tokens)
    write_report(args.out, "bench_gather_mm", "\n".join(lines), data)
    return data


if __name__ == "__main__":
    main()
