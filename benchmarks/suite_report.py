"""The suite's report: the CPU targets met or missed, the markdown tables, the block between the
markers in RESULTS.md, and the PNG plots."""

from __future__ import annotations

import os

from bench_layer import OVERHEAD_TARGET, TARGETS
from common import LOADS, MODES, table, write_block
from layer_metrics import STAGES
from suite_layer import BASELINE_ORDER

BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
def evaluate_targets(layer_rows: list[dict]) -> list[dict]:
    """The CPU targets of the README, each met or missed, with the worst case and the margin."""
    out = []
    fb = [r for r in layer_rows if r["mode"] == "fwd+bwd" and r["load"] != "degenerate"]
    for shape, target in TARGETS.items():
        for dname in sorted({r["dtype"] for r in fb if r["shape"] == shape}):
            rs = [r for r in fb if r["shape"] == shape and r["dtype"] == dname]
            worst = min(rs, key=lambda r: r["efficiency"])
            out.append(
                dict(
                    target=f"fwd+bwd efficiency >= {target:.2f}",
                    scope=f"{shape} {dname}, loads but degenerate",
                    met=worst["efficiency"] >= target,
                    worst=f"{worst['efficiency']:.2f} ({worst['load']})",
                    margin=worst["efficiency"] - target,
                )
            )
    rs = [r for r in layer_rows if r["shape"] in TARGETS and r["load"] != "degenerate"]
    if rs:
        worst = max(rs, key=lambda r: r["overhead_share"])
        out.append(
            dict(
                target=f"route+plan+permute+combine <= {100 * OVERHEAD_TARGET:.0f}%",
                scope=", ".join(TARGETS) + ", fwd and fwd+bwd, loads but degenerate",
                met=worst["overhead_share"] <= OVERHEAD_TARGET,
                worst=f"{100 * worst['overhead_share']:.1f}% ({worst['shape']} "
                f"{worst['dtype']} {worst['load']} {worst['mode']})",
                margin=OVERHEAD_TARGET - worst["overhead_share"],
            )
        )
    for b in BASELINE_ORDER:
        rs = [r for r in layer_rows if r["baselines"].get(b)]
        if not rs:
            continue
        ratio = [(r["baselines"][b]["median"] / r["smoe"]["median"], r) for r in rs]
        behind = [(v, r) for v, r in ratio if v < 1.0]
        v, r = min(ratio, key=lambda p: p[0])
        out.append(
            dict(
                target=f"ahead of {b}",
                scope=f"every shape, dtype, load, mode ({len(rs)} rows)",
                met=not behind,
                worst=f"{v:.2f}x ({r['shape']} {r['dtype']} {r['load']} {r['mode']})"
                + (f"; behind in {len(behind)}/{len(rs)}" if behind else ""),
                margin=v - 1.0,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# rendering: markdown and plots
# ---------------------------------------------------------------------------------------------
def fmt_ms(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{1e3 * s['median']:.2f} ± {1e3 * s['iqr']:.2f}"


def ratio(b: dict | None, ours: dict) -> str:
    return f"{b['median'] / ours['median']:.2f}x" if b else "-"


def render_markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"### Suite run {data['date']}" + (" (quick)" if data["quick"] else ""),
        "",
        f"- command: `{data['command']}` (wall {data['wall_s']:.0f} s)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, ISA {m['isa']}; "
        f"torch {m['torch']}, smoe {m['smoe']}, transformers {m['transformers']}, "
        f"Python {m['python']}; commit {m['commit']}",
        f"- malloc: {data['malloc']}" + (f" {data['env']}" if data["env"] else ""),
        f"- times: median ± IQR of >= {data['min_samples']} samples after a warm-up (3 for "
        "calls over 0.15 s); ratios are baseline time / smoe time "
        "(> 1: smoe ahead); efficiency = dense torch.mm time of the same expert FLOPs / smoe "
        "time.",
        "",
    ]
    sec = data["sections"]
    if data.get("targets"):
        lines += ["#### Targets (CPU)", ""]
        lines += table(
            ["target", "scope", "result", "worst case", "margin"],
            [
                [t["target"], t["scope"], "met" if t["met"] else "**missed**", t["worst"],
                 f"{t['margin']:+.2f}"]
                for t in data["targets"]
            ],
        )  # fmt: skip
    if sec.get("layer"):
        lines += layer_tables(sec["layer"], data.get("shapes", {}))
    for p in sec.get("profiles") or []:
        lines += [
            f"Profile where a target is missed: {p['shape']} {p['dtype']} {p['load']} "
            f"{p['mode']}, self CPU time by op (smoe layer | dense limit):",
            "",
        ]

        def split(ops_: list[dict]) -> tuple[list[dict], list[dict]]:
            return [o for o in ops_ if o["op"] != "(all ops)"], [
                o for o in ops_ if o["op"] == "(all ops)"
            ]

        (ours, ours_total), (dense, dense_total) = split(p["smoe"]), split(p["dense"])
        cells = []
        for i in range(max(len(ours), len(dense))):
            a = ours[i] if i < len(ours) else None
            b = dense[i] if i < len(dense) else None
            cells.append(_profile_cells(a) + _profile_cells(b))
        if ours_total or dense_total:
            total = _profile_cells(ours_total[0] if ours_total else None)
            cells.append(total + _profile_cells(dense_total[0] if dense_total else None))
        lines += table(["smoe op", "ms (share)", "dense op", "ms (share)"], cells)
    if sec.get("vae"):
        lines += ["#### SMoE-VAE decoder experts (top-1)", ""]
        rows = sec["vae"]
        lines += [
            f"B = {rows[0]['B']} latents, E = {rows[0]['E']} conv decoders; limit: one decoder "
            "over all B rows (the FLOPs of top-1).",
            "",
        ]
        lines += table(
            ["dtype", "load", "mode", "smoe top-1 ms", "images/s", "efficiency",
             "vs all-experts", "vs mask-loop"],
            [
                [r["dtype"], r["load"], r["mode"], fmt_ms(r["times"]["smoe-top1"]),
                 f"{r['images_per_s']:,.0f}", f"{r['efficiency']:.2f}",
                 ratio(r["times"]["all-experts"], r["times"]["smoe-top1"]),
                 ratio(r["times"]["mask-loop"], r["times"]["smoe-top1"])]
                for r in rows
            ],
        )  # fmt: skip
    if sec.get("routers"):
        lines += ["#### Routers", ""]
        lines += table(
            ["router", "T", "d", "E", "k", "dtype", "mode", "time (us)", "ns/token"],
            [
                [r["router"], r["T"], r["d"], r["E"], r["k"], r["dtype"], r["mode"],
                 f"{1e6 * r['time']['median']:.0f} ± {1e6 * r['time']['iqr']:.0f}",
                 f"{r['ns_per_token']:.1f}"]
                for r in sec["routers"]
            ],
        )  # fmt: skip
    if sec.get("ops"):
        lines += ["#### Dispatch ops alone (natural routing)", ""]
        lines += table(
            ["op", "shape", "dtype", "mode", "smoe (us)", "torch (us)", "torch / smoe",
             "GB/s"],
            [
                [r["op"], r["shape"], r["dtype"], r["mode"],
                 f"{1e6 * r['smoe']['median']:.1f}", f"{1e6 * r['torch']['median']:.1f}",
                 f"{r['speedup']:.2f}x",
                 f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else "-"]
                for r in sec["ops"]
            ],
        )  # fmt: skip
    if sec.get("scaling"):
        lines += ["#### Scaling (natural routing)", ""]
        rs = sec["scaling"]
        names = list(rs[0]["times"])
        lines += table(
            ["sweep", "T", "E", "dtype", "mode", *[f"{n} ms" for n in names],
             "smoe us/token", "efficiency"],
            [
                [r["sweep"], r["T"], r["E"], r["dtype"], r["mode"],
                 *[f"{1e3 * r['times'][n]['median']:.2f}" for n in names],
                 f"{1e6 * r['times']['smoe']['median'] / r['T']:.2f}",
                 f"{r['efficiency']:.2f}"]
                for r in rs
            ],
        )  # fmt: skip
        lines += ["![tokens](plots/scaling_tokens.png) ![experts](plots/scaling_experts.png)", ""]
    if sec.get("compile"):
        lines += ["#### torch.compile (dynamo explain, T = 64)", ""]
        lines += table(
            ["contender", "dtype", "graphs", "graph breaks", "why / fullgraph fwd+bwd"],
            [
                [r["contender"], r["dtype"], r["graphs"], r["graph_breaks"],
                 r.get("error") or r.get("fullgraph_fwd_bwd") or "; ".join(r["reasons"])]
                for r in sec["compile"]
            ],
        )  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _profile_cells(o: dict | None) -> list[str]:
    if not o:
        return ["", ""]
    return [f"`{o['op']}` x{o['calls']}", f"{o['ms']:.1f} ({100 * o['share']:.0f}%)"]


def layer_tables(rows: list[dict], shapes: dict) -> list[str]:
    lines = ["#### MoE layer", ""]
    if shapes:
        lines += [
            "Shapes: "
            + "; ".join(
                f"{n}: T={s['T']} d={s['d']} d_ff={s['d_ff']} E={s['E']} k={s['k']} "
                f"{s['activation']}" + (f" cf={s['capacity_factor']}" if s["capacity_factor"]
                                        else "")
                for n, s in shapes.items()
            ),
            "",
        ]  # fmt: skip
    lines += [
        "Loads: balanced (T·k/E each), natural (random gate), skewed (expert 0 in the top-k "
        "of half the tokens), degenerate (every token on experts 0..k-1). gshard-einsum runs "
        "at capacity factor 1.25 (v-moe: the layer's) and drops what exceeds it; the other "
        "baselines are dropless.",
        "",
    ]
    names = [b for b in BASELINE_ORDER if any(r["baselines"].get(b) for r in rows)]
    short = [b.replace("transformers-", "hf-") for b in names]
    lines += table(
        ["shape", "dtype", "load", "mode", "smoe ms", "tokens/s", "efficiency", "overhead",
         *[f"vs {s}" for s in short]],
        [
            [r["shape"], r["dtype"], r["load"], r["mode"], fmt_ms(r["smoe"]),
             f"{r['tokens_per_s']:,.0f}", f"{r['efficiency']:.2f}",
             f"{100 * r['overhead_share']:.1f}%",
             *[ratio(r["baselines"].get(b), r["smoe"]) for b in names]]
            for r in rows
        ],
    )  # fmt: skip
    skipped = sorted({f"{b}: {why}" for r in rows for b, why in r["skipped"].items()})
    if skipped:
        lines += ["Not run: " + "; ".join(skipped[:6]), ""]
    lines += ["Time shares of the smoe layer (each stage timed alone), natural load:", ""]
    lines += table(
        ["shape", "dtype", "mode", *[f"{s} %" for s in STAGES]],
        [
            [r["shape"], r["dtype"], r["mode"], *[f"{100 * r['shares'][s]:.1f}" for s in STAGES]]
            for r in rows
            if r["load"] == "natural"
        ],
    )
    mem = [r for r in rows if r["peak_bytes"]]
    if mem:
        lines += ["Peak memory (MiB, torch CPU allocator, one call), natural load:", ""]
        lines += table(
            ["shape", "dtype", "mode", "smoe", *short],
            [
                [r["shape"], r["dtype"], r["mode"], f"{r['peak_bytes']['smoe'] / 2**20:.1f}",
                 *[f"{r['peak_bytes'][b] / 2**20:.1f}" if b in r["peak_bytes"] else "-"
                   for b in names]]
                for r in mem
            ],
        )  # fmt: skip
    lines += ["![efficiency](plots/efficiency.png) ![shares](plots/stage_shares.png)", ""]
    return lines


def write_results(path: str, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the suite's block between the markers in ``path`` (append them when absent)."""
    write_block(path, block, begin, end)


def render_plots(data: dict, outdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    sec = data["sections"]
    colors = {"smoe": "C0", "sort+grouped_mm": "C1", "transformers-grouped_mm": "C2", "dense": "k"}
    for sweep, xkey, xlabel in (
        ("tokens", "T", "tokens T"),
        ("experts", "E", "experts E (fixed FLOPs per token)"),
    ):
        rs = [r for r in sec.get("scaling") or [] if r["sweep"] == sweep]
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, mode in zip(axes, MODES):
            mr = [r for r in rs if r["mode"] == mode]
            xs = [r[xkey] for r in mr]
            for n in mr[0]["times"]:
                per = [1e6 * r["times"][n]["median"] / r["T"] for r in mr]
                ax.plot(xs, per, "o-", label=n, color=colors.get(n))
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("us per token (flat = linear in T)" if sweep == "tokens" else
                          "us per token (flat = cost independent of E)")  # fmt: skip
            ax.set_title(f"{mode}, {mr[0]['dtype']}, d={mr[0]['d']} d_ff={mr[0]['d_ff']}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"scaling_{sweep}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    rows = [r for r in sec.get("layer") or [] if r["mode"] == "fwd+bwd"]
    if rows:
        groups = sorted({(r["shape"], r["dtype"]) for r in rows}, key=str)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
        width = 0.8 / len(LOADS)
        for i, load in enumerate(LOADS):
            vals = [
                next((r["efficiency"] for r in rows if (r["shape"], r["dtype"]) == g
                      and r["load"] == load), 0.0)
                for g in groups
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=load)
        for j, (shape, _) in enumerate(groups):
            if shape in TARGETS:
                ax.hlines(TARGETS[shape], j - width / 2, j + 0.8 - width / 2, colors="r")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{d}" for s, d in groups], fontsize=8)
        ax.set_ylabel("efficiency (dense GEMM time / layer time)")
        ax.set_title("smoe forward+backward efficiency (red: target)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "efficiency.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        nat = [r for r in sec["layer"] if r["load"] == "natural"]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(nat)), 4))
        bottom = [0.0] * len(nat)
        for s in STAGES:
            vals = [100 * r["shares"][s] for r in nat]
            ax.bar(range(len(nat)), vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(nat)))
        ax.set_xticklabels([f"{r['shape']}\n{r['dtype']} {r['mode']}" for r in nat], fontsize=7)
        ax.set_ylabel("% of stage time")
        ax.set_title("smoe layer time by stage (natural load)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = os.path.join(outdir, "stage_shares.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
