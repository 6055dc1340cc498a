"""USMoE swapped into a trained token-choice model without training (issue 27; specs/usmoe.md
§6, §11), on the QuickDraw V-MoE ViT, the router lab's non-causal task.

    python benchmarks/usmoe_study.py [--seeds 0 1 2] [--budgets 1.0 0.86 0.7] [--threads 1]
        [--quick]

Per seed, the leaderboard's token-choice ViT (``router_zoo.py``'s: ``quickdraw_vit(9)``, "Every
2", E = 8, k = 2, routing groups of 8 images, fresh experts, 2 epochs, no noise in training) is
trained once with the top-k router (TC), its weights the softmax probabilities of the top-2
(not renormalised: OLMoE's ``norm_topk_prob=False``, as in the paper's models; with
``--tc-renormalize`` they sum to 1, the library's default, and the results go to their own
folder and RESULTS.md section). Then, with every weight unchanged, each MoE layer's
router is replaced by one that reads the same router weight W [E, d]:

- ``tc``: the trained model as it is (softmax top-2, renormalised);
- ``ec``: expert choice per image (:class:`smoe.ExpertChoiceRouter`, capacity factor k: each
  expert takes its ``ceil(N k / E)`` best tokens of the image by the softmax over experts, N = 50
  tokens with the class token: 13, where the spec's ``round`` gives 12), weights not
  renormalised;
- ``usmoe_<b>``: USMoE (α 0.5, the scaled-sigmoid expert score, joint top-N per image) with the
  budget ``b · k`` pairs per token on average, b in ``--budgets`` (1.0: the same expert
  evaluations as TC; 0.86 and 0.7: 14 % and 30 % fewer).

Metrics: test accuracy, clean and with Gaussian pixel noise (std 0.5, the leaderboard's), and the
expert evaluations per token (routed token-expert pairs the experts computed, over tokens, mean
over the MoE layers). The paper's expectations (§11): (i) USMoE(N = S k) ≥ TC ≥/≈ EC; (ii) USMoE
at N ≈ 0.86 S k ≈ TC. Verdicts use ``router_zoo.verdict`` on the per-seed differences (paired:
a seed's arms share one trained model; a difference must exceed two standard errors of them).
The from-scratch comparison (TC vs EC vs USMoE trained with their own routers) is the
leaderboard's ViT columns.

Each seed's JSON goes to ``benchmarks/results/usmoe_study/`` (``--quick``: ``benchmarks/out/``);
a seed whose JSON exists with the same setup is reused. The table goes into
``benchmarks/RESULTS.md`` between the ``usmoe-study`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, write_block  # benchmarks/common.py
from router_zoo import mean_std, vit_data  # benchmarks/router_zoo.py
from swap_study import claim_rows, stored_or_run, swap_router  # benchmarks/swap_study.py
from vmoe_capacity import train as vit_train  # benchmarks/vmoe_capacity.py
from zoo_entries import Claim  # benchmarks/zoo_entries.py

from smoe.models import moe_auxes, moe_blocks, quickdraw_vit, vmoe_vit

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- usmoe-study:begin -->", "<!-- usmoe-study:end -->"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "usmoe_study"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
E, K, NOISE_STD = 8, 2, 0.5
METRICS = ("acc", "acc_noisy", "evals")


def trained_tc(seed: int, quick: bool, data, renormalize: bool = False) -> torch.nn.Module:
    """The leaderboard's top-k ViT, trained (router_zoo.run_vit's setup), its top-k weights
    renormalised or not."""
    (x, y), _ = data
    torch.manual_seed(seed)
    model = vmoe_vit(
        quickdraw_vit(9),
        num_experts=E,
        k=K,
        every=2,
        group_images=8,
        upcycle=False,
        router="topk",
        renormalize=renormalize,
    )
    epochs = 1 if quick else 2
    vit_train("topk", model, x, y, epochs=epochs, batch_size=128, lr=2e-3, seed=seed,
              progress=not quick)  # fmt: skip
    return model.eval()


def swap_routers(model: torch.nn.Module, name: str, **options: Any) -> None:
    """Every MoE layer's router becomes ``name`` reading the trained router's weight (aliased:
    the same tensor, no copy); the top-k router is kept to swap back."""
    for mlp in moe_blocks(model).values():
        if options.get("group_size") == "image":  # expert choice within each image
            options = {**options, "group_size": mlp.tokens_per_image}
        swap_router(mlp.moe, name, **options)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images, labels, batch_size: int = 400) -> tuple[float, float]:
    """(accuracy, routed token-expert pairs per token, mean over the MoE layers)."""
    correct, pairs, tokens = 0, 0.0, 0
    for i in range(0, len(images), batch_size):
        out = model(images[i : i + batch_size])
        correct += int((out.argmax(-1) == labels[i : i + batch_size]).sum())
        auxes = list(moe_auxes(model).values())
        n_tok = out.shape[0] * next(iter(moe_blocks(model).values())).tokens_per_image
        pairs += sum(float(a.tokens_per_expert.sum()) for a in auxes) / len(auxes)
        tokens += n_tok
    return correct / len(images), pairs / tokens


def arms(budgets: list[float]) -> dict[str, tuple[str, dict[str, Any], str]]:
    out = {
        "tc": ("topk", {}, "TC (as trained)"),
        "ec": (
            "expert_choice",
            {"capacity_factor": float(K), "group_size": "image"},
            "EC per image (capacity factor k)",
        ),
    }
    for b in budgets:
        out[f"usmoe_{b:.2f}"] = (
            "usmoe",
            {"budget": b * K, "group": "sequence"},
            f"USMoE, budget {b:.2f} k",
        )
    return out


def run_seed(seed: int, args: argparse.Namespace, data) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = trained_tc(seed, args.quick, data, args.tc_renormalize)
    _, (tx, ty) = data
    g = torch.Generator().manual_seed(1234)  # the leaderboard's noise
    noisy = tx + NOISE_STD * torch.randn(tx.shape, generator=g)
    results = {}
    for arm, (router, options, _) in arms(args.budgets).items():
        swap_routers(model, router, **options)
        acc, evals = evaluate(model, tx, ty)
        acc_noisy, _ = evaluate(model, noisy, ty)
        results[arm] = {"acc": acc, "acc_noisy": acc_noisy, "evals": evals}
    return {"seed": seed, "arms": results, "seconds": time.perf_counter() - t0}


CLAIMS = (
    ("usmoe_1.00", "tc", Claim("(i) USMoE (N = S k) beats TC training-free (MTEB: all six types)",
                               "acc", "higher")),
    ("usmoe_1.00", "ec", Claim("(i) USMoE (N = S k) beats EC", "acc", "higher")),
    ("tc", "ec", Claim("(i) TC ≥/≈ EC", "acc", "same", 0.01)),
    ("usmoe_0.86", "tc", Claim("(ii) USMoE at 0.86 S k ≈ TC (14 % fewer expert evaluations)",
                               "acc", "same", 0.01)),
    ("usmoe_1.00", "tc", Claim("... also under pixel noise (later versions)", "acc_noisy",
                               "higher")),
)  # fmt: skip


def render(runs: list[dict], args: argparse.Namespace, out: Path) -> str:
    table = {
        arm: {m: mean_std([r["arms"][arm][m] for r in runs]) for m in METRICS}
        for arm in arms(args.budgets)
    }
    m = runs[0]["machine"] if runs else machine()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    size = "quick (CI-sized, not a measurement)" if args.quick else "full"
    title = " (TC weights renormalised)" if args.tc_renormalize else ""
    weights = (
        "its top-2 weights renormalised to sum 1 (the library's default; every swapped router's "
        "weights are not, so the routed output shrinks)"
        if args.tc_renormalize
        else "its top-2 weights the softmax probabilities, not renormalised (OLMoE's "
        "norm_topk_prob=False, the paper's models; the swapped routers' weights likewise)"
    )
    lines = [
        f"## USMoE swapped into a trained token-choice ViT, training-free{title} "
        f"({datetime.date.today().isoformat()}, `usmoe_study.py`, {size})",
        "",
        "Spec: specs/usmoe.md §6, §11, at the router lab's scale: the leaderboard's QuickDraw "
        f"V-MoE ViT (E = {E}, k = {K}, {1 if args.quick else 2} epochs) trained with top-k, "
        f"{weights}; then every router swapped "
        "for one reading the same weights, nothing retrained. Images stand in for MTEB sentences "
        "(USMoE's joint selection per image). Seeds "
        f"{sorted(r['seed'] for r in runs)}, mean ± std; written at commit `{m['commit']}` on "
        f"{m.get('cpu', '?')}. Runs: `{shown}`.",
        "",
        "| arm | test acc. (%) | noisy test acc. (%) | expert evaluations / token |",
        "|---|---|---|---|",
    ]
    for arm, (_, _, label) in arms(args.budgets).items():
        t = table[arm]
        lines.append(
            f"| {label} | {100 * t['acc'][0]:.1f} ± {100 * t['acc'][1]:.1f} | "
            f"{100 * t['acc_noisy'][0]:.1f} ± {100 * t['acc_noisy'][1]:.1f} | "
            f"{t['evals'][0]:.3f} |"
        )
    lines += ["", "| claim (paper) | measured: arm − baseline (± 1 SE) | verdict |"]
    lines.append("|---|---|---|")
    lines += claim_rows(
        runs, CLAIMS, table, lambda d, se: f"{100 * d:+.1f} ± {100 * se:.1f}", "points"
    )
    lines += [
        "",
        "Verdict rule: a difference counts when it exceeds two standard errors of the per-seed "
        "differences (paired: each seed's arms share one trained model); otherwise inconclusive "
        "at this scale; '≈' claims allow 1 point. Not the paper's setting (OLMoE-1B-7B on MTEB: "
        "`benchmarks/usmoe_mteb.py`, which needs the weights on disk).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.86, 0.7])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="256 training images, 1 epoch (a test)")
    p.add_argument(
        "--tc-renormalize",
        action="store_true",
        help="train TC with its top-k weights renormalised (default: not, as OLMoE)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    if any(not b > 0 for b in args.budgets):
        raise SystemExit(f"usmoe_study: --budgets must be > 0, got {args.budgets}")
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = ROOT / "benchmarks" / "out"
    variant = "_renorm" if args.tc_renormalize else ""
    out = args.out or (
        scratch / f"usmoe_study{variant}_quick"
        if args.quick
        else DEFAULT_OUT.with_name(DEFAULT_OUT.name + variant)
    )
    results = args.results or (
        scratch / "RESULTS_usmoe_study_quick.md" if args.quick else DEFAULT_RESULTS
    )
    out.mkdir(parents=True, exist_ok=True)
    data = vit_data(args.quick)
    cfg = {
        "arms": {a: [r, o] for a, (r, o, _) in arms(args.budgets).items()},
        "quick": args.quick,
        "E": E,
        "k": K,
        "noise_std": NOISE_STD,
        "tc_renormalize": args.tc_renormalize,
    }
    runs = stored_or_run(
        args.seeds,
        out,
        cfg,
        lambda seed: run_seed(seed, args, data),
        lambda rec: ", ".join(f"{a} {100 * v['acc']:.1f}%" for a, v in rec["arms"].items()),
        "usmoe_study",
    )
    block = render(runs, args, out)
    tag = "-renorm" if args.tc_renormalize else ""
    write_block(
        results, block, BEGIN.replace("study", "study" + tag), END.replace("study", "study" + tag)
    )
    print(block)
    return {"runs": runs, "results": str(results)}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
