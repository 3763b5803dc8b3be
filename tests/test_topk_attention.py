"""topk_attention() against the float64 reference (sort, take k, softmax)."""

import numpy as np
import pytest

import softretrieval as sr

from reference import topk_attention_ref


def make(rng, B, N, d, dv):
    return (rng.standard_normal((B, d)).astype(np.float32),
            rng.standard_normal((N, d)).astype(np.float32),
            rng.standard_normal((N, dv)).astype(np.float32))


def assert_matches(res, ref, tol=1e-5):
    out, ids, weights, lse, coverage = ref
    assert isinstance(res, sr.TopKAttention)
    for name in ("out", "weights", "lse", "coverage"):
        assert getattr(res, name).dtype == np.float32, name
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.out, out, atol=tol)
    np.testing.assert_allclose(res.weights, weights, atol=tol)
    np.testing.assert_allclose(res.lse, lse, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.coverage, coverage, atol=tol)


@pytest.mark.parametrize("B,N,d,dv,k", [(1, 1, 3, 2, 1), (1, 100, 7, 3, 10), (3, 40, 5, 5, 40),
                                        (9, 33, 6, 4, 50), (17, 300, 9, 2, 20), (64, 700, 12, 8, 5)])
def test_matches_reference(small_tiles, rng, B, N, d, dv, k):
    Q, K, V = make(rng, B, N, d, dv)
    res = sr.topk_attention(Q, K, V, k=k)
    assert res.out.shape == (B, dv) and res.ids.shape == (B, k) and res.coverage.shape == (B,)
    assert_matches(res, topk_attention_ref(Q, K, V, k=k))


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_metrics_scale_bias_exclude(small_tiles, rng, metric):
    Q, K, V = make(rng, 11, 150, 6, 3)
    bias = rng.standard_normal(150)
    bias[::5] = -np.inf
    lists = [rng.choice(150, 30, replace=False) for _ in range(11)]
    lists[4] = np.arange(150)
    res = sr.topk_attention(Q, K, V, k=12, scale=0.8, bias=bias, exclude=lists, metric=metric)
    ref = topk_attention_ref(Q, K, V, k=12, scale=0.8, bias=bias, exclude=lists, metric=metric)
    assert_matches(res, ref)
    assert (res.ids[4] == -1).all() and (res.out[4] == 0).all() and res.coverage[4] == 0
    assert np.isneginf(res.lse[4])


def test_k_equals_n_is_full_attention(small_tiles, rng):
    Q, K, V = make(rng, 10, 90, 5, 4)
    res = sr.topk_attention(Q, K, V, k=90, scale=0.5)
    out, lse = sr.attention(Q, K, V, scale=0.5, return_lse=True)
    # coverage = exp(lse_topk - lse): two float32 sums of 90 weights, ~1e-6 apart
    np.testing.assert_allclose(res.coverage, 1.0, atol=1e-5)
    np.testing.assert_allclose(res.out, out, atol=1e-5)
    np.testing.assert_allclose(res.lse, lse, rtol=1e-6)


def test_k_larger_than_n(rng):
    Q, K, V = make(rng, 3, 6, 4, 2)
    res = sr.topk_attention(Q, K, V, k=10)
    assert (res.ids[:, 6:] == -1).all() and (res.weights[:, 6:] == 0).all()
    np.testing.assert_allclose(res.weights.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(res.coverage, 1, atol=1e-6)


def test_coverage_grows_with_k_on_minilm(minilm):
    base, query = minilm["base"], minilm["query"][:100]
    cov = [sr.topk_attention(query, base, k=k, scale=20.0).coverage.mean() for k in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(cov, cov[1:]))
    ref = topk_attention_ref(query[:20], base, k=100, scale=20.0)
    assert_matches(sr.topk_attention(query[:20], base, k=100, scale=20.0), ref)


def test_huge_scale_is_finite(rng):
    Q, K, V = make(rng, 5, 400, 8, 3)
    res = sr.topk_attention(Q, K, V, k=4, scale=1e4)
    assert np.isfinite(res.out).all() and np.isfinite(res.lse).all()
    assert_matches(res, topk_attention_ref(Q, K, V, k=4, scale=1e4), tol=1e-4)


def test_empty_queries(rng):
    _, K, V = make(rng, 1, 10, 3, 2)
    res = sr.topk_attention(np.zeros((0, 3), np.float32), K, V, k=4)
    assert res.out.shape == (0, 2) and res.ids.shape == (0, 4)
