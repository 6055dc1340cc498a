"""Run the bad-input matrix: each case in its own forked child, 2 at a time, 30 s each.

    python tests/bad_inputs/run.py --device cpu     # or cuda; rewrites tests/bad_inputs/REPORT.md

This process is a fork server: it imports torch, smoe and the table once, runs no torch op, and
forks one child per case (a child sets torch to one thread, so no OpenMP pool crosses a fork;
CUDA is first touched in the child). A child reports through a pipe; its output goes to a file
kept for the crash excerpt. Outcomes:

- clear error: the expected exception type, message matching the row's regex (the argument);
- wrong error: another exception type, or a message that does not name the argument;
- crash: killed by a signal, exited without a report, or a CUDA device-side assert;
- hang: still running at the timeout (killed);
- silent: returned without an error;
- defined: a defined-behaviour row that returned True (its documented behaviour held).

Exit status 0 when every case met its expectation.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import re
import select
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.bad_inputs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bad_inputs.cases import Case, Dev, Expect  # noqa: E402

OUTCOMES = ("clear error", "defined", "wrong error", "silent", "crash", "hang")
REPORT = Path(__file__).with_name("REPORT.md")
_MAX_MESSAGE = 4000
# A CUDA error surfacing as an exception is a crash: the context is unusable afterwards.
_CUDA_FAULT = re.compile(r"device-side assert|CUDA error|illegal memory access|cudaError")


@dataclass
class Result:
    """One case's outcome: ``ok`` when the outcome is the one its expectation asks for."""

    name: str
    target: str
    kind: str
    expected: str
    outcome: str
    detail: str
    ok: bool
    seconds: float = 0.0


def classify(expect: Expect, report: dict | None, status: int | None, log: str) -> tuple[str, str]:
    """(outcome, detail) of a finished child: its pipe ``report`` (None if it sent none), its
    wait ``status`` (None: killed at the timeout) and the tail of its output."""
    if status is None:
        return "hang", "killed at the timeout"
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return "crash", f"{sig}: {log.strip()[-300:]}"
    if report is None:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        return "crash", f"exited {code} without a report: {log.strip()[-300:]}"
    if report["status"] == "returned":
        if expect.exc is None and not expect.async_assert and report["value"] is True:
            return "defined", f"returned True ({expect.pattern})"
        return "silent", f"returned {report['repr']}"
    message = report["message"]
    if _CUDA_FAULT.search(message):
        return "crash", f"{report['type']}: {message}"
    detail = f"{report['type']}: {message}"
    if report["expected_type"] and re.search(expect.pattern, message):
        return "clear error", detail
    return "wrong error", detail


def _child(case: Case, device: str, wfd: int, out_fd: int) -> None:
    """In the forked child: run the case, write one JSON report, exit without cleanup."""
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    faulthandler.disable()  # pytest's would print a crashing child's traceback to its own stderr
    torch = sys.modules.get("torch")
    expect = case.expect_on(device)
    try:
        if torch is not None:
            torch.set_num_threads(1)
        value = case.fn(Dev(device))
        if torch is not None and device == "cuda":
            torch.cuda.synchronize()  # surface an asynchronous device assert here
        report = {"status": "returned", "value": value is True, "repr": _short(repr(value))}
    except BaseException as e:  # noqa: BLE001 - classifying any exception is the point
        report = {
            "status": "raised",
            "type": type(e).__name__,
            "expected_type": expect.exc is not None and isinstance(e, expect.exc),
            "message": str(e)[:_MAX_MESSAGE],
        }
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(wfd, data) :]
    os._exit(0)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclass
class _Running:
    case: Case
    pid: int
    rfd: int
    log: object
    start: float
    data: bytearray


def run_cases(
    cases: Sequence[Case], device: str = "cpu", *, jobs: int = 2, timeout: float = 30.0
) -> list[Result]:
    """Run each case in a forked child, ``jobs`` at a time; results in the cases' order."""
    pending = [c for c in cases if device in c.devices]
    results: dict[str, Result] = {}
    running: dict[int, _Running] = {}  # by read fd
    while pending or running:
        while pending and len(running) < jobs:
            r = _start(pending.pop(0), device)
            running[r.rfd] = r
        now = time.monotonic()
        wait = max(0.0, min(r.start + timeout - now for r in running.values()))
        readable, _, _ = select.select(list(running), [], [], wait)
        for fd in readable:
            r = running[fd]
            chunk = os.read(fd, 65536)
            if chunk:
                r.data += chunk
                continue
            _, status = os.waitpid(r.pid, 0)  # EOF: the child has exited
            results[r.case.name] = _finish(r, device, status)
            del running[fd]
        now = time.monotonic()
        for fd, r in list(running.items()):
            if now - r.start >= timeout:
                os.kill(r.pid, signal.SIGKILL)
                os.waitpid(r.pid, 0)
                results[r.case.name] = _finish(r, device, None)
                del running[fd]
    return [results[c.name] for c in cases if c.name in results]


def _start(case: Case, device: str) -> _Running:
    rfd, wfd = os.pipe()
    log = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            _child(case, device, wfd, log.fileno())
        finally:
            os._exit(70)
    os.close(wfd)
    return _Running(case, pid, rfd, log, time.monotonic(), bytearray())


def _finish(r: _Running, device: str, status: int | None) -> Result:
    os.close(r.rfd)
    r.log.seek(0)
    log = r.log.read()[-2000:].decode(errors="replace")
    r.log.close()
    report = json.loads(bytes(r.data)) if r.data else None
    expect = r.case.expect_on(device)
    outcome, detail = classify(expect, report, status, log)
    ok = outcome == expect.outcome
    seconds = round(time.monotonic() - r.start, 3)
    return Result(
        r.case.name, r.case.target, r.case.kind, expect.label, outcome, detail, ok, seconds
    )


def summary(results: Sequence[Result]) -> str:
    counts = Counter(r.outcome for r in results)
    parts = [f"{counts.get(o, 0)} {o}" for o in OUTCOMES]
    met = sum(r.ok for r in results)
    return f"{len(results)} cases: " + ", ".join(parts) + f"; {met}/{len(results)} as expected"


def render_report(results: Sequence[Result], device: str) -> str:
    import torch

    def cell(text: str, n: int) -> str:
        return _short(text, n).replace("|", "\\|")

    lines = [
        "# Bad-input matrix",
        "",
        f"Generated by `python tests/bad_inputs/run.py --device {device}` (torch "
        f"{torch.__version__}); do not edit by hand. Each case runs in its own forked child with "
        "a timeout; outcomes and the per-row expectations are explained in "
        "`tests/bad_inputs/run.py` and `tests/bad_inputs/cases.py`.",
        "",
        f"**{device}: {summary(results)}**",
        "",
    ]
    off = [r for r in results if not r.ok]
    if off:
        lines += ["Not as expected:", ""] + [f"- `{r.name}`: {r.outcome}" for r in off] + [""]
    lines += [
        "| case | kind | expected | outcome | message excerpt |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        mark = r.outcome if r.ok else f"**{r.outcome}**"
        lines.append(
            f"| `{cell(r.name, 90)}` | {r.kind} | {cell(r.expected, 60)} | {mark} | "
            f"{cell(r.detail, 140)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case (default 30)")
    p.add_argument("-k", "--filter", default=None, help="only cases whose name matches this regex")
    p.add_argument("--report", type=Path, default=REPORT, help="markdown report to write")
    p.add_argument("--no-report", action="store_true", help="write no markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)

    import torch

    import smoe  # noqa: F401  (imported once, before any fork: registers torch.ops.smoe)
    from tests.bad_inputs.cases import PRELOAD, all_cases

    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:  # an optional dependency (timm): its rows fail clearly in the child
            pass

    if torch.cuda.is_initialized():  # a forked child could not use CUDA then
        raise SystemExit("run.py: CUDA was initialised before forking; nothing may touch it")
    cases = all_cases()
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, c.name)]
    results = run_cases(cases, args.device, jobs=args.jobs, timeout=args.timeout)
    if not args.no_report and not args.filter:
        args.report.write_text(render_report(results, args.device))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    for r in results:
        if not r.ok:
            print(f"{r.outcome:12s} {r.name}: {_short(r.detail, 200)}")
    print(summary(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
