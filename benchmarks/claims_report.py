"""The report of ``claims.py``: the markdown block for RESULTS.md and the plot."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from common import machine, pm, shown  # benchmarks/common.py

_COLUMNS = (
    ("bpc", "val bpc", 1.0, 4),
    ("late_rf", "late RF", 1.0, 4),
    ("rc", "RC (end)", 1.0, 3),
    ("rc_change", "RC end − first", 1.0, 3),
    ("rc_late", "RC end − mid", 1.0, 3),
    ("max_vio", "MaxVio", 1.0, 3),
    ("bpc_attacked", "val bpc (attacked)", 1.0, 4),
    ("bpc_early", "val bpc, first quarter", 1.0, 4),
    ("cv", "load CV", 1.0, 3),
    ("entropy", "routing entropy (nats)", 1.0, 3),
)


def _experts(cfg: dict, one_k: bool = True) -> str:
    """The expert and block setup of a study's char-LM, as the table's text gives it."""
    width = f"expert width {cfg['d_ff']}" if cfg.get("d_ff") else "expert width 4d/k"
    if one_k:
        parts = [f"{width} (equal active expert compute in every arm)"]
    else:  # the same experts in every arm: compute scales with each arm's k
        parts = [f"{width} in every arm (the same experts: active expert compute scales with k)"]
    if cfg.get("activation", "gelu") != "gelu" or cfg.get("expert_bias"):
        bias = " with biases" if cfg.get("expert_bias") else ""
        parts.append(f"{cfg.get('activation', 'gelu')} experts{bias}")
    if cfg.get("dropout") or cfg.get("expert_dropout"):
        parts.append(
            f"dropout {cfg.get('dropout', 0)} (inside the experts {cfg.get('expert_dropout', 0)})"
        )
    if cfg.get("layout", "pre_ln") != "pre_ln":
        parts.append(f"{cfg['layout']} blocks")
    return ", ".join(parts)


def charlm_inference_flops(cfg: dict) -> tuple[float, float]:
    """(whole model, MoE layers' share) multiply-add FLOPs x 2 per generated token of the
    char-LM of ``smoe.examples.charlm`` with setup ``cfg``, at a full context (attention over
    ``context`` / 2 earlier tokens on average): the attention projections (8 d²) and scores and
    values (4 d · context/2) per block, each MoE layer's router (2 d E) and k experts (two GEMMs,
    three with swiglu), a dense block's FFN (16 d²) and the tied output head (2 d V, V = 65).
    Layer norms, softmaxes and activations are left out (a few % at most). An S2MoE layer at
    inference (``eval_output="clean"``) is its SMoE: no noise, no second path, no gate.
    """
    d, n, k = cfg["d_model"], cfg["n_layers"], cfg["k"]
    d_ff = cfg.get("d_ff") or 4 * d // k
    gemms = 3 if cfg.get("activation", "gelu") == "swiglu" else 2
    attn = 8 * d * d + 4 * d * cfg["context"] / 2
    moe = 2 * d * cfg["num_experts"] + k * gemms * 2 * d * d_ff
    every = cfg.get("moe_every", 1)
    n_moe = sum(1 for i in range(n) if (i + 1) % every == 0)
    total = n * attn + n_moe * moe + (n - n_moe) * 16 * d * d + 2 * d * 65
    return total, n_moe * moe


def _flops_lines(study: Any, runs: dict[str, list[dict]]) -> list[str]:
    rows = {a: rs[0]["setup"] for a, rs in runs.items() if rs}
    if not rows:
        return []
    flops = {a: charlm_inference_flops(cfg) for a, cfg in rows.items()}
    top = max(t for t, _ in flops.values())
    lines = [
        "",
        "Inference FLOPs per token (`charlm_inference_flops`: whole model, the MoE layers' share; "
        "relative to the costliest arm):",
        "",
        "| arm | k | MFLOPs / token | MoE layers | vs costliest |",
        "|---|---|---|---|---|",
    ]
    for a, (total, moe) in flops.items():
        lines.append(
            f"| {study.arms[a].label} | {rows[a]['k']} | {total / 1e6:.2f} | "
            f"{moe / 1e6:.2f} ({100 * moe / total:.0f} %) | {total / top:.3f} |"
        )
    return lines


def render(
    name: str,
    study: Any,
    summary: dict,
    runs: dict[str, list[dict]],
    *,
    quick: bool,
    out: Path,
    plot: Path,
) -> str:
    """The study's section: setup, table (mean ± std over seeds), each claim with its verdict."""
    date = datetime.date.today().isoformat()
    size = "quick (CI-sized, not a measurement)" if quick else "full"
    m = machine()
    first = next((r for rs in runs.values() for r in rs), None)
    cfg = first["setup"] if first else {}
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    ks = sorted({r["setup"]["k"] for rs in runs.values() for r in rs})
    k_text = str(ks[0]) if len(ks) == 1 else "per arm (below)"
    minutes = sum(r["seconds"] for rs in runs.values() for r in rs) / 60
    columns = [
        c for c in _COLUMNS if any(not math.isnan(r[c[0]][0]) for r in summary["table"].values())
    ]
    lines = [
        f"## Paper claims: {study.title} ({date}, `claims.py {name}`, {size})",
        "",
        f"Spec: {study.spec}. Char-LM of `smoe.examples.charlm` on Tiny Shakespeare: "
        f"{cfg.get('n_layers')} MoE layers, d = {cfg.get('d_model')}, "
        f"E = {cfg.get('num_experts')}, "
        f"k = {k_text}, {_experts(cfg, len(ks) == 1)}, {cfg.get('steps')} "
        f"steps of {cfg.get('batch_size')} x {cfg.get('context')} characters, evaluated every "
        f"{cfg.get('eval_every')}; each arm with its router's default auxiliary-loss weights. "
        f"Seeds {seeds}, mean ± std over seeds. Written at commit `{m['commit']}` on "
        f"{m.get('cpu', '?')}; {minutes:.0f} min of training in all. Runs: `{shown(out)}`; "
        f"plot: `{shown(plot)}`.",
        "",
        "| arm | router, options | " + " | ".join(c[1] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for arm, row in summary["table"].items():
        a = study.arms[arm]
        opts = ", ".join(f"{k}={v}" for k, v in {**a.options, **a.charlm}.items()) or "defaults"
        cells = [pm(row[key], scale, digits) for key, _, scale, digits in columns]
        lines.append(
            f"| {a.label} (n = {row['n']}) | `{a.router}` ({opts}) | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| claim (paper) | measured: method − baseline (± 1 SE) | verdict |",
        "|---|---|---|",
    ]
    for v in summary["verdicts"]:
        if v["delta"] is None:
            measured = "not measured"
        else:
            measured = f"{v['delta']:+.4f} ± {v['se']:.4f} ({v['metric']})"
        lines.append(f"| {v['claim']} | {measured} | **{v['verdict']}** |")
    if any(v.get("baseline") is None for v in summary["verdicts"]):
        lines += [
            "",
            "A claim measured against zero (a trend: rises, declines) compares one arm's mean "
            "with 0 by the same rule.",
        ]
    if getattr(study, "flops", False):
        lines += _flops_lines(study, runs)
    if summary.get("timing_verdicts"):
        t = summary["timing"]
        lines += [
            "",
            "Step time (an interleaved timing of every arm in one process after the runs"
            + (
                "; an SSR arm's expected time is (1 − p) × its measured step + p × the always-on "
                "step):"
                if any("expected_s" in v for v in t.values())
                else "):"
            ),
            "",
            "| arm | s / step | expected s / step |",
            "|---|---|---|",
        ]
        for arm, v in t.items():
            exp = f"{v['expected_s']:.4f}" if "expected_s" in v else "–"
            lines.append(f"| {study.arms[arm].label} | {v['step_s']:.4f} | {exp} |")
        lines += ["", "| claim | ratio | bound | verdict |", "|---|---|---|---|"]
        for v in summary["timing_verdicts"]:
            lines.append(f"| {v['claim']} | {v['ratio']:.3f} | {v['bound']} | **{v['verdict']}** |")
    lines += [
        "",
        "Verdict rule: a difference counts when it exceeds two standard errors over seeds; "
        "otherwise inconclusive at this scale.",
        "",
    ]
    return "\n".join(lines)


def render_plot(study: Any, runs: dict[str, list[dict]], path: Path) -> None:
    """bpc, RF (against the previous checkpoint) and RC over training, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (
        ("steps", "bpc_curve", "validation bits/char"),
        ("rf_steps", "rf_curve", "routing fluctuation (vs previous)"),
        ("steps", "rc_curve", "RC on h (higher: less collapsed)"),
    )
    for ax, (xkey, ykey, title) in zip(axes, panels):
        for arm, rs in runs.items():
            if not rs:
                continue
            x = rs[0][xkey]
            y = np.array([r[ykey] for r in rs], dtype=float)
            mean, std = y.mean(0), y.std(0)
            style = "-" if arm.startswith(("xmoe", "method")) else "--"
            (line,) = ax.plot(x, mean, style, label=study.arms[arm].label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ykey == "bpc_curve":
            lo = min((min(r[ykey]) for rs in runs.values() for r in rs), default=math.nan)
            if not math.isnan(lo):
                ax.set_ylim(lo - 0.05, lo + 1.0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
