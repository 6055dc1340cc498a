"""Build report behind ``smoe.info()`` and ``python -m smoe.info``."""

from __future__ import annotations

import torch

from smoe import _loader

_loader.load_library()  # first: in an unbuilt tree it raises the "not built" ImportError

from smoe import _build_info  # noqa: E402


def has_kernel(op: str, key: str) -> bool:
    """True if ``smoe::op`` has a real (compiled) kernel for dispatch key ``key``."""
    if key == "CUDA" and not _build_info.WITH_CUDA:
        return False  # only the "rebuild with CUDA" stub is registered
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"smoe::{op}", key)


def info() -> str:
    """Print and return a short report: versions, CUDA support, per-op kernels."""
    from smoe import __version__

    lines = [
        f"smoe {__version__}",
        f"torch: built against {_build_info.TORCH_VERSION}, installed {torch.__version__}",
        f"python: built with {_build_info.PYTHON}",
        (
            f"CUDA: compiled in (CUDA {_build_info.CUDA_VERSION}, archs {_build_info.CUDA_ARCHS})"
            if _build_info.WITH_CUDA
            else "CUDA: not compiled in (CPU-only build)"
        ),
        f"CUDA device available now: {torch.cuda.is_available()}",
        "",
        f"{'op':<24}{'CPU':<6}{'CUDA':<6}",
    ]
    for op in _loader.registered_ops():
        cpu = "yes" if has_kernel(op, "CPU") else "no"
        cuda = "yes" if has_kernel(op, "CUDA") else "no"
        lines.append(f"{op:<24}{cpu:<6}{cuda:<6}")
    report = "\n".join(lines)
    print(report)
    return report
