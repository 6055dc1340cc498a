"""What does graph-of-tokens routing cost next to plain top-k routing? (issue 24)

    python benchmarks/bench_graph.py [--device cpu|cuda] [--quick] [--threads N] [--S ...] [--E ...]

For each sequence length S and expert count E (router width d = 128, k = 2, causal, B = 8192 / S
sequences, so every cell routes the same 8192 tokens), forward (under ``no_grad``) and forward +
backward (into the tokens, the gate and, for attention-aware, the attention) in one process:

- ``top-k``: :class:`smoe.TopKRouter`: the baseline of the router ratios (1.0);
- ``sim fused``: :class:`smoe.SimilarityAwareRouter` at its defaults (dense dot similarity, poe,
  causal): the graph is mixed through ``scaled_dot_product_attention``;
- ``sim window``: the same with ``window=64``: A is built explicitly ``[B, S, S]`` and mixed by
  ``smoe.ops.graph_mix``;
- ``attention``: :class:`smoe.AttentionAwareRouter` given a precomputed causal attention
  ``[B, 4, S, S]`` (a leaf that gets a gradient): the routing cost only (head mean, mask, mix);
- ``graph_mix``: the op ``torch.ops.smoe.graph_mix`` alone on ``x [B, S, E]`` and a dense
  row-stochastic causal ``A [B, S, S]``, against ``self_coef * x + lam * torch.bmm(A, x)``.

Router times are ratios to top-k, the op's to the torch expression. On CUDA also the peak memory
of SimilarityAwareRouter fused vs ``fused=False`` (explicit A) for one sequence of S = 256 ..
32768 tokens (E = 16), forward and forward + backward, with peak/S, peak/S² and the exponent of
a least-squares fit of log(peak) on log(S) (S >= 1024): ~1 is linear, ~2 quadratic.

Median of repeated calls (``common.measure``). Writes ``benchmarks/out/bench_graph[_cuda][_quick]
.md`` and ``.json`` (``--out``), and the ratio plot (``--plot``; the full CPU run:
``benchmarks/plots/bench_graph.png``). Never writes RESULTS.md; never run inside the tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from common import Clock, log, machine  # benchmarks/common.py

from smoe import AttentionAwareRouter, SimilarityAwareRouter, TopKRouter
from smoe.routing import RoutingContext

ROOT = Path(__file__).resolve().parents[1]
D, K, HEADS, WINDOW, TOKENS = 128, 2, 4, 64, 8192
SIZES_S, SIZES_E = (256, 512, 1024, 2048, 4096), (8, 16, 32, 64)
MODES = ("fwd", "fwd+bwd")
ROUTERS = ("sim_fused", "sim_window", "attention")
LABELS = {"sim_fused": "sim fused", "sim_window": f"sim window {WINDOW}", "attention": "attention"}
MEM_S, MEM_E = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768), 16
# (S, E, "router/mode") cells left out of the full CPU run (shown as —, named in the output).
# Empty: the whole grid takes about 7 minutes on one thread.
CPU_SKIP: set[tuple[int, int, str]] = set()


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------
def _router_call(router, x, ctx, backward: bool, g) -> Callable[[], None]:
    def run() -> None:
        if backward:
            r = router(x, ctx)
            ((r.weight * g).sum() + r.logits.sum() * 0).backward()
        else:
            with torch.no_grad():
                router(x, ctx)

    return run


def _op_call(fn, x, A, backward: bool, g) -> Callable[[], None]:
    def run() -> None:
        if backward:
            (fn(x, A) * g).sum().backward()
        else:
            with torch.no_grad():
                fn(x, A)

    return run


def smoe_mix(x, A):
    return torch.ops.smoe.graph_mix(x, A, None, self_coef=1.0, lam=1.0)


def torch_mix(x, A):
    return 1.0 * x + 1.0 * torch.bmm(A, x)


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    S = logits.shape[-1]
    ok = torch.ones(S, S, dtype=torch.bool, device=logits.device).tril()
    return torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)


def bench_cell(
    S: int, E: int, device: str, clock: Clock, d: int, tokens: int, window: int, skip: set
) -> list[dict]:
    """Both modes of one (S, E) cell: ``[{S, B, E, mode, <name>_s, <name>_ratio, skipped}]``."""
    B = max(1, tokens // S)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B * S, d, generator=g).to(device).requires_grad_()
    att = causal_softmax(torch.randn(B, HEADS, S, S, generator=g)).to(device).requires_grad_()
    xm = torch.randn(B, S, E, generator=g).to(device).requires_grad_()
    A = causal_softmax(torch.randn(B, S, S, generator=g)).to(device).requires_grad_()
    gw = torch.rand(B * S, K, generator=g).to(device)
    gm = torch.randn(B, S, E, generator=g).to(device)
    ctx = RoutingContext(batch_shape=(B, S), causal=True)
    ctx_att = ctx._replace(attention=att)
    torch.manual_seed(0)
    routers = {
        "topk": (TopKRouter(d, E, K).to(device), ctx),
        "sim_fused": (SimilarityAwareRouter(d, E, K, causal=True).to(device), ctx),
        "sim_window": (
            SimilarityAwareRouter(d, E, K, causal=True, window=window).to(device),
            ctx,
        ),
        "attention": (AttentionAwareRouter(d, E, K, causal=True).to(device), ctx_att),
    }
    rows = []
    for mode in MODES:
        bwd = mode == "fwd+bwd"
        row: dict = {"S": S, "B": B, "E": E, "mode": mode, "skipped": []}
        for name, (router, c) in routers.items():
            if (S, E, f"{name}/{mode}") in skip:
                row[f"{name}_s"] = None
                row["skipped"].append(name)
                continue
            row[f"{name}_s"] = clock(_router_call(router, x, c, bwd, gw)).median
        row["op_s"] = clock(_op_call(smoe_mix, xm, A, bwd, gm)).median
        row["torch_s"] = clock(_op_call(torch_mix, xm, A, bwd, gm)).median
        for name in ROUTERS:
            t = row[f"{name}_s"]
            row[f"{name}_ratio"] = None if t is None else t / row["topk_s"]
        row["op_ratio"] = row["op_s"] / row["torch_s"]
        rows.append(row)
    return rows


def sdpa_backend(device: str, S: int, E: int, d: int) -> str:
    """The first SDPA backend, in PyTorch's order, that accepts the fused similarity's shapes
    (q = k ``[1, 1, S, d]``, v ``[1, 1, S, E]``, fp32, causal), as the router passes them: on CPU
    it pads q and v to one width, since the CPU flash kernel needs equal head dims (without it
    the math backend, which materialises ``[S, S]``, runs)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    width = max(d, E) if device == "cpu" else None
    q = torch.randn(1, 1, S, width or d, device=device)
    v = torch.randn(1, 1, S, width or E, device=device)
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with warnings.catch_warnings(), sdpa_kernel([b]):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, q, v, is_causal=True)
            return b.name.lower()
        except RuntimeError:
            continue
    return "none"


# ---------------------------------------------------------------------------------------------
# Peak memory of the fused similarity (CUDA)
# ---------------------------------------------------------------------------------------------
def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes of one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fit_exponent(S: list[int], peak: list[float]) -> float:
    """Slope of the least-squares line of log(peak) on log(S)."""
    xs, ys = [math.log(s) for s in S], [math.log(max(p, 1.0)) for p in peak]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / den if den else float("nan")


def memory_scaling(
    device: str, sizes, E: int, d: int, peak: Callable[[Callable[[], object]], int], fit_from: int
) -> dict:
    """Peak bytes of SimilarityAwareRouter, fused vs explicit, for one sequence of S tokens:
    ``{rows: [{S, variant, mode, peak_bytes, per_S, per_S2}], fits: {variant/mode: exponent}}``."""
    rows = []
    for S in sizes:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(S, d, generator=g).to(device).requires_grad_()
        gw = torch.rand(S, K, generator=g).to(device)
        ctx = RoutingContext(batch_shape=(1, S), causal=True)
        for variant, fused in (("fused", True), ("explicit", False)):
            torch.manual_seed(0)
            router = SimilarityAwareRouter(d, E, K, causal=True, fused=fused).to(device)
            for mode in MODES:
                run = _router_call(router, x, ctx, mode == "fwd+bwd", gw)
                run()  # warm-up: workspaces, lazy init, the gate's .grad
                b = int(peak(run))
                rows.append(dict(S=S, variant=variant, mode=mode, peak_bytes=b,
                                 per_S=b / S, per_S2=b / S**2))  # fmt: skip
        del x, gw
    fits = {}
    for variant in ("fused", "explicit"):
        for mode in MODES:
            pts = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
            pts = [r for r in pts if r["S"] >= fit_from] or pts
            fits[f"{variant}/{mode}"] = fit_exponent(
                [r["S"] for r in pts], [r["peak_bytes"] for r in pts]
            )
    return {"E": E, "d": d, "fit_from": fit_from, "rows": rows, "fits": fits}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "—" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


COLUMNS = (
    "| S | B | E | top-k ms | sim fused | sim window {w} | attention | graph_mix ms | torch ms "
    "| graph_mix / torch |"
)


def render(rows: list[dict], meta: dict, quick: bool, memory: dict | None) -> str:
    size = "quick (not a measurement)" if quick else "full"
    dev = meta["device"] + (f", {meta['gpu']}" if meta.get("gpu") else "")
    lines = [
        f"## Graph-of-tokens routing cost ({datetime.date.today().isoformat()}, "
        f"`bench_graph.py`, {size}, {dev})",
        "",
        f"Commit `{meta['commit']}` on {meta.get('cpu', '?')}, {meta.get('threads', '?')} "
        f"thread(s), load average {meta['load']:.1f} at the start ({meta['note']}). "
        f"{meta['tokens']} tokens a cell (B = {meta['tokens']} / S sequences of S), d = "
        f"{meta['d']}, k = {K}, causal, fp32. Router columns: time as a ratio to TopKRouter's "
        f"(top-k ms); `attention` is AttentionAwareRouter on a given [B, {HEADS}, S, S] causal "
        "attention (the routing only); `graph_mix / torch`: the op against "
        "`x + torch.bmm(A, x)` on a dense causal A [B, S, S]. fwd under no_grad; fwd+bwd "
        "includes the gradients into x, the gate and A / the attention. Fused similarity's "
        f"SDPA backend here: {meta['sdpa_backend']}.",
    ]
    if meta.get("skipped"):
        lines += ["", f"Skipped (—), to keep the run short: {meta['skipped']}."]
    for mode in MODES:
        lines += ["", f"**{mode}**", "", COLUMNS.format(w=meta["window"]), "|---" * 10 + "|"]
        for r in (r for r in rows if r["mode"] == mode):
            lines.append(
                f"| {r['S']} | {r['B']} | {r['E']} | {r['topk_s'] * 1e3:.2f} | "
                + " | ".join(_x(r[f"{n}_ratio"]) for n in ROUTERS)
                + f" | {r['op_s'] * 1e3:.2f} | {r['torch_s'] * 1e3:.2f} | {r['op_ratio']:.2f} |"
            )
    if memory:
        lines += render_memory(memory)
    return "\n".join(lines) + "\n"


def render_memory(memory: dict) -> list[str]:
    fits = memory["fits"]
    lines = [
        "",
        f"**Peak memory** of SimilarityAwareRouter, one sequence (B = 1), E = {memory['E']}, d = "
        f"{memory['d']}: bytes above the inputs (max_memory_allocated after a reset). Fit: "
        f"exponent p of peak ∝ S^p over S >= {memory['fit_from']} (1 linear, 2 quadratic).",
        "",
        "| S | mode | fused MiB | fused B/S | fused B/S² | explicit MiB | explicit B/S | "
        "explicit B/S² |",
        "|---" * 8 + "|",
    ]
    by = {(r["S"], r["variant"], r["mode"]): r for r in memory["rows"]}
    for mode in MODES:
        for S in sorted({r["S"] for r in memory["rows"]}):
            f, e = by[(S, "fused", mode)], by[(S, "explicit", mode)]
            lines.append(
                f"| {S} | {mode} | {f['peak_bytes'] / 2**20:.2f} | {f['per_S']:.0f} | "
                f"{f['per_S2']:.3g} | {e['peak_bytes'] / 2**20:.2f} | {e['per_S']:.0f} | "
                f"{e['per_S2']:.3g} |"
            )
    lines += [
        "",
        "Fit exponents: "
        + ", ".join(f"{k} **{v:.2f}**" for k, v in fits.items())
        + ". Fused linear: "
        + ("**yes**" if all(fits[f"fused/{m}"] < 1.3 for m in MODES) else "**no**")
        + ".",
    ]
    return lines


def render_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4), sharex=True)
    for ax, name in zip(axes, (*ROUTERS, "op")):
        for E in sorted({r["E"] for r in rows}):
            rs = [r for r in rows if r["E"] == E and r["mode"] == "fwd+bwd"]
            pts = [(r["S"], r[f"{name}_ratio"]) for r in rs if r[f"{name}_ratio"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"E = {E}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("S (tokens per sequence)")
        ax.set_title("graph_mix / torch bmm" if name == "op" else f"{LABELS[name]} / top-k")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("time ratio (fwd+bwd)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, short timing (CI)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--S", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--E", type=int, nargs="+", default=None, help="expert counts")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--plot", type=Path, default=None, help="the ratio plot (PNG)")
    p.add_argument("--note", default="a shared machine: every figure noisy; the ratios come from "
                   "one process, so load hits both sides")  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_graph: --device cuda but torch.cuda.is_available() is False")
    if args.quick:
        S_list, E_list, d, tokens, window = (32, 64), (4, 8), 16, 128, 8
        clock, mem_S, skip = Clock(0.01, 2, 1e-3), (256, 512, 1024), set()
    else:
        S_list, E_list, d, tokens, window = SIZES_S, SIZES_E, D, TOKENS, WINDOW
        clock, mem_S = Clock(0.3, 5, 2e-3, slow_s=0.5), MEM_S
        skip = set() if cuda else CPU_SKIP
    S_list, E_list = args.S or S_list, args.E or E_list
    load = os.getloadavg()[0]
    rows: list[dict] = []
    for S in S_list:
        for E in E_list:
            rows += bench_cell(S, E, args.device, clock, d, tokens, window, skip)
            for r in rows[-2:]:
                log(
                    f"S={S} E={E} {r['mode']}: top-k {r['topk_s'] * 1e3:.2f} ms, "
                    + ", ".join(f"{n} {_x(r[f'{n}_ratio'])}x" for n in ROUTERS)
                    + f", graph_mix/torch {r['op_ratio']:.2f}"
                )
    memory = None
    if cuda:  # the CPU path never reaches this
        memory = memory_scaling(args.device, mem_S, MEM_E, d, cuda_peak_bytes, fit_from=1024)
    meta = machine(args.device)
    meta.update(device=args.device, load=load, note=args.note, tokens=tokens, d=d, window=window)
    meta["sdpa_backend"] = sdpa_backend(args.device, S_list[-1], E_list[0], d)
    skipped = sorted(s for s in skip if s[0] in S_list and s[1] in E_list)
    meta["skipped"] = ", ".join(f"S={s} E={e} {n}" for s, e, n in skipped)
    name = "bench_graph" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"rows": rows, "memory": memory, "machine": meta}
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    text = render(rows, meta, args.quick, memory)
    (args.out / f"{name}.md").write_text(text)
    plot = args.plot
    if plot is None and not args.quick:
        plot = (
            ROOT / "benchmarks" / "plots" / "bench_graph.png"
            if not cuda
            else args.out / (name + ".png")
        )
    if plot is not None:
        title = f"bench_graph.py, {args.device}, {meta['threads']} thread(s), {tokens} tokens"
        render_plot(rows, plot, title)
    print(text)
    return data


if __name__ == "__main__":
    main()
