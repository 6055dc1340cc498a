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
``benchmarks/plots/soak_<device>.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
from soak_report import plot, write_json  # benchmarks/soak_report.py: JSON and plot
from torch import Tensor, nn

from smoe import MoELayer, RoutingContext
from smoe import reference as ref
from smoe.routing import ExpertChoiceRouter, TopKRouter, VMoERouter, available_routers, router_info

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((2, 16), (0, 8), (4, 16), (1, 1), (3, 7), (1, 32), (8, 8))  # (B, S): T 32 0 64 1 21..
LOADS = ("balanced", "skewed", "degenerate")
MB = 2**20


@dataclass(frozen=True)
class Spec:
    """One router variant of the rotation: a registry name, its options, k, a layer capacity."""

    label: str
    router: str
    k: int = 2
    options: tuple[tuple[str, Any], ...] = ()
    capacity_factor: float | None = None


VARIANTS = (
    Spec("topk+capacity", "topk", capacity_factor=1.0),
    Spec("switch-k1+capacity", "switch", k=1, capacity_factor=1.25),
    Spec("vmoe+bpr", "vmoe", options=(("batch_priority", True), ("group_size", 16))),
    Spec("expert_choice-g16", "expert_choice", options=(("group_size", 16),)),
    # USMoE in groups of 16 tokens (the last one padded), a fractional budget, the token softmax
    Spec(
        "usmoe-g16",
        "usmoe",
        options=(("group", 16), ("budget", 1.5), ("expert_score", "token_softmax")),
    ),
)


def router_specs() -> list[Spec]:
    """Every registered router with its defaults (new ones join by registering), then VARIANTS."""
    return [Spec(name, name) for name in available_routers()] + list(VARIANTS)


@dataclass
class SoakConfig:
    steps: int = 20_000
    device: str = "cpu"
    layers: int = 2
    d_model: int = 32
    d_ff: int = 64
    experts: int = 8
    lr: float = 1e-3
    seed: int = 0
    compile_every: int = 10  # 0: no compiled variant
    compile_backend: str = "inductor"
    compile_labels: tuple[str, ...] | None = None  # specs the compiled variant rotates (None: all)
    parity_every: int = 50  # 0: no parity checks
    mem_rel: float = 0.01
    mem_abs_mb: float = 8.0
    threads: int | None = None  # torch intra-op threads (None: leave as is)
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------
class Stack(nn.Module):
    """Pre-norm residual MoE stack: ``h = h + MoE_l(norm_l(h))``; returns (h, summed aux loss)."""

    def __init__(self, spec: Spec, cfg: SoakConfig) -> None:
        super().__init__()
        acts = ("gelu", "swiglu")
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.layers))
        self.layers = nn.ModuleList(
            MoELayer(
                cfg.d_model,
                cfg.d_ff,
                cfg.experts,
                spec.k,
                activation=acts[i % 2],
                router=spec.router,
                router_options=dict(spec.options),
                capacity_factor=spec.capacity_factor,
                layer_index=i,
            )
            for i in range(cfg.layers)
        )

    def forward(self, x: Tensor, context: RoutingContext) -> tuple[Tensor, Tensor, Tensor]:
        h, aux_loss = x, x.new_zeros(())
        load = None
        for norm, layer in zip(self.norms, self.layers):
            y, aux = layer(norm(h), context)
            h, aux_loss = h + y, aux_loss + aux.loss()
            load = aux.tokens_per_expert if load is None else load
        return h, aux_loss, load


def make_batch(
    shape: tuple[int, int], load: str, spec: Spec, stack: Stack, g: torch.Generator, device: str
) -> tuple[Tensor, RoutingContext]:
    """Tokens ``[B, S, d]`` of a load pattern and their context (attention if the router needs
    it). skewed: half the tokens get a large push along expert 0's router row of layer 0;
    degenerate: one token repeated, so every token takes the same experts (ties for expert
    choice)."""
    B, S = shape
    d = stack.norms[0].normalized_shape[0]
    if load == "degenerate":
        x = torch.randn(1, 1, d, generator=g).repeat(B, S, 1)
    else:
        x = torch.randn(B, S, d, generator=g)
    if load == "skewed" and B * S > 0:
        w = getattr(stack.layers[0].router, "weight", None)
        u = torch.randn(d, generator=g) if w is None else w.detach()[0].float().cpu()
        hot = torch.rand(B, S, generator=g) < 0.5
        x = x + hot[..., None] * (2.0 * math.sqrt(d)) * u / u.norm()
    attention = None
    if router_info(spec.router).needs_attention:
        attention = torch.softmax(torch.randn(B, S, S, generator=g), dim=-1).to(device)
    return x.to(device), RoutingContext(attention=attention)


def _reference_layer(layer: MoELayer, x: Tensor) -> Tensor | None:
    """``smoe.reference`` output of a float64 eval-mode layer on ``x [T, d]`` (None: the reference
    does not cover this router)."""
    r, ex, T = layer.router, layer.experts, x.shape[0]
    E, w_in, w_out, act = ex.num_experts, ex.w_in, ex.w_out, ex.activation
    cap = None
    if type(r) is TopKRouter and layer.capacity_factor is not None:
        cap = ref.capacity_for(T, r.k, E, layer.capacity_factor)
    if type(r) is TopKRouter and getattr(r, "bias", None) is not None:  # the momentum gate
        weight, expert = ref.topk_softmax(x @ r.weight.T + r.bias, r.k, renormalize=r.renormalize)
        plan = ref.make_plan(expert, E, capacity=cap)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    if type(r) is TopKRouter:
        return ref.moe_layer(
            x, r.weight, w_in, w_out, r.k, activation=act, renormalize=r.renormalize, capacity=cap
        )
    logits = x @ r.weight.T if hasattr(r, "weight") else None
    if type(r) is VMoERouter and (r.rounding, r.multiple_of) == ("ceil", 4):
        weight, expert = ref.topk_softmax(logits, r.k, renormalize=False)
        prio = None
        if r.batch_priority:
            prio = weight[:, 0] if r.priority == "max" else weight.sum(1)
        S = T if r.group_size is None else min(r.group_size, T)
        c = r.current_capacity_factor()
        cap = None if c is None or T == 0 else ref.vmoe_capacity(S, E, r.k, c)
        plan = ref.make_plan(expert, E, capacity=cap, priority=prio, group_size=r.group_size)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    if type(r) is ExpertChoiceRouter:
        S = T if r.group_size is None else min(r.group_size, T)
        cap = min(S, math.ceil(S * r.capacity_factor / E))
        weight, plan = ref.expert_choice(logits, cap, group_size=r.group_size)
        expert = torch.where(plan.kept, torch.arange(E, device=x.device), -1)
        return ref.routed_moe(x, expert, weight, plan.kept, w_in, w_out, activation=act)
    return None


def parity_check(stack: Stack, x: Tensor, context: RoutingContext) -> float | None:
    """Max |smoe - reference| over the layers of a float64 eval copy of ``stack`` on ``x``
    (each layer on its input from the smoe path); None if the reference does not cover it.

    Raises:
        AssertionError: a layer differs from the reference beyond float64 tolerance.
    """
    twin = copy.deepcopy(stack).double().eval()
    if context.attention is not None:
        context = context._replace(attention=context.attention.double())
    h, worst = x.double(), 0.0
    with torch.no_grad():
        for norm, layer in zip(twin.norms, twin.layers):
            inp = norm(h)
            y, _ = layer(inp, context)
            want = _reference_layer(layer, inp.reshape(-1, inp.shape[-1]))
            if want is None:
                return None
            torch.testing.assert_close(y.reshape(want.shape), want)
            if want.numel():
                worst = max(worst, (y.reshape(want.shape) - want).abs().max().item())
            h = h + y
    return worst


# ---------------------------------------------------------------------------------------------
# Probes and pass criteria
# ---------------------------------------------------------------------------------------------
def probe(device: str) -> dict[str, float]:
    """RSS (bytes), open fds and threads of this process, plus CUDA allocated/reserved bytes."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: psutil, if present
        import psutil

        p = psutil.Process()
        out.update(rss=p.memory_info().rss, threads=p.num_threads(), fds=p.num_fds())
    if device.startswith("cuda"):
        out["allocated"] = torch.cuda.memory_allocated(device)
        out["reserved"] = torch.cuda.memory_reserved(device)
    return out


def compile_count() -> int:
    """Graphs dynamo has compiled in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def quarters(values: Sequence[float]) -> list[list[float]]:
    q = len(values) // 4
    return [list(values[i * q : (i + 1) * q if i < 3 else len(values)]) for i in range(4)]


def check_memory(
    values: Sequence[float], rel: float = 0.01, abs_bytes: float = 8 * MB
) -> str | None:
    """None if the last quarter's median stays within max(rel x, abs_bytes) above the second
    quarter's median ``x`` (the first quarter is warm-up), else why not."""
    if len(values) < 8:
        return f"memory: {len(values)} samples, need at least 8"
    q2, q4 = (median(q) for q in quarters(values)[1::2])
    allowed = max(rel * q2, abs_bytes)
    if q4 - q2 > allowed:
        return (
            f"memory: last-quarter median {q4 / MB:.1f} MB exceeds the second quarter's "
            f"{q2 / MB:.1f} MB by {(q4 - q2) / MB:.2f} MB > {allowed / MB:.2f} MB allowed"
        )
    return None


def check_no_growth(values: Sequence[float], what: str) -> str | None:
    """None if the last quarter's maximum does not exceed the second quarter's."""
    _, q2, _, q4 = quarters(values)
    if q2 and q4 and max(q4) > max(q2):
        return f"{what}: grew from max {max(q2):g} (second quarter) to {max(q4):g} (last quarter)"
    return None


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
