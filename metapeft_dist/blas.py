"""Give MLX a fast BLAS on Linux before ``mlx.core`` is imported.

The ``mlx[cpu]`` wheel for Linux bundles the single-threaded netlib reference BLAS,
which makes float32 matmuls 10-16x slower than OpenBLAS on the same core. Loading
Debian's OpenBLAS into the process with ``RTLD_GLOBAL`` before ``mlx.core`` resolves
its BLAS symbols makes MLX use it, with identical results. On macOS MLX uses
Accelerate and Metal, so nothing is done there.

``metapeft_dist/__init__.py`` calls :func:`ensure_fast_blas` so that every entry
point (CLI, Ray workers, tests, benchmarks) gets it by importing the package first.

Environment:
  METAPEFT_OPENBLAS   path of the library to load, or ``off`` to skip loading.
  OPENBLAS_NUM_THREADS  set to 1 unless the user set it: one thread was as fast
                      as two on small meta-learning matmuls and much less noisy,
                      and Ray runs one worker per core anyway.
  OPENBLAS_CORETYPE   set from the CPU's flags unless the user set it: Debian 12's
                      OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to
                      a generic kernel (a 1024^3 float32 matmul: 95 ms; with SkylakeX
                      kernels on the same AVX-512 machine, 14 ms). SkylakeX needs
                      AVX-512 F/CD/BW/DQ/VL, Haswell needs AVX2 and FMA.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from typing import Iterator

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

# None until the first call; then the loaded path, or "" when none was loaded.
_loaded: str | None = None
_library: ctypes.CDLL | None = None

# OpenBLAS threads for a one-off computation over a whole corpus (the text models' cached
# states): a fixed count, not the machine's cores, because OpenBLAS splits a matmul by
# its thread count and so the bits of a cache depend on it; with two, a cache built on
# any machine of one kind is the same. Two threads built MiniLM's states 1.45x faster
# than one on a 2-core AMD EPYC.
CACHE_THREADS = 2

_KERNELS = (  # (OpenBLAS core type, the CPU flags its kernels use), best first
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def coretype_for(cpu_flags: set[str]) -> str | None:
    """The best OpenBLAS x86-64 kernel family these CPU flags can run, or None."""
    for name, needs in _KERNELS:
        if needs <= cpu_flags:
            return name
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def find_openblas() -> str | None:
    """The path of an OpenBLAS shared library on this machine, or None."""
    override = os.environ.get("METAPEFT_OPENBLAS")
    if override:
        return None if override.lower() == "off" else override
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def ensure_fast_blas() -> str:
    """Load OpenBLAS globally on Linux; return its path ("" if none was loaded).

    Idempotent. Warns once (RuntimeWarning) when on Linux no OpenBLAS is found, then
    carries on with MLX's bundled BLAS.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = ""
    if not sys.platform.startswith("linux"):
        return _loaded
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if platform.machine() == "x86_64" and "OPENBLAS_CORETYPE" not in os.environ:
        coretype = coretype_for(_cpu_flags())
        if coretype:
            os.environ["OPENBLAS_CORETYPE"] = coretype
    if os.environ.get("METAPEFT_OPENBLAS", "").lower() == "off":
        return _loaded
    path = find_openblas()
    if path is None:
        warnings.warn(
            "metapeft: OpenBLAS not found; MLX falls back to its bundled reference BLAS "
            "(matmuls ~10x slower). Install it with: apt-get install libopenblas0-pthread",
            RuntimeWarning,
            stacklevel=2,
        )
        return _loaded
    global _library
    try:
        _library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        warnings.warn(
            f"metapeft: could not load OpenBLAS from {path} ({err}); MLX falls back to "
            "its bundled reference BLAS (matmuls ~10x slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _loaded
    _loaded = path
    return _loaded


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """OpenBLAS runs its matmuls on ``count`` threads inside, and on as many as before
    after. Nothing where this process loaded no OpenBLAS (macOS: Accelerate)."""
    library = _library
    if library is None or not hasattr(library, "openblas_set_num_threads"):
        yield
        return
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(count)
    try:
        yield
    finally:
        library.openblas_set_num_threads(before)


def _cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_kind() -> str:
    """What decides the bits of a computation here: the chip, MLX's device and version,
    and on a Linux CPU the BLAS and its kernel family, e.g. ``x86_64 AMD EPYC, mlx 0.30.1
    cpu, OpenBLAS SkylakeX``. The same computation on the same shapes gives equal bits on
    machines of one kind; kinds differ in the last bits (different kernels)."""
    import mlx.core as mx

    device = mx.default_device().type.name
    kind = f"{platform.machine()} {_cpu_name()}, mlx {mx.__version__} {device}"
    if sys.platform.startswith("linux"):
        if ensure_fast_blas():
            kind += f", OpenBLAS {os.environ.get('OPENBLAS_CORETYPE', 'auto')}"
        else:
            kind += ", bundled BLAS"
    return kind
