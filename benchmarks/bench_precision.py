"""Is smoe as accurate in fp16/bf16 as the same computation with torch's own ops?

    python benchmarks/bench_precision.py [--device cpu] [--quick]          # error-ratio table
    python benchmarks/bench_precision.py --train [--seeds 3] [--steps 300]  # bf16 training curves

Errors (STYLE.md §8, flash-attention's rule): for every numeric op, forward and backward, and for
``MoELayer`` (y, dx, router and expert weight gradients), in fp16 and bf16: max-abs error against
float64 on the same rounded inputs, of smoe and of the same computation written with torch's ops
in that precision (``tests/low_precision.py``), over several magnitudes and seeds. ``ratio`` is
smoe's error / max(torch's error, floor), the floor being ``eps(dtype) x max|float64 result|``;
the tests require ratio <= 3 (exactly: smoe <= 3 x torch + floor). ``round`` is the error of the
float64 result rounded to the dtype: the best any implementation can do.

Training: the QuickDraw MoE classifier of ``smoe.examples.quickdraw_moe`` (2 MoE layers, E=8,
k=2, batch 128, AdamW 2e-3) for ``--steps`` steps in fp32, in bf16 with smoe's ops and in bf16
with torch's ops (``use_torch_ops``), same seed, same initial weights, same batches. bf16 runs
compute forward and backward in bf16 and keep fp32 master weights for the optimizer (so the
difference is the compute precision, not bf16 weight updates). Curve distance: mean over steps of
|loss_bf16 - loss_fp32|, and the gap of the final loss (mean of the last 20 steps).

JSON goes to benchmarks/results/precision/, and benchmarks/results/reliability/precision.md is
rebuilt from every JSON there. The training comparison lives in precision_training.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402  (benchmarks/common.py)
from precision_training import plot_training, training, training_markdown  # noqa: E402

from smoe import MoELayer, ops  # noqa: E402
from tests.helpers import spaced_logits  # noqa: E402
from tests.low_precision import (  # noqa: E402
    in_scope,
    oracle_ops,
    rule,
    smoe_ops,
    torch_ops,
    use_ops,
    use_torch_ops,
)  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "precision"
MARKDOWN = ROOT / "benchmarks" / "results" / "reliability" / "precision.md"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SCALE = {"fp16": 1e2, "bf16": 1e4}


# ---------------------------------------------------------------------------------------------
# error table
# ---------------------------------------------------------------------------------------------
def op_cases(shape: dict, device: str):
    """name -> (fn(op_table, *inputs) -> outputs, float64 inputs builder(scale), output names,
    input names). Inputs are activations of magnitude ``scale`` (logits ~ scale too)."""
    T, E, k, d, f = shape["T"], shape["E"], shape["k"], shape["d"], shape["d_ff"]
    dev = dict(dtype=torch.float64, device=device)
    expert = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32).to(device)
    plan = ops.make_plan(expert, E)
    cap = ops.make_plan(expert, E, capacity=math.ceil(k * T / E))

    def logits(s):
        return [(spaced_logits(T, E) * (s / (0.3 * E))).to(device)]

    cases = {
        "topk_softmax": (
            lambda o, lg: (o["topk_softmax"](lg, k).weight,),
            logits,
            ["weight"],
            ["logits"],
        ),
        "expert_choice": (
            lambda o, lg: (o["expert_choice"](lg, T * k // E).weight,),
            lambda s: [(torch.randn(T, E, **dev) * min(s, 4.0))],
            ["weight"],
            ["logits"],
        ),
        "permute": (
            lambda o, x: (o["permute"](x, plan),),
            lambda s: [torch.randn(T, d, **dev) * s],
            ["x_sorted"],
            ["x"],
        ),
        "combine": (
            lambda o, y, w: (o["combine"](y, w, cap),),
            lambda s: [torch.randn(T * k, d, **dev) * s, torch.rand(T, k, **dev).softmax(-1)],
            ["y"],
            ["y_sorted", "weight"],
        ),
        "grouped_mm": (
            lambda o, x, w: (o["grouped_mm"](x, w.transpose(1, 2), plan.offsets),),
            lambda s: [torch.randn(T * k, d, **dev) * s, torch.randn(E, f, d, **dev) / d**0.5],
            ["out"],
            ["x", "w"],
        ),
        "swiglu": (
            lambda o, h: (o["swiglu"](h),),
            lambda s: [torch.randn(T * k, 2 * f, **dev).clamp(-4, 4) * s],
            ["out"],
            ["h"],
        ),
    }
    return cases


def numbers(got, low, want64) -> dict:
    """rule()'s numbers, the error of the rounded float64 result, whether the rule applies."""
    r = rule(got, low, want64)
    r["round"] = rule(want64.to(got.dtype), low, want64)["smoe_err"]
    r["in_scope"] = in_scope(low, want64)
    r["finite"] = bool(torch.isfinite(got).all())
    return r


def measure_op(fn, inputs64, dtype, out_names, in_names) -> dict[str, dict]:
    """rule() numbers per output ("fwd <name>") and per input gradient ("bwd d<name>")."""
    low = [t.to(dtype) for t in inputs64]
    runs = {}
    for key, table, args in [
        ("smoe", smoe_ops, low),
        ("torch", torch_ops, low),
        ("float64", oracle_ops, [t.double() for t in low]),
    ]:
        args = [a.detach().requires_grad_() for a in args]
        runs[key] = (args, fn(table, *args))
    rows = {}
    for i, name in enumerate(out_names):
        s, t, w = (runs[key][1][i] for key in ("smoe", "torch", "float64"))
        rows[f"fwd {name}"] = numbers(s, t, w)
    cot = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in runs["smoe"][1]]
    grads = {}
    for key, (args, outs) in runs.items():
        c = [x.to(outs[0].dtype) if key != "float64" else x.to(dtype).double() for x in cot]
        grads[key] = torch.autograd.grad(outs, args, c)
    for i, name in enumerate(in_names):
        s, t, w = (grads[key][i] for key in ("smoe", "torch", "float64"))
        rows[f"bwd d{name}"] = numbers(s, t, w)
    return rows


def margined_tokens(T, d, gate, k, scale, dtype):
    """Tokens whose router logits have relative top-(k+1) gaps >= 1e-3 (choices held fixed)."""
    x = torch.empty(T, d, dtype=torch.float64)
    todo = torch.ones(T, dtype=torch.bool)
    while todo.any():
        x[todo] = (torch.randn(int(todo.sum()), d, dtype=torch.float64) * scale).to(dtype).double()
        s = (x @ gate.double().T).sort(dim=-1, descending=True).values[:, : k + 1]
        todo = (s[:, :-1] - s[:, 1:]).min(dim=-1).values < 1e-3 * s.abs().max(dim=-1).values
    return x


def measure_layer(shape, activation, scale, dtype, device) -> dict[str, dict]:
    T, E, k, d, f = shape["T"], shape["E"], shape["k"], shape["d"], shape["d_ff"]
    low = MoELayer(d, f, E, k, activation=activation).to(device=device, dtype=dtype)
    f64 = copy.deepcopy(low).double()
    x = margined_tokens(T, d, low.router.weight.cpu(), k, scale, dtype).to(device)
    cot = torch.randn(T, d, dtype=torch.float64, device=device).to(dtype)

    def run(layer, inp, c):
        inp = inp.detach().requires_grad_()
        y, _ = layer(inp)
        params = [layer.router.weight, layer.experts.w_in, layer.experts.w_out]
        return (y, *torch.autograd.grad(y, [inp, *params], c))

    got = run(low, x.to(dtype), cot)
    with use_torch_ops():
        base = run(low, x.to(dtype), cot)
    with use_ops(oracle_ops):
        want = run(f64, x, cot.double())
    names = ["fwd y", "bwd dx", "bwd d router.weight", "bwd d w_in", "bwd d w_out"]
    return {n: numbers(g, b, w) for n, g, b, w in zip(names, got, base, want)}


def error_table(device: str, quick: bool) -> dict:
    shape = dict(T=64, E=4, k=2, d=32, d_ff=48) if quick else dict(T=512, E=8, k=2, d=128, d_ff=256)
    seeds = 2 if quick else 5
    rows = []
    for dname, dtype in DTYPES.items():
        scales = [1e-2, 1.0, MAX_SCALE[dname]]
        entries: dict[tuple[str, str], list[dict]] = {}
        for seed in range(seeds):
            torch.manual_seed(seed)
            for op, (fn, build, outs, ins) in op_cases(shape, device).items():
                for s in scales:
                    for out, r in measure_op(fn, build(s), dtype, outs, ins).items():
                        entries.setdefault((op, out), []).append({**r, "scale": s})
            for activation in ("gelu", "swiglu"):
                for s in scales:
                    for out, r in measure_layer(shape, activation, s, dtype, device).items():
                        entries.setdefault((f"MoELayer {activation}", out), []).append(
                            {**r, "scale": s}
                        )
        for (op, out), every in entries.items():
            rs = [r for r in every if r["in_scope"]]
            if not rs:
                continue
            worst = max(rs, key=lambda r: r["ratio"])
            rows.append(
                dict(
                    op=op,
                    dtype=dname,
                    output=out,
                    smoe_err=max(r["smoe_err"] for r in rs),
                    torch_err=max(r["torch_err"] for r in rs),
                    round_err=max(r["round"] for r in rs),
                    worst_ratio=worst["ratio"],
                    worst_ratio_scale=worst["scale"],
                    median_ratio=statistics.median(r["ratio"] for r in rs),
                    cases=len(rs),
                    out_of_scope=len(every) - len(rs),
                    out_of_scope_nonfinite=sum(not r["finite"] for r in every if not r["in_scope"]),
                )
            )
    return dict(shape=shape, seeds=seeds, rows=rows)


def error_markdown(res: dict) -> str:
    sh = res["shape"]
    lines = [
        f"Shape T={sh['T']}, E={sh['E']}, k={sh['k']}, d={sh['d']}, d_ff={sh['d_ff']}; "
        f"{res['seeds']} seeds x activation scales 1e-2, 1, max (1e2 fp16, 1e4 bf16). "
        "Errors are max-abs against float64 on the same rounded inputs, maxima over all cases; "
        "ratio = smoe error / max(torch-ops error, eps(dtype) x max|result|) per case (worst and "
        "median over cases); `round` = error of the float64 result rounded to the dtype; "
        "`out of scope` = cases left out because the float64 result exceeds the dtype's max "
        "or torch's own result is inf/NaN (the computation overflows in that precision: no "
        "torch-ops error to compare with), in brackets those where smoe's result was inf/NaN "
        "too.",
        "",
        "| op | dtype | output | smoe err | torch-ops err | round | worst ratio (scale) "
        "| median ratio | out of scope |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['output']} | {r['smoe_err']:.3g} | "
            f"{r['torch_err']:.3g} | {r['round_err']:.3g} | {r['worst_ratio']:.2f} "
            f"({r['worst_ratio_scale']:g}) | {r['median_ratio']:.2f} | "
            f"{r['out_of_scope']}/{r['cases'] + r['out_of_scope']} "
            f"({r['out_of_scope_nonfinite']}) |"
        )
    worst = max(res["rows"], key=lambda r: r["worst_ratio"])
    lines += [
        "",
        f"Worst ratio overall: {worst['worst_ratio']:.2f} ({worst['op']}, {worst['dtype']}, "
        f"{worst['output']}); the bound is 3.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
NOTES_MARK = "<!-- notes: kept when the tables above are regenerated -->"


def write_markdown() -> None:
    """Rebuild the tables from every JSON in RESULTS; hand-written notes after NOTES_MARK stay."""
    notes = ""
    if MARKDOWN.exists() and NOTES_MARK in MARKDOWN.read_text():
        notes = MARKDOWN.read_text().split(NOTES_MARK, 1)[1]
    parts = ["# Low-precision numerics (fp16 / bf16)", ""]
    for path in sorted(RESULTS.glob("*.json")):
        res = json.loads(path.read_text())
        m = res["machine"]
        title = "Error ratios" if res["kind"] == "errors" else "bf16 training vs fp32"
        body = error_markdown(res) if res["kind"] == "errors" else training_markdown(res)
        parts += [
            f"## {title} ({res['device']})",
            "",
            f"{res['date']}; {m.get('gpu') or m['cpu']}, {m.get('threads')} threads, torch "
            f"{m.get('torch')}, commit {m.get('commit')}. Command: `{res['command']}`",
            "",
            body,
            "",
        ]
    parts.append(NOTES_MARK + notes)
    MARKDOWN.parent.mkdir(parents=True, exist_ok=True)
    MARKDOWN.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CI-sized: small shapes, 2 seeds")
    p.add_argument("--train", action="store_true", help="the bf16 training comparison instead")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_precision.py", *given])
    meta = dict(date=str(date.today()), device=args.device, command=command.strip())
    meta["machine"] = machine(args.device)
    if args.train:
        steps = 30 if args.quick else args.steps
        seeds = 1 if args.quick else args.seeds
        res = {"kind": "training", **meta, **training(args.device, seeds, steps)}
        print(training_markdown(res))
    else:
        res = {"kind": "errors", **meta, **error_table(args.device, args.quick)}
        print(error_markdown(res))
    if args.no_write or args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{res['kind']}_{args.device}.json").write_text(json.dumps(res, indent=1))
    if args.train:
        plot_training(res)
    write_markdown()


if __name__ == "__main__":
    main()
