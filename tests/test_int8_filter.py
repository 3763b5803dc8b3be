"""The int8 filter of exact top-k over int8 keys (cpu_int8): its integer dot, its error bound, and
searches through it against the float32 path, FAISS and a float64 reference, on adversarial
near-ties where every float32 dot is exact (so the two paths must agree bit for bit)."""

import numpy as np
import pytest
from numba import njit

import softretrieval as sr
from softretrieval import config, cpu_int8, cpu_micro

from conftest import switched_off
from reference import topk_ref

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="this CPU has no AVX512_VNNI")


def float32_path(fn, *args, **kw):
    """``fn(*args, **kw)`` with config.INT8_FILTER off."""
    return switched_off("INT8_FILTER", fn, *args, **kw)


@njit
def integer_dots(q, K, c0, d):
    out = np.empty(K.shape[0], np.int32)
    for j in range(K.shape[0]):
        out[j] = cpu_micro.int8_dot(q, K[j, c0:c0 + d])
    return out


def wrapped(x):
    """int64 values modulo 2^32 as int32."""
    return ((np.asarray(x, np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def exact_int8_data(rng, B, N, d, bases=4, flips=0.2):
    """Queries and int8-exact keys whose float32 dots are exact in any order,
    with many near-ties among the keys, and where the filter's logits fall
    well below the exact ones (so a filter without its margin loses keys).

    Query entries are ``m * 2**-11`` with ``|m| <= 511`` (511 at column 0, so
    the query's int8 scale is ``511 / 127`` units): each other ``m`` lies 0.3
    of a step above a multiple of that scale and rounds toward zero, so the
    rounding error ``e`` has the sign of the query. Key rows are integers in
    [-121, 121] with 127 at column 0 (row scale 1: stored exactly), copies of
    a few base rows with the signs of the first query and a share ``flips``
    of entries moved by one. Every product and partial sum fits float32's 24
    bits (``d <= 33``); scores of copies differ by multiples of 2**-11, while
    ``e . k`` (how far below its exact logit the filter puts a key) is about
    1.2 * 2**-11 per unit of ``|k|_1``."""
    assert d <= 33
    step = 511 / 127
    sign = rng.choice([-1, 1], (B, d))
    M = sign * np.floor(step * (rng.integers(1, 120, (B, d)) + 0.3))
    M[:, 0] = 511
    base = sign[0] * rng.integers(60, 121, (bases, d))
    K = base[rng.integers(0, bases, N)] + rng.integers(-1, 2, (N, d)) * (rng.random((N, d)) < flips)
    K[:, 0] = 127
    return (M * 2.0**-11).astype(np.float32), K.astype(np.float32)


def int8_index(K):
    index = sr.Index(K.shape[1], dtype="int8")
    index.add(K)
    return index


# ------------------------------------------------------------ the integer dot and its bound

@pytest.mark.parametrize("d", [1, 5, 63, 64, 65, 128, 200, 384, 70000])
def test_integer_dot_is_exact(rng, d):
    """Exact modulo 2^32 (the sums of d = 70000 wrap; the offset taken back
    in the same arithmetic gives the exact dot, below)."""
    K = rng.integers(-128, 128, (9, d)).astype(np.int8)
    K[0] = 127
    q = np.zeros(cpu_int8.padded(d), np.int8)
    q[:d] = rng.integers(-127, 128, d)
    q[:d:2] = 127
    expected = wrapped((K.astype(np.int64) + 128) @ q[:d].astype(np.int64))
    np.testing.assert_array_equal(integer_dots(q, K, 0, d), expected)
    # a row slice of a wider array (a head's columns): nothing past d is read
    wide = rng.integers(-128, 128, (9, d + 70)).astype(np.int8)
    wide[:, 3:3 + d] = K
    np.testing.assert_array_equal(integer_dots(q, wide, 3, d), expected)


def test_integer_dot_refuses_rows_that_are_not_contiguous():
    """A strided row would be read as if contiguous: it does not compile."""
    from numba.core.errors import TypingError

    q = np.zeros(64, np.int8)
    with pytest.raises(TypingError):
        integer_dots(q, np.zeros((4, 128), np.int8)[:, ::2], 0, 64)
    np.testing.assert_array_equal(integer_dots(q, np.zeros((4, 64), np.int8), 0, 64), 0)


def test_long_keys_whose_integer_sums_wrap_still_score_exactly():
    d = 70000                                    # sum (k + 128) q~ = 255 * 127 * d > 2^31
    Q = np.ones((1, d), np.float32)
    codes = np.full((2, d), 127, np.int8)
    codes[1, ::2] = -128
    S, _, _ = filter_logits(Q, codes, np.ones(2, np.float32))
    np.testing.assert_array_equal(S[0], [127.0 * d, (127.0 - 128.0) * d / 2])


def filter_logits(Q, codes, scales):
    """(approximate logits, per-query margin units, the largest 128 |q|_1)."""
    d = Q.shape[1]
    qi = np.empty((Q.shape[0], cpu_int8.padded(d)), np.int8)
    stats = np.empty((Q.shape[0], 3))
    largest = cpu_int8.quantize_queries(Q, qi, stats)
    S = np.empty((Q.shape[0], codes.shape[0]), np.float32)
    cpu_int8.approx_scores(qi, stats, codes, 0, d, scales, S)
    assert (qi[:, d:] == 0).all()
    return S, stats[:, 2], largest


@pytest.mark.parametrize("kind", ["normal", "heavy", "tiny", "worst"])
@pytest.mark.parametrize("d", [3, 64, 129])
def test_approximate_logits_within_the_bound(rng, kind, d):
    """|filter logit - exact logit| within the slack (the float32 logit's own
    error is the rest of the slack); for the worst case, close to it."""
    B, N = 6, 300
    codes = rng.integers(-127, 128, (N, d)).astype(np.int8)
    scales = rng.uniform(0.01, 2.0, N).astype(np.float32)
    if kind == "normal":
        Q = rng.standard_normal((B, d)).astype(np.float32)
    elif kind == "heavy":
        Q = (rng.standard_cauchy((B, d)) * 10).astype(np.float32)
    elif kind == "tiny":
        Q = (rng.standard_normal((B, d)) * 1e-39).astype(np.float32)
    else:
        # every element just short of halfway between two quantization levels, and keys of
        # 127 with the sign of the rounding error: |e . k| = 127 |e|_1, the bound's own worst case
        top = 127 * 2.0**-7
        Q = np.full((B, d), (3 + 0.4999) * 2.0**-7, np.float32) * rng.choice([-1, 1], (B, d))
        Q[:, 0] = top
        codes = np.broadcast_to(np.where(Q[0] > 0, 127, -127).astype(np.int8), (N, d)).copy()
    S, unit, largest = filter_logits(Q, codes, scales)
    assert largest == pytest.approx(128 * np.abs(Q.astype(np.float64)).sum(1).max())
    exact = (Q.astype(np.float64) @ codes.T.astype(np.float64)) * scales.astype(np.float64)
    slack = np.array([cpu_int8.slack(u, scales.max()) for u in unit], np.float64)[:, None]
    error = np.abs(S - exact)
    assert (error <= slack + 2.0**-20 * np.abs(exact)).all()
    if kind == "worst":
        assert error.max() > 0.5 * slack.max()


def test_quantize_refuses_non_finite_queries():
    Q = np.ones((2, 8), np.float32)
    Q[1, 3] = np.nan
    assert cpu_int8.quantize_queries(Q, np.empty((2, 64), np.int8), np.empty((2, 3))) == np.inf


def test_usable_guards_overflow_and_bad_scales(rng):
    assert cpu_int8.usable(1e3, np.ones(4, np.float32)) == (True, 1.0)
    assert cpu_int8.usable(1.0, np.array([0.5, -3.0, 2.0, -0.0], np.float32)) == (True, 3.0)
    assert cpu_int8.usable(1.0, np.zeros(0, np.float32)) == (True, 0.0)
    many = rng.standard_normal(4099).astype(np.float32) * np.float32(1e-3)
    assert cpu_int8.usable(1.0, many) == (True, np.abs(many).max())
    for bad in (-np.inf, -np.nan, np.nan, np.inf):
        many[4000] = bad
        assert not cpu_int8.usable(1.0, many)[0]
    assert not cpu_int8.usable(2.0**99, np.full(4, 4.0, np.float32))[0]
    # the float32 path sums before scaling: tiny scales do not make a huge query safe
    assert not cpu_int8.usable(2.0**101, np.full(4, 1e-10, np.float32))[0]
    assert not cpu_int8.usable(1.0, np.array([1, np.nan], np.float32))[0]
    assert not cpu_int8.usable(1.0, np.array([1, np.inf], np.float32))[0]


# ------------------------------------------------------------ searches through the filter

@pytest.mark.parametrize("B,N,d,k", [(1, 1, 5, 3), (1, 700, 33, 10), (3, 1500, 17, 40),
                                     (16, 2100, 32, 7), (5, 640, 1, 5), (2, 300, 24, 400)])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_exact_near_ties_equal_float32_path_and_reference(request, rng, B, N, d, k, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    Q, K = exact_int8_data(rng, B, N, d)
    index = int8_index(K)
    assert (index._arrays()["keys"].astype(np.float32) == K).all()
    scores, ids = index.search(Q, k)
    scores0, ids0 = float32_path(index.search, Q, k)
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_array_equal(scores, scores0)
    ref_scores, ref_ids = topk_ref(Q, K, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("B", [1, 2, 9, 16])
def test_exclusions_and_allow_lists(small_tiles, rng, B):
    Q, K = exact_int8_data(rng, B, 900, 20)
    index = int8_index(K)
    exclude = [rng.choice(900, 300, replace=False) for _ in range(B)]
    include = [rng.choice(900, 50, replace=False) for _ in range(B)]
    for kw in ({"exclude": exclude}, {"include": include}):
        got = index.search(Q, 12, **kw)
        want = float32_path(index.search, Q, 12, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_random_data_same_as_float32_path_and_faiss(rng):
    import faiss

    Q = rng.standard_normal((4, 96)).astype(np.float32)
    K = rng.standard_normal((20000, 96)).astype(np.float32)
    index = int8_index(K)
    scores, ids = index.search(Q, 25)
    scores0, ids0 = float32_path(index.search, Q, 25)
    np.testing.assert_array_equal(ids, ids0)
    np.testing.assert_allclose(scores, scores0, rtol=1e-6, atol=1e-6)
    flat = faiss.IndexFlatIP(96)
    flat.add(index._arrays()["keys"].astype(np.float32) * index._arrays()["scales"][:, None])
    _, fids = flat.search(Q, 25)
    np.testing.assert_array_equal(ids, fids)


def test_huge_queries_take_the_float32_path(rng):
    Q, K = exact_int8_data(rng, 2, 500, 16)
    index = int8_index(K)
    big = Q * np.float32(2.0**97)           # 128 |q|_1 above 2^100: the float32 path
    got = index.search(big, 9)
    want = float32_path(index.search, big, 9)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_overflowing_dots_are_refused_as_on_the_float32_path(rng):
    """Huge queries against tiny keys: the float32 dot (before the row
    scale) overflows, and the search refuses it with or without the filter."""
    index = int8_index((rng.standard_normal((300, 8)) * 1e-8).astype(np.float32))
    Q = np.full((1, 8), 1e37, np.float32)
    with pytest.raises(ValueError, match="overflow"):
        float32_path(index.search, Q, 5)
    with pytest.raises(ValueError, match="overflow"):
        index.search(Q, 5)


def test_minilm_same_as_float32_path(minilm):
    index = int8_index(minilm["base"])
    Q = minilm["query"][:16]
    for B in (1, 5, 16):
        scores, ids = index.search(Q[:B], 10)
        scores0, ids0 = float32_path(index.search, Q[:B], 10)
        np.testing.assert_array_equal(ids, ids0)
        np.testing.assert_allclose(scores, scores0, rtol=1e-6, atol=1e-6)


def test_off_switch_and_other_metrics_unchanged(rng):
    """l2 and biased searches take the float32 path; both still agree."""
    Q, K = exact_int8_data(rng, 3, 800, 16)
    for metric in ("l2", "cosine"):
        index = sr.Index(16, dtype="int8", metric=metric)
        index.add(K)
        got = index.search(Q, 6)
        want = float32_path(index.search, Q, 6)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert config.INT8_FILTER
