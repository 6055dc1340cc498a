"""The CPU expert GEMMs' 16-bit path (csrc/cpu/gemm16.h): ATen's own bf16/fp16 mm ("native") or
the float32 GEMM on upcast inputs, rounded once ("upcast"), measured side by side in one process.

    python benchmarks/bench_gemm16.py [--tokens 512] [--dtype bf16 fp16] [--quick] [--out D]

For each of bench_layer.py's shapes (at ``--tokens`` tokens) and each 16-bit dtype: ``MoELayer``'s
forward (under ``torch.no_grad``) and forward+backward with each path, the float32 layer, and the
dense limits: ``torch.mm`` GEMMs of the layer's expert FLOPs in the dtype and in float32. What
"auto" picks on this CPU is in the header (``smoe.info()`` says it too). Ratios are to the native
path and to the float32 dense limit. Writes ``bench_gemm16.md`` and ``.json`` under ``--out``
(git-ignored by default); never writes RESULTS.md.
"""

from __future__ import annotations

import torch
from bench_layer import SHAPES, run_layer  # benchmarks/bench_layer.py
from common import bench_args, machine, measure, table, write_report
from layer_metrics import dense_limit
from tqdm import tqdm

from smoe import _C, MoELayer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    args = bench_args(__doc__, DTYPES, tokens=512, quick_tokens=16)

    def clock(fn) -> float:  # a slow call (the scalar fallback takes seconds) gets 3 samples
        return measure(fn, min_run_time=args.min_run_time, slow_s=0.5).median

    torch.manual_seed(0)
    rows, jobs = [], [(s, d, b) for s in SHAPES for d in args.dtype for b in (False, True)]
    for shape_name, dname, backward in tqdm(jobs, desc="bench_gemm16"):
        shape = dict(SHAPES[shape_name], T=args.tokens)
        dtype = DTYPES[dname]
        layer = MoELayer(shape["d"], shape["d_ff"], shape["E"], shape["k"], activation="swiglu")
        x = torch.randn(1, shape["T"], shape["d"])
        times = {}
        try:
            for mode in ("native", "upcast"):
                _C.set_cpu_gemm16(mode)
                m = layer.to(dtype)
                times[mode] = clock(run_layer(m, x.to(dtype).requires_grad_(backward), backward))
        finally:
            _C.set_cpu_gemm16("auto")
        times["float32 layer"] = clock(
            run_layer(layer.float(), x.clone().requires_grad_(backward), backward)
        )
        n, d, f = shape["T"] * shape["k"], shape["d"], shape["d_ff"]
        times[f"dense {dname}"] = clock(dense_limit(n, d, 2 * f, f, dtype, backward, as_given=True))
        times["dense float32"] = clock(dense_limit(n, d, 2 * f, f, torch.float32, backward))
        rows.append(dict(shape=shape_name, dtype=dname, mode="fwd+bwd" if backward else "fwd",
                         ms={k: v * 1e3 for k, v in times.items()}))  # fmt: skip

    head = ["shape", "dtype", "mode", "native ms", "upcast ms", "upcast / native speed-up",
            "float32 layer ms", "dense 16-bit ms", "dense float32 ms",
            "efficiency (dense float32 / upcast)"]  # fmt: skip
    info = machine()

    def cells(r: dict) -> list[str]:
        ms = r["ms"]
        return [r["shape"], r["dtype"], r["mode"], f"{ms['native']:.1f}", f"{ms['upcast']:.1f}",
                f"{ms['native'] / ms['upcast']:.1f}x", f"{ms['float32 layer']:.1f}",
                f"{ms['dense ' + r['dtype']]:.1f}", f"{ms['dense float32']:.1f}",
                f"{ms['dense float32'] / ms['upcast']:.2f}"]  # fmt: skip

    lines = [
        f"machine: {info}",
        f"auto here: {_C.cpu_gemm16_path()}",
        f"tokens: {args.tokens}",
        "",
        *table(head, [cells(r) for r in rows]),
    ]
    write_report(args.out, "bench_gemm16", "\n".join(lines), dict(rows=rows, machine=info))


if __name__ == "__main__":
    main()
