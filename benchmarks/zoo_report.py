"""The router leaderboard's report: the markdown block for RESULTS.md and the plot."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from common import machine, pm, shown  # benchmarks/common.py


def _setup_line(runs: dict[str, dict[int, dict]], noise_std: float) -> str:
    """The setup as the runs recorded it (the first char-LM run's config)."""
    cfg = next(
        (r["charlm"]["setup"] for by in runs.values() for r in by.values() if r.get("charlm")), None
    )
    lm = (
        f"charlm: {cfg['n_layers']} layers, d = {cfg['d_model']}, E = {cfg['num_experts']}, "
        f"k = {cfg['k']}, {cfg['steps']} steps of {cfg['batch_size']} x {cfg['context']} "
        f"characters, validation bits/char on the first {cfg['eval_batches'] * cfg['batch_size']} "
        f"windows of {cfg['context']} characters, clean and word-swap attacked (rate "
        f"{cfg['attack_rate']}, placeholder `{cfg['attack_placeholder']}`); late RF = mean "
        "routing fluctuation over the second half of training; MaxVio at the end (mean over "
        "layers). "
        if cfg
        else ""
    )
    return (
        f"{lm}Step time: this invocation's interleaved timing of char-LM training steps, as a "
        f"ratio to top-k's. ViT: QuickDraw test accuracy (%), clean and with Gaussian pixel noise "
        f"σ = {noise_std}; every router at k = 2 (expert choice: c = 2), E = 8."
    )


def render(
    table: dict[str, dict],
    zoo: dict[str, Any],
    runs: dict[str, dict[int, dict]],
    *,
    seeds: list[int],
    noise_std: float,
    quick: bool,
    out: Path,
) -> str:
    """The "Router leaderboard" section: the table, then each claim with its verdict."""
    date = datetime.date.today().isoformat()
    size = "quick (CI-sized, not a measurement)" if quick else "full"
    m = machine()
    lines = [
        f"## Router leaderboard ({date}, `router_zoo.py`, {size})",
        "",
        f"Table written at commit `{m['commit']}` on {m.get('cpu', '?')}, {m.get('threads', '?')} "
        f"threads; seeds {seeds} (mean ± std over seeds); same backbone, steps and optimiser for "
        f"every router. {_setup_line(runs, noise_std)} Runs (JSON, with the commit and machine of "
        f"each): `{shown(out)}`.",
        "",
        "| router | bpc | bpc attacked | late RF | MaxVio | step time / top-k | ViT acc % "
        "| ViT acc % (noise) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lm = row["in_lm"]
        cells = [
            pm(row["bpc"]) if lm else row.get("lm_missing", "not causal"),
            pm(row["bpc_attacked"]) if lm else "–",
            pm(row["late_rf"], digits=4) if lm else "–",
            pm(row["max_vio"]) if lm else "–",
            f"{row['step_ratio']:.2f}" if lm and not math.isnan(row["step_ratio"]) else "–",
            pm(row["vit_acc"], 100, 1),
            pm(row["vit_acc_noisy"], 100, 1),
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
