"""The soak run's probes (memory, file descriptors, threads, dynamo's compile count) and its pass
criteria (benchmarks/soak.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from statistics import median

import torch

MB = 2**20


def probe(device: str) -> dict[str, float]:
    """RSS (bytes), open fds and threads of this process, plus CUDA allocated/reserved bytes."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: psutil, if present
        import psutil

        p = psutil.Process()
        out.update(rss=p.memory_info().rss, threads=p.num_threads(), fds=p.num_fds())
    if device.startswith("cuda"):
        out["allocated"] = torch.cuda.memory_allocated(device)
        out["reserved"] = torch.cuda.memory_reserved(device)
    return out


def compile_count() -> int:
    """Graphs dynamo has compiled in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def quarters(values: Sequence[float]) -> list[list[float]]:
    q = len(values) // 4
    return [list(values[i * q : (i + 1) * q if i < 3 else len(values)]) for i in range(4)]


def check_memory(
    values: Sequence[float], rel: float = 0.01, abs_bytes: float = 8 * MB
) -> str | None:
    """None if the last quarter's median stays within max(rel x, abs_bytes) above the second
    quarter's median ``x`` (the first quarter is warm-up), else why not."""
    if len(values) < 8:
        return f"memory: {len(values)} samples, need at least 8"
    q2, q4 = (median(q) for q in quarters(values)[1::2])
    allowed = max(rel * q2, abs_bytes)
    if q4 - q2 > allowed:
        return (
            f"memory: last-quarter median {q4 / MB:.1f} MB exceeds the second quarter's "
            f"{q2 / MB:.1f} MB by {(q4 - q2) / MB:.2f} MB > {allowed / MB:.2f} MB allowed"
        )
    return None


def check_no_growth(values: Sequence[float], what: str) -> str | None:
    """None if the last quarter's maximum does not exceed the second quarter's."""
    _, q2, _, q4 = quarters(values)
    if q2 and q4 and max(q4) > max(q2):
        return f"{what}: grew from max {max(q2):g} (second quarter) to {max(q4):g} (last quarter)"
    return None
