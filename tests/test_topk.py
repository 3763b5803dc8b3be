"""topk() against FAISS itself and a float64 reference: metrics, ties, edges, exclusions, bad input."""

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import config

from reference import attention_ref, exclusion_mask, topk_ref


def make(rng, B, N, d):
    return (rng.standard_normal((B, d)).astype(np.float32),
            rng.standard_normal((N, d)).astype(np.float32))


def assert_same_topk(scores, ids, ref_scores, ref_ids, tol=1e-5):
    """Scores within tol (relative when large); ids equal wherever the score
    gap to the neighbours exceeds the tolerance (near-ties may swap). At the
    last place the neighbour may lie just outside the reference's list: there
    a different id is accepted when its score ties the reference's."""
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ref_scores.shape and ids.shape == ref_ids.shape
    np.testing.assert_array_equal(ids == -1, ref_ids == -1)
    valid = ref_ids != -1
    np.testing.assert_allclose(scores[valid], ref_scores[valid], rtol=tol, atol=tol)
    assert (scores[~valid] == ref_scores[~valid]).all()
    differ = ids != ref_ids
    if differ.any():
        scale = np.maximum(1.0, np.abs(ref_scores[differ]))
        for b, j in zip(*np.nonzero(differ)):
            row = ref_scores[b, valid[b]]
            gap = np.abs(row - ref_scores[b, j])
            gap[j] = np.inf
            if j == row.size - 1:      # the neighbour outside the list: our own pick
                gap[j] = abs(scores[b, j] - ref_scores[b, j])
            assert gap.min() <= 2 * tol * max(1.0, abs(ref_scores[b, j])), (b, j)
        assert scale.size < 0.01 * ids.size + 2


def faiss_search(metric, K, Q, k):
    index = faiss.IndexFlatIP(K.shape[1]) if metric == "ip" else faiss.IndexFlatL2(K.shape[1])
    index.add(K)
    return index.search(Q, k)


SHAPES = [(1, 1, 3, 1), (1, 100, 7, 10), (3, 16, 8, 16), (5, 33, 5, 40), (17, 300, 9, 50),
          (40, 257, 13, 1), (64, 1000, 16, 100)]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("B,N,d,k", SHAPES)
def test_against_faiss_small_tiles(small_tiles, rng, metric, B, N, d, k):
    Q, K = make(rng, B, N, d)
    scores, ids = sr.topk(Q, K, k, metric=metric)
    D, I = faiss_search(metric, K, Q, min(k, N))
    assert_same_topk(scores[:, : min(k, N)], ids[:, : min(k, N)], D, I.astype(np.int64))
    assert_same_topk(scores, ids, *topk_ref(Q, K, k, metric))


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("B,k", [(1, 10), (7, 100), (300, 10), (1030, 5)])
def test_against_faiss_knn_default_tiles(rng, metric, B, k):
    Q, K = make(rng, B, 20000, 32)
    D, I = faiss.knn(Q, K, k, metric=faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    assert_same_topk(*sr.topk(Q, K, k, metric=metric), D, I.astype(np.int64))


@pytest.mark.parametrize("k", [1, 100, 1500, 4096])
def test_large_k_against_faiss(rng, k):
    Q, K = make(rng, 5, 6000, 16)
    D, I = faiss_search("ip", K, Q, k)
    assert_same_topk(*sr.topk(Q, K, k), D, I.astype(np.int64))


def test_minilm_recall_against_shipped_ground_truth(minilm):
    base, query, gt, gt_ip = minilm["base"], minilm["query"], minilm["gt"], minilm["gt_ip"]
    scores, ids = sr.topk(query, base, 100)
    recall10 = np.mean([len(set(ids[b, :10]) & set(gt[b, :10])) / 10 for b in range(len(query))])
    recall100 = np.mean([len(set(ids[b]) & set(gt[b])) / 100 for b in range(len(query))])
    assert recall10 == 1.0
    assert recall100 >= 0.9999
    np.testing.assert_allclose(scores, gt_ip, atol=1e-5)
    D, I = faiss_search("ip", base, query, 100)
    assert_same_topk(scores, ids, D, I.astype(np.int64))


def test_minilm_l2_and_cosine(minilm):
    base, query, gt = minilm["base"], minilm["query"][:200], minilm["gt"][:200]
    _, ids_l2 = sr.topk(query, base, 10, metric="l2")
    _, ids_cos = sr.topk(query, base, 10, metric="cosine")
    assert (ids_l2 == gt[:, :10]).mean() == 1.0
    assert (ids_cos == gt[:, :10]).mean() == 1.0


def test_cosine_against_faiss_on_normalized_copies(small_tiles, rng):
    Q, K = make(rng, 9, 200, 6)
    K[::7] *= 50
    Q0, K0 = Q.copy(), K.copy()
    scores, ids = sr.topk(Q, K, 20, metric="cosine")
    np.testing.assert_array_equal(Q, Q0)
    np.testing.assert_array_equal(K, K0)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    Kn = K / np.linalg.norm(K, axis=1, keepdims=True)
    D, I = faiss_search("ip", Kn, Qn, 20)
    assert_same_topk(scores, ids, D, I.astype(np.int64))
    assert_same_topk(scores, ids, *topk_ref(Q, K, 20, "cosine"))


def test_cosine_zero_vectors_score_zero(rng):
    Q, K = make(rng, 2, 5, 3)
    K[2] = 0
    Q[1] = 0
    scores, ids = sr.topk(Q, K, 5, metric="cosine")
    assert (scores[1] == 0).all() and list(ids[1]) == [0, 1, 2, 3, 4]
    assert scores[0][list(ids[0]).index(2)] == 0


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_lower_id_first(small_tiles, rng, metric):
    K = rng.integers(-2, 3, (300, 4)).astype(np.float32)
    K[100:150] = K[0]
    Q = rng.integers(-2, 3, (30, 4)).astype(np.float32)
    Q[10] = Q[0]
    scores, ids = sr.topk(Q, K, 60, metric=metric)
    ref_scores, ref_ids = topk_ref(Q, K, 60, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    np.testing.assert_array_equal(ids[10], ids[0])


@pytest.mark.parametrize("metric,pad", [("ip", -np.inf), ("cosine", -np.inf), ("l2", np.inf)])
def test_k_larger_than_n_pads(small_tiles, rng, metric, pad):
    Q, K = make(rng, 4, 7, 5)
    scores, ids = sr.topk(Q, K, 12, metric=metric)
    assert (ids[:, 7:] == -1).all() and (scores[:, 7:] == pad).all()
    assert sorted(ids[0, :7]) == list(range(7))
    assert_same_topk(scores, ids, *topk_ref(Q, K, 12, metric))


def test_n_equals_one(rng):
    Q, K = make(rng, 3, 1, 5)
    scores, ids = sr.topk(Q, K, 1)
    np.testing.assert_array_equal(ids, [[0]] * 3)
    np.testing.assert_allclose(scores[:, 0], Q @ K[0], rtol=1e-6)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_bias_and_excluded_keys(small_tiles, rng, metric):
    Q, K = make(rng, 12, 200, 6)
    bias = rng.standard_normal(200)
    bias[rng.random(200) < 0.5] = -np.inf
    scores, ids = sr.topk(Q, K, 30, metric=metric, bias=bias)
    assert_same_topk(scores, ids, *topk_ref(Q, K, 30, metric, bias=bias))
    assert np.isfinite(bias[ids[ids >= 0]]).all()


def test_bias_excluding_everything(rng):
    Q, K = make(rng, 3, 50, 4)
    scores, ids = sr.topk(Q, K, 5, bias=np.full(50, -np.inf))
    assert (ids == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("B", [1, 5, 40])
def test_exclude_csr_and_lists(small_tiles, rng, B):
    Q, K = make(rng, B, 120, 6)
    lists = [rng.choice(120, rng.integers(0, 60), replace=False) for _ in range(B)]
    lists[0] = np.arange(120)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])])
    csr = (offsets, np.concatenate(lists).astype(np.int32))
    s1, i1 = sr.topk(Q, K, 15, exclude=lists)
    s2, i2 = sr.topk(Q, K, 15, exclude=csr)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    assert (i1[0] == -1).all()
    assert_same_topk(s1, i1, *topk_ref(Q, K, 15, exclude=lists))
    for b in range(B):
        assert not set(i1[b][i1[b] >= 0]) & set(lists[b])


def test_exclude_applies_to_attention(small_tiles, rng):
    Q, K = make(rng, 6, 90, 5)
    V = rng.standard_normal((90, 3)).astype(np.float32)
    lists = [rng.choice(90, 40, replace=False) for _ in range(6)]
    lists[2] = np.arange(90)
    out, lse = sr.attention(Q, K, V, exclude=lists, return_lse=True)
    mask = exclusion_mask(6, 90, lists)
    for b in range(6):
        bias = np.where(mask[b], -np.inf, 0.0)
        ro, rl = attention_ref(Q[b:b + 1], K, V, bias=bias)
        np.testing.assert_allclose(out[b], ro[0], atol=1e-5)
        np.testing.assert_allclose(lse[b], rl[0], rtol=1e-5)
    assert (out[2] == 0).all() and np.isneginf(lse[2])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_attention_metrics(small_tiles, rng, metric):
    Q, K = make(rng, 9, 150, 7)
    V = rng.standard_normal((150, 4)).astype(np.float32)
    out, lse = sr.attention(Q, K, V, metric=metric, scale=0.3, return_lse=True)
    from reference import scores_ref

    S = scores_ref(Q, K, metric)
    logits = -0.3 * S if metric == "l2" else 0.3 * S
    m = logits.max(1, keepdims=True)
    w = np.exp(logits - m)
    np.testing.assert_allclose(out, (w @ V) / w.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(lse, (m + np.log(w.sum(1, keepdims=True)))[:, 0], rtol=1e-5, atol=1e-5)


def test_invariant_across_tiles_and_threads(monkeypatch, rng):
    Q, K = make(rng, 70, 3000, 12)
    results = []
    for cfg in [dict(NUM_THREADS=1), dict(NUM_THREADS=2),
                dict(NUM_THREADS=2, QUERY_BLOCK=8, KEY_TILE=16, KEY_TILE_FEW=8, FEW_TILE_SCORES=0, FEW_QUERIES=2,
                     MIN_QUERIES_PER_THREAD=4, MIN_KEYS_PER_SPLIT=8)]:
        for B in (1, 3, 70):
            with monkeypatch.context() as mp:
                for name, value in cfg.items():
                    mp.setattr(config, name, value)
                results.append((B, sr.topk(Q[:B], K, 25)))
    for B, (s, i) in results[3:]:
        s0, i0 = next(r for b, r in results if b == B)
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_allclose(s, s0, rtol=1e-6)


@pytest.mark.parametrize("k,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("3", TypeError),
                                   (True, TypeError), (None, TypeError)])
def test_bad_k(rng, k, exc):
    Q, K = make(rng, 2, 10, 3)
    with pytest.raises(exc, match="k must"):
        sr.topk(Q, K, k)
    with pytest.raises(exc, match="k must"):
        sr.topk_attention(Q, K, k=k)


def test_unknown_metric(rng):
    Q, K = make(rng, 2, 10, 3)
    with pytest.raises(ValueError, match="metric"):
        sr.topk(Q, K, 3, metric="dot")
    with pytest.raises(ValueError, match="metric"):
        sr.attention(Q, K, metric="L2")


@pytest.mark.parametrize("exclude,exc,match", [
    ([np.array([0, 10])] * 2, ValueError, "out of range"),
    ([np.array([-1])] * 2, ValueError, "out of range"),
    ([np.array([1])], ValueError, "one array per query"),
    ([np.array([0.5])] * 2, TypeError, "integers"),
    ((np.array([0, 1, 2]), np.array([1, 12])), ValueError, "out of range"),
    ((np.array([0, 2, 1]), np.array([1, 2])), ValueError, "offsets"),
    ((np.array([0, 1]), np.array([1])), ValueError, "offsets"),
    ((np.array([0, 1, 2]),), ValueError, "tuple"),
    ({"a": 1}, TypeError, "exclude"),
])
def test_bad_exclude(rng, exclude, exc, match):
    Q, K = make(rng, 2, 10, 3)
    with pytest.raises(exc, match=match):
        sr.topk(Q, K, 3, exclude=exclude)


def test_bad_input_names_argument(rng):
    Q, K = make(rng, 2, 10, 3)
    K[4, 1] = np.nan
    with pytest.raises(ValueError, match="keys"):
        sr.topk(Q, K, 3)
    with pytest.raises(TypeError, match="queries"):
        sr.topk(Q.astype(int), K, 3)
    with pytest.raises(ValueError, match="bias"):
        sr.topk(Q, np.nan_to_num(K), 3, bias=np.zeros(9))


def test_empty_queries(rng):
    _, K = make(rng, 1, 10, 3)
    s, i = sr.topk(np.zeros((0, 3), np.float32), K, 4)
    assert s.shape == (0, 4) and i.shape == (0, 4)
