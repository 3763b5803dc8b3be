"""The float32 micro-kernels (cpu_micro: AVX-512) against numpy and the float64 references: tiles
crossing the register tile's 12-row and 32-column edges, key windows that skip register tiles, and soft
retrieval, grouped-query and causal attention through them against the BLAS path."""

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cpu_micro

from conftest import switched_off
from reference import attention_ref, sequence_attention_ref

pytestmark = pytest.mark.skipif(not cpu_micro.has_avx512(), reason="this CPU has no AVX-512F")


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
