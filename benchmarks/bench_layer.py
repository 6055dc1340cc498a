"""MoELayer against what a user would otherwise run, and against this machine's limit.

    python benchmarks/bench_layer.py [--quick] [--dtype fp32 bf16] [--malloc tuned] [--json F]

Peers, with the same weights, in one process: transformers' own ``MixtralSparseMoeBlock`` with
``experts_implementation`` "eager" and "grouped_mm"; the limit: dense ``torch.mm`` GEMMs with the
same FLOPs as the layer's expert GEMMs, same dtype. Reports tokens/s, efficiency = dense time /
layer time, the ratio to each peer, and the time share of route / plan / permute / experts /
combine (each stage timed alone, forward or forward+backward).

``--malloc tuned`` re-runs the process with glibc's mmap threshold raised, so that tensors over
32 MB are recycled from the heap instead of being mmap'ed and page-faulted afresh on every call
(the allocator tuning PyTorch's CPU performance guide recommends, via jemalloc/tcmalloc there).
Every contender runs in the same process, so both settings compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

import torch
from common import TUNED_MALLOC, machine, maybe_reexec_tuned_malloc, measure, measure_many
from layer_metrics import dense_limit, fresh_grads, stage_times
from torch import nn

from smoe import MoELayer

SHAPES = {
    "mixtral-like": dict(T=4096, d=512, d_ff=1792, E=8, k=2),
    "fine-grained": dict(T=4096, d=256, d_ff=128, E=64, k=8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"mixtral-like": 0.90, "fine-grained": 0.80}
OVERHEAD_TARGET = 0.10


def make_layers(shape: dict, dtype: torch.dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    ours = MoELayer(shape["d"], shape["d_ff"], shape["E"], shape["k"], activation="swiglu").to(
        dtype
    )
    peers = {}
    for impl in ("eager", "grouped_mm"):
        cfg = MixtralConfig(
            hidden_size=shape["d"],
            intermediate_size=shape["d_ff"],
            num_local_experts=shape["E"],
            num_experts_per_tok=shape["k"],
            experts_implementation=impl,
            hidden_act="silu",
        )
        block = MixtralSparseMoeBlock(cfg).to(dtype)
        with torch.no_grad():  # the same weights everywhere; both store experts as [E, out, in]
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.w_in)
            block.experts.down_proj.copy_(ours.experts.w_out)
        peers[f"transformers-{impl}"] = block
    return ours, peers


def run_layer(layer, x, backward: bool, params: nn.Module | None = None, fresh: bool = True):
    """One call of ``layer(x)``: under ``no_grad``, or a forward+backward that starts, as a
    training step after ``optimizer.zero_grad()`` does, from no gradients (x's, and those of the
    parameters of ``layer`` when it is a module, or of ``params`` for a function). ``fresh=False``:
    the caller has dropped them (:func:`probe_step`)."""
    owner = layer if isinstance(layer, nn.Module) else params
    drop_grads = fresh_grads(owner, x) if fresh else (lambda: None)

    def fwd():
        with torch.no_grad():
            out = layer(x)
        return out

    def fwd_bwd():
        drop_grads()
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(torch.ones_like(y))

    return fwd_bwd if backward else fwd


def probe_step(layer, x, backward: bool, params: nn.Module | None = None):
    """:func:`run_layer` for a memory probe: a training step's gradients are dropped now, before
    the probe's window opens, as ``zero_grad()`` runs before a step, and the step holds its new
    ones to the end. Dropped inside the window, the last step's gradients would be credited to the
    step as freed (measured: torch's CPU profiler did so for the baselines' gradients, and a
    baseline of allocated bytes, as CUDA's, does so for all)."""
    if backward:
        fresh_grads(layer if isinstance(layer, nn.Module) else params, x)()
    return run_layer(layer, x, backward, params, fresh=False)


@dataclass
class Row:
    shape: str
    dtype: str
    mode: str
    smoe_s: float
    smoe_iqr_s: float
    dense_s: float
    peers_s: dict
    tokens_per_s: float
    efficiency: float
    target: float
    met: bool
    overhead_share: float
    shares: dict


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small shapes, short timing (CI-sized)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--json", default="benchmarks/out/bench_layer.json")
    p.add_argument("--malloc", choices=["default", "tuned"], default="default")
    args = p.parse_args()
    maybe_reexec_tuned_malloc(args.malloc, TUNED_MALLOC)
    min_run_time = args.min_run_time or (0.05 if args.quick else 2.0)

    # blocks of >= min_run_time / 1000, as Timer.blocked_autorange sizes them
    block_s = max(2e-3, min_run_time / 1000)
    timing = dict(min_run_time=min_run_time, block_s=block_s, max_samples=1000)

    def clock(fn):
        return measure(fn, **timing)

    torch.manual_seed(0)
    rows = []
    for shape_name in args.shape:
        shape = dict(SHAPES[shape_name])
        if args.quick:
            shape["T"] = 256
        for dname in args.dtype:
            dtype = DTYPES[dname]
            ours, peers = make_layers(shape, dtype)
            x = torch.randn(1, shape["T"], shape["d"], dtype=dtype)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                xin = x.clone().requires_grad_(backward)
                # smoe and its peers interleaved, so that a drift of the machine touches all alike
                contenders = {"smoe": ours, **peers}
                runs = {n: run_layer(m, xin, backward) for n, m in contenders.items()}
                timed = measure_many(runs, **timing)
                for res in timed.values():
                    if isinstance(res, RuntimeError):
                        raise res
                ours_t = timed.pop("smoe")
                t, iqr = ours_t.median, ours_t.iqr
                peer_t = {n: s.median for n, s in timed.items()}
                N, d, f = shape["T"] * shape["k"], shape["d"], shape["d_ff"]
                dense = clock(dense_limit(N, d, 2 * f, f, dtype, backward)).median
                shares = stage_times(ours, x, backward, clock=clock)
                total = sum(shares.values())
                shares = {k: v / total for k, v in shares.items()}
                eff = dense / t
                rows.append(
                    Row(
                        shape_name,
                        dname,
                        mode,
                        t,
                        iqr,
                        dense,
                        peer_t,
                        shape["T"] / t,
                        eff,
                        TARGETS[shape_name],
                        eff >= TARGETS[shape_name],
                        1.0 - shares["experts"],
                        shares,
                    )
                )
                print_row(rows[-1], header=len(rows) == 1)
    info = machine()
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        env = TUNED_MALLOC if args.malloc == "tuned" else {}
        meta = {"machine": info, "quick": args.quick, "malloc": args.malloc, "env": env}
        json.dump({**meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"\nmachine: {info}\nmalloc: {args.malloc} {env}\njson: {args.json}")


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def print_row(r: Row, header: bool) -> None:
    if header:
        print(
            "| shape | dtype | mode | smoe ms | tokens/s | efficiency (target) | vs eager "
            "| vs grouped_mm "
            "| route/plan/permute/experts/combine % | overhead ≤10% |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    shares = "/".join(
        f"{100 * r.shares[k]:.1f}" for k in ("route", "plan", "permute", "experts", "combine")
    )
    vs = {n: r.peers_s[n] / r.smoe_s for n in r.peers_s}
    print(
        f"| {r.shape} | {r.dtype} | {r.mode} | {1e3 * r.smoe_s:.1f} ± {1e3 * r.smoe_iqr_s:.1f} | "
        f"{r.tokens_per_s:,.0f} | {r.efficiency:.2f} ({r.target:.2f} {met(r.met)}) | "
        f"{vs['transformers-eager']:.2f}x | {vs['transformers-grouped_mm']:.2f}x | {shares} | "
        f"{100 * r.overhead_share:.1f}% {met(r.overhead_share <= OVERHEAD_TARGET)} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
