"""Shared test helpers: tolerances, dtypes, the checks every op goes through."""

from __future__ import annotations

from collections import Counter

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Absolute/relative tolerances against the float64 reference, per dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype=None):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def assert_low_precision_close(actual, ref64, ref_low):
    """STYLE.md §8: in fp16/bf16 the error against float64 is at most 3x that of the reference
    computed in the same low precision (plus one ulp-scale floor)."""
    err = (actual.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0
    base = (ref_low.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0
    floor = TOL[actual.dtype]["atol"]
    assert err <= 3 * base + floor, f"error {err} vs reference-in-{actual.dtype} error {base}"


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, every row strided: a column-interleaved copy viewed back."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def capture_cuda_graph(fn):
    """``(graph, out)``: ``fn()`` run once on a side stream (the warm-up CUDA graphs need outside
    the capture), then captured into ``graph``; ``out`` holds the captured call's outputs, which
    each ``graph.replay()`` rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def spaced_logits(T: int, E: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Logits whose sorted gaps are >= 0.3, so a small perturbation never flips the top-k."""
    rows = [torch.randperm(E).double() * 0.3 + 0.01 * torch.rand(E) for _ in range(T)]
    out = torch.stack(rows) if T else torch.empty(0, E, dtype=torch.float64)
    return out.to(dtype=dtype, device=device)


def run_quick_benchmark(script: str, out, *args: str, stem: str, timeout: int = 600):
    """Runs ``benchmarks/<script> --quick --out <out> <args>`` in a subprocess from the repository
    root, asserts it exited 0, and returns ``(<stem>.json as data, <stem>.md text, stdout)``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / script), "--quick", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (json.loads((out / f"{stem}.json").read_text()), (out / f"{stem}.md").read_text(),
            proc.stdout)  # fmt: skip


def op_calls(fn):
    """``fn()`` under torch's CPU profiler: its result, and a Counter of the ops it called by
    name (``"smoe::grouped_mm"``), calls made inside other ops included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, Counter(e.name for e in prof.events())


def program_targets(program) -> set[str]:
    """The ops an exported program's graph calls (``"smoe.make_plan.default"``)."""
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
