"""USMoE swapped into a trained token-choice char-LM without training (issue 27; specs/usmoe.md
§6, §11): the training-free protocol of ``usmoe_study.py`` on the router lab's causal task.

    python benchmarks/usmoe_lm_study.py [--seeds 0 1 2] [--budgets 1.0 0.86 0.7] [--threads 1]
        [--quick]

Per seed, the leaderboard's char-LM (``router_zoo.charlm_config("topk")``: Tiny Shakespeare, 4 MoE
layers, d = 128, E = 8, k = 2, 600 steps) is trained once with the top-k router (TC), its top-2
weights the softmax probabilities, not renormalised (OLMoE's ``norm_topk_prob=False``, the
paper's models). Then, with every weight unchanged, each MoE layer's router is replaced by one
that reads the same router weight W [E, d]:

- ``tc``: the trained model as it is;
- ``ec``: expert choice grouped by position (each position's B = 32 tokens of the batch compete;
  capacity factor k: every expert takes ``ceil(B k / E)`` = 8 of them), weights not renormalised;
- ``usmoe_<b>``: USMoE (α 0.5, the scaled-sigmoid expert score) grouped by position, the best
  ``round(b · k · B)`` pairs of each position's B tokens, b in ``--budgets`` (1.0: TC's expert
  evaluations; 0.86 and 0.7: 14 % and 30 % fewer).

Grouping by position keeps both causal (smoe.routing.pairs): a sequence grouping would let a
token's experts depend on later characters, and its bits per character would not be a language
model's. The reference's own scratch LM groups this way (specs/usmoe.md §5).

Metrics: validation bits per character over the whole validation text (clean, and with the
leaderboard's word-swap attack), and the expert evaluations per token (routed token-expert pairs
over tokens, mean over the MoE layers). The paper's expectations (§11): (i) USMoE(N = S k) ≥ TC
≥/≈ EC; (ii) USMoE at N ≈ 0.86 S k ≈ TC. Verdicts as in usmoe_study.py (paired per-seed
differences; a difference must exceed two standard errors; '≈' allows 0.01 bpc).

Each seed's JSON goes to ``benchmarks/results/usmoe_lm_study/`` (``--quick``: ``benchmarks/out/``);
a seed whose JSON exists with the same setup is reused. The table goes into
``benchmarks/RESULTS.md`` between the ``usmoe-lm-study`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import machine, write_block  # benchmarks/common.py
from router_zoo import charlm_config, mean_std  # benchmarks/router_zoo.py
from swap_study import claim_rows, stored_or_run, swap_router  # benchmarks/swap_study.py
from zoo_entries import Claim  # benchmarks/zoo_entries.py

from smoe.data.text import eval_windows, tiny_shakespeare, word_swap
from smoe.examples.charlm import build_model, run

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- usmoe-lm-study:begin -->", "<!-- usmoe-lm-study:end -->"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "usmoe_lm_study"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
METRICS = ("bpc", "bpc_attacked", "evals")


def tc_config(quick: bool):
    """The leaderboard's top-k char-LM, its top-2 weights not renormalised."""
    cfg = charlm_config("topk", quick)
    return dataclasses.replace(cfg, router_options={"renormalize": False})


def arms(budgets: list[float], k: int) -> dict[str, tuple[str, dict[str, Any], str]]:
    out = {
        "tc": ("topk", {}, "TC (as trained)"),
        "ec": (
            "expert_choice",
            {"capacity_factor": float(k), "group_size": "position"},
            "EC by position (capacity factor k)",
        ),
    }
    for b in budgets:
        out[f"usmoe_{b:.2f}"] = (
            "usmoe",
            {"budget": b * k, "group": "position"},
            f"USMoE by position, budget {b:.2f} k",
        )
    return out


def swap_routers(model: torch.nn.Module, name: str, **options: Any) -> None:
    """Every MoE layer's router becomes ``name`` reading the trained router's weight (aliased:
    the same tensor, no copy); the top-k router is kept to swap back."""
    for layer in model.moe_layers():
        swap_router(layer, name, **options)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, cfg) -> tuple[float, float]:
    """(bits per character over every full validation batch, routed token-expert pairs per
    token, mean over the MoE layers)."""
    model.eval()
    nats, chars, pairs = 0.0, 0, 0.0
    for x, y in eval_windows(data, cfg.batch_size, cfg.context):
        logits, auxes = model(x)
        nats += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        chars += y.numel()
        pairs += sum(float(a.tokens_per_expert.sum()) for a in auxes) / len(auxes)
    return nats / chars / math.log(2), pairs / chars


def run_seed(seed: int, args: argparse.Namespace, corpus, attacked) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = tc_config(args.quick)
    with tempfile.TemporaryDirectory() as tmp:  # run() saves the trained weights there
        run(cfg, seed, corpus=corpus, out_dir=tmp, progress=not args.quick)
        model = build_model(cfg, len(corpus.vocab))
        state = torch.load(Path(tmp) / f"charlm_topk_seed{seed}.pt", weights_only=True)
        model.load_state_dict(state)
    results = {}
    for arm, (router, options, _) in arms(args.budgets, cfg.k).items():
        swap_routers(model, router, **options)
        bpc, evals = evaluate(model, corpus.val, cfg)
        bpc_attacked, _ = evaluate(model, attacked, cfg)
        results[arm] = {"bpc": bpc, "bpc_attacked": bpc_attacked, "evals": evals}
    return {"seed": seed, "arms": results, "seconds": time.perf_counter() - t0}


CLAIMS = (
    ("usmoe_1.00", "tc", Claim("(i) USMoE (N = S k) beats TC training-free (MTEB: all six types)",
                               "bpc", "lower")),
    ("usmoe_1.00", "ec", Claim("(i) USMoE (N = S k) beats EC", "bpc", "lower")),
    ("tc", "ec", Claim("(i) TC ≥/≈ EC", "bpc", "same", 0.01)),
    ("usmoe_0.86", "tc", Claim("(ii) USMoE at 0.86 S k ≈ TC (14 % fewer expert evaluations)",
                               "bpc", "same", 0.01)),
    ("usmoe_1.00", "tc", Claim("... also on corrupted inputs (later versions; word-swap attack)",
                               "bpc_attacked", "lower")),
)  # fmt: skip


def render(runs: list[dict], args: argparse.Namespace, out: Path) -> str:
    cfg = tc_config(args.quick)
    table = {
        arm: {m: mean_std([r["arms"][arm][m] for r in runs]) for m in METRICS}
        for arm in arms(args.budgets, cfg.k)
    }
    m = runs[0]["machine"] if runs else machine()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    size = "quick (CI-sized, not a measurement)" if args.quick else "full"
    lines = [
        "## USMoE swapped into a trained token-choice char-LM, training-free "
        f"({datetime.date.today().isoformat()}, `usmoe_lm_study.py`, {size})",
        "",
        "Spec: specs/usmoe.md §6, §11, at the router lab's scale: the leaderboard's char-LM "
        f"(Tiny Shakespeare, {cfg.n_layers} MoE layers, d = {cfg.d_model}, E = {cfg.num_experts}, "
        f"k = {cfg.k}, {cfg.steps} steps) trained with top-k, its top-2 weights the softmax "
        "probabilities (not renormalised: OLMoE's norm_topk_prob=False); then every router "
        "swapped for one reading the same weights, nothing retrained. EC and USMoE group the "
        f"B = {cfg.batch_size} tokens at each position of a batch (causal; the reference's "
        "scratch LM groups this way). Bits per character over the whole validation text. Seeds "
        f"{sorted(r['seed'] for r in runs)}, mean ± std; written at commit `{m['commit']}` on "
        f"{m.get('cpu', '?')}. Runs: `{shown}`.",
        "",
        "| arm | val bpc | attacked val bpc | expert evaluations / token |",
        "|---|---|---|---|",
    ]
    for arm, (_, _, label) in arms(args.budgets, cfg.k).items():
        t = table[arm]
        lines.append(
            f"| {label} | {t['bpc'][0]:.3f} ± {t['bpc'][1]:.3f} | "
            f"{t['bpc_attacked'][0]:.3f} ± {t['bpc_attacked'][1]:.3f} | {t['evals'][0]:.3f} |"
        )
    lines += [
        "",
        "| claim (paper) | measured: arm − baseline (± 1 SE) | verdict |",
        "|---|---|---|",
    ]
    lines += claim_rows(runs, CLAIMS, table, lambda d, se: f"{d:+.3f} ± {se:.3f}", "bpc")
    lines += [
        "",
        "Verdict rule: a difference counts when it exceeds two standard errors of the per-seed "
        "differences (paired: each seed's arms share one trained model); otherwise inconclusive "
        "at this scale; '≈' claims allow 0.01 bpc. Not the paper's setting (OLMoE-1B-7B on "
        "MTEB: `benchmarks/usmoe_mteb.py`, which needs the weights on disk).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.86, 0.7])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="the tests' tiny char-LM, 20 steps")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    if any(not b > 0 for b in args.budgets):
        raise SystemExit(f"usmoe_lm_study: --budgets must be > 0, got {args.budgets}")
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = ROOT / "benchmarks" / "out"
    out = args.out or (scratch / "usmoe_lm_study_quick" if args.quick else DEFAULT_OUT)
    results = args.results or (
        scratch / "RESULTS_usmoe_lm_study_quick.md" if args.quick else DEFAULT_RESULTS
    )
    out.mkdir(parents=True, exist_ok=True)
    cfg = tc_config(args.quick)
    corpus = tiny_shakespeare(placeholder=cfg.attack_placeholder)
    attacked = corpus.vocab.encode(
        word_swap(corpus.val_text, cfg.attack_rate, cfg.attack_placeholder, cfg.attack_seed)
    )
    setup = {
        "arms": {a: [r, o] for a, (r, o, _) in arms(args.budgets, cfg.k).items()},
        "charlm": dataclasses.asdict(cfg),
    }
    runs = stored_or_run(
        args.seeds,
        out,
        setup,
        lambda seed: run_seed(seed, args, corpus, attacked),
        lambda rec: ", ".join(f"{a} {v['bpc']:.3f}" for a, v in rec["arms"].items()),
        "usmoe_lm_study",
    )
    block = render(runs, args, out)
    write_block(results, block, BEGIN, END)
    print(block)
    return {"runs": runs, "results": str(results)}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
