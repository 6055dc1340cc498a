"""Training-step speed of transformers MoE models with smoe as their experts implementation.

    python benchmarks/bench_transformers.py [--quick] [--device cpu|cuda] [--dtype fp32 bf16]
                                            [--threads N] [--out DIR]

Three random-config causal LMs (no hub downloads), sized so the MoE layers dominate a step:

- ``mixtral``: MixtralConfig, E = 8, k = 2, wide experts (d_ff = 4d);
- ``olmoe``: OlmoeConfig, fine-grained: E = 64, k = 8, narrow experts (d_ff = d/2);
- ``deepseek_v3``: DeepseekV3Config, E = 32, k = 4, d_ff = d/2, one shared expert,
  group-limited routing (4 groups, top 2), every layer MoE.

A step is forward, cross-entropy loss, backward and ``AdamW.step`` on one model instance, whose
experts implementation is switched with ``model.set_experts_implementation``: "eager",
"grouped_mm", "batched_mm" (skipped when its gathered per-token weights would exceed
``--batched-mm-gib``), "smoe", and "null" (see below). Every implementation runs on the same
weights: the learning rate is 0 (AdamW still does all its arithmetic), so the routing, and with it
the load of every expert, is identical for all of them; the first step's loss of each is compared
with grouped_mm's as a check that they compute the same model.

Timing: the implementations are interleaved in rounds in one process (the order rotates each
round), so drift in the machine's load hits all alike. In each round an implementation gets one
untimed step after the switch, then ``--steps`` timed steps (``common.measure``); its round time is
their median. ms/step and tokens/s are the median over rounds; "vs grouped_mm" is the median over
rounds of grouped_mm's round time / this implementation's round time in the same round (> 1 is
faster), with the range over rounds. Each timed step is also split into forward (with the loss),
backward and ``AdamW.step`` (medians over all timed steps; on CUDA the device is synchronised at
each boundary), which shows the part of a step no experts implementation moves.

Allocator: with glibc's defaults, a large temporary (AdamW's ``sqrt`` and ``div`` outputs, 8-16 MB
per expert weight) is page-faulted in afresh or not depending on the heap's state, which the
implementations that ran before leave behind: AdamW's time then moves by up to ~35 ms between
rounds of one process (measured at the OLMoE-like fp32 shape). ``--malloc tuned`` re-runs the
process with glibc keeping every freed block (``common.TUNED_MALLOC``), which takes that out.

Experts' share of step time: "null" is an experts forward of negligible cost
(``hidden_states * sum(top_k_weights)``: no expert GEMMs, the router stays in the graph). The
share of an implementation is ``(t - t_null) / t``: the marginal cost of its experts forward and
backward. Everything else (attention, router, shared experts, loss, the optimizer step over the
other weights) is in both terms.

Gradients between steps: ``--zero-grad none`` (default) drops them, as ``optimizer.zero_grad()``
does by default and so every step of a transformers ``Trainer``: each backward writes fresh
gradients, and the null row's expert weights get none, so AdamW skips them there and the experts'
share includes their optimizer update. ``--zero-grad zeros`` (``set_to_none=False``, the default
before 2026-12-06) keeps zeroed gradients: every backward adds into them (an ``add_`` over every
weight gradient, paid alike by every implementation) and AdamW updates every weight in every row.

Writes ``bench_transformers_<device>[_quick].md`` and ``.json`` under ``--out`` (default
``benchmarks/out/``, git-ignored). Never writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import TUNED_MALLOC, log, machine, maybe_reexec_tuned_malloc, measure
from transformers_report import render

import smoe.integrations.transformers  # noqa: F401  (registers "smoe")

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("eager", "grouped_mm", "batched_mm", "smoe")
NULL = "bench_null"  # registered below; the "null" row
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def null_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts forward of negligible cost: no expert GEMMs, the router stays in the graph."""
    return hidden_states * top_k_weights.sum(-1, keepdim=True).to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def sizes(quick: bool, device: str) -> dict:
    """Width d, tokens per step (batch x seq), vocabulary, layers, heads."""
    if quick:
        return dict(d=64, batch=2, seq=32, vocab=128, layers=2, heads=4)
    if device == "cuda":
        return dict(d=1024, batch=8, seq=1024, vocab=4096, layers=2, heads=8)
    return dict(d=256, batch=4, seq=256, vocab=512, layers=2, heads=4)


def configs(quick: bool, device: str) -> dict[str, tuple[str, dict]]:
    """name -> (transformers class prefix, config kwargs)."""
    s = sizes(quick, device)
    d = s["d"]
    common = dict(
        vocab_size=s["vocab"],
        hidden_size=d,
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=s["seq"],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    E_fine, k_fine = (16, 4) if quick else (64, 8)
    E_ds, k_ds = (8, 2) if quick else (32, 4)
    head = d // s["heads"]
    return {
        "mixtral": ("Mixtral", dict(common, intermediate_size=4 * d, num_local_experts=8,
                                    num_experts_per_tok=2)),
        "olmoe": ("Olmoe", dict(common, intermediate_size=d // 2, num_experts=E_fine,
                                num_experts_per_tok=k_fine)),
        "deepseek_v3": ("DeepseekV3", dict(
            common, intermediate_size=2 * d, moe_intermediate_size=d // 2, n_routed_experts=E_ds,
            num_experts_per_tok=k_ds, n_shared_experts=1, n_group=4, topk_group=2,
            first_k_dense_replace=0, q_lora_rank=d // 4, kv_lora_rank=d // 4,
            qk_rope_head_dim=head // 4, qk_nope_head_dim=head // 2, v_head_dim=head // 2)),
    }  # fmt: skip


def build(prefix: str, kw: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    import transformers

    cfg = getattr(transformers, f"{prefix}Config")(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg)
    return model.to(device=device, dtype=dtype).train()


def shape_of(model: torch.nn.Module) -> dict:
    """d, d_ff, E, k and shared experts of the model's first MoE block."""
    c = model.config
    E = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    return dict(
        d=c.hidden_size,
        d_ff=getattr(c, "moe_intermediate_size", None) or c.intermediate_size,
        E=E or c.n_routed_experts,
        k=c.num_experts_per_tok,
        shared=getattr(c, "n_shared_experts", 0) or 0,
        layers=c.num_hidden_layers,
        vocab=c.vocab_size,
    )


def batched_mm_bytes(shape: dict, tokens: int, dtype: torch.dtype) -> int:
    """The per-(token, choice) weight copies batched_mm gathers (gate_up and down), kept for the
    backward, plus their gradients of the same size, over all layers."""
    per_row = shape["d"] * 2 * shape["d_ff"] + shape["d_ff"] * shape["d"]
    S = tokens * shape["k"]
    return 2 * S * per_row * shape["layers"] * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def step_fn(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ids: torch.Tensor,
    zero: str,
    phases: list[tuple[float, float, float]] | None = None,
):
    """One training step; with ``phases``, each step appends its (forward, backward, optimizer)
    seconds (the device synchronised at each boundary)."""
    set_to_none = zero == "none"
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        if phases is not None:
            sync()
            phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return loss.detach()

    return step


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def bench_model(name: str, prefix: str, kw: dict, dtype_name: str, args) -> list[dict]:
    """Every implementation's row for one model and dtype, timed in interleaved rounds."""
    dtype, device = DTYPES[dtype_name], args.device
    model = build(prefix, kw, dtype, device)
    shape = shape_of(model)
    s = sizes(args.quick, device)
    tokens = s["batch"] * s["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    phases: list[tuple[float, float, float]] = []
    step = step_fn(model, opt, ids, args.zero_grad, phases)

    need = batched_mm_bytes(shape, tokens, dtype)
    skipped = {}
    if need > args.batched_mm_gib * 2**30:
        skipped["batched_mm"] = f"needs ~{need / 2**30:.1f} GiB > --batched-mm-gib"
    loss = {}
    for impl in [*IMPLS, NULL]:  # warm-up, and the first step's loss of each
        if impl in skipped:
            continue
        model.set_experts_implementation(impl)
        try:
            loss[impl] = float(step())
        except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype a CUDA kernel lacks, OOM
            skipped[impl] = "failed: " + (str(e).strip().splitlines() or ["?"])[0][:100]
            if device == "cuda":
                torch.cuda.empty_cache()
    if NULL in skipped:
        raise RuntimeError(f"{name} {dtype_name}: the null experts step {skipped[NULL]}")
    impls = [i for i in [*IMPLS, NULL] if i not in skipped]
    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {i: [] for i in impls}
    split: dict[str, list[tuple[float, float, float]]] = {i: [] for i in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            model.set_experts_implementation(impl)
            st = measure(
                step, min_run_time=0.0, min_samples=args.steps, max_samples=args.steps, block_s=0.0
            )
            times[impl].append(st.median)
            split[impl] += phases[-args.steps :]  # the timed steps (measure warms up once)
    load1 = os.getloadavg()[0]
    del model, opt

    rows = []
    base = times.get("grouped_mm")  # None when grouped_mm failed: no ratios then
    null = statistics.median(times[NULL])
    for impl in [*IMPLS, NULL]:
        row = dict(
            model=name,
            dtype=dtype_name,
            impl="null" if impl == NULL else impl,
            tokens=tokens,
            **shape,
            load_start=load0,
            load_end=load1,
        )
        if impl in skipped:
            rows.append(dict(row, skipped=skipped[impl]))
            continue
        t = statistics.median(times[impl])
        ratios = [b / x for b, x in zip(base, times[impl])] if base else [math.nan]
        own = impl != NULL  # the null experts compute another model: no share, no loss check
        rows.append(
            dict(
                row,
                skipped=None,
                round_s=times[impl],
                step_s=t,
                phase_s=[statistics.median(p[j] for p in split[impl]) for j in range(3)],
                tokens_per_s=tokens / t,
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                experts_share=(t - null) / t if own else None,
                loss=loss[impl],
                loss_rel_diff=rel(loss[impl], loss.get("grouped_mm", math.nan)) if own else None,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    p.add_argument("--models", nargs="+", default=None, help="a subset of the three models")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 1 step (a test)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="default 5 (2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3)")
    p.add_argument(
        "--batched-mm-gib",
        type=float,
        default=8.0,
        help="skip batched_mm when its gathered weights need more (default 8)",
    )
    p.add_argument(
        "--zero-grad",
        default="none",
        choices=("none", "zeros"),
        help="between steps: none (torch's default, what a Trainer does) or zeroed gradients",
    )
    p.add_argument(
        "--malloc",
        choices=("default", "tuned"),
        default="default",
        help="tuned: re-run with glibc keeping freed blocks (no temporaries page-faulted afresh)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    maybe_reexec_tuned_malloc(args.malloc)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 10 if args.device == "cuda" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NULL, null_experts_forward)
    meta = machine(args.device)
    meta["malloc"] = {"mode": args.malloc, "env": {k: os.environ.get(k) for k in TUNED_MALLOC}}
    cores = os.cpu_count() or 1
    meta["load_start"] = os.getloadavg()[0]
    meta["load_note"] = (
        f" (more than {cores} cores can serve with this run's threads: other processes ran, "
        "every time is noisy; the ratios come from interleaved rounds, so load hits every "
        "implementation alike)"
        if meta["load_start"] + meta["threads"] > cores and args.device == "cpu"
        else ""
    )
    meta["command"] = " ".join(["python benchmarks/bench_transformers.py", *argv])
    cfgs = configs(args.quick, args.device)
    rows = []
    for name in args.models or list(cfgs):
        prefix, kw = cfgs[name]
        for dtype_name in args.dtype:
            new = bench_model(name, prefix, kw, dtype_name, args)
            rows += new
            for r in new:
                if not r["skipped"]:
                    log(
                        f"{name} {dtype_name} {r['impl']:<10} {r['step_s'] * 1e3:8.1f} ms "
                        f"{r['ratio']:.2f}x grouped_mm, load {r['load_end']:.1f}"
                    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_transformers_{args.device}{'_quick' if args.quick else ''}"
    md = render(rows, meta, args)
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps({"rows": rows, "machine": meta}, indent=1))
    print(md)
    return {"rows": rows, "machine": meta}


if __name__ == "__main__":
    main()
