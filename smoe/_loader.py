"""Loads the compiled extension once, after checking it was built against the running torch."""

from __future__ import annotations

import torch

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall -e ."
_loaded = False


def load_library() -> None:
    """Import ``smoe._C`` (which registers every op), or raise one clear ImportError."""
    global _loaded
    if _loaded:
        return
    try:
        from smoe import _build_info
    except ImportError as e:
        raise ImportError(
            f"smoe's C++ extension is not built. From the repository root run: {REBUILD}"
        ) from e
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"smoe was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild it with: {REBUILD}"
        )
    try:
        from smoe import _C  # noqa: F401  (its static initialisers register torch.ops.smoe.*)
    except ImportError as e:
        raise ImportError(
            f"smoe's C++ extension failed to load ({e}); rebuild it against this torch with: "
            f"{REBUILD}"
        ) from e
    if not _build_info.WITH_CUDA:
        _register_cuda_stubs()
    _loaded = True


_stub_lib = None


def _register_cuda_stubs() -> None:
    """CPU-only build: CUDA inputs get a message saying how to rebuild, not a dispatch error."""
    global _stub_lib
    _stub_lib = torch.library.Library("smoe", "IMPL")

    for name in registered_ops():
        _stub_lib.impl(name, cuda_stub(name), "CUDA")


def cuda_stub(name: str):
    """The CUDA kernel of ``smoe::name`` in a CPU-only build: an error saying how to rebuild."""

    def stub(*args, **kwargs):
        raise RuntimeError(
            f"smoe::{name}: smoe was built without CUDA (SMOE_CUDA=0 or no nvcc); rebuild with "
            f"a CUDA build of torch and nvcc on PATH: {REBUILD}"
        )

    return stub


def registered_ops() -> list[str]:
    """Names of every op in the ``smoe`` namespace, as registered by the extension."""
    names = set()
    for key in ("CPU", "CompositeImplicitAutograd"):
        try:
            regs = torch._C._dispatch_get_registrations_for_dispatch_key(key)
        except (AttributeError, RuntimeError):
            continue
        names.update(r.split("::", 1)[1].split(".")[0] for r in regs if r.startswith("smoe::"))
    return sorted(names)
