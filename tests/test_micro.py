"""The float32 micro-kernels (cpu_micro: AVX-512 or AVX2) against numpy and the float64 references:
tiles crossing the register tile's edges (12 x 32 with AVX-512, 6 x 16 with AVX2), key windows that skip register tiles, and soft
retrieval, grouped-query and causal attention through them against the BLAS path."""

import os
import subprocess
import sys

import numpy as np
import pytest
from llvmlite import binding as llvm

import softretrieval as sr
from softretrieval import cpu_micro

from conftest import switched_off
from reference import attention_ref, sequence_attention_ref

pytestmark = pytest.mark.skipif(not cpu_micro.has_fma_tiles(), reason="this CPU has neither AVX-512F nor AVX2")


def blas_path(fn, *args, **kw):
    """``fn(*args, **kw)`` with config.MICRO_KERNELS off."""
    return switched_off("MICRO_KERNELS", fn, *args, **kw)


@pytest.mark.parametrize("bq,tn,d", [(1, 1, 1), (12, 32, 8), (13, 33, 5), (40, 100, 64), (25, 512, 3)])
@pytest.mark.parametrize("windowed", [False, True])
def test_tile_products_edges_and_windows(rng, bq, tn, d, windowed):
    Q = rng.standard_normal((bq, d)).astype(np.float32)
    K = rng.standard_normal((tn, d)).astype(np.float32)
    rows = -(-bq // cpu_micro.ROWS) * cpu_micro.ROWS
    qpad = np.empty((rows, d), np.float32)
    cpu_micro.pad_rows(Q, qpad)
    kp = np.empty((-(-tn // cpu_micro.COLS), d, cpu_micro.COLS), np.float32)
    cpu_micro.pack_columns(K, kp)
    width = rng.integers(0, tn + 1, bq) if windowed else np.empty(0, np.int64)
    S = np.full((bq, tn), np.nan, np.float32)
    cpu_micro.tile_products(qpad, kp, S, np.empty((cpu_micro.ROWS, cpu_micro.COLS), np.float32), False,
                            width.astype(np.int64))
    expect = Q.astype(np.float64) @ K.T.astype(np.float64)
    need = np.broadcast_to(np.arange(tn)[None, :] < (width[:, None] if windowed else tn), (bq, tn))
    np.testing.assert_allclose(S[need], expect[need], rtol=1e-5, atol=1e-5)
    if windowed:          # whole register tiles past every row's window are skipped (left unset)
        for r0 in range(0, bq, cpu_micro.ROWS):
            block = width[r0:r0 + cpu_micro.ROWS].max()
            first_skipped = -(-block // cpu_micro.COLS) * cpu_micro.COLS
            assert np.isnan(S[r0:r0 + cpu_micro.ROWS, first_skipped:]).all()


@pytest.mark.parametrize("B,N,d,dv", [(17, 700, 7, 32), (25, 3001, 64, 64), (100, 1500, 33, 96),
                                      (300, 2000, 16, 128)])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_soft_retrieval_through_micro_kernels(request, rng, B, N, d, dv, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    Q = rng.standard_normal((B, d)).astype(np.float32)
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, dv)).astype(np.float32)
    bias = rng.standard_normal(N)
    bias[::11] = -np.inf
    for kw in ({}, {"bias": bias, "metric": "l2"}, {"metric": "cosine", "scale": 20.0}):
        out, lse = sr.attention(Q, K, V, return_lse=True, **kw)
        ref_out, ref_lse = blas_path(sr.attention, Q, K, V, return_lse=True, **kw)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    r_out, r_lse = attention_ref(Q, K, V)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(lse, r_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,S,window", [(100, 100, None), (60, 250, None), (200, 200, 37)])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_causal_and_gqa_through_micro_kernels(request, rng, T, S, window, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    q = rng.standard_normal((2, T, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, S, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, S, 2, 64)).astype(np.float32)
    out, lse = sr.attention(q, k, v, causal=True, window=window, return_lse=True)
    ref_out, ref_lse = sequence_attention_ref(q, k, v, causal=True, window=window)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-4, atol=1e-4)
    b_out, b_lse = blas_path(sr.attention, q, k, v, causal=True, window=window, return_lse=True)
    np.testing.assert_allclose(out, b_out, rtol=1e-5, atol=1e-5)


def test_the_register_tile_fits_the_vectors():
    assert (cpu_micro.ROWS, cpu_micro.COLS) == {16: (12, 32), 8: (6, 16)}[cpu_micro.LANES]


def test_aligned_rows_copies_only_rows_off_32_bytes(rng):
    raw = cpu_micro.aligned_empty(40 * 64 + 16, np.float32)
    buf = cpu_micro.aligned_empty(40 * 64, np.float32).reshape((40, 64))
    for skip, copied in ((0, False), (4, True), (8, False), (12, True)):
        X = raw[skip:skip + 40 * 64].reshape((40, 64))
        X[:] = rng.standard_normal((40, 64))
        out = cpu_micro.aligned_rows(X, buf)
        assert np.shares_memory(out, buf) == copied and np.shares_memory(out, X) != copied
        np.testing.assert_array_equal(out, X)


@pytest.mark.parametrize("skip", [0, 1, 4, 8])
def test_values_rows_off_the_vectors_alignment(rng, skip):
    """Value rows starting 4-32 bytes past a cache line (large numpy arrays start 16 past): read in place
    (AVX-512) or copied first (AVX2), the same results."""
    B, N, d, dv = 40, 1500, 24, 64
    Q = rng.standard_normal((B, d)).astype(np.float32)
    K = rng.standard_normal((N, d)).astype(np.float32)
    raw = cpu_micro.aligned_empty(N * dv + 16, np.float32)
    V = raw[skip:skip + N * dv].reshape((N, dv))
    V[:] = rng.standard_normal((N, dv))
    assert V.ctypes.data % 64 == 4 * skip
    out, lse = sr.attention(Q, K, V, return_lse=True)
    r_out, r_lse = attention_ref(Q, K, V)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(lse, r_lse, rtol=1e-5, atol=1e-5)


#: Numba compiling for Haswell: AVX2 and FMA, no AVX-512 (scripts/avx2_paths.sh).
HASWELL = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c"}


def numba_env(**settings):
    """This process's environment without its Numba CPU settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    return dict(env, **settings)


def tile_in_a_process(**settings):
    """(ROWS, COLS, has_bf16, has_vnni) as printed by a process with these Numba CPU settings."""
    res = subprocess.run([sys.executable, "-c", "from softretrieval import cpu_micro as m; "
                          "print(m.ROWS, m.COLS, m.has_fma_tiles(), m.has_bf16(), m.has_vnni())"],
                         env=numba_env(**settings), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_the_tile_follows_the_feature_list_numba_hands_llvm():
    """Numba's cache key holds the CPU name and the feature list it hands LLVM, and a kernel compiled
    for one register tile must never be loaded where another was chosen (traps where the tile was off:
    SIGILL). Naming the host's own CPU hands LLVM the host's features, as a default process does: both
    choose the same tile and share cached kernels. Generic CPUs get none; a list that turns FMA off
    turns AVX-512F off in LLVM, and here."""
    default = tile_in_a_process()
    assert tile_in_a_process(NUMBA_CPU_NAME=llvm.get_host_cpu_name()) == default
    assert tile_in_a_process(NUMBA_CPU_NAME="haswell") == default
    assert tile_in_a_process(NUMBA_CPU_NAME="generic")[2:] == ["False", "False", "False"]
    assert tile_in_a_process(**HASWELL) == ["6", "16", "True", "False", "False"]
    assert tile_in_a_process(NUMBA_CPU_FEATURES="+avx,+avx2,+avx512f,-fma")[2:] == ["False", "False", "False"]


@pytest.mark.skipif(cpu_micro.LANES == 8 or not all(llvm.get_host_cpu_features().get(f) for f in ("avx2", "fma")),
                    reason="the AVX2 register tile is this process's own (or the CPU has no AVX2)")
def test_this_file_again_through_the_avx2_register_tile(tmp_path):
    """On an AVX-512 CPU the 6 x 16 AVX2 register tile never runs in this process: this file's tests run
    again in a process whose Numba compiles for Haswell (its own Numba cache)."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=numba_env(NUMBA_CACHE_DIR=str(tmp_path), **HASWELL), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "failed" not in res.stdout and "1 skipped" in res.stdout


def test_float16_keys_in_a_build_for_any_cpu(tmp_path):
    """A process whose Numba compiles for a generic x86-64 (NUMBA_CPU_NAME=generic, as for a cache
    shared by several CPUs) has no F16C: float16 storage decodes its halves with the portable rule
    (found by review: the F16C conversion became a call LLVM could not resolve, and the process
    aborted). Its top-k and soft retrieval match the float64 reference."""
    script = (
        "import numpy as np, softretrieval as sr\n"
        "from softretrieval import cpu_micro\n"
        "assert not cpu_micro.target_features().get('f16c', False)\n"
        "rng = np.random.default_rng(3)\n"
        "K = rng.standard_normal((700, 33)).astype(np.float16)\n"
        "V = rng.standard_normal((700, 9)).astype(np.float32)\n"
        "Q = rng.standard_normal((5, 33)).astype(np.float32)\n"
        "index = sr.Index(33, dtype='float16')\n"
        "index.add(K.astype(np.float32))\n"
        "s, i = index.search(Q, 10)\n"
        "ref = Q.astype(np.float64) @ K.astype(np.float64).T\n"
        "assert (i == np.argsort(-ref, axis=1, kind='stable')[:, :10]).all()\n"
        "assert np.allclose(s, np.take_along_axis(ref, i, 1), atol=1e-4)\n"
        "out = sr.attention(Q, K, V, scale=1.0)\n"
        "w = np.exp(ref - ref.max(1, keepdims=True)); w /= w.sum(1, keepdims=True)\n"
        "assert np.allclose(out, w @ V, atol=1e-5)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=numba_env(NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="generic"))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout[-2000:] + res.stderr[-3000:]
