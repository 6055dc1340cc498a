"""bench_transformers.py's report: the markdown section (machine, command, how a step is timed,
the models, and a row per model, dtype and experts implementation)."""

from __future__ import annotations

import datetime

HEADER = (
    "| model | dtype | experts | ms / step | forward / backward / AdamW ms | tokens/s "
    "| vs grouped_mm (range) | experts share | loss rel. Δ |"
)


def render(rows: list[dict], meta: dict, args) -> str:
    size = "quick (not a measurement)" if args.quick else "full"
    gpu = f", {meta['gpu']} (driver {meta.get('driver', '?')})" if meta.get("gpu") else ""
    loads = [r[k] for r in rows for k in ("load_start", "load_end")]
    lines = [
        f"## transformers training steps by experts implementation "
        f"({datetime.date.today().isoformat()}, `bench_transformers.py`, {size}, {meta['device']})",
        "",
        f"Commit `{meta['commit']}`, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta.get('cpu', '?')} ({meta.get('isa', '?')}), threads {meta['threads']}{gpu}. "
        f"Load average {meta['load_start']:.1f} at the start, {min(loads):.1f}–{max(loads):.1f} "
        f"around the timed rounds{meta['load_note']}. Allocator: glibc, "
        + ("tuned (`--malloc tuned`)" if meta["malloc"]["mode"] == "tuned" else "defaults")
        + ".",
        f"Command: `{meta['command']}`.",
        "",
        "A step: forward, loss, backward, AdamW (lr 0: same weights and routing for every "
        f"implementation), {rows[0]['tokens']} tokens. {args.rounds} interleaved rounds of "
        f"{args.steps} timed steps each, gradients between steps: {args.zero_grad} "
        f"(`--zero-grad`). ms/step and tokens/s: median over rounds; forward / backward / "
        "AdamW: medians over the timed steps; vs grouped_mm: "
        "median over rounds of the same round's time ratio (> 1 is faster), range over rounds in "
        "brackets; experts share: (t − t_null) / t, the null experts costing nothing (router, "
        "attention, shared experts and the optimizer step over the other weights stay in both; "
        "with `--zero-grad none` the experts' own AdamW update is in the share); loss rel. Δ: "
        "first step's loss against grouped_mm's.",
        "",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        r0 = next(r for r in rows if r["model"] == name)
        shared = f", {r0['shared']} shared expert" if r0["shared"] else ""
        lines.append(
            f"- `{name}`: d {r0['d']}, d_ff {r0['d_ff']}, E {r0['E']}, k {r0['k']}{shared}, "
            f"{r0['layers']} layers, vocab {r0['vocab']}"
        )
    lines += ["", HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['dtype']} | {r['impl']} |"
        if r["skipped"]:
            lines.append(f"{head} skipped: {r['skipped']} | | | | | |")
            continue
        share = "" if r["experts_share"] is None else f"{100 * r['experts_share']:.0f} %"
        ratio = f"{r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        if r["impl"] == "smoe":
            ratio = f"**{ratio}**"
        diff = "(another model)" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e}"
        phase = " / ".join(f"{s * 1e3:.0f}" for s in r["phase_s"])
        lines.append(
            f"{head} {r['step_s'] * 1e3:.0f} | {phase} | {r['tokens_per_s']:,.0f} | {ratio} "
            f"| {share} | {diff} |"
        )
    return "\n".join(lines) + "\n"
