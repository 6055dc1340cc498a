"""Build report behind ``smoe.info()`` and ``python -m smoe.info``."""

from __future__ import annotations

import torch

from smoe import _loader

_loader.load_library()  # first: in an unbuilt tree it raises the "not built" ImportError

from smoe import _C, _build_info  # noqa: E402


def has_kernel(op: str, key: str) -> bool:
    """True if ``smoe::op`` has a real (compiled) kernel for dispatch key ``key``."""
    if key == "CUDA" and not _build_info.WITH_CUDA:
        return False  # only the "rebuild with CUDA" stub is registered
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"smoe::{op}", key)


def arch_runs(capability: tuple[int, int], arch_list: str) -> bool:
    """Whether a GPU of compute ``capability`` can run kernels built for ``arch_list``.

    ``arch_list`` is a ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0+PTX", spaces also separate). A cubin for
    X.Y runs on X.Z with Z >= Y (same major; the "a"/"f" feature variants only on X.Y itself);
    PTX for X.Y is JIT-compiled by the driver for any later GPU.
    """
    major, minor = capability
    for entry in arch_list.replace(";", " ").split():
        ptx = entry.endswith("+PTX")
        name = entry.removesuffix("+PTX")
        variant = name[-1] if name[-1:].isalpha() else ""
        a_major, a_minor = (int(p) for p in name.rstrip("af").split("."))
        if variant and (major, minor) == (a_major, a_minor):
            return True
        if not variant and major == a_major and minor >= a_minor:
            return True
        if ptx and (major, minor) >= (a_major, a_minor):
            return True
    return False


def device_arch_line() -> str | None:
    """One line on whether the visible GPU can run this build, or None without a GPU."""
    if not (_build_info.WITH_CUDA and torch.cuda.is_available()):
        return None
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    sm = f"sm_{capability[0]}{capability[1]}"
    if arch_runs(capability, _build_info.CUDA_ARCHS):
        return f"this GPU: {name} ({sm}), compiled in"
    return (
        f"this GPU: {name} ({sm}) is NOT among the compiled architectures "
        f"({_build_info.CUDA_ARCHS}); CUDA ops will refuse to run. Rebuild with "
        f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}" '
        "pip install --no-build-isolation ."
    )


def _allocator_line() -> str:
    from smoe.allocator import cpu_allocator_settings

    tuned = cpu_allocator_settings()
    if not tuned:
        return "CPU allocator: glibc defaults (smoe.tune_cpu_allocator() not called)"
    return "CPU allocator: tuned by smoe.tune_cpu_allocator() " + ", ".join(
        f"{k}={v}" for k, v in tuned.items()
    )


def _cache_line() -> str:
    cap = _C.cpu_cache_cap() >> 20
    if cap == 0:
        return "CPU output cache: off (SMOE_CPU_CACHE_MB=0)"
    held = _C.cpu_cache_bytes() >> 20
    return f"CPU output cache: {held} MB held, cap {cap} MB (SMOE_CPU_CACHE_MB)"


def info() -> str:
    """Print and return a short report: versions, CUDA support, per-op kernels."""
    from smoe import __version__

    width = max(len(op) for op in _loader.registered_ops()) + 2
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
        *filter(None, [device_arch_line()]),
        _allocator_line(),
        _cache_line(),
        _C.cpu_gemm16_path(),
        _C.cpu_gate_path(),
        _C.cuda_grouped_mm_path(),
        "",
        f"{'op':<{width}}{'CPU':<6}{'CUDA':<6}",
    ]
    for op in _loader.registered_ops():
        cpu = "yes" if has_kernel(op, "CPU") else "no"
        cuda = "yes" if has_kernel(op, "CUDA") else "no"
        lines.append(f"{op:<{width}}{cpu:<6}{cuda:<6}")
    report = "\n".join(lines)
    print(report)
    return report
