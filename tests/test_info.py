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


@pytest.mark.parametrize(
    "capability, arch_list, runs",
    [
        ((9, 0), "9.0", True),
        ((8, 6), "8.0", True),  # a cubin runs on later minors of its major
        ((8, 0), "8.6", False),
        ((10, 0), "9.0", False),
        ((10, 0), "8.0;9.0+PTX", True),  # PTX is JIT-compiled for later GPUs
        ((7, 5), "8.0;9.0+PTX", False),
        ((9, 0), "9.0a", True),
        ((9, 1), "9.0a", False),  # arch-specific features run on that GPU only
        ((12, 0), "8.0 9.0 10.0+PTX", True),
    ],
)
def test_arch_runs_follows_cuda_compatibility(capability, arch_list, runs):
    from smoe._info import arch_runs

    assert arch_runs(capability, arch_list) is runs


def test_every_cuda_glue_function_checks_the_device_arch():
    # The first CUDA call on an unsupported GPU must say so, not fail inside a launch: every device
    # guard in the glue is followed by check_device_arch.
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    for path in sorted(csrc.glob("*_launch.cpp")):
        text = path.read_text()
        assert text.count("CUDAGuard guard(") == text.count("check_device_arch("), path.name


@pytest.mark.cuda
def test_info_says_this_gpu_is_compiled_in():
    if not _build_info.WITH_CUDA:
        pytest.skip("CPU-only build")
    assert "compiled in" in smoe.info().split("this GPU:")[1].splitlines()[0]


def test_stale_build_is_one_clear_import_error():
    # A _C built from older sources lacks a newer op: the import names it and the rebuild command
    # (was: "operator smoe::<op> does not exist" from deep inside torch.library).
    code = (
        "import torch, torch.library as L\n"
        "def missing(*a, **k):\n"
        "    raise RuntimeError('operator smoe::cosine_scores does not exist')\n"
        "L.register_fake = missing\n"
        "try:\n"
        "    import smoe\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "older than its Python sources" in out.stdout, out.stdout + out.stderr
    assert "smoe::cosine_scores" in out.stdout and "pip install --no-build-isolation" in out.stdout


def _tool_output(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{cmd[0]} is not available")


def test_extension_uses_the_shared_libstdcxx():
    # A libstdc++ copied into _C.so (a toolchain with only libstdc++.a) crashed the first
    # ostream << long of a process whose torch uses the shared one (setup.py links it by name).
    import glob
    import os

    (so,) = glob.glob(os.path.join(os.path.dirname(smoe.__file__), "_C*.so"))
    needed = _tool_output("readelf", "-d", so)
    assert "libstdc++.so.6" in needed
    defined = _tool_output("nm", "--defined-only", so)
    assert "_ZNSt6locale7classicEv" not in defined  # std::locale::classic(): libstdc++'s own
