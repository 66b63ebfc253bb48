"""blas.py: OpenBLAS is loaded on Linux before mlx, warned about once when absent,
and nothing happens on macOS."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from metapeft_dist import blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("METAPEFT_OPENBLAS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=full_env,
                          capture_output=True, text=True, timeout=120)


@linux_only
def test_openblas_is_mapped_into_this_process():
    path = blas.ensure_fast_blas()
    if not path:
        pytest.skip("OpenBLAS is not installed here (scripts/setup.sh installs it)")
    maps = open("/proc/self/maps").read()
    assert os.path.realpath(path) in maps or "libopenblas" in maps
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


@linux_only
def test_a_corpus_cache_is_built_on_two_threads_with_the_same_bits_every_time():
    """blas.threads sets OpenBLAS's thread count inside and restores it after; a matmul
    of a corpus build's shape gives the same bits on each of two runs on two threads."""
    import ctypes

    import mlx.core as mx

    if not blas.ensure_fast_blas():
        pytest.skip("OpenBLAS is not installed here (scripts/setup.sh installs it)")
    library = ctypes.CDLL(blas.ensure_fast_blas())
    a = mx.random.normal((64 * 20, 384), key=mx.random.key(0))
    w = mx.random.normal((384, 1536), key=mx.random.key(1))
    assert library.openblas_get_num_threads() == 1
    with blas.threads(blas.CACHE_THREADS):
        assert library.openblas_get_num_threads() == 2
        first, second = np.array(a @ w), np.array(a @ w)
    assert library.openblas_get_num_threads() == 1
    np.testing.assert_array_equal(first, second)


@linux_only
def test_user_thread_count_is_kept():
    out = _python("import metapeft_dist, os; print(os.environ['OPENBLAS_NUM_THREADS'])",
                  OPENBLAS_NUM_THREADS="2")
    assert out.stdout.strip() == "2"


@linux_only
def test_missing_openblas_warns_exactly_once_and_carries_on():
    code = ("import metapeft_dist\n"
            "from metapeft_dist.blas import ensure_fast_blas\n"
            "assert ensure_fast_blas() == ''\n"
            "import mlx.core as mx\n"
            "print(int((mx.ones((4, 4)) @ mx.ones((4, 4))).sum().item()))\n")
    out = _python(code, METAPEFT_OPENBLAS="/nonexistent/libopenblas.so.0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "64"
    assert out.stderr.count("RuntimeWarning") == 1
    assert "could not load OpenBLAS" in out.stderr


@linux_only
def test_off_switch_loads_nothing_and_does_not_warn():
    out = _python("import metapeft_dist; from metapeft_dist import blas; print(repr(blas._loaded))",
                  METAPEFT_OPENBLAS="off")
    assert out.stdout.strip() == "''"
    assert "RuntimeWarning" not in out.stderr


@linux_only
def test_openblas_gives_the_same_matmul_as_the_bundled_blas():
    code = ("import metapeft_dist, numpy as np, mlx.core as mx\n"
            "r = np.random.default_rng(0)\n"
            "a = mx.array(r.normal(size=(96, 80)).astype(np.float32))\n"
            "b = mx.array(r.normal(size=(80, 64)).astype(np.float32))\n"
            "import sys; sys.stdout.buffer.write(np.array(a @ b).tobytes())\n")
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    env = dict(os.environ, METAPEFT_OPENBLAS="off")
    slow = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    import numpy as np

    x = np.frombuffer(fast.stdout, dtype=np.float32)
    y = np.frombuffer(slow.stdout, dtype=np.float32)
    assert x.size == y.size == 96 * 64
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_coretype_from_cpu_flags():
    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}
    assert blas.coretype_for(avx512) == "SkylakeX"
    assert blas.coretype_for({"avx2", "fma", "sse4_2"}) == "Haswell"
    assert blas.coretype_for({"avx512f", "avx2", "fma"}) == "Haswell"  # partial AVX-512
    assert blas.coretype_for({"sse4_2"}) is None


@linux_only
def test_user_coretype_is_kept():
    out = _python("import metapeft_dist, os; print(os.environ['OPENBLAS_CORETYPE'])",
                  OPENBLAS_CORETYPE="Zen")
    assert out.stdout.strip() == "Zen"


def test_macos_does_nothing(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(blas.sys, "platform", "darwin")

    def refuse(*args, **kwargs):
        raise AssertionError("no library may be loaded on macOS")

    monkeypatch.setattr(blas.ctypes, "CDLL", refuse)
    assert blas.ensure_fast_blas() == ""
