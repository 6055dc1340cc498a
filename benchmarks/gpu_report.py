"""bench_gpu.py's report: the progress line per row, the target table, and the markdown section
(device, command, the rows' ratios, syncs and peak memory, profiles where a target is missed).
"""

from __future__ import annotations

from suite import BASELINE_ORDER, table

TARGETS = {"mixtral-8x7b": 0.80, "qwen3-30b-a3b": 0.60, "olmoe": 0.60}
MUST_BEAT = ("sort+grouped_mm", "transformers-grouped_mm")


def line(r: dict) -> str:
    ours = r["times"]["smoe"]
    if not ours:
        return f"  {r['shape']} {r['dtype']} {r['load']} {r['mode']}: smoe failed: " + str(
            r["skipped"].get("smoe")
        )
    vs = " ".join(
        f"{b}={r['times'][b]['median'] / ours['median']:.2f}x"
        for b in BASELINE_ORDER
        if r["times"].get(b)
    )
    return (
        f"  {r['shape']:<14} {r['dtype']} {r['load']:<10} {r['mode']:<7} "
        f"{1e3 * ours['median']:8.2f} ms eff {r['efficiency']:.2f} syncs {r['syncs'].get('smoe')} "
        f"{vs}"
    )


def targets(rows: list[dict]) -> list[list[str]]:
    out = []
    fb = [r for r in rows if r["mode"] == "fwd+bwd" and r["load"] != "degenerate"]
    for shape, target in TARGETS.items():
        rs = [r for r in fb if r["shape"] == shape]
        if not rs:
            continue
        worst = min(rs, key=lambda r: r["efficiency"] or 0.0)
        eff = worst["efficiency"] or 0.0
        out.append(
            [
                f"fwd+bwd efficiency >= {target:.2f}",
                f"{shape}, loads but degenerate",
                "met" if eff >= target else "**missed**",
                f"{eff:.2f} ({worst['load']})",
            ]
        )
    for b in MUST_BEAT:
        rs = [r for r in rows if r["times"].get(b) and r["times"]["smoe"]]
        if not rs:
            continue
        ratio = [(r["times"][b]["median"] / r["times"]["smoe"]["median"], r) for r in rs]
        v, r = min(ratio, key=lambda p: p[0])
        behind = sum(x < 1.0 for x, _ in ratio)
        out.append(
            [
                f"ahead of {b}",
                f"every shape, load, mode ({len(rs)} rows)",
                "met" if not behind else "**missed**",
                f"{v:.2f}x ({r['shape']} {r['load']} {r['mode']})",
            ]
        )
    return out


def _syncs(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def render(data: dict) -> str:
    m = data["machine"]
    dev = m.get("gpu") or m["cpu"]
    lines = [
        f"### GPU run {data['date']}: {dev}" + (" (quick)" if data["quick"] else ""),
        "",
        f"- command: `{data['command']}` (wall {data['wall_s']:.0f} s)",
        f"- device: {dev}, driver {m.get('driver', '-')}, CUDA {m.get('cuda', '-')}; "
        f"torch {m['torch']}, smoe {m['smoe']}, transformers {m['transformers']}, "
        f"Python {m['python']}; commit {m['commit']}",
        "- ratios: baseline time / smoe time (> 1: smoe ahead); efficiency: dense GEMM time "
        "(torch.mm, cuBLAS on GPU) of the same expert FLOPs / smoe time; syncs: host-device "
        "synchronisations in one forward.",
        "",
    ]
    rows = data["rows"]
    names = [b for b in BASELINE_ORDER if any(r["times"].get(b) for r in rows)]
    short = [b.replace("transformers-", "hf-") for b in names]
    lines += table(["target", "scope", "result", "worst case"], data["targets"])
    cells = []
    for r in rows:
        ours = r["times"]["smoe"]
        cells.append(
            [
                r["shape"],
                r["dtype"],
                r["load"],
                r["mode"],
                f"{1e3 * ours['median']:.2f} ± {1e3 * ours['iqr']:.2f}" if ours else "failed",
                f"{r['tokens_per_s']:,.0f}" if ours else "-",
                f"{r['efficiency']:.2f}" if ours else "-",
                *[
                    f"{r['times'][b]['median'] / ours['median']:.2f}x"
                    if ours and r["times"].get(b)
                    else "-"
                    for b in names
                ],
                _syncs(r["syncs"].get("smoe")) if r["mode"] == "fwd" else "",
                f"{r['peak_mib'].get('smoe', 0):.1f}",
            ]
        )
    lines += table(
        ["shape", "dtype", "load", "mode", "smoe ms", "tokens/s", "efficiency"]
        + [f"vs {s}" for s in short]
        + ["syncs", "peak MiB"],
        cells,
    )
    syncs = [r for r in rows if r["mode"] == "fwd" and r["load"] == rows[0]["load"]]
    if syncs:
        lines += [
            "Host-device syncs per forward / peak MiB by contender (first load; syncs are "
            "counted on CUDA only):",
            "",
        ]
        lines += table(
            ["shape", *[c.replace("transformers-", "hf-") for c in ["smoe", *names]]],
            [
                [r["shape"]]
                + [
                    f"{_syncs(r['syncs'].get(c))} / {r['peak_mib'].get(c, 0):.1f}"
                    for c in ["smoe", *names]
                ]
                for r in syncs
            ],
        )
    skipped = sorted({f"{b}: {why}" for r in rows for b, why in r["skipped"].items()})
    if skipped:
        lines += ["Not run: " + "; ".join(skipped[:8]), ""]
    for p in data.get("profiles") or []:
        what = "kernels by self CUDA time" if m.get("gpu") else "ops by self CPU time"
        lines += [f"Profile where a target is missed: {p['shape']} {p['dtype']} natural "
                  f"fwd+bwd, smoe {what}:", ""]  # fmt: skip
        if "error" in p:
            lines += [f"profiling failed: {p['error']}", ""]
            continue
        lines += table(
            ["op", "calls", "ms", "share"],
            [[f"`{o['op']}`", o["calls"], f"{o['ms']:.2f}", f"{100 * o['share']:.0f}%"]
             for o in p["ops"]],
        )  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"
