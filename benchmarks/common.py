"""Helpers shared by the benchmarks (suite*.py, bench_layer.py, bench_gpu.py, ...): timing with
spread, peak memory, profiles, the command line and reports, the machine and its allocator, stored
results. The dense limit and the layer's stage shares are in layer_metrics.py; the load patterns
live in loads.py and are re-exported here.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# isort: split
# re-exported: the benchmarks import the load patterns from here too
from loads import FORCE, LOADS, PatternRouter, pattern_bias, pattern_experts  # noqa: F401

MODES = ("fwd", "fwd+bwd")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """Seconds per call: median and interquartile range over ``n`` samples."""

    median: float
    iqr: float
    n: int


def measure(
    fn: Callable[[], object],
    *,
    min_run_time: float,
    min_samples: int = 5,
    max_samples: int = 200,
    block_s: float = 2e-3,
    slow_s: float = float("inf"),
) -> Stat:
    """Median and IQR of ``fn``'s time per call after one warm-up call.

    Each sample is a block of calls lasting about ``block_s`` (one call for anything slower),
    timed as ``torch.utils.benchmark.Timer`` does (``timeit`` with the garbage collector off and
    a clock that synchronises CUDA), without Timer's extra warm-up calls before every sample.
    Sampling stops once ``min_run_time`` has passed and ``min_samples`` were taken (3 when the
    warm-up call took longer than ``slow_s``: the spread of a slow call is already small next to
    its median, and the suite has a time budget).
    """
    kw = dict(min_samples=min_samples, max_samples=max_samples, block_s=block_s, slow_s=slow_s)
    out = measure_many({"fn": fn}, min_run_time=min_run_time, **kw)["fn"]
    if isinstance(out, RuntimeError):
        raise out
    return out


def measure_many(
    fns: dict[str, Callable[[], object]],
    *,
    min_run_time: float,
    min_samples: int = 5,
    max_samples: int = 200,
    block_s: float = 2e-3,
    slow_s: float = float("inf"),
) -> dict[str, Stat | RuntimeError]:
    """:func:`measure` for the contenders of one row at once, interleaved: after one warm-up
    call each, the samples are taken round-robin (one block of every contender per round) until
    each has its samples, so that a drift of the machine's speed over the row (a shared VM's is
    10-15 % over minutes) touches every contender alike rather than whichever ran in a slow
    spell. A contender that raises ``RuntimeError`` (a case it cannot run, out of memory) gets the
    exception instead of a :class:`Stat` and leaves the rounds; the others go on."""
    out: dict[str, Stat | RuntimeError] = {}
    timers, number, need = {}, {}, {}
    times: dict[str, list[float]] = {}
    total: dict[str, float] = {}
    for name, fn in fns.items():
        timer = timeit.Timer(stmt=fn, timer=_clock)
        try:
            first = timer.timeit(1)  # warm-up, and a first estimate
        except RuntimeError as e:
            out[name] = e
            continue
        timers[name] = timer
        number[name] = max(1, int(block_s / max(first, 1e-9)))
        need[name] = min(min_samples, 3) if first > slow_s else min_samples
        times[name], total[name] = [], 0.0
    active = list(timers)
    while active:
        for name in list(active):
            try:
                t = timers[name].timeit(number[name])
            except RuntimeError as e:
                out[name] = e
                active.remove(name)
                continue
            times[name].append(t / number[name])
            total[name] += t
            n = len(times[name])
            if n >= max_samples or (total[name] >= min_run_time and n >= need[name]):
                active.remove(name)
    for name, ts in times.items():
        if name not in out:
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
            out[name] = Stat(statistics.median(ts), q[2] - q[0], len(ts))
    return {name: out[name] for name in fns}


class Clock:
    """Timing settings of this run (one place, so --quick changes them all)."""

    def __init__(
        self, min_run_time: float, min_samples: int, block_s: float, slow_s: float = float("inf")
    ) -> None:
        self.min_run_time, self.min_samples, self.block_s = min_run_time, min_samples, block_s
        self.slow_s = slow_s

    def _settings(self, min_samples: int | None = None) -> dict:
        return dict(
            min_run_time=self.min_run_time,
            min_samples=min_samples or self.min_samples,
            block_s=self.block_s,
            slow_s=self.slow_s,
        )

    def __call__(self, fn: Callable[[], object], min_samples: int | None = None) -> Stat:
        return measure(fn, **self._settings(min_samples))

    def many(self, fns: dict[str, Callable[[], object]]) -> dict[str, Stat | RuntimeError]:
        """The contenders of one row, interleaved (:func:`measure_many`)."""
        return measure_many(fns, **self._settings())


def stat(s: Stat) -> dict:
    return asdict(s)


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_args(doc: str, dtypes, *, tokens: int, quick_tokens: int, argv=None):
    """The command line the op benchmarks share (bench_gemm16, bench_router_stats,
    bench_gather_mm): ``--tokens``, ``--dtype`` (from ``dtypes``), ``--min-run-time``, ``--quick``
    (``quick_tokens`` tokens and 0.01 s per measurement: CI-sized) and ``--out``."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--dtype", nargs="+", default=list(dtypes), choices=list(dtypes))
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument(
        "--quick", action="store_true", help=f"{quick_tokens} tokens, short timing (CI-sized)"
    )
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.min_run_time = quick_tokens, 0.01
    return args


def write_report(out_dir: str | os.PathLike, stem: str, text: str, data: dict) -> None:
    """Prints a benchmark's markdown ``text`` and writes it and ``data`` (JSON) to
    ``out_dir/<stem>.md`` and ``.json``."""
    import json
    from pathlib import Path

    print(text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines (and a blank line after it)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during one call, above what was live before.

    From the allocation and free events of ``torch.profiler`` (``profile_memory=True``),
    accumulated in time order. Counts tensors only (not the Python heap, not code), smoe's cached
    CPU outputs included (csrc/cpu/workspace.cpp reports them); allocations made by OpenMP worker
    threads are not reported by the profiler, so smoe's kernels allocate their outputs and the
    per-thread scratch of expert_mlp and gather_mm on the calling thread, before going parallel.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    return max(itertools.accumulate((n for _, n in events), initial=0))


def profile_top(fn: Callable[[], object], rows: int = 8) -> list[dict]:
    """The ops taking most self CPU time over one call (after a warm-up call):
    ``[{op, calls, ms, share}]``, then the total of all ops as ``"(all ops)"``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    avg = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in avg)
    avg.sort(key=lambda e: -e.self_cpu_time_total)
    top = [
        {
            "op": e.key,
            "calls": e.count,
            "ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in avg[:rows]
    ]
    return top + [{"op": "(all ops)", "calls": sum(e.count for e in avg), "ms": total / 1e3,
                   "share": 1.0}]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The machine, and the allocator setting
# ---------------------------------------------------------------------------------------------
def limit_dtype(dtype: torch.dtype, device="cpu") -> torch.dtype:
    """The dtype a dense GEMM runs fastest in for ``dtype`` data: itself, except a 16-bit dtype on
    a CPU where smoe's expert GEMMs take the float32 path on upcast inputs (csrc/cpu/gemm16.h),
    because torch's own 16-bit mm there is a scalar loop at ~1 GF/s (any AVX2-only x86 CPU)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    from smoe import _C

    upcasts = _C.cpu_gemm16_upcasts("bfloat16" if dtype == torch.bfloat16 else "float16")
    return torch.float32 if upcasts else dtype


def machine(device: str = "cpu") -> dict:
    """CPU model, cores, threads, ISA, versions, commit; GPU name and driver on CUDA.

    Works without transformers installed (its version is then None).
    """
    import os
    import platform
    import subprocess

    import smoe

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    info = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        isa=torch.backends.cpu.get_cpu_capability(),
        python=platform.python_version(),
        torch=torch.__version__,
        smoe=smoe.__version__,
        transformers=tf_version,
        commit=commit,
        device=device,
    )
    if not device.startswith("cuda"):
        info["cpu_16bit_limit"] = {  # the dtype of dense_limit's GEMMs for 16-bit data
            "bf16": str(limit_dtype(torch.bfloat16)).removeprefix("torch."),
            "fp16": str(limit_dtype(torch.float16)).removeprefix("torch."),
        }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info.update(cuda=torch.version.cuda)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            info["driver"] = out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "?"
    return info


# glibc keeps freed blocks of any size in its heap and never trims it: no large tensor page-faults
# in again after its first use (smoe.tune_cpu_allocator's aim, PyTorch's CPU guide's jemalloc)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(16 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def maybe_reexec_tuned_malloc(malloc: str, env: dict[str, str] = TUNED_MALLOC) -> None:
    """``--malloc tuned``: re-run this process with glibc's mmap threshold raised."""
    import os
    import sys

    if malloc == "tuned" and any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


# ---------------------------------------------------------------------------------------------
# Stored results
# ---------------------------------------------------------------------------------------------
def write_block(path: str | os.PathLike, block: str, begin: str, end: str) -> None:
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` (append the markers
    and the block when absent): how each benchmark keeps its own section of RESULTS.md current."""
    text = open(path).read() if os.path.exists(path) else ""
    new = f"{begin}\n{block}{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + new + tail
    else:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        text = text + sep + new + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def same_setup(stored: dict | None, current: dict, defaults: dict | None = None) -> bool:
    """Whether a stored run was made with ``current``'s setup. A key the stored setup lacks (a
    config field added after the run) counts as its default from ``defaults``, so adding a field
    does not invalidate every stored run; a key whose value differs does."""
    if stored is None:
        return False
    if defaults:
        stored = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    return stored == current


def pm(ms: tuple[float, float], scale: float = 1.0, digits: int = 3, nan: str = "n/a") -> str:
    """A ``(mean, std)`` pair as ``"m ± s"`` times ``scale`` (100: percentages), ``nan`` for a
    NaN mean (an arm without the metric)."""
    m, s = ms
    return nan if m != m else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (what a report prints)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
