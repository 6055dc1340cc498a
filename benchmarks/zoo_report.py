"""The router leaderboard's report: the markdown block for RESULTS.md and the plot."""

from __future__ import annotations

import datetime
import math
import subprocess
from pathlib import Path
from typing import Any

import torch


def _pm(ms: tuple[float, float], scale: float = 1.0, digits: int = 3) -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _shown(path: Path) -> str:
    """The path relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def render(
    table: dict[str, dict],
    zoo: dict[str, Any],
    *,
    seeds: list[int],
    noise_std: float,
    quick: bool,
    out: Path,
) -> str:
    """The "Router leaderboard" section: the table, then each claim with its verdict."""
    date = datetime.date.today().isoformat()
    size = "quick (CI-sized, not a measurement)" if quick else "full"
    lines = [
        f"## Router leaderboard ({date}, `router_zoo.py`, {size})",
        "",
        f"Commit `{_commit()}`, {torch.get_num_threads()} CPU threads, seeds {seeds} "
        f"(mean ± std over seeds). Every router at k = 2 (expert choice: c = 2), E = 8, the same "
        "backbone, steps and optimiser. charlm: Tiny Shakespeare validation bits/char, clean and "
        "word-swap attacked (rate 0.04, placeholder `AAA`); late RF = mean routing fluctuation "
        "over the second half of training; MaxVio at the end (mean over layers); step time as a "
        f"ratio to top-k's. ViT: QuickDraw test accuracy (%), clean and with pixel noise "
        f"σ = {noise_std}. Runs: `{_shown(out)}`.",
        "",
        "| router | bpc | bpc attacked | late RF | MaxVio | step time / top-k | ViT acc % "
        "| ViT acc % (noise) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lm = row["causal"]
        cells = [
            _pm(row["bpc"]) if lm else "not causal",
            _pm(row["bpc_attacked"]) if lm else "–",
            _pm(row["late_rf"], digits=4) if lm else "–",
            _pm(row["max_vio"]) if lm else "–",
            _pm(row["step_ratio"], digits=2) if lm else "–",
            _pm(row["vit_acc"], 100, 1),
            _pm(row["vit_acc_noisy"], 100, 1),
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Claims against top-k (verdict rule in `router_zoo.verdict`: a difference beyond twice "
        "its standard error over seeds):",
        "",
        "| router | claim | metric | measured Δ vs top-k | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, row in table.items():
        for v in row["verdicts"]:
            delta = "–" if v["delta"] is None else f"{v['delta']:+.4f} (± {v['se']:.4f})"
            lines.append(
                f"| `{name}` | {v['claim']} | {v.get('metric', '–')} | {delta} | {v['verdict']} |"
            )
    lines.append("")
    return "\n".join(lines) + "\n"


def render_plot(table: dict[str, dict], runs: dict[str, dict[int, dict]], path: Path) -> Path:
    """Three panels: bpc (clean, attacked), ViT accuracy (clean, noisy), RF over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(names))
    for ax, (a, b), (la, lb), scale, title in (
        (axes[0], ("bpc", "bpc_attacked"), ("clean", "attacked"), 1, "charlm val bits/char"),
        (axes[1], ("vit_acc", "vit_acc_noisy"), ("clean", "noisy"), 100, "ViT test accuracy %"),
    ):
        for off, key, label in ((-0.2, a, la), (0.2, b, lb)):
            m = [table[n][key][0] * scale for n in names]
            s = [table[n][key][1] * scale for n in names]
            ax.bar([i + off for i in x], m, width=0.4, yerr=s, label=label, capsize=3)
        finite = [table[n][k][0] * scale for n in names for k in (a, b)]
        finite = [v for v in finite if not math.isnan(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3) - 0.02 * abs(lo), hi + 0.15 * (hi - lo + 1e-3))
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    for i, name in enumerate(names):
        curves = [r["charlm"] for r in runs[name].values() if r.get("charlm")]
        if not curves:
            continue
        steps = curves[0]["rf_steps"]
        mean = [sum(c["rf"][j] for c in curves) / len(curves) for j in range(len(steps))]
        ax.plot(steps, mean, label=name, color=f"C{i}")
    ax.set(xlabel="step", ylabel="RF vs previous checkpoint", title="charlm routing fluctuation")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
