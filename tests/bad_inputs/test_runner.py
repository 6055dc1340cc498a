"""The bad-input runner classifies each way a case can end: a crash (abort, segfault), a hang, a
silent return, a wrong error, a clear error and a defined behaviour.

The children here run no torch op, so forking this (pytest, torch-importing) process is safe.
"""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from tests.bad_inputs.cases import ASYNC_ASSERT, Case, defined, error
from tests.bad_inputs.run import classify, render_report, run_cases, summary

TIMEOUT = 2.0  # seconds; the hanging case sleeps far past it


def _abort(d):
    os.abort()


def _segfault(d):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def _hang(d):
    time.sleep(60)


def _silent(d):
    return 42


def _raise_value_error(d):
    raise ValueError("selftest: k must be >= 1, got 0")


def _raise_type_error(d):
    raise TypeError("selftest: k must be an int, got str")


def _exit_quietly(d):
    os._exit(3)


def _true(d):
    return True


def _case(name, fn, expect):
    return Case(f"selftest/{name}", "selftest", "selftest", fn, expect, devices=("cpu",))


CASES = [
    _case("abort", _abort, error(r"\bk\b", ValueError)),
    _case("segfault", _segfault, error(r"\bk\b", ValueError)),
    _case("hang", _hang, error(r"\bk\b", ValueError)),
    _case("silent", _silent, error(r"\bk\b", ValueError)),
    _case("wrong type", _raise_type_error, error(r"\bk\b", ValueError)),
    _case("wrong argument", _raise_value_error, error(r"\bcapacity\b", ValueError)),
    _case("clear", _raise_value_error, error(r"\bk\b", ValueError)),
    _case("exit without report", _exit_quietly, error(r"\bk\b", ValueError)),
    _case("defined", _true, defined("returns True")),
    _case("defined but not as documented", _silent, defined("returns True")),
]

EXPECTED = {
    "selftest/abort": "crash",
    "selftest/segfault": "crash",
    "selftest/hang": "hang",
    "selftest/silent": "silent",
    "selftest/wrong type": "wrong error",
    "selftest/wrong argument": "wrong error",
    "selftest/clear": "clear error",
    "selftest/exit without report": "crash",
    "selftest/defined": "defined",
    "selftest/defined but not as documented": "silent",
}


@pytest.fixture(scope="module")
def results():
    return {r.name: r for r in run_cases(CASES, "cpu", jobs=2, timeout=TIMEOUT)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_runner_classifies_outcome(results, name):
    assert results[name].outcome == EXPECTED[name], results[name]


def test_runner_marks_only_matching_outcomes_ok(results):
    ok = {name for name, r in results.items() if r.ok}
    assert ok == {"selftest/clear", "selftest/defined"}


def test_runner_names_the_signal_of_a_crash(results):
    assert results["selftest/abort"].detail.startswith("SIGABRT")
    assert results["selftest/segfault"].detail.startswith("SIGSEGV")


def test_runner_keeps_the_cases_order(results):
    assert list(results) == [c.name for c in CASES]


def test_runner_skips_cases_not_on_the_device():
    assert run_cases(CASES[:1], "cuda", timeout=TIMEOUT) == []


def test_classify_counts_a_cuda_device_assert_as_a_crash():
    report = {
        "status": "raised",
        "type": "AcceleratorError",
        "expected_type": True,
        "message": "CUDA error: device-side assert triggered",
    }
    assert classify(error("expert"), report, 0, "")[0] == "crash"
    assert classify(ASYNC_ASSERT, report, 0, "")[0] == "crash"


def test_summary_and_report_count_every_class(results):
    rows = list(results.values())
    line = summary(rows)
    assert line.startswith(f"{len(rows)} cases: 1 clear error, 1 defined, 2 wrong error, 2 silent")
    assert "3 crash, 1 hang" in line
    report = render_report(rows, "cpu")
    assert line in report
    for name in EXPECTED:
        assert f"`{name}`" in report
