"""Index and compact storage against float64 references (on the decoded keys),
FAISS, the MiniLM real data, and the on-disk format."""

import json
import os

import faiss
import numpy as np
import pytest

import softretrieval as sr
from conftest import rewrite_meta, saved_file
from softretrieval import storage

from reference import exclusion_mask, scores_ref, topk_attention_ref, topk_ref

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def decoded_ref(index):
    """The index's keys as float64, decoded here from the raw stored arrays."""
    raw = index._data[: len(index)]
    if index.dtype == "float32":
        return raw.astype(np.float64)
    if index.dtype == "float16":
        return raw.astype(np.float64)
    if index.dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64) * index._scales[: len(index)].astype(np.float64)[:, None]


def soft_ref(Q, K, V, scale, metric, bias=None, exclude=None):
    """float64 softmax retrieval with the full (B, N) logits: (out, lse)."""
    S = scores_ref(Q, K, metric)
    logits = (-scale * S if metric == "l2" else scale * S)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[None, :]
    logits[exclusion_mask(*logits.shape, exclude)] = -np.inf
    m = logits.max(axis=1, keepdims=True)
    w = np.exp(logits - m)
    lse = m[:, 0] + np.log(w.sum(axis=1))
    return (w @ np.asarray(V, np.float64)) / w.sum(axis=1, keepdims=True), lse


# ---------------------------------------------------------------- storage


def test_encodings_round_to_nearest(rng):
    x = (rng.standard_normal((300, 17)) * np.logspace(-3, 3, 17)).astype(np.float32)
    for dtype in DTYPES:
        data = np.empty(x.shape, storage.FORMATS[dtype][0])
        scale = np.zeros(x.shape[0], np.float32)
        storage.encode_rows(x, dtype, data, scale)
        back = storage.decode_rows(data, dtype, scale).astype(np.float64)
        err = np.abs(back - x)
        if dtype == "float32":
            assert (err == 0).all()
        elif dtype == "float16":
            np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float64))
        elif dtype == "bfloat16":
            assert (err <= np.abs(x) * 2.0**-8).all()          # half an ulp of an 8-bit significand
            trunc = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
            assert (err <= np.abs(trunc - x) + 1e-30).all()    # never worse than truncation
        else:
            amax = np.abs(x).max(axis=1)
            assert (err <= (amax / 127 / 2 * 1.0001)[:, None]).all()
            assert np.abs(data).max() == 127


def test_encodings_equal_numpy_bit_for_bit(rng):
    """The one-pass encoder gives numpy's float16 conversion exactly (every
    tie between two halves, subnormals, signed zeros; each value in a row
    with a 1000, so the row holds float16's precision), the bfloat16 bits of
    round-to-nearest-even, and int8 with the row scale max|row| / 127."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = (halves[:-1] + halves[1:]) / 2                   # exactly between two halves
    values = np.concatenate([ties, -ties, halves, -halves, [0.0, -0.0, 2.0**-25, 3 * 2.0**-26]])
    x = np.stack([values, np.full(values.shape, 1000.0)], axis=1).astype(np.float32)
    data = np.empty(x.shape, np.float16)
    storage.encode_rows(x, "float16", data, None)
    np.testing.assert_array_equal(data.view(np.uint16), x.astype(np.float16).view(np.uint16))
    y = (rng.standard_normal((500, 33)) * np.logspace(-30, 30, 33)).astype(np.float32)
    bits = y.view(np.uint32)
    want = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    got = np.empty(y.shape, np.uint16)
    storage.encode_rows(y, "bfloat16", got, None)
    np.testing.assert_array_equal(got, want.astype(np.uint16))
    got, scale = np.empty(y.shape, np.int8), np.empty(500, np.float32)
    center = rng.standard_normal(33).astype(np.float32)
    storage.encode_rows(y, "int8", got, scale, center)
    z = (y - center).astype(np.float32)
    want_scale = (np.abs(z).max(axis=1) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(
        got, np.clip(np.rint(z * (np.float32(1) / want_scale)[:, None]), -127, 127).astype(np.int8))


def test_encoding_refuses_out_of_range_and_non_finite():
    data = np.empty((1, 2), np.float16)
    with pytest.raises(ValueError, match="float16 range"):
        storage.encode_rows(np.array([[1.0, 7e4]]), "float16", data, None)
    with pytest.raises(ValueError, match="bfloat16 range"):
        storage.encode_rows(np.array([[3.4e38, 0.0]]), "bfloat16", np.empty((1, 2), np.uint16), None)
    with pytest.raises(ValueError, match="NaN or inf"):
        storage.encode_rows(np.array([[np.nan, 0.0]]), "int8", np.empty((1, 2), np.int8),
                            np.empty(1, np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        storage.encode_rows(np.array([[1e39, 0.0]]), "float32", np.empty((1, 2), np.float32), None)
    with pytest.raises(ValueError, match="dtype must be one of"):
        sr.Index(4, dtype="float8")


# ---------------------------------------------------------------- modes vs references


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("B,N,d", [(1, 37, 5), (3, 50, 8), (6, 29, 7), (19, 61, 6)])
def test_modes_match_float64_reference(small_tiles, rng, dtype, metric, B, N, d):
    """B = 1, 3 (fewer than four queries), 6 (a quad and a rest) and 19 (the
    BLAS path) over tiles that do not divide N; d odd; k > N."""
    K = rng.standard_normal((N, d))
    V = rng.standard_normal((N, 3))
    Q = rng.standard_normal((B, d)).astype(np.float32)
    index = sr.Index(d, metric=metric, value_dim=3, dtype=dtype)
    index.add(K, V)
    Kd = decoded_ref(index)
    k = 4 if N > 30 else N + 3
    scores, ids = index.search(Q, k)
    ref_s, ref_i = topk_ref(Q, Kd, k, metric)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=2e-5, atol=2e-5)
    out, lse = index.retrieve(Q, temperature=2.0, return_lse=True)
    ref_out, ref_lse = soft_ref(Q, Kd, V, 0.5, metric)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(index.logsumexp(Q, scale=0.5), ref_lse, rtol=2e-5, atol=2e-5)
    res = index.retrieve_topk(Q, 5, scale=0.5)
    r_out, r_ids, r_w, r_lse, r_cov = topk_attention_ref(Q, Kd, V, 5, scale=0.5, metric=metric)
    np.testing.assert_array_equal(res.ids, r_ids)
    np.testing.assert_allclose(res.out, r_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(res.coverage, r_cov, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2, 5])
def test_keys_as_values_are_decoded(small_tiles, rng, dtype, B):
    """Without values the softmax-weighted mean of the (decoded) keys; B <= 2
    takes the SIMD path (fused decoding), B = 5 the BLAS one."""
    K = rng.standard_normal((45, 9))
    Q = rng.standard_normal((B, 9))
    index = sr.Index(9, dtype=dtype)
    index.add(K)
    Kd = decoded_ref(index)
    np.testing.assert_allclose(index.retrieve(Q), soft_ref(Q, Kd, Kd, 1.0, "ip")[0],
                               rtol=2e-5, atol=2e-5)
    res = index.retrieve_topk(Q, 3)
    np.testing.assert_allclose(res.out, topk_attention_ref(Q, Kd, None, 3, scale=1.0)[0],
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(index.keys(), Kd, rtol=1e-7)   # int8: a float32 product


def test_search_matches_faiss(rng):
    K = rng.standard_normal((3000, 24)).astype(np.float32)
    Q = rng.standard_normal((40, 24)).astype(np.float32)
    index = sr.Index(24)
    index.add(K)
    flat = faiss.IndexFlatIP(24)
    flat.add(K)
    fs, fi = flat.search(Q, 10)
    scores, ids = index.search(Q, 10)
    np.testing.assert_array_equal(ids, fi)
    np.testing.assert_allclose(scores, fs, rtol=1e-5, atol=1e-5)


def test_minilm_compact_recall_targets(minilm):
    """Real sentence embeddings: recall@10 of each storage dtype against the
    float32 result (targets: >= 0.99 float16/bfloat16, >= 0.95 int8), and the
    soft-retrieval output error."""
    base, query = minilm["base"], minilm["query"][:300]
    exact = sr.Index(base.shape[1])
    exact.add(base)
    _, ref_ids = exact.search(query, 10)
    np.testing.assert_array_equal(ref_ids[:, 0], minilm["gt"][:300, 0])
    ref_out = exact.retrieve(query, temperature=0.05)
    for dtype, target, out_tol in (("float16", 0.99, 2e-3), ("bfloat16", 0.99, 1e-2),
                                   ("int8", 0.95, 1e-2)):
        index = sr.Index(base.shape[1], dtype=dtype)
        index.add(base)
        _, ids = index.search(query, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
        assert recall >= target, (dtype, recall)
        err = np.abs(index.retrieve(query, temperature=0.05) - ref_out).max()
        assert err < out_tol, (dtype, err)


# ---------------------------------------------------------------- ids, bias, exclusions


def test_external_ids_bias_and_exclusions(rng):
    K = rng.standard_normal((40, 6))
    Q = rng.standard_normal((3, 6))
    ext = np.arange(40) * 10 + 5
    bias = rng.standard_normal(40)
    index = sr.Index(6)
    index.add(K[:25], ids=ext[:25], bias=bias[:25])
    index.add(K[25:], ids=ext[25:], bias=bias[25:])
    assert len(index) == index.ntotal == 40
    excl = [np.array([ext[3], 999_999]), np.array([], np.int64), ext[[0, 1, 2]]]   # unknown ids ignored
    rows = [np.array([3]), np.array([], np.int64), np.array([0, 1, 2])]
    scores, ids = index.search(Q, 7, exclude=excl)
    ref_s, ref_i = topk_ref(Q, K, 7, bias=bias, exclude=rows)
    np.testing.assert_array_equal(ids, ext[ref_i])
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    other = rng.standard_normal(40)
    _, ids2 = index.search(Q, 7, bias=other)
    np.testing.assert_array_equal(ids2, ext[topk_ref(Q, K, 7, bias=other)[1]])
    _, ids3 = index.search(Q, 7, bias=False)
    np.testing.assert_array_equal(ids3, ext[topk_ref(Q, K, 7)[1]])
    lse = index.logsumexp(Q, exclude=excl)
    np.testing.assert_allclose(lse, soft_ref(Q, K, K, 1.0, "ip", bias, rows)[1], rtol=1e-5)
    res = index.retrieve_topk(Q, 4, exclude=excl)
    assert set(res.ids.ravel()) <= set(ext)
    index.bias = None
    _, ids4 = index.search(Q, 7)
    np.testing.assert_array_equal(ids4, ids3)


def test_row_number_exclusions_and_hidden_items(rng):
    K = rng.standard_normal((30, 4))
    index = sr.Index(4)
    index.add(K)
    with pytest.raises(ValueError, match="out of range"):
        index.search(K[:1], 3, exclude=[np.array([30])])
    b = np.zeros(30)
    b[:29] = -np.inf
    index.bias = b
    scores, ids = index.search(K[:2], 3)
    np.testing.assert_array_equal(ids[:, 0], [29, 29])
    assert (ids[:, 1:] == -1).all() and np.isneginf(scores[:, 1:]).all()
    out, lse = index.retrieve(K[:2], return_lse=True)
    np.testing.assert_allclose(out, K[[29, 29]], rtol=1e-6)
    assert np.isfinite(lse).all()


def test_temperature_and_scale(rng):
    K = rng.standard_normal((50, 8))
    Q = rng.standard_normal((2, 8))
    index = sr.Index(8)
    index.add(K)
    np.testing.assert_allclose(index.retrieve(Q, temperature=0.25), index.retrieve(Q, scale=4.0))
    np.testing.assert_allclose(index.retrieve(Q), soft_ref(Q, K, K, 1.0, "ip")[0], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        index.retrieve(Q, scale=1.0, temperature=1.0)
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="temperature"):
            index.retrieve(Q, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        index.retrieve(Q, temperature="hot")


# ---------------------------------------------------------------- adding


def test_chunked_adds_equal_one_add(monkeypatch, rng):
    monkeypatch.setattr(storage, "ENCODE_CHUNK", 7)
    K = rng.standard_normal((100, 5))
    whole = sr.Index(5, dtype="int8")
    whole.add(K)
    parts = sr.Index(5, dtype="int8")
    for lo in range(0, 100, 13):
        parts.add(K[lo:lo + 13])
    np.testing.assert_array_equal(parts.keys(), whole.keys())
    parts.add(np.zeros((0, 5)))
    assert len(parts) == 100


def test_bad_adds_are_refused_and_add_nothing(rng):
    index = sr.Index(4, value_dim=2)
    index.add(rng.standard_normal((3, 4)), rng.standard_normal((3, 2)), ids=[7, 8, 9])
    bad = [
        (TypeError, "floating-point", dict(keys=np.ones((2, 4), int), values=np.ones((2, 2)), ids=[1, 2])),
        (ValueError, r"shape \(n, 4\)", dict(keys=np.ones((2, 5)), values=np.ones((2, 2)), ids=[1, 2])),
        (ValueError, "NaN", dict(keys=np.full((2, 4), np.nan), values=np.ones((2, 2)), ids=[1, 2])),
        (ValueError, "values", dict(keys=np.ones((2, 4)), values=None, ids=[1, 2])),
        (ValueError, "values", dict(keys=np.ones((2, 4)), values=np.ones((3, 2)), ids=[1, 2])),
        (ValueError, "already", dict(keys=np.ones((2, 4)), values=np.ones((2, 2)), ids=[1, 7])),
        (ValueError, "unique", dict(keys=np.ones((2, 4)), values=np.ones((2, 2)), ids=[1, 1])),
        (ValueError, ">= 0", dict(keys=np.ones((2, 4)), values=np.ones((2, 2)), ids=[-1, 2])),
        (ValueError, "every add", dict(keys=np.ones((2, 4)), values=np.ones((2, 2)))),
        (ValueError, "bias", dict(keys=np.ones((2, 4)), values=np.ones((2, 2)), ids=[1, 2], bias=[0.0, np.nan])),
    ]
    for exc, match, kwargs in bad:
        with pytest.raises(exc, match=match):
            index.add(**kwargs)
        assert len(index) == 3
    with pytest.raises(ValueError, match="no values"):
        sr.Index(4).add(np.ones((1, 4)), np.ones((1, 2)))


def test_bad_queries(rng):
    index = sr.Index(4)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.ones((1, 4)), 1)
    index.add(rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="dimension 3"):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.retrieve(np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(np.ones((1, 4)), 0)
    with pytest.raises(ValueError, match="bias"):
        index.search(np.ones((1, 4)), 1, bias=np.ones(4))


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_and_mmap_round_trip(tmp_path, rng, dtype):
    K = rng.standard_normal((70, 6))
    V = rng.standard_normal((70, 2))
    Q = rng.standard_normal((4, 6))
    index = sr.Index(6, metric="cosine", value_dim=2, dtype=dtype)
    index.add(K, V, ids=np.arange(70) + 100, bias=rng.standard_normal(70))
    path = tmp_path / "idx"
    index.save(path)
    index.save(path)   # replacing an existing index is atomic too
    assert os.listdir(tmp_path) == ["idx"]
    want = index.retrieve_topk(Q, 5)
    for mmap in (False, True):
        back = sr.Index.load(path, mmap=mmap)
        assert repr(back) == repr(index)
        got = back.retrieve_topk(Q, 5)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    back = sr.Index.load(path, mmap=True)
    back.add(K[:3] * 2, V[:3], ids=[1, 2, 3])    # a mapped index grows into memory
    assert len(back) == 73 and len(sr.Index.load(path)) == 70


def test_damaged_index_is_refused(tmp_path, rng, refuses_bad_meta):
    index = sr.Index(6, dtype="int8")
    index.add(rng.standard_normal((50, 6)))
    path = tmp_path / "idx"
    index.save(path)
    file = saved_file(path, "keys")
    keys = file.read_bytes()
    file.write_bytes(keys[:-5])
    with pytest.raises(ValueError, match="checksum"):
        sr.Index.load(path)
    with pytest.raises(ValueError, match=r"keys\."):
        sr.Index.load(path, verify=False)
    file.write_bytes(keys)
    saved_file(path, "scales").unlink()
    with pytest.raises(ValueError, match=r"scales\.[0-9a-f]+\.npy is missing"):
        sr.Index.load(path)
    index.save(path)
    meta = json.loads((path / "meta.json").read_text())
    for edit in ({"ntotal": 51}, {"metric": "l2"}, {"dtype": "float16"}):
        (path / "meta.json").write_text(json.dumps(dict(meta, **edit)))
        with pytest.raises(ValueError, match="edited"):
            sr.Index.load(path, verify=False)
    (path / "meta.json").write_text(json.dumps(meta))
    rewrite_meta(path, ntotal=51)
    with pytest.raises(ValueError, match="expected"):
        sr.Index.load(path)
    rewrite_meta(path, ntotal=50, dtype="float64")
    with pytest.raises(ValueError, match="dtype"):
        sr.Index.load(path)
    refuses_bad_meta(sr.Index.load, path)


def test_encodings_at_extreme_magnitudes():
    """int8 rows whose scale's reciprocal overflows float32 still encode by
    division (not clamped to +-127); float16 rows too small for the format
    are refused even when their squares underflow float32."""
    x = np.array([[1e-37, 5e-38, -3e-38, 0.0]], np.float32)
    data, scale = np.empty((1, 4), np.int8), np.empty(1, np.float32)
    storage.encode_rows(x, "int8", data, scale)
    np.testing.assert_array_equal(data[0], np.clip(np.rint(x[0] / scale[0]), -127, 127))
    for tiny in (1e-23, 1e-30):
        with pytest.raises(ValueError, match="lose precision in float16"):
            storage.encode_rows(np.full((1, 4), tiny, np.float32), "float16",
                                np.empty((1, 4), np.float16), None)
