"""The bfloat16 filter of exact top-k (cpu_bf16): its error bound, its micro-kernel, the rescoring
scan, and top-k through it against the float32 path, FAISS and a float64 reference, on adversarial
near-ties where every float32 dot is exact (so the two paths must agree bit for bit)."""

import math

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cpu_bf16, cpu_micro, rules, topk_buffer
from softretrieval.constants import MASKED, NEG_INIT

from conftest import switched_off
from reference import topk_ref

needs_bf16 = pytest.mark.skipif(not cpu_bf16.available(), reason="this CPU has no AVX512_BF16")


def float32_path(fn, *args, **kw):
    """``fn(*args, **kw)`` with config.BF16_FILTER off."""
    return switched_off("BF16_FILTER", fn, *args, **kw)


def bf16_round(x):
    """x rounded to the nearest bfloat16 (ties to even), as float64."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def exact_data(rng, B, N, d, bases=3, flips=0.1):
    """Queries and keys whose float32 dot products are exact in any order,
    with many exact ties and near-ties among the keys.

    Entries are ``m * 2**-11`` with ``|m| < 512``: nine significant bits, so
    rounding to bfloat16 (eight) changes most of them, while products are
    multiples of 2**-22 below 2**-4 and sums of up to 33 of them stay below
    2**2: 24 bits, exact in float32. Keys are copies of a few base keys with
    a share ``flips`` of their entries moved by one unit: scores then differ
    by multiples of 2**-22, far below the filter's error bound."""
    assert d <= 33
    Q = rng.integers(-511, 512, (B, d))
    base = rng.integers(-510, 511, (bases, d))
    K = base[rng.integers(0, bases, N)] + rng.integers(-1, 2, (N, d)) * (rng.random((N, d)) < flips)
    return (Q * 2.0**-11).astype(np.float32), (K * 2.0**-11).astype(np.float32)


# ------------------------------------------------------------ the rescoring scan (plain Python)

NO_SCALES = np.zeros(0, np.float32)


@pytest.fixture(autouse=True)
def plain_decode(monkeypatch):
    """The rules run as plain Python here: their stored-element decoder (which
    each target supplies) is the identity on float32 rows."""
    monkeypatch.setattr(rules, "decode", lambda x: x, raising=False)


def scan_both(rng, n_tiles, tile, k, noise):
    """The buffer after :func:`rules.topk_rescore_scan_row` on approximate
    logits (exact ones plus ``noise`` times the slack) and after
    :func:`rules.topk_scan_row` on the exact ones."""
    exact = np.round(rng.standard_normal(n_tiles * tile) * 8).astype(np.float32) / 8  # many ties
    exact[rng.random(exact.size) < 0.1] = MASKED
    slack = np.float32(0.3)
    approx = exact + (noise * slack * rng.uniform(-1, 1, exact.size)).astype(np.float32)
    approx[exact == MASKED] = MASKED
    q = np.ones(1, np.float32)                       # dot(q, Kt[j]) is the exact logit
    results = []
    for rescore in (True, False):
        cap = topk_buffer.capacity(k)
        bs, bi = np.empty(cap, np.float32), np.empty(cap, np.int64)
        count, ts, ti = 0, NEG_INIT, -1
        for t0 in range(0, exact.size, tile):
            row = (approx if rescore else exact)[t0:t0 + tile].copy()
            Kt = exact[t0:t0 + tile, None]
            mx = row.max()
            if rescore:
                count, ts, ti = rules.topk_rescore_scan_row(
                    row, row.size, mx, t0, k, bs, bi, count, ts, ti, q, Kt, NO_SCALES, None, None,
                    False, slack)
            else:
                count, ts, ti = rules.topk_scan_row(row, row.size, mx, t0, k, bs, bi, count, ts, ti)
        n = topk_buffer.finish(bs, bi, count, k)
        results.append((bs[:n].copy(), bi[:n].copy()))
    return results


@pytest.mark.parametrize("k", [1, 5, 40])
def test_rescore_scan_ends_as_the_exact_scan(rng, k):
    (s1, i1), (s0, i0) = scan_both(rng, n_tiles=6, tile=37, k=k, noise=1.0)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(s1, s0)


def test_rescore_scan_relies_on_its_margin(rng):
    """With errors up to six times the promised slack the scan loses keys: the margin
    is what makes it exact (so the test above can fail)."""
    lost = 0
    for _ in range(20):
        (_, i1), (_, i0) = scan_both(rng, n_tiles=6, tile=37, k=5, noise=6.0)
        lost += not np.array_equal(i1, i0)
    assert lost > 0


# ------------------------------------------------------------ the micro-kernel and its bound

def filter_dots(Q, K):
    """(dots of the bfloat16 micro-kernel, query norm bounds, key norm bounds)."""
    bq, d = Q.shape
    tn = K.shape[0]
    d2 = (d + 1) // 2
    qp = np.empty((-(-bq // cpu_micro.ROWS) * cpu_micro.ROWS, d2), np.uint32)
    qn = np.empty(bq)
    cpu_bf16.pack_queries(Q, qp, qn)
    kp = np.empty((-(-tn // cpu_micro.COLS), d2, cpu_micro.COLS), np.uint32)
    kn = np.empty(tn, np.float32)
    cpu_bf16.pack_keys(K, kp, kn, np.empty((tn, d2), np.uint32))
    S = np.full((bq, tn), np.nan, np.float32)
    cpu_micro.tile_products(qp, kp, S, np.empty((cpu_micro.ROWS, cpu_micro.COLS), np.float32), True,
                            np.empty(0, np.int64))
    return S, qn, np.array([cpu_bf16.norm_bound(x, d) for x in kn])


@needs_bf16
@pytest.mark.parametrize("bq,tn,d", [(1, 1, 1), (12, 32, 2), (13, 33, 7), (25, 70, 128), (7, 100, 385),
                                     (40, 31, 64)])
@pytest.mark.parametrize("kind", ["normal", "heavy", "worst", "tiny", "huge"])
def test_tile_dots_within_the_bound(rng, bq, tn, d, kind):
    if kind == "worst":     # every element halfway between two bfloat16: the bound nearly tight
        Q = np.full((bq, d), 1 + 2.0**-8, np.float32) * rng.choice([1, -1], (bq, 1)).astype(np.float32)
        K = np.full((tn, d), 1 + 2.0**-8, np.float32)
    else:
        Q = rng.standard_normal((bq, d)).astype(np.float32)
        K = rng.standard_normal((tn, d)).astype(np.float32)
        if kind == "heavy":
            Q *= np.exp(rng.standard_normal((bq, d)) * 3).astype(np.float32)
            K *= np.exp(rng.standard_normal((tn, d)) * 3).astype(np.float32)
        scale = {"normal": 1.0, "heavy": 1.0, "tiny": 1e-19, "huge": 1e14}[kind]
        Q *= np.float32(scale)
        K *= np.float32(scale)
    S, qn, kn = filter_dots(Q, K)
    exact = Q.astype(np.float64) @ K.astype(np.float64).T
    assert np.isfinite(S).all()
    np.testing.assert_array_less(qn, np.linalg.norm(Q.astype(np.float64), axis=1) * (1 + 1e-6) + 1e-300)
    assert (qn >= np.linalg.norm(Q.astype(np.float64), axis=1)).all()
    assert (kn >= np.linalg.norm(K.astype(np.float64), axis=1)).all()
    bound = cpu_bf16.coefficient(d) * qn[:, None] * kn[None, :] + 2.0**-100
    err = np.abs(S - exact)
    assert (err <= bound).all(), (err / bound).max()
    # and it is a bfloat16 product: the dots of the rounded inputs, in float32
    rounded = bf16_round(Q) @ bf16_round(K).T
    ref_scale = np.abs(bf16_round(Q)) @ np.abs(bf16_round(K)).T
    assert (np.abs(S - rounded) <= 4 * (d + 2) * 2.0**-24 * ref_scale + 2.0**-100).all()
    if kind == "worst" and d > 1:
        assert (err / bound).max() > 0.4


def test_coefficient_and_slack():
    u = 2.0**-8
    assert 2 * u < cpu_bf16.coefficient(128) < 2 * u * 1.01
    assert cpu_bf16.coefficient(4096) > cpu_bf16.coefficient(128)
    s = cpu_bf16.slack(10.0, *cpu_bf16.margin_terms(2.0, 1.0, 0.0, 128))
    assert s >= cpu_bf16.coefficient(128) * 20
    assert cpu_bf16.slack(1e30, *cpu_bf16.margin_terms(1e30, 1.0, 0.0, 128)) == np.inf


# ------------------------------------------------------------ top-k through the filter

@needs_bf16
@pytest.mark.parametrize("B,N,d,k", [(13, 33, 33, 5), (37, 1000, 17, 10), (100, 3001, 33, 100),
                                     (30, 200, 8, 500), (64, 2048, 1, 3)])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_exact_near_ties_equal_float32_path_and_reference(request, rng, B, N, d, k, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    Q, K = exact_data(rng, B, N, d)
    bias = (rng.integers(-8, 9, N) * 2.0**-22).astype(np.float32)
    exclude = [rng.choice(N, size=rng.integers(0, 5), replace=False) for _ in range(B)]
    for kw in ({}, {"bias": bias, "exclude": exclude}):
        scores, ids = sr.topk(Q, K, k, **kw)
        s32, i32 = float32_path(sr.topk, Q, K, k, **kw)
        np.testing.assert_array_equal(ids, i32)
        np.testing.assert_array_equal(scores, s32)
        ref_s, ref_i = topk_ref(Q, K, k, **kw)
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
    scores, ids = sr.topk(Q, K, k, metric="l2")
    s32, i32 = float32_path(sr.topk, Q, K, k, metric="l2")
    np.testing.assert_array_equal(ids, i32)
    np.testing.assert_array_equal(scores, s32)


@needs_bf16
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_random_data_same_sets_as_float32_path(small_tiles, rng, metric):
    Q = rng.standard_normal((50, 19)).astype(np.float32)
    K = rng.standard_normal((700, 19)).astype(np.float32)
    for k in (1, 10, 64):
        scores, ids = sr.topk(Q, K, k, metric=metric)
        s32, i32 = float32_path(sr.topk, Q, K, k, metric=metric)
        np.testing.assert_allclose(scores, s32, rtol=1e-5, atol=1e-5)
        assert all(set(a) == set(b) for a, b in zip(ids, i32))


@needs_bf16
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_index_storage_dtypes(rng, dtype):
    Q, K = exact_data(rng, 40, 1500, 33)
    index = sr.Index(33, dtype=dtype)
    index.add(K)
    allow = [rng.choice(1500, size=700, replace=False) for _ in range(40)]
    for kw in ({}, {"include": allow}):
        scores, ids = index.search(Q, 20, **kw)
        s32, i32 = float32_path(index.search, Q, 20, **kw)
        if dtype == "int8":        # row scales: dots are no longer exact in float32
            np.testing.assert_allclose(scores, s32, rtol=1e-5, atol=1e-6)
            assert all(len(set(a) ^ set(b)) <= 2 for a, b in zip(ids, i32))
        else:
            np.testing.assert_array_equal(ids, i32)
            np.testing.assert_array_equal(scores, s32)


@needs_bf16
def test_huge_norms_take_the_float32_path(small_tiles, rng):
    """Tiles whose norms could overflow the bound are scored in float32;
    the others in the same call still go through the filter."""
    Q, K = exact_data(rng, 20, 300, 33)
    K[150:170] *= np.float32(2.0**90)          # some tiles beyond NORM_LIMIT with the queries
    Qbig = Q * np.float32(2.0**20)
    for q in (Q, Qbig):
        scores, ids = sr.topk(q, K, 7)
        s32, i32 = float32_path(sr.topk, q, K, 7)
        np.testing.assert_array_equal(ids, i32)
        np.testing.assert_array_equal(scores, s32)
        assert np.isin(ids, np.arange(150, 170)).any()


@needs_bf16
def test_huge_elements_and_nan_patterns_as_the_float32_path(small_tiles, rng):
    """A query element beyond bfloat16's range against tiny keys (the norm
    product is small, the element is not) scores in float32; keys holding
    NaN patterns that rounding to bfloat16 would turn into numbers are
    refused as on the float32 path."""
    Q = rng.standard_normal((32, 16)).astype(np.float32)
    Q[:, 0] = np.float32(3.4e38)
    K = (rng.standard_normal((600, 16)) * 1e-10).astype(np.float32)
    scores, ids = sr.topk(Q, K, 5)
    s32, i32 = float32_path(sr.topk, Q, K, 5)
    np.testing.assert_array_equal(ids, i32)
    np.testing.assert_array_equal(scores, s32)
    Q = rng.standard_normal((32, 16)).astype(np.float32)
    for pattern in (0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800000):
        bad = rng.standard_normal((600, 16)).astype(np.float32)
        bad.view(np.uint32)[100, 3] = pattern
        with pytest.raises(ValueError, match="NaN or inf"):
            float32_path(sr.topk, Q, bad, 5)
        with pytest.raises(ValueError, match="NaN or inf"):
            sr.topk(Q, bad, 5)


@needs_bf16
def test_subnormal_and_zero_inputs(small_tiles, rng):
    Q = rng.standard_normal((30, 9)).astype(np.float32) * np.float32(1e-39)
    Q[3] = 0
    K = rng.standard_normal((100, 9)).astype(np.float32) * np.float32(1e-3)
    K[10] = 0
    scores, ids = sr.topk(Q, K, 5)
    s32, i32 = float32_path(sr.topk, Q, K, 5)
    np.testing.assert_array_equal(scores, s32)
    np.testing.assert_array_equal(ids, i32)
    scores, ids = sr.topk(Q, K, 5, metric="cosine")     # queries normalized: dots no longer exact
    s32, i32 = float32_path(sr.topk, Q, K, 5, metric="cosine")
    np.testing.assert_allclose(scores, s32, rtol=1e-6)
    assert all(set(a) == set(b) for a, b in zip(ids, i32))


@needs_bf16
def test_minilm_same_as_float32_path_and_faiss(minilm):
    base, query = minilm["base"], minilm["query"]
    scores, ids = sr.topk(query, base, 100)
    s32, i32 = float32_path(sr.topk, query, base, 100)
    np.testing.assert_allclose(scores, s32, rtol=1e-6, atol=1e-6)
    # Sets differ only where the 100th place is a tie within float32 rounding
    # (the two paths add a dot's 384 products in different orders).
    exact = query.astype(np.float64) @ base.astype(np.float64).T
    differ = [b for b in range(len(query)) if set(ids[b]) != set(i32[b])]
    assert len(differ) <= 5
    for b in differ:
        swapped = list(set(ids[b]) ^ set(i32[b]))
        assert np.ptp(exact[b, swapped]) < 1e-6
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    D, I = index.search(query, 10)
    assert (ids[:, :10] == I).mean() > 0.999
    np.testing.assert_allclose(scores[:, :10], D, rtol=1e-5, atol=1e-5)


def test_margin_scale():
    """The margin a top-k search pays for, in the units of its logits: for
    unit vectors about 2**-7 (so a key is rescored only when its bfloat16
    logit comes within ~0.008 of the threshold)."""
    m = cpu_bf16.slack(1.0, *cpu_bf16.margin_terms(1.0, 1.0, 0.0, 384))
    assert 2.0**-7 < m < 2.0**-7 * 1.02
    assert math.isfinite(m)
