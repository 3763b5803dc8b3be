"""Property-based checks of every public function (hypothesis).

Generated calls — shapes across tile and split edges (tiles shrunk), input
dtypes, multi-head and sequence layouts, metrics, scales, biases with -inf,
exclusions, k — are either valid, and then must match the float64 reference
(finite, never NaN), or made invalid by one mutation, and then must raise a
``ValueError``/``TypeError`` whose message names the argument. No other
exception type, no NaN for valid input.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softretrieval as sr

from reference import attention_ref, scores_ref, sequence_attention_ref, topk_ref

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# every test crosses tile and split edges (tiles shrunk by tests/conftest.py)
pytestmark = pytest.mark.usefixtures("small_tiles")


@st.composite
def retrieval_calls(draw):
    """A valid 2-D retrieval call: arrays, metric, scale, bias, exclusions, k."""
    B = draw(st.integers(0, 11))
    N = draw(st.integers(1, 40))
    d = draw(st.integers(1, 7))
    dv = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    Q = rng.standard_normal((B, d)).astype(dtype)
    K = rng.standard_normal((N, d)).astype(dtype)
    V = draw(st.sampled_from([None, "values"]))
    V = None if V is None else rng.standard_normal((N, dv)).astype(dtype)
    metric = draw(st.sampled_from(["ip", "cosine", "l2"]))
    scale = draw(st.sampled_from([None, 0.0, 0.3, 2.0]))
    bias = None
    if draw(st.booleans()):
        bias = rng.standard_normal(N)
        bias[rng.random(N) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -np.inf
    exclude = None
    if draw(st.booleans()):
        exclude = [rng.choice(N, rng.integers(0, N + 1), replace=False) for _ in range(B)]
    k = draw(st.integers(1, N + 5))
    return dict(Q=Q, K=K, V=V, metric=metric, scale=scale, bias=bias, exclude=exclude, k=k)


def logits_ref(c):
    """(B, N) float64 logits of a call, -inf where excluded."""
    Q, K = (np.asarray(c[n], np.float32).astype(np.float64) for n in ("Q", "K"))
    scale = 1.0 / np.sqrt(K.shape[1]) if c["scale"] is None else c["scale"]
    S = scores_ref(Q, K, c["metric"])
    logits = scale * (-S if c["metric"] == "l2" else S)
    if c["bias"] is not None:
        logits = logits + c["bias"][None, :]
    if c["exclude"] is not None:
        for b, ids in enumerate(c["exclude"]):
            logits[b, ids] = -np.inf
    return logits


def soft_ref(logits, V):
    out = np.zeros((logits.shape[0], V.shape[1]))
    lse = np.full(logits.shape[0], -np.inf)
    for b, row in enumerate(logits):
        if np.isneginf(row).all():
            continue
        m = row.max()
        w = np.exp(row - m)
        out[b] = w @ V / w.sum()
        lse[b] = m + np.log(w.sum())
    return out, lse


def values_of(c):
    return np.asarray(c["K"] if c["V"] is None else c["V"], np.float32).astype(np.float64)


@SETTINGS
@given(retrieval_calls())
def test_attention_matches_the_reference(c):
    out, lse = sr.attention(c["Q"], c["K"], c["V"], scale=c["scale"], bias=c["bias"],
                            metric=c["metric"], exclude=c["exclude"], return_lse=True)
    want_out, want_lse = soft_ref(logits_ref(c), values_of(c))
    assert out.dtype == np.float32 and not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-4, atol=1e-4)


@SETTINGS
@given(retrieval_calls())
def test_topk_matches_the_reference(c):
    bias = c["bias"]
    scores, ids = sr.topk(c["Q"], c["K"], c["k"], metric=c["metric"], bias=bias,
                          exclude=c["exclude"])
    Q, K = (np.asarray(c[n], np.float32).astype(np.float64) for n in ("Q", "K"))
    want_s, want_i = topk_ref(Q, K, c["k"], c["metric"], bias=bias, exclude=c["exclude"])
    assert scores.shape == ids.shape == (Q.shape[0], c["k"]) and not np.isnan(scores).any()
    np.testing.assert_array_equal(ids == -1, want_i == -1)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)
    S = scores_ref(Q, K, c["metric"])             # each returned id has the score returned
    for b in range(Q.shape[0]):
        got = ids[b][ids[b] >= 0]
        sign = -1.0 if c["metric"] == "l2" else 1.0
        own = S[b, got] + (0.0 if bias is None else sign * bias[got])
        np.testing.assert_allclose(scores[b, : got.size], own, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(retrieval_calls())
def test_topk_attention_matches_the_reference(c):
    res = sr.topk_attention(c["Q"], c["K"], c["V"], c["k"], scale=c["scale"], bias=c["bias"],
                            metric=c["metric"], exclude=c["exclude"])
    logits = logits_ref(c)
    _, want_lse = soft_ref(logits, values_of(c))
    for a in res:
        assert not np.isnan(a).any() if a.dtype.kind == "f" else True
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isneginf(res.lse), ~finite)
    np.testing.assert_allclose(res.lse[finite], want_lse[finite], rtol=1e-4, atol=1e-4)
    V = values_of(c)
    for b in range(logits.shape[0]):              # out and weights over the ids returned
        got = res.ids[b][res.ids[b] >= 0]
        assert got.size == min(c["k"], np.isfinite(logits[b]).sum())
        if got.size:
            w = np.exp(logits[b, got] - logits[b, got].max())
            w /= w.sum()
            np.testing.assert_allclose(res.weights[b, : got.size], w, rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(res.out[b], w @ V[got], rtol=1e-3, atol=1e-3)
            assert 0 < res.coverage[b] <= 1


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 12),
       st.sampled_from([(1, 1), (4, 2), (3, 1), (2, 2)]),
       st.integers(1, 5), st.booleans(), st.sampled_from([None, 1, 4]), st.integers(0, 2**32 - 1))
def test_heads_and_causal_sequences_match_the_reference(batch, T, S, heads, d, causal, window, seed):
    H, Hkv = heads
    rng = np.random.default_rng(seed)
    S = max(S, T) if causal else S
    q = rng.standard_normal((batch, T, H, d)).astype(np.float32)
    k = rng.standard_normal((batch, S, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((batch, S, Hkv, 3)).astype(np.float32)
    window = window if causal else None
    out, lse = sr.attention(q, k, v, causal=causal, window=window, return_lse=True)
    want_out, want_lse = sequence_attention_ref(q, k, v, causal=causal, window=window)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))


@SETTINGS
@given(st.sampled_from([1e4, 1e6, 1e8]), st.integers(1, 6), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_extreme_valid_scales_stay_finite(scale, B, N, seed):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((B, 4)).astype(np.float32)
    K = rng.standard_normal((N, 4)).astype(np.float32)
    try:
        out, lse = sr.attention(Q, K, scale=scale, return_lse=True)
    except ValueError as exc:                     # logits beyond float32: refused, named
        assert "scale" in str(exc)
        return
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    want_out, want_lse = attention_ref(Q.astype(np.float64), K.astype(np.float64), scale=scale)
    np.testing.assert_allclose(out, want_out, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-4)


# ---------------------------------------------------------------- invalid calls

def _mutations(c):
    """(argument name, mutated call) pairs, each breaking one argument."""
    Q, K = c["Q"], c["K"]
    B, N = Q.shape[0], K.shape[0]
    nan_q = np.array(Q, np.float32)
    if nan_q.size:
        nan_q.flat[0] = np.nan
    nan_k = np.array(K, np.float32)
    nan_k.flat[-1] = np.inf
    out = [
        ("queries", dict(c, Q=Q[None])),
        ("queries", dict(c, Q=Q.astype(np.int32))),
        ("queries", dict(c, Q=[list(r) for r in Q[:1]] + [[1.0] * (Q.shape[1] + 1)])),
        ("keys", dict(c, K=K[:, :0])),
        ("keys", dict(c, K=np.zeros((0, K.shape[1]), np.float32))),
        ("keys", dict(c, K=K.astype(np.complex64))),
        ("bias", dict(c, bias=np.zeros(N + 1))),
        ("bias", dict(c, bias=np.full(N, np.nan))),
        ("bias", dict(c, bias=np.array(["a"] * N))),
        ("metric", dict(c, metric="cos")),
        ("exclude", dict(c, exclude=[np.array([N])] * B)),
        ("exclude", dict(c, exclude={"a": 1})),
        ("k", dict(c, k=0)),
        ("k", dict(c, k=2.5)),
        ("scale", dict(c, scale=float("nan"))),
        ("scale", dict(c, scale="x")),
    ]
    if B:   # (with no query, keys and values are not scanned for NaN: documented)
        out.append(("queries", dict(c, Q=nan_q)))
        out.append(("keys", dict(c, K=nan_k)))
        out.append(("k", dict(c, k=10**15)))
        out.append(("exclude", dict(c, exclude=[np.array([-1])] * B)))
    if c["V"] is not None:
        out.append(("values", dict(c, V=c["V"][:-1] if N > 1 else c["V"][:, :0])))
        if B:
            out.append(("values", dict(c, V=np.full_like(c["V"], np.nan, dtype=np.float32))))
    if K.shape[1] > 1:
        out.append(("keys", dict(c, K=K[:, :-1])))
    return out


CALLS = {
    "attention": lambda c: sr.attention(c["Q"], c["K"], c["V"], scale=c["scale"], bias=c["bias"],
                                        metric=c["metric"], exclude=c["exclude"]),
    "topk": lambda c: sr.topk(c["Q"], c["K"], c["k"], metric=c["metric"], bias=c["bias"],
                              exclude=c["exclude"]),
    "topk_attention": lambda c: sr.topk_attention(c["Q"], c["K"], c["V"], c["k"], scale=c["scale"],
                                                  bias=c["bias"], metric=c["metric"],
                                                  exclude=c["exclude"]),
}
ARGUMENTS = {"attention": {"queries", "keys", "values", "bias", "metric", "exclude", "scale"},
             "topk": {"queries", "keys", "bias", "metric", "exclude", "k"},
             "topk_attention": {"queries", "keys", "values", "bias", "metric", "exclude", "k",
                                "scale"}}


@SETTINGS
@given(retrieval_calls(), st.sampled_from(sorted(CALLS)), st.data())
def test_invalid_calls_name_the_argument(c, name, data):
    options = [(arg, m) for arg, m in _mutations(c) if arg in ARGUMENTS[name]]
    arg, bad = data.draw(st.sampled_from(options))
    with pytest.raises((ValueError, TypeError)) as info:
        CALLS[name](bad)
    message = str(info.value)
    assert arg in message, message


@SETTINGS
@given(st.sampled_from(["float32", "float16", "bfloat16", "int8"]), st.sampled_from(["ip", "cosine", "l2"]),
       st.integers(1, 40), st.integers(1, 8), st.integers(1, 45), st.booleans(), st.integers(0, 2**32 - 1))
def test_index_matches_topk_on_its_decoded_keys(dtype, metric, N, B, k, with_ids, seed):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((N, 6))
    Q = rng.standard_normal((B, 6)).astype(np.float32)
    index = sr.Index(6, metric=metric, dtype=dtype)
    ids = rng.permutation(10 * N)[:N] if with_ids else None
    index.add(K, ids=ids)
    decoded = index.keys()
    scores, got = index.search(Q, k)
    want_s, want_rows = sr.topk(Q, decoded, k, metric=metric)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)
    want = want_rows if ids is None else np.where(want_rows >= 0, ids[np.maximum(want_rows, 0)], -1)
    np.testing.assert_array_equal(got == -1, want == -1)
    out, lse = index.retrieve(Q, scale=0.5, return_lse=True)
    want_out, want_lse = sr.attention(Q, decoded, scale=0.5, metric=metric, return_lse=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-4, atol=1e-4)
    for bad, exc in ((Q[:, :5], ValueError), (Q.astype(int), TypeError),
                     (np.full_like(Q, np.nan), ValueError)):
        with pytest.raises(exc, match="queries"):
            index.search(bad, k)
    with pytest.raises((ValueError, TypeError), match="k"):
        index.search(Q, 0)
