"""Build recipe for smoe's C++/CUDA extension, read top to bottom.

Install with `pip install --no-build-isolation -e .` against the torch you already have.
Environment: SMOE_CUDA=0 (CPU only), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS, SMOE_DEBUG=1.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# 1. torch must already be installed: we build against it, never against an isolated copy.
try:
    import torch
except ImportError:
    sys.exit(
        "smoe: torch is not installed in this environment. Install torch first, then build with "
        "`pip install --no-build-isolation .` (build isolation would hide your torch)."
    )


# 2. Decide whether to compile CUDA: a CUDA build of torch plus an nvcc, never a visible GPU.
def _real_cuda_home() -> str | None:
    """The toolkit root holding include/cuda_runtime_api.h, seeing through wrapper scripts."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates: list[str] = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a small wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`): read its target
            with open(real, "rb") as f:
                head = f.read(4096)
            if b"\0" not in head:
                for target in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                    candidates.append(os.path.dirname(os.path.dirname(target.decode())))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


cuda_home = _real_cuda_home() if torch.version.cuda else None
with_cuda = (
    os.environ.get("SMOE_CUDA", "1") != "0" and torch.version.cuda is not None and cuda_home is not None
)
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension is imported: it reads CUDA_HOME once

# 3. Defaults that torch's helper cannot guess on a machine without a GPU.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
if "MAX_JOBS" not in os.environ:
    try:
        avail_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        avail_gb = 4.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(avail_gb // 2))))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# 4. Sources by suffix (STYLE.md §1): a new op needs no edit here.
sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))]
cuda_glue = [s for s in sources if s.endswith("_launch.cpp")]
cpu_sources = [s for s in sources if not s.endswith("_launch.cpp")]
cu_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]

# 5. Flags.
debug = os.environ.get("SMOE_DEBUG", "0") == "1"
archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
defines = [
    f'-DSMOE_TORCH_VERSION="{torch.__version__}"',
    f'-DSMOE_CUDA_VERSION="{torch.version.cuda or ""}"' if with_cuda else '-DSMOE_CUDA_VERSION=""',
    f'-DSMOE_CUDA_ARCHS="{archs}"',
    "-DCUB_WRAPPED_NAMESPACE=smoe_cub",
]
# -fno-math-errno -fno-trapping-math: as torch itself builds; lets -O3 vectorise branch-free math
# (csrc/common/math.h). NaN and inf semantics are unchanged (unlike -ffast-math).
# -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially unless _OPENMP is
# defined in *our* translation units; libgomp.so.1 then resolves to the one torch already loaded.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *defines]
cxx_flags += ["-g"] if debug else []
link_flags = ["-fopenmp"]


def _libstdcxx_link_flags() -> list[str]:
    """The shared libstdc++ by path, so that no part of libstdc++ is copied into _C.so.

    A driver that finds only ``libstdc++.a`` (no ``libstdc++.so`` development link), or flags
    such as ``-static-libstdc++`` in the environment, copy parts of libstdc++ into the
    extension; that second copy, in a process whose torch uses the shared one, crashed on the
    first number formatted into a string (a GPU machine's image, 2026-12-04: a segfault inside
    ``std::ostream::operator<<(long)``). Naming the runtime library ahead of the driver's own
    ``-lstdc++`` resolves every symbol there; elsewhere it changes nothing.
    tests/test_info.py checks the built extension.
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run(
            [cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [found] if os.path.isabs(found) and os.path.exists(found) else []


link_flags += _libstdcxx_link_flags()
include_dirs = [os.path.join(ROOT, "csrc")]
if with_cuda:
    cxx_flags.append("-DSMOE_WITH_CUDA")
    # The toolkit may lack cuBLAS/cuSPARSE headers that ATen's CUDA headers include; the torch
    # wheel ships them in its nvidia/cu13 package.
    for pkg_dir in (os.path.join(os.path.dirname(torch.__file__), "..", "nvidia"),):
        for inc in sorted(glob.glob(os.path.join(pkg_dir, "cu*", "include"))):
            if not os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
                include_dirs.append(os.path.abspath(inc))
nvcc_flags = ["-O3", *defines, "--expt-relaxed-constexpr"] + (["-lineinfo"] if debug else [])

if with_cuda:
    ext = CUDAExtension(
        "smoe._C",
        sources=cpu_sources + cuda_glue + cu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=False,
    )
else:
    ext = CppExtension(
        "smoe._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

# Build facts for smoe.info and the import-time version check (a plain file, no import of _C).
ops_cuda = sorted(os.path.basename(s)[: -len(".cu")] for s in cu_sources) if with_cuda else []
with open(os.path.join(ROOT, "smoe", "_build_info.py"), "w") as f:
    f.write(
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"PYTHON = {sys.version.split()[0]!r}\n"
    )

# 6. One summary line.
print(
    f"smoe build: torch {torch.__version__}, torch CUDA {torch.version.cuda}, nvcc root {cuda_home}, "
    f"archs '{archs}', with_cuda={with_cuda}, MAX_JOBS={os.environ['MAX_JOBS']}, "
    f"link {' '.join(link_flags)}",
    flush=True,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
