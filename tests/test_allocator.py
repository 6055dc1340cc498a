"""smoe.tune_cpu_allocator: large CPU tensors reuse freed heap memory instead of page-faulting a
fresh mmap each time (counted as minor page faults, in a fresh subprocess each), the opt-out, the
report, and its argument errors."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

import smoe
from smoe.allocator import cpu_allocator_settings, tune_cpu_allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)

# Allocates, touches and frees a 64 MiB tensor 10 times and counts the minor page faults of the
# last 8: a fresh mmap faults every 4 KiB page in (16,384 per cycle); a reused heap block none.
# (An aligned request sometimes misses the block just freed and takes fresh heap from the top,
# so a tuned cycle faults now and then; most do not.)
PROBE = """
import json, resource, sys, torch
import smoe
tuned = smoe.tune_cpu_allocator() if sys.argv[1] == "tune" else None
n = 16 * 2**20  # float32 elements: 64 MiB
faults = 0
for cycle in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(n)
    del x
    if cycle >= 2:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(tuned=tuned, faults=faults, settings=smoe.cpu_allocator_settings(),
                      info="CPU allocator: tuned" in smoe.info())))
"""
PAGES = 8 * 16384  # the faults of 8 fresh 64 MiB mappings


def _probe(mode: str, env: dict | None = None) -> dict:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    default, tuned = _probe("default"), _probe("tune")
    assert default["tuned"] is None and not default["settings"] and not default["info"]
    assert default["faults"] >= 0.9 * PAGES, default  # glibc: a fresh mmap every cycle
    assert tuned["tuned"] is True and tuned["info"], tuned
    assert tuned["settings"] == {
        "mmap_threshold": 1 << 30, "trim_threshold": 2**31 - 1, "top_pad": 256 << 20,
    }  # fmt: skip
    assert tuned["faults"] <= 0.4 * PAGES, tuned  # most cycles reuse the freed heap block


@glibc
def test_the_environment_opts_out():
    out = _probe("tune", {"SMOE_TUNE_MALLOC": "0"})
    assert out["tuned"] is False and out["settings"] == {}, out
    assert out["faults"] >= 0.9 * PAGES, out


def test_exported_from_the_package():
    assert smoe.tune_cpu_allocator is tune_cpu_allocator
    assert smoe.cpu_allocator_settings is cpu_allocator_settings


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(mmap_threshold=0), "mmap_threshold"),
        (dict(mmap_threshold=2**31), "mmap_threshold"),
        (dict(trim_threshold=-1), "trim_threshold"),
        (dict(top_pad=1.5), "top_pad"),
        (dict(top_pad=True), "top_pad"),
    ],
)
def test_bad_values_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"tune_cpu_allocator: {name} must be an int"):
        tune_cpu_allocator(**kwargs)
