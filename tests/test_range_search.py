"""Range search: against a float64 brute force written here and against
FAISS's ``range_search``, on shapes crossing tile, split and slot edges.

FAISS's threshold is strict (``>`` for inner products, ``<`` for
distances), ours inclusive, and float32 scores differ from float64 ones in
their last bits: every threshold here lies midway between two reference
scores far enough apart (:func:`midway`) that no score is within rounding of
it, so the sets of ids must be equal, and the scores equal within rounding.
"""

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import api, config, layout, ranges, storage, validate
from softretrieval.devices import Rows

from reference import exclusion_mask, scores_ref

METRICS = ("ip", "cosine", "l2")


def make(rng, B, N, d):
    return (rng.standard_normal((B, d)).astype(np.float32),
            rng.standard_normal((N, d)).astype(np.float32))


def reference_scores(Q, K, metric, bias=None, exclude=None, window=None):
    """(B, N) float64 scores (similarity + bias, or squared distance - bias)
    and (B, N) bool: which keys may be returned at all."""
    S = scores_ref(Q, K, metric)
    B, N = S.shape
    valid = ~exclusion_mask(B, N, exclude)
    if bias is not None:
        b = np.asarray(bias, np.float64)
        valid &= np.isfinite(b)[None, :]
        with np.errstate(invalid="ignore"):
            S = S - b if metric == "l2" else S + b
    if window is not None:
        lo, hi = window
        j = np.arange(N)
        valid &= (j >= lo[:, None]) & (j < hi[:, None])
    return S, valid


def range_ref(S, valid, threshold, metric):
    """Per query: (ids ascending, their scores) of every valid key at or
    above the threshold (at or below it for "l2")."""
    keep = valid & ((S <= threshold) if metric == "l2" else (S >= threshold))
    return [(np.flatnonzero(keep[b]), S[b, keep[b]]) for b in range(S.shape[0])]


def tolerance(Q, K, metric):
    """Absolute rounding allowance of float32 scores."""
    if metric == "cosine":
        return 1e-5
    qn = np.linalg.norm(Q.astype(np.float64), axis=1).max()
    kn = np.linalg.norm(K.astype(np.float64), axis=1).max()
    return 2e-6 * (qn + kn) ** 2


def midway(S, valid, per_query, atol, metric):
    """A threshold giving about ``per_query`` results per query, midway
    between two neighbouring reference scores more than 8 atol apart."""
    v = np.sort(S[valid & np.isfinite(S)])
    want = per_query * S.shape[0]
    want = min(max(want if metric == "l2" else v.size - want, 1), v.size - 1)
    for step in range(v.size):
        for j in (want - step, want + step):
            if 0 < j < v.size and v[j] - v[j - 1] > 8 * atol:
                return float((v[j] + v[j - 1]) / 2)
    raise AssertionError("no gap between reference scores")


def check(res, ref, metric, atol):
    """``res`` = (lims, scores, ids) holds exactly the reference's ids per
    query, their scores within ``atol``, best first then lower id."""
    lims, scores, ids = res
    assert lims.dtype == np.int64 and ids.dtype == np.int64 and scores.dtype == np.float32
    assert lims.shape == (len(ref) + 1,) and lims[0] == 0 and (np.diff(lims) >= 0).all()
    assert lims[-1] == ids.shape[0] == scores.shape[0]
    for b, (want_ids, want_scores) in enumerate(ref):
        got_i = ids[lims[b]:lims[b + 1]]
        got_s = scores[lims[b]:lims[b + 1]]
        np.testing.assert_array_equal(np.sort(got_i), want_ids, err_msg=f"query {b}")
        by_id = np.argsort(got_i)
        np.testing.assert_allclose(got_s[by_id], want_scores, rtol=0, atol=atol)
        key = got_s if metric == "l2" else -got_s
        assert (np.lexsort((got_i, key)) == np.arange(got_i.size)).all(), f"query {b} order"


def faiss_range(metric, K, Q, threshold):
    index = faiss.IndexFlatL2(K.shape[1]) if metric == "l2" else faiss.IndexFlatIP(K.shape[1])
    index.add(K)
    return index.range_search(Q, threshold)


def check_faiss(res, faiss_res, atol):
    """Same ids per query as FAISS, scores within atol (FAISS's are unordered)."""
    lims, scores, ids = res
    L, D, I = faiss_res
    np.testing.assert_array_equal(lims, L.astype(np.int64))
    for b in range(lims.shape[0] - 1):
        mine = np.argsort(ids[lims[b]:lims[b + 1]])
        theirs = np.argsort(I[L[b]:L[b + 1]])
        np.testing.assert_array_equal(ids[lims[b]:lims[b + 1]][mine], I[L[b]:L[b + 1]][theirs])
        np.testing.assert_allclose(scores[lims[b]:lims[b + 1]][mine], D[L[b]:L[b + 1]][theirs],
                                   rtol=0, atol=atol)


# ---------------------------------------------------------------- the brute force

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("B,N,d,slots", [(1, 37, 5, 128), (3, 100, 7, 2), (13, 257, 9, 1),
                                         (19, 63, 3, 4), (2, 7, 4, 1)])
def test_against_reference_small_tiles(small_tiles, monkeypatch, rng, metric, B, N, d, slots):
    """Tiles, key splits and query blocks of a few rows, and slots so few that
    most queries overflow the first pass and are run again."""
    monkeypatch.setattr(config, "RANGE_SLOTS", slots)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    Q, K = make(rng, B, N, d)
    atol = tolerance(Q, K, metric)
    S, valid = reference_scores(Q, K, metric)
    threshold = midway(S, valid, 6, atol, metric)
    res = sr.range_search(Q, K, threshold, metric=metric)
    check(res, range_ref(S, valid, threshold, metric), metric, atol)


@pytest.mark.parametrize("metric", METRICS)
def test_results_do_not_depend_on_slots_tiles_or_threads(monkeypatch, rng, metric):
    """The same keys whatever the slots, tiles and threads (the scores
    within float32 rounding: the tiling changes the order of the sums)."""
    Q, K = make(rng, 70, 3001, 16)
    S, valid = reference_scores(Q, K, metric)
    atol = tolerance(Q, K, metric)
    threshold = midway(S, valid, 40, atol, metric)
    first = sr.range_search(Q, K, threshold, metric=metric)
    monkeypatch.setattr(config, "RANGE_SLOTS", 3)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    monkeypatch.setattr(config, "KEY_TILE", 100)
    monkeypatch.setattr(config, "NUM_THREADS", 1)
    again = sr.range_search(Q, K, threshold, metric=metric)
    np.testing.assert_array_equal(first[0], again[0])
    ref = range_ref(S, valid, threshold, metric)
    check(first, ref, metric, atol)
    check(again, ref, metric, atol)


# ---------------------------------------------------------------- FAISS

@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("B", [1, 5, 200])
def test_against_faiss(rng, metric, B):
    Q, K = make(rng, B, 20000, 24)
    atol = tolerance(Q, K, metric)
    S, valid = reference_scores(Q, K, metric)
    threshold = midway(S, valid, 150, atol, metric)
    res = sr.range_search(Q, K, threshold, metric=metric)
    check_faiss(res, faiss_range(metric, K, Q, threshold), atol)


def test_cosine_against_faiss_on_normalized_copies(small_tiles, rng):
    Q, K = make(rng, 9, 300, 6)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    Kn = K / np.linalg.norm(K, axis=1, keepdims=True)
    S, valid = reference_scores(Q, K, "cosine")
    threshold = midway(S, valid, 20, 1e-5, "cosine")
    res = sr.range_search(Q, K, threshold, metric="cosine")
    check_faiss(res, faiss_range("ip", Kn, Qn, threshold), 1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_minilm_against_faiss(minilm, metric):
    """The shipped real MiniLM embeddings (7942 x 384)."""
    base, query = minilm["base"], minilm["query"][:150]
    atol = tolerance(query, base, metric)
    S, valid = reference_scores(query, base, metric)
    threshold = midway(S, valid, 25, atol, metric)
    res = sr.range_search(query, base, threshold, metric=metric)
    check_faiss(res, faiss_range(metric, base, query, threshold), atol)
    check(res, range_ref(S, valid, threshold, metric), metric, atol)


# ---------------------------------------------------------------- storage, bias, masks

@pytest.mark.parametrize("dtype", list(storage.FORMATS))
@pytest.mark.parametrize("metric", METRICS)
def test_index_in_every_storage_dtype(small_tiles, monkeypatch, rng, dtype, metric):
    """Compact keys are decoded in the tile loop: the results are the brute
    force over the decoded keys; external ids come back."""
    monkeypatch.setattr(config, "RANGE_SLOTS", 2)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    Q, K = make(rng, 11, 150, 8)
    index = sr.Index(8, metric=metric, dtype=dtype)
    ext = rng.permutation(10**6)[:150].astype(np.int64)
    index.add(K, ids=ext)
    Kd = index.keys()
    atol = tolerance(Q, Kd, metric)
    S, valid = reference_scores(Q, Kd, metric)
    threshold = midway(S, valid, 9, atol, metric)
    lims, scores, ids = index.range_search(Q, threshold)
    rows = np.argsort(ext)[np.searchsorted(ext[np.argsort(ext)], ids)]
    np.testing.assert_array_equal(ext[rows], ids)
    check((lims, scores, rows), range_ref(S, valid, threshold, metric), metric, atol)


@pytest.mark.parametrize("metric", METRICS)
def test_bias_and_exclusions(small_tiles, monkeypatch, rng, metric):
    """A finite bias moves the scores, a -inf bias and the exclusion lists
    remove keys, even at a threshold that admits everything else."""
    monkeypatch.setattr(config, "RANGE_SLOTS", 3)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    B, N = 9, 120
    Q, K = make(rng, B, N, 6)
    bias = rng.standard_normal(N) * 2
    bias[rng.choice(N, 15, replace=False)] = -np.inf
    exclude = [rng.choice(N, rng.integers(0, 30), replace=False) for _ in range(B)]
    atol = tolerance(Q, K, metric) + 1e-5 * np.abs(bias[np.isfinite(bias)]).max()
    S, valid = reference_scores(Q, K, metric, bias=bias, exclude=exclude)
    threshold = midway(S, valid, 12, atol, metric)
    res = sr.range_search(Q, K, threshold, metric=metric, bias=bias, exclude=exclude)
    check(res, range_ref(S, valid, threshold, metric), metric, atol)
    everything = -np.inf if metric != "l2" else np.inf
    res = sr.range_search(Q, K, everything, metric=metric, bias=bias, exclude=exclude)
    check(res, range_ref(S, valid, everything, metric), metric, atol)


@pytest.mark.parametrize("metric", METRICS)
def test_key_windows_and_exclusions_of_a_problem(small_tiles, monkeypatch, rng, metric):
    """Per-query key windows (``masks.row_lo/row_hi``, as an Index passes
    them) with exclusion lists, through ``solve_range``; reruns of the
    overflowing queries keep each query's own window and list."""
    monkeypatch.setattr(config, "RANGE_SLOTS", 2)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    B, N, d = 10, 90, 5
    Q, K = make(rng, B, N, d)
    lo = rng.integers(0, 40, B).astype(np.int64)
    hi = (lo + rng.integers(0, 60, B)).clip(0, N).astype(np.int64)
    exclude = [rng.choice(N, 10, replace=False) for _ in range(B)]
    atol = tolerance(Q, K, metric)
    S, valid = reference_scores(Q, K, metric, exclude=exclude, window=(lo, hi))
    threshold = midway(S, valid, 8, atol, metric)
    lay = layout.Layout(ndim=2, batch=1, T=B, H=1, S=N, Hkv=1, d=d, dv=d)
    p = api.problem_terms(Q, Rows(K, width=d), Rows(K, width=d), False, metric=metric, scale=None,
                          bias=None, exclude=validate.exclusion_lists(exclude, B, N),
                          window=(lo, hi), softmax=False)
    res = ranges.solve_range(lay, [((0, 0), p)], threshold, metric)
    check(res, range_ref(S, valid, threshold, metric), metric, atol)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("metric", METRICS)
def test_every_key_qualifies_equals_topk_of_all(small_tiles, monkeypatch, rng, metric):
    """``-inf`` ("ip", "cosine") or ``+inf`` ("l2") returns every key, in
    top-k order, with top-k's scores."""
    monkeypatch.setattr(config, "RANGE_SLOTS", 5)
    monkeypatch.setattr(config, "RANGE_BUFFER_BYTES", 0)
    B, N = 7, 61
    Q, K = make(rng, B, N, 4)
    lims, scores, ids = sr.range_search(Q, K, np.inf if metric == "l2" else -np.inf, metric=metric)
    np.testing.assert_array_equal(lims, np.arange(B + 1) * N)
    top_s, top_i = sr.topk(Q, K, N, metric=metric)
    np.testing.assert_array_equal(scores.reshape(B, N), top_s)
    if metric == "ip":        # (l2, cosine: equal scores may order by id, top-k by logit)
        np.testing.assert_array_equal(ids.reshape(B, N), top_i)
    S, valid = reference_scores(Q, K, metric)
    check((lims, scores, ids), range_ref(S, valid, np.inf if metric == "l2" else -np.inf, metric),
          metric, tolerance(Q, K, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_empty_results(small_tiles, rng, metric):
    Q, K = make(rng, 6, 50, 4)
    S, valid = reference_scores(Q, K, metric)
    beyond = S.min() - 1 if metric == "l2" else S.max() + 1
    for threshold in (beyond, -np.inf if metric == "l2" else np.inf):
        lims, scores, ids = sr.range_search(Q, K, threshold, metric=metric)
        np.testing.assert_array_equal(lims, np.zeros(7, np.int64))
        assert scores.shape == ids.shape == (0,)


@pytest.mark.parametrize("metric", METRICS)
def test_threshold_is_inclusive(rng, metric):
    """A key whose returned score equals the threshold is returned; one
    float32 step beyond, it is not."""
    Q, K = make(rng, 3, 40, 6)
    lims, scores, ids = sr.range_search(Q, K, np.inf if metric == "l2" else -np.inf, metric=metric)
    s, i = scores[lims[1] + 5], ids[lims[1] + 5]
    lims2, scores2, ids2 = sr.range_search(Q[1:2], K, float(s), metric=metric)
    assert i in ids2 and (scores2 <= s if metric == "l2" else scores2 >= s).all()
    beyond = np.nextafter(s, np.float32(-np.inf) if metric == "l2" else np.float32(np.inf))
    assert i not in sr.range_search(Q[1:2], K, float(beyond), metric=metric)[2]


def test_l2_distances_are_never_below_zero(rng):
    """Without bias, "l2" scores are floored at 0 (as top-k's): a negative
    threshold finds nothing, a small one the duplicate of a query (its
    float32 distance is rounding, at least 0)."""
    Q, K = make(rng, 4, 30, 5)
    K[7] = Q[2]
    assert sr.range_search(Q, K, -1e-3, metric="l2")[0][-1] == 0
    lims, scores, ids = sr.range_search(Q, K, 1e-3, metric="l2")
    np.testing.assert_array_equal(lims, [0, 0, 0, 1, 1])
    assert ids[0] == 7 and 0 <= scores[0] <= 1e-3
    assert (sr.range_search(Q, K, np.inf, metric="l2")[1] >= 0).all()


def test_integer_thresholds_beyond_float_are_infinite(rng):
    Q, K = make(rng, 2, 10, 4)
    assert sr.range_search(Q, K, 10**400)[0][-1] == 0
    assert sr.range_search(Q, K, -10**400)[0][-1] == 20


def test_empty_queries(rng):
    _, K = make(rng, 1, 10, 4)
    lims, scores, ids = sr.range_search(np.zeros((0, 4), np.float32), K, 0.5)
    np.testing.assert_array_equal(lims, [0])
    assert scores.shape == ids.shape == (0,)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("threshold,exc", [(np.nan, ValueError), (float("nan"), ValueError),
                                           (1 + 2j, ValueError), ("0.5", TypeError),
                                           (None, TypeError), (True, TypeError)])
def test_bad_threshold(rng, threshold, exc):
    Q, K = make(rng, 2, 10, 4)
    with pytest.raises(exc, match="threshold"):
        sr.range_search(Q, K, threshold)
    index = sr.Index(4)
    index.add(K)
    with pytest.raises(exc, match="threshold"):
        index.range_search(Q, threshold)


def test_bad_input_names_the_argument(rng):
    Q, K = make(rng, 2, 10, 4)
    with pytest.raises(ValueError, match="dimension"):
        sr.range_search(Q, K[:, :3], 0.5)
    with pytest.raises(ValueError, match="2-D"):
        sr.range_search(Q[:, None], K[:, None], 0.5)
    with pytest.raises(ValueError, match="metric"):
        sr.range_search(Q, K, 0.5, metric="dot")
    with pytest.raises(ValueError, match="bias"):
        sr.range_search(Q, K, 0.5, bias=np.full(10, np.nan))
    with pytest.raises(ValueError, match="keys"):
        K[3, 1] = np.nan
        sr.range_search(Q, K, 0.5)


def test_runs_on_the_cpu_only(rng):
    Q, K = make(rng, 2, 10, 4)
    with pytest.raises(ValueError, match="CPU"):
        sr.range_search(Q, K, 0.5, device="cuda")
    with pytest.raises(ValueError, match="device"):
        sr.range_search(Q, K, 0.5, device="tpu")
    lims, _, _ = sr.range_search(Q, K, 0.5, device="auto")
    assert lims.shape == (3,)
    index = sr.Index(4)
    index.add(K)
    with pytest.raises(ValueError, match="CPU"):
        index.range_search(Q, 0.5, device="cuda")
    for same in (index.range_search(Q, np.array(0.5), device="auto"),
                 sr.range_search(Q, K, np.float32(0.5))):
        for a, b in zip(same, sr.range_search(Q, K, 0.5)):
            np.testing.assert_array_equal(a, b)
