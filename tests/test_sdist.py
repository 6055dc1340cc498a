"""The source distribution carries everything a build needs (headers, CMakeLists.txt, .cu files,
the shipped data) and nothing built (the .so, the generated _build_info.py)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_has_every_source_and_no_build_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = tmp_path.glob("smoe-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "csrc", "smoe/data", "CMakeLists.txt", "tests/cpp"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert "csrc/checks.h" in names and "csrc/cuda/grid.cuh" in names
    assert not [n for n in names if n.endswith((".so", ".o")) or n == "smoe/_build_info.py"]
