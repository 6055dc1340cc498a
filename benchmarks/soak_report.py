"""Output of benchmarks/soak.py: the per-step samples downsampled to JSON, and the plot of memory,
fds, threads and compiled graphs per step (benchmarks/plots/soak_<device>.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soak import SoakResult

MB = 2**20


def downsample(samples: dict[str, list[float]], max_points: int = 2000) -> dict[str, list[float]]:
    """Every n-th sample (and the last) so that at most ``max_points + 1`` remain."""
    n = len(samples["step"])
    stride = max(1, math.ceil(n / max_points))
    idx = list(range(0, n, stride))
    if n and idx[-1] != n - 1:
        idx.append(n - 1)
    return {k: [v[i] for i in idx] for k, v in samples.items()}


def write_json(result: SoakResult, path: Path, machine: dict | None = None) -> None:
    small = downsample(result.samples)
    for key in ("step", "fds", "threads", "compiles"):
        small[key] = [int(v) for v in small[key]]
    for key in ("mem", "rss", "reserved"):
        small[key] = [round(v / MB, 3) for v in small[key]]
    small["loss"] = [round(v, 5) for v in small["loss"]]
    data = dict(
        config=result.config,
        machine=machine,
        summary=result.summary,
        units=dict(mem="MB", rss="MB", reserved="MB", compiles="graphs compiled so far"),
        samples=small,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")))


def plot(result: SoakResult, path: Path) -> None:
    """Memory (whole run, and after warm-up with the allowed band), fds, threads and compiled
    graphs per step; dashed lines mark the quarters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, cfg, n = downsample(result.samples, 5000), result.config, result.config["steps"]
    mem = "CUDA allocated (MB)" if cfg["device"].startswith("cuda") else "RSS (MB)"
    rows = [("mem", mem), ("mem", f"{mem[:-5]}, after warm-up"), ("fds", "open fds")]
    rows += [("threads", "threads"), ("compiles", "graphs compiled")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 10), sharex=True)
    for i, (ax, (key, label)) in enumerate(zip(axes, rows)):
        steps, values = s["step"], [v / (MB if key == "mem" else 1) for v in s[key]]
        if i == 1:
            kept = [j for j, t in enumerate(steps) if t >= n // 4]
            steps, values = [steps[j] for j in kept], [values[j] for j in kept]
        ax.plot(steps, values, lw=0.8)
        ax.set_ylabel(label)
        for b in (n // 4, n // 2, 3 * n // 4):
            ax.axvline(b, color="grey", ls="--", lw=0.8)
    q = result.summary["memory_median_mb_per_quarter"]
    for i, m in enumerate(q[1:], start=1):
        axes[1].hlines(m, i * n / 4, (i + 1) * n / 4, colors="C1", lw=1.5, label="quarter median")
    limit = q[1] + max(cfg["mem_rel"] * q[1], cfg["mem_abs_mb"])
    axes[1].axhline(limit, color="C3", ls=":", label="allowed last-quarter median")
    handles, labels = axes[1].get_legend_handles_labels()
    axes[1].legend(handles[-2:], labels[-2:], fontsize=8, loc="center right")
    axes[0].set_title(f"soak {cfg['device']}: {n} steps, {result.summary['verdict']}")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
