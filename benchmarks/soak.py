"""Soak run: many training steps of a small MoE stack, watching for leaks, NaNs and recompiles.

    python benchmarks/soak.py --steps 20000 --device cpu|cuda

Every step is a forward, backward and AdamW step of a residual stack of ``smoe.MoELayer`` (2
layers, d = 32, E = 8). The step rotates through the router variants (every router in
``smoe.routing.available_routers()`` with its defaults, plus top-k with a capacity, Switch at
k = 1, V-MoE with Batch Prioritized Routing, grouped expert choice and USMoE in groups of 16 with a
fractional budget), the token count T (0 and 1 included) and the load (balanced, skewed: half the
tokens pushed towards expert 0, degenerate: every token the same, so all go to the same
experts). Every ``--compile-every``-th step runs the same stack under
``torch.compile(dynamic=True)`` instead; every ``--parity-every``-th step compares a float64 copy
of one stack, layer by layer, with ``smoe.reference``.

After each step it samples memory (RSS from /proc/self/status on CPU, or
``torch.cuda.memory_allocated`` on CUDA), open file descriptors, threads and dynamo's compile
count. Pass criteria (the script exits 1 and says which failed):
- memory: median of the last quarter of the steps <= median of the second quarter (the first is
  warm-up) + max(1 % of it, 8 MB). Only growth past both bounds fails;
- no non-finite loss or gradient;
- every parity check passes;
- open fds and threads: the last quarter's maximum <= the second quarter's;
- compiles: none in the second half (the compiled schedule meets every router x shape within
  the warm-up quarter, so any later compile is a recompile that grows with steps).

Writes a JSON of downsampled per-step samples (``--json``, default
``benchmarks/results/soak/soak_<device>_<steps>.json``) and a plot (``--plot``, default
``benchmarks/plots/soak_<device>.png``). The workload (variants, stack, batches, parity) is
soak_workload.py, the probes and pass criteria soak_checks.py, the JSON and plot soak_report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
from soak_checks import (  # benchmarks/soak_checks.py: probes and pass criteria
    MB,
    check_memory,
    check_no_growth,
    compile_count,
    probe,
    quarters,
)
from soak_report import plot, write_json  # benchmarks/soak_report.py: JSON and plot
from soak_workload import (  # benchmarks/soak_workload.py: variants, stack, batches, parity
    LOADS,
    SHAPES,
    SoakConfig,
    Spec,
    Stack,
    make_batch,
    parity_check,
    router_specs,
)
from torch import Tensor, nn

from smoe import RoutingContext
from smoe.routing import router_info

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _combo(i: int, n_specs: int) -> tuple[int, int, int]:
    """Step i's (spec, shape, load) indices: spec fastest, then shape, then load."""
    return i % n_specs, (i // n_specs) % len(SHAPES), (i // (n_specs * len(SHAPES))) % len(LOADS)


@dataclass
class SoakResult:
    config: dict
    summary: dict
    samples: dict[str, Sequence[float]] = field(repr=False)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _build(cfg: SoakConfig) -> tuple[list[Spec], nn.ModuleList, dict[str, str]]:
    """One stack per router variant that builds with its defaults (the others: label -> why)."""
    specs, stacks, skipped = [], nn.ModuleList(), {}
    for spec in router_specs():
        try:
            stacks.append(Stack(spec, cfg))
            specs.append(spec)
        except (TypeError, ValueError) as e:  # a router that needs options we cannot guess
            skipped[spec.label] = str(e)
    return specs, stacks.to(cfg.device), skipped


def _check_parity(state: dict, spec: Spec, stack: Stack, x: Tensor, ctx: RoutingContext) -> None:
    state["checks"] += 1
    try:
        worst = parity_check(stack, x, ctx)
    except AssertionError as e:
        state["failures"].append(f"{spec.label} T={x.shape[0] * x.shape[1]}: {e}")
        return
    if worst is None:
        state["not_covered"].add(spec.label)
    else:
        state["covered"].add(spec.label)
        state["worst"] = max(state["worst"], worst)


def run_soak(cfg: SoakConfig) -> SoakResult:
    """Run the soak; returns every per-step sample, the summary and the failed criteria.

    Raises:
        ValueError: ``compile_every`` too large for the compiled schedule to meet every router x
            shape within the warm-up quarter of ``steps``.
    """
    threads = torch.get_num_threads()
    # One code object (Stack.forward) serves every compiled router and shape.
    with torch._dynamo.config.patch(recompile_limit=64):
        try:
            torch.set_num_threads(cfg.threads or threads)
            return _run(cfg)
        finally:
            torch.set_num_threads(threads)


def _run(cfg: SoakConfig) -> SoakResult:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    specs, stacks, skipped = _build(cfg)
    opt = torch.optim.AdamW(stacks.parameters(), lr=cfg.lr)
    target = torch.randn(cfg.d_model, cfg.d_model, generator=g).to(cfg.device) / cfg.d_model**0.5
    cspecs = [i for i, s in enumerate(specs) if s.label in (cfg.compile_labels or [s.label])]
    if cfg.compile_every:
        combos = len(cspecs) * len(SHAPES)
        if combos * cfg.compile_every > cfg.steps // 4:
            raise ValueError(
                f"run_soak: compile_every={cfg.compile_every} x {combos} compiled router x shape "
                f"combinations do not fit in the warm-up quarter of steps={cfg.steps}"
            )
    compiled: dict[int, Any] = {}
    keys = ("step", "mem", "rss", "reserved", "fds", "threads", "compiles", "loss")
    # Preallocated, so that the samples themselves do not grow the RSS they measure.
    samples: dict[str, Sequence[float]] = {k: array("d", bytes(8 * cfg.steps)) for k in keys}
    parity = dict(checks=0, worst=0.0, failures=[], covered=set(), not_covered=set())
    stats = dict(nonfinite=[], compiled_steps=0, compile_s=0.0)
    top_share = {load: [0.0, 0] for load in LOADS}  # sum and count of layer 0's top share
    start_compiles = compile_count()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"soak {cfg.device}", disable=not cfg.progress, mininterval=1)
    for step in bar:
        si, hi, li = _combo(step, len(specs))
        use_compiled = cfg.compile_every and step % cfg.compile_every == cfg.compile_every - 1
        if use_compiled:  # the compiled variant walks its own (spec, shape, load) schedule
            ci, hi, li = _combo(stats["compiled_steps"], len(cspecs))
            si = cspecs[ci]
            stats["compiled_steps"] += 1
        spec, stack, where = specs[si], stacks[si], f"{SHAPES[hi]} {LOADS[li]}"
        x, ctx = make_batch(SHAPES[hi], LOADS[li], spec, stack, g, cfg.device)
        fn, before, t_step = stack, compile_count(), time.perf_counter()
        if use_compiled:
            if si not in compiled:
                compiled[si] = torch.compile(
                    stack,
                    backend=cfg.compile_backend,
                    dynamic=True,
                    fullgraph=router_info(spec.router).compiles,
                )
            fn = compiled[si]
        out, aux_loss, load = fn(x, ctx._replace(step=step))
        err = out - x @ target
        loss = err.square().sum() / max(err.numel(), 1) + aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.sum() for p in stack.parameters() if p.grad is not None]
        if not bool(torch.isfinite(torch.stack([loss.detach(), *grads])).all()):
            stats["nonfinite"].append(f"step {step} ({spec.label}, {where})")
        opt.step()
        if compile_count() != before:
            stats["compile_s"] += time.perf_counter() - t_step
        if load.sum() > 0:
            top_share[LOADS[li]][0] += float(load.max() / load.sum())
            top_share[LOADS[li]][1] += 1
        if cfg.parity_every and step % cfg.parity_every == 0:  # every router in turn
            j = parity["checks"] % len(specs)
            px, pctx = make_batch(SHAPES[hi], LOADS[li], specs[j], stacks[j], g, cfg.device)
            _check_parity(parity, specs[j], stacks[j], px, pctx)
        p = probe(cfg.device)
        for key, value in (
            ("step", step),
            ("mem", p.get("allocated", p["rss"])),
            ("rss", p["rss"]),
            ("reserved", p.get("reserved", 0)),
            ("fds", p["fds"]),
            ("threads", p["threads"]),
            ("compiles", compile_count() - start_compiles),
            ("loss", float(loss.detach())),
        ):
            samples[key][step] = value
        if step % 500 == 0:
            bar.set_postfix(
                mem=f"{samples['mem'][step] / MB:.1f}MB", fds=p["fds"], thr=p["threads"]
            )
    seconds = time.perf_counter() - t0
    summary = _summary(cfg, specs, skipped, samples, parity, stats, top_share, seconds)
    return SoakResult(asdict(cfg), summary, samples, summary["failures"])


def _judge(cfg: SoakConfig, samples: dict, parity: dict, nonfinite: list[str]) -> list[str]:
    """The failed pass criteria, each with its reason."""
    failures = [
        check_memory(samples["mem"], cfg.mem_rel, cfg.mem_abs_mb * MB),
        check_no_growth(samples["fds"], "open fds"),
        check_no_growth(samples["threads"], "threads"),
    ]
    if nonfinite:
        failures.append(f"non-finite loss or gradients at {len(nonfinite)} steps: {nonfinite[0]}")
    if parity["failures"]:
        failures.append(f"{len(parity['failures'])} parity failures: {parity['failures'][0]}")
    comp = samples["compiles"]
    late = int(comp[-1] - comp[len(comp) // 2 - 1]) if len(comp) >= 2 else 0
    if late:
        failures.append(f"compiles: {late} graphs compiled in the second half (of {int(comp[-1])})")
    return [f for f in failures if f]


def _summary(cfg, specs, skipped, samples, parity, stats, top_share, seconds) -> dict:
    def per_quarter(key: str, fn) -> list:
        return [fn(q) for q in quarters(samples[key])]

    ends = [int(q[-1]) for q in quarters(samples["compiles"])]
    failures = _judge(cfg, samples, parity, stats["nonfinite"])
    return dict(
        steps=cfg.steps,
        seconds=round(seconds, 1),
        steps_per_s=round(cfg.steps / seconds, 1),
        torch_threads=cfg.threads or torch.get_num_threads(),
        routers=[s.label for s in specs],
        skipped_routers=skipped,
        memory_metric="cuda memory_allocated" if cfg.device.startswith("cuda") else "RSS",
        memory_median_mb_per_quarter=per_quarter("mem", lambda q: round(median(q) / MB, 2)),
        rss_median_mb_per_quarter=per_quarter("rss", lambda q: round(median(q) / MB, 2)),
        fds_max_per_quarter=per_quarter("fds", lambda q: int(max(q))),
        threads_max_per_quarter=per_quarter("threads", lambda q: int(max(q))),
        compiled_steps=stats["compiled_steps"],
        graphs_compiled_per_quarter=[b - a for a, b in zip([0, *ends], ends)],
        compile_seconds=round(stats["compile_s"], 1),
        parity_checks=parity["checks"],
        parity_covered=sorted(parity["covered"]),
        parity_not_covered=sorted(parity["not_covered"]),
        parity_failures=parity["failures"][:5],
        parity_worst_abs_err=parity["worst"],
        nonfinite_steps=len(stats["nonfinite"]),
        top_expert_share_by_load={
            k: round(total / n, 3) if n else None for k, (total, n) in top_share.items()
        },
        loss_median_last_100=median(samples["loss"][-100:]),
        verdict="PASS" if not failures else "FAIL",
        failures=failures,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile-every", type=int, default=10, help="0: no compiled variant")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-routers", nargs="+", default=None, help="labels (default: all)")
    p.add_argument("--parity-every", type=int, default=50, help="0: no parity checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    cfg = SoakConfig(
        steps=args.steps,
        device=args.device,
        compile_every=args.compile_every,
        compile_backend=args.compile_backend,
        compile_labels=tuple(args.compile_routers) if args.compile_routers else None,
        parity_every=args.parity_every,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    result = run_soak(cfg)
    from common import machine  # benchmarks/common.py

    dev = args.device.split(":")[0]
    out = args.json or ROOT / "benchmarks" / "results" / "soak" / f"soak_{dev}_{args.steps}.json"
    write_json(result, out, machine(args.device))
    png = args.plot or ROOT / "benchmarks" / "plots" / f"soak_{dev}.png"
    plot(result, png)
    print(json.dumps(result.summary, indent=1))
    print(f"wrote {out} and {png}")
    for f in result.failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
