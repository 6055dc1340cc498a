import subprocess
import sys

import pytest
import torch

import smoe
from smoe import _build_info, _loader


def test_info_lists_every_op_with_its_kernels():
    report = smoe.info()
    assert f"installed {torch.__version__}" in report
    for op in ["topk_softmax", "make_plan", "permute", "combine", "grouped_mm"]:
        line = next(line for line in report.splitlines() if line.startswith(op + " "))
        assert line.split()[1] == "yes"  # CPU kernel
        assert line.split()[2] == ("yes" if _build_info.WITH_CUDA else "no")


def test_info_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "smoe.info"], capture_output=True, text=True, check=True
    )
    assert "grouped_mm" in out.stdout and "Warning" not in out.stderr


def test_version_mismatch_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(_loader, "_loaded", False)
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.1")
    with pytest.raises(
        ImportError, match=r"built against torch 0.0.1 but torch .* rebuild it with: pip"
    ):
        _loader.load_library()


def test_every_op_has_a_cuda_entry():
    # A CUDA build registers the kernels; a CPU-only build a stub that says how to rebuild.
    for op in _loader.registered_ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"smoe::{op}", "CUDA"), op


def test_cpu_only_build_says_how_to_rebuild_for_cuda_inputs():
    with pytest.raises(RuntimeError, match=r"smoe::permute: smoe was built without CUDA.*rebuild"):
        _loader.cuda_stub("permute")(torch.zeros(1))
