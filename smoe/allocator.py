"""Keep large CPU tensors' memory mapped between calls: smoe's cache of its own large outputs (on by
default), and glibc's malloc thresholds for everything else (opt-in, set in process).

smoe's CPU ops take each output of 4 MiB or more from a cache of freed blocks (csrc/cpu/
workspace.h), so a training step reuses the previous step's resident pages instead of page-faulting
fresh ones. ``SMOE_CPU_CACHE_MB`` caps it (default 2048; 0 turns it off, read once per process),
:func:`release_cpu_cache` frees what it holds, :func:`cpu_cache_info` says how much that is. The
rest of this module tunes glibc itself, for the tensors that torch's own ops allocate:

glibc serves every allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel on free, so each MoE layer call page-faults its large
temporaries (the permuted rows, the expert activations, their gradients) afresh, about 2.5 µs per
4 KiB page on this repository's CI VM: a fine-grained fp32 layer's forward + backward takes 164 ms
with glibc's defaults and 130 ms tuned, its ``combine`` backward alone 24.7 vs 3.7 ms
(benchmarks/RESULTS.md, "Allocator").
Raising the thresholds keeps freed blocks in the heap for the next call, which is what PyTorch's
CPU performance guide gets from jemalloc / tcmalloc.

    import smoe
    smoe.tune_cpu_allocator()   # once, early in the program

smoe's own programs (the main job, the char-LM lab) call it; ``import smoe`` does not, since a
library should not change its host process's allocator unasked.

The cost is memory: freed blocks up to ``trim_threshold`` stay resident (RSS does not shrink after
a peak). ``MALLOC_MMAP_THRESHOLD_`` etc. in the environment do the same before the process starts;
``SMOE_TUNE_MALLOC=0`` makes this function a no-op (for a process that manages its allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["cpu_allocator_settings", "cpu_cache_info", "release_cpu_cache", "tune_cpu_allocator"]

# mallopt parameters (glibc's malloc.h); mallopt takes a C int value
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1

_settings: dict[str, int] = {}


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (present in glibc)
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(
    mmap_threshold: int = 1 << 30,
    trim_threshold: int = _INT_MAX,
    top_pad: int = 256 << 20,
) -> bool:
    """Raise glibc's malloc thresholds for this process (``mallopt``); idempotent.

    Args:
        mmap_threshold: allocations up to this many bytes come from the heap, not a fresh mmap
            (default 1 GiB; glibc's default is dynamic, at most 32 MiB).
        trim_threshold: free memory at the top of the heap kept before it is returned to the
            kernel (default 2 GiB − 1).
        top_pad: extra bytes obtained with each heap growth (default 256 MiB).

    Returns:
        True when glibc accepted all three; False on a platform without glibc's ``mallopt``, when
        glibc refused a value, or when ``SMOE_TUNE_MALLOC=0`` is in the environment.

    Raises:
        ValueError: a value that is not an int in (0, 2^31 − 1] (``mallopt`` takes a C int).
    """
    wanted = {
        "mmap_threshold": (_M_MMAP_THRESHOLD, mmap_threshold),
        "trim_threshold": (_M_TRIM_THRESHOLD, trim_threshold),
        "top_pad": (_M_TOP_PAD, top_pad),
    }
    for name, (_, value) in wanted.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT_MAX:
            raise ValueError(
                f"tune_cpu_allocator: {name} must be an int in (0, {_INT_MAX}] bytes, got {value!r}"
            )
    if os.environ.get("SMOE_TUNE_MALLOC", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    for name, (param, value) in wanted.items():
        if not libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)):
            return False
        _settings[name] = value
    return True


def cpu_allocator_settings() -> dict[str, int]:
    """What :func:`tune_cpu_allocator` set in this process (empty when it has not run)."""
    return dict(_settings)


def cpu_cache_info() -> dict[str, int]:
    """``{"cached_bytes": ..., "cap_bytes": ...}`` of smoe's CPU output cache: freed large outputs
    of smoe's ops kept for reuse (no tensor uses them), and the cap (``SMOE_CPU_CACHE_MB``)."""
    from smoe import _C, _loader

    _loader.load_library()
    return {"cached_bytes": _C.cpu_cache_bytes(), "cap_bytes": _C.cpu_cache_cap()}


def release_cpu_cache() -> int:
    """Free every block smoe's CPU output cache holds (say, after training, before a long
    inference-only phase); returns the bytes freed. Tensors in use are never affected."""
    from smoe import _C, _loader

    _loader.load_library()
    return _C.release_cpu_cache()
