"""Live catalogs: Index.remove / update / compact and per-query allow-lists
(``include=``), against freshly built indexes, a float64 brute force and
FAISS (``remove_ids``, ``IDSelectorBatch`` through ``SearchParameters``)."""

import threading

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import config

DTYPES = ("float32", "float16", "bfloat16", "int8")
METRICS = ("ip", "cosine", "l2")


def fresh(keys, ids, metric, dtype, values=None, bias=None):
    """An index built from scratch of exactly these items, in this order."""
    index = sr.Index(keys.shape[1], metric=metric, dtype=dtype,
                     value_dim=None if values is None else values.shape[1])
    index.add(keys, values=values, ids=ids, bias=bias)
    return index


def same_results(a, b, Q, k, **kwargs):
    """Every query method gives the same results on indexes a and b."""
    sa, ia = a.search(Q, k, **kwargs)
    sb, ib = b.search(Q, k, **kwargs)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-6, atol=1e-6)
    oa, la = a.retrieve(Q, return_lse=True, **kwargs)
    ob, lb = b.retrieve(Q, return_lse=True, **kwargs)
    np.testing.assert_allclose(oa, ob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    ta, tb = a.retrieve_topk(Q, k, **kwargs), b.retrieve_topk(Q, k, **kwargs)
    np.testing.assert_array_equal(ta.ids, tb.ids)
    np.testing.assert_allclose(ta.out, tb.out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ta.coverage, tb.coverage, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.logsumexp(Q, **kwargs), b.logsumexp(Q, **kwargs), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_remove_equals_a_fresh_index_of_the_rest(small_tiles, rng, dtype, metric):
    N, d, B = 203, 7, 5
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, 3)).astype(np.float32)
    ids = rng.permutation(10 * N)[:N]
    bias = rng.standard_normal(N)
    index = fresh(K, ids, metric, dtype, V, bias)
    gone = rng.choice(ids, N // 10, replace=False)
    assert index.remove(np.concatenate([gone, [10 * N + 5]])) == gone.size   # unknown: ignored
    keep = ~np.isin(ids, gone)
    assert len(index) == index.ntotal == keep.sum()
    np.testing.assert_array_equal(index.ids, ids[keep])
    np.testing.assert_array_equal(index.bias, bias[keep])
    Q = rng.standard_normal((B, d)).astype(np.float32)
    rest = fresh(K[keep], ids[keep], metric, dtype, V[keep], bias[keep])
    np.testing.assert_array_equal(index.keys(), rest.keys())
    same_results(index, rest, Q, 9)
    same_results(index, rest, Q, N + 4)                      # k > N: -1 padding, never a removed id
    same_results(index, rest, Q, 9, bias=False)
    call_bias = rng.standard_normal(keep.sum())
    same_results(index, rest, Q, 9, bias=call_bias)
    same_results(index, rest, Q, 9, exclude=[gone[:3]] + [ids[keep][:2]] * (B - 1))
    index.compact()
    same_results(index, rest, Q, 9)


def test_remove_matches_faiss_remove_ids(rng):
    N, d = 500, 16
    K = rng.standard_normal((N, d)).astype(np.float32)
    ids = np.arange(N, dtype=np.int64) * 3 + 1
    index = fresh(K, ids, "ip", "float32")
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    ref.add_with_ids(K, ids)
    gone = rng.choice(ids, 77, replace=False)
    assert index.remove(gone) == ref.remove_ids(gone) == 77
    Q = rng.standard_normal((6, d)).astype(np.float32)
    got_s, got_i = index.search(Q, 20)
    want_s, want_i = ref.search(Q, 20)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    assert not np.isin(got_i, gone).any()


def test_removed_ids_can_be_added_again_and_remove_is_idempotent(rng):
    K = rng.standard_normal((50, 4)).astype(np.float32)
    ids = np.arange(100, 150)
    index = fresh(K, ids, "ip", "float32")
    assert index.remove([100, 101]) == 2
    assert index.remove([100, 101]) == 0
    assert index.remove([]) == 0
    with pytest.raises(ValueError, match="already in the index"):
        index.add(K[:1], ids=[102])
    new = rng.standard_normal((1, 4)).astype(np.float32) * 10
    index.add(new, ids=[100])
    assert len(index) == 49
    _, got = index.search(new, 1)
    assert got[0, 0] == 100
    with pytest.raises(TypeError, match="ids"):
        index.remove([1.5])
    with pytest.raises(ValueError, match="below 2"):
        index.remove(np.array([2**63 + 1], np.uint64))


def test_every_item_removed_leaves_an_empty_index(rng):
    index = fresh(rng.standard_normal((5, 3)), np.arange(5), "ip", "float32")
    index.remove(np.arange(5))
    assert len(index) == 0
    with pytest.raises(ValueError, match="empty"):
        index.search(np.ones((1, 3)), 1)
    index.add(np.ones((1, 3)), ids=[3])
    _, got = index.search(np.ones((1, 3)), 2)
    np.testing.assert_array_equal(got, [[3, -1]])


def test_an_index_without_ids_keeps_its_numbers(tmp_path, rng):
    K = rng.standard_normal((40, 5)).astype(np.float32)
    index = sr.Index(5)
    index.add(K)
    assert index.ids is None
    index.remove([0, 7])
    np.testing.assert_array_equal(index.ids, np.setdiff1d(np.arange(40), [0, 7]))
    index.add(K[:2])                                         # numbered on: 40, 41
    np.testing.assert_array_equal(index.ids[-2:], [40, 41])
    with pytest.raises(ValueError, match="numbers its items itself"):
        index.add(K[:1], ids=[99])
    _, got = index.search(K[7:8], 3)
    assert 7 not in got and 0 not in got
    index.save(tmp_path / "ix")
    back = sr.Index.load(tmp_path / "ix")
    np.testing.assert_array_equal(back.ids, index.ids)
    same_results(index, back, K[:3], 5)
    back.add(K[:1])
    assert back.ids[-1] == 42


def test_update_equals_a_fresh_index(small_tiles, rng):
    N, d = 120, 9
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, 4)).astype(np.float32)
    ids = rng.permutation(1000)[:N]
    bias = rng.standard_normal(N)
    index = fresh(K, ids, "ip", "float32", V, bias)
    which = rng.choice(N, 15, replace=False)
    K2, V2 = K.copy(), V.copy()
    K2[which] = rng.standard_normal((15, d))
    V2[which[:5]] = rng.standard_normal((5, 4))
    index.update(ids[which[:5]], K2[which[:5]], V2[which[:5]])
    index.update(ids[which[5:]], K2[which[5:]])              # values kept
    assert len(index) == N
    # the updated items moved to the end: compare with a fresh index in that order
    order = np.concatenate([np.setdiff1d(np.arange(N), which), which[:5], which[5:]])
    want = fresh(K2[order], ids[order], "ip", "float32", V2[order], bias[order])
    np.testing.assert_array_equal(index.ids, ids[order])
    np.testing.assert_array_equal(index.bias, bias[order])
    same_results(index, want, rng.standard_normal((4, d)).astype(np.float32), 7)


def test_bad_updates_change_nothing(rng):
    K = rng.standard_normal((20, 4)).astype(np.float32)
    index = fresh(K, np.arange(20), "ip", "float32", rng.standard_normal((20, 2)))
    before = (index.keys(), index.ids.copy())
    bad = [
        (([3, 99], K[:2]), ValueError, "not in the index"),
        (([3, 3], K[:2]), ValueError, "unique"),
        (([3], K[:1, :3]), ValueError, "shape"),
        (([3], np.full((1, 4), np.nan)), ValueError, "keys"),
        (([3], K[:1], np.ones((1, 5))), ValueError, "values"),
        (([3.0], K[:1]), TypeError, "ids"),
    ]
    for args, err, match in bad:
        with pytest.raises(err, match=match):
            index.update(*args)
    np.testing.assert_array_equal(index.keys(), before[0])
    np.testing.assert_array_equal(index.ids, before[1])
    index.remove([5])
    with pytest.raises(ValueError, match="not in the index"):
        index.update([5], K[:1])


def test_growth_drops_removed_rows(rng):
    index = sr.Index(3)
    K = rng.standard_normal((10, 3)).astype(np.float32)
    index.add(K)
    index.remove(np.arange(8))
    index.add(rng.standard_normal((100, 3)))                  # grows: removed rows dropped
    assert len(index) == 102 and index._n == 102
    np.testing.assert_array_equal(index.ids[:2], [8, 9])
    np.testing.assert_array_equal(index.keys()[:2], K[8:])


def test_save_writes_live_items_only(tmp_path, rng):
    K = rng.standard_normal((30, 6)).astype(np.float32)
    index = fresh(K, np.arange(30) + 5, "l2", "int8")
    index.remove([5, 6, 7])
    index.update([10], K[:1])
    index.save(tmp_path / "ix")
    back = sr.Index.load(tmp_path / "ix")
    assert len(back) == 27 and back._n == 27
    np.testing.assert_array_equal(back.ids, index.ids)
    same_results(index, back, K[:4], 5)


def brute(Q, K, rows_per_query, k):
    """float64 top-k over each query's own rows: (scores, rows)."""
    scores = np.full((Q.shape[0], k), -np.inf)
    out = np.full((Q.shape[0], k), -1)
    for b, rows in enumerate(rows_per_query):
        rows = np.sort(np.asarray(rows, np.int64))
        s = K[rows].astype(np.float64) @ Q[b].astype(np.float64)
        order = np.lexsort((rows, -s))[:k]
        scores[b, : order.size] = s[order]
        out[b, : order.size] = rows[order]
    return scores, out


def soft(Q, K, V, rows_per_query):
    """float64 softmax over each query's own rows: (out, lse)."""
    out = np.zeros((Q.shape[0], V.shape[1]))
    lse = np.full(Q.shape[0], -np.inf)
    for b, rows in enumerate(rows_per_query):
        if len(rows) == 0:
            continue
        s = K[rows].astype(np.float64) @ Q[b].astype(np.float64)
        top = s.max()
        w = np.exp(s - top)
        lse[b] = top + np.log(w.sum())
        out[b] = (w / w.sum()) @ V[rows]
    return out, lse


@pytest.mark.parametrize("path", ["gather", "mask"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_include_matches_brute_force(small_tiles, monkeypatch, rng, path, dtype):
    monkeypatch.setattr(config, "INCLUDE_GATHER_SHARE", 1.0 if path == "gather" else 0.0)
    N, d, B = 301, 11, 6
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, 5)).astype(np.float32)
    ids = rng.permutation(5 * N)[:N]
    index = fresh(K, ids, "ip", dtype, V)
    Kd = index.keys()
    gone = ids[:20]
    index.remove(gone)
    sizes = [0, 1, 3, 40, 150, N]
    include = [rng.choice(ids, s, replace=False) for s in sizes]
    include[3] = np.concatenate([include[3], [10 * N]])      # unknown ids: ignored
    exclude = [ids[20:30]] * B
    Q = rng.standard_normal((B, d)).astype(np.float32)
    allowed = [np.flatnonzero(np.isin(ids, inc) & ~np.isin(ids, gone) & ~np.isin(ids, ex))
               for inc, ex in zip(include, exclude)]
    want_s, want_rows = brute(Q, Kd, allowed, 8)
    got_s, got_ids = index.search(Q, 8, include=include, exclude=exclude)
    np.testing.assert_array_equal(got_ids, np.where(want_rows >= 0, ids[want_rows], -1))
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    want_o, want_l = soft(Q, Kd, V, allowed)
    got_o, got_l = index.retrieve(Q, include=include, exclude=exclude, return_lse=True)
    np.testing.assert_allclose(got_o, want_o, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(index.logsumexp(Q, include=include, exclude=exclude), want_l,
                               rtol=1e-5, atol=1e-5)
    top = index.retrieve_topk(Q, 8, include=include, exclude=exclude)
    np.testing.assert_array_equal(top.ids, got_ids)
    np.testing.assert_allclose(top.lse, want_l, rtol=1e-5, atol=1e-5)
    assert top.coverage[0] == 0 and top.coverage[1] == pytest.approx(1.0)


def test_include_paths_agree_and_choice_is_automatic(monkeypatch, rng):
    N, d, B = 4000, 8, 3
    K = rng.standard_normal((N, d)).astype(np.float32)
    index = sr.Index(d)
    index.add(K)
    Q = rng.standard_normal((B, d)).astype(np.float32)
    short = [rng.choice(N, 10, replace=False) for _ in range(B)]
    long = [rng.choice(N, N // 2, replace=False) for _ in range(B)]
    for include in (short, long):
        auto = index.search(Q, 5, include=include)
        for share in (0.0, 1.0):
            monkeypatch.setattr(config, "INCLUDE_GATHER_SHARE", share)
            forced = index.search(Q, 5, include=include)
            np.testing.assert_array_equal(forced[1], auto[1])
        monkeypatch.undo()
    # the automatic choice: short lists are gathered, long ones masked
    snap, _, problems = index._problems(Q, softmax=False, scale=None, bias=None, exclude=None,
                                        include=short, device="cpu")
    assert snap.row_map is not None and problems[0][1].keys.data.shape[0] == 30
    snap, _, problems = index._problems(Q, softmax=False, scale=None, bias=None, exclude=None,
                                        include=long, device="cpu")
    assert snap.row_map is None and problems[0][1].masks.allow


def test_include_matches_faiss_id_selector(rng):
    N, d = 2000, 12
    K = rng.standard_normal((N, d)).astype(np.float32)
    ids = np.arange(N, dtype=np.int64) * 7
    index = fresh(K, ids, "l2", "float32")
    ref = faiss.IndexIDMap2(faiss.IndexFlatL2(d))
    ref.add_with_ids(K, ids)
    Q = rng.standard_normal((4, d)).astype(np.float32)
    include = [rng.choice(ids, n, replace=False) for n in (5, 50, 500, 1500)]
    got_s, got_i = index.search(Q, 10, include=include)
    for b, inc in enumerate(include):
        sel = faiss.IDSelectorBatch(inc.size, faiss.swig_ptr(inc))
        want_s, want_i = ref.search(Q[b:b + 1], 10, params=faiss.SearchParameters(sel=sel))
        np.testing.assert_array_equal(got_i[b], want_i[0])
        valid = want_i[0] >= 0                       # (FAISS pads l2 with FLT_MAX, we with inf)
        np.testing.assert_allclose(got_s[b][valid], want_s[0][valid], rtol=1e-4, atol=1e-4)
        assert np.isposinf(got_s[b][~valid]).all()


def test_bad_include_lists(rng):
    index = fresh(rng.standard_normal((10, 3)), np.arange(10), "ip", "float32")
    Q = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="include must hold one array per query"):
        index.search(Q, 2, include=[[1]])
    with pytest.raises(ValueError, match="include ids out of range"):
        index.search(Q, 2, include=[[1], [-1]])
    with pytest.raises(TypeError, match="include"):
        index.search(Q, 2, include="1,2")
    plain = sr.Index(3)
    plain.add(rng.standard_normal((10, 3)))
    with pytest.raises(ValueError, match="include ids out of range"):
        plain.search(Q, 2, include=[[1], [10]])


def test_a_million_items_after_removing_a_tenth(rng):
    N, d = 1_000_000, 8
    K = rng.standard_normal((N, d), dtype=np.float32)
    index = sr.Index(d)
    index.add(K)
    gone = rng.choice(N, N // 10, replace=False)
    index.remove(gone)
    keep = np.setdiff1d(np.arange(N), gone)
    rest = fresh(K[keep], keep, "ip", "float32")
    Q = rng.standard_normal((3, d), dtype=np.float32)
    a, b = index.search(Q, 10), rest.search(Q, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(index.logsumexp(Q), rest.logsumexp(Q), rtol=1e-5)


def test_concurrent_searches_see_before_or_after(rng):
    """Readers search while a writer updates and removes: every result is
    the index's before or after one change, never a mix."""
    N, d = 3000, 8
    K = rng.standard_normal((N, d)).astype(np.float32)
    index = fresh(K, np.arange(N), "ip", "float32")
    Q = K[:4] * 5
    states = [index.search(Q, 5)[1]]
    flip = [np.arange(i, N, 10) for i in range(4)]
    expected = fresh(K, np.arange(N), "ip", "float32")
    for part in flip:                                       # what each state looks like
        expected.update(part, -K[part])
        states.append(expected.search(Q, 5)[1])
    expected.remove(np.arange(0, N, 7))
    states.append(expected.search(Q, 5)[1])
    seen, errors = [], []
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(index.search(Q, 5)[1])
            except Exception as exc:     # noqa: BLE001 (reported below)
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for part in flip:
        index.update(part, -K[part])
    index.remove(np.arange(0, N, 7))
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen
    for got in seen:
        assert any(np.array_equal(got, s) for s in states)
    np.testing.assert_array_equal(index.search(Q, 5)[1], states[-1])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_range_search_after_removal_with_allow_lists_matches_faiss(monkeypatch, rng, share):
    """Index.range_search after removals, with allow-lists (masked and
    gathered), equals FAISS range_search on the remaining items filtered
    by an IDSelectorBatch per query."""
    monkeypatch.setattr(config, "INCLUDE_GATHER_SHARE", share)
    N, d = 1500, 10
    K = rng.standard_normal((N, d)).astype(np.float32)
    ids = np.arange(N, dtype=np.int64) * 5
    index = fresh(K, ids, "ip", "float16")
    Kd = index.keys()
    gone = rng.choice(ids, 150, replace=False)
    index.remove(gone)
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    keep = ~np.isin(ids, gone)
    ref.add_with_ids(Kd[keep], ids[keep])
    Q = rng.standard_normal((3, d)).astype(np.float32)
    include = [rng.choice(ids, n, replace=False) for n in (10, 300, 1400)]
    s = np.sort((Kd.astype(np.float64) @ Q.T.astype(np.float64)).ravel())
    threshold = float(s[-40] + s[-41]) / 2
    if s[-40] - s[-41] < 1e-4:
        pytest.skip("no clear gap at the threshold for this draw")
    lims, scores, got = index.range_search(Q, threshold, include=include)
    for b, inc in enumerate(include):
        sel = faiss.IDSelectorBatch(inc.size, faiss.swig_ptr(inc))
        wl, ws, wi = ref.range_search(Q[b:b + 1], threshold, params=faiss.SearchParameters(sel=sel))
        mine = got[lims[b]:lims[b + 1]]
        assert not np.isin(mine, gone).any()
        np.testing.assert_array_equal(np.sort(mine), np.sort(wi))
        np.testing.assert_allclose(np.sort(scores[lims[b]:lims[b + 1]]), np.sort(ws), rtol=1e-5,
                                   atol=1e-5)


def test_an_emptied_index_with_ids_and_adds_without_them(tmp_path, rng):
    """All items removed: while their rows remain, an add must keep the rule
    (ids on every add); once dropped (compact, save/load) the index is empty
    and decides again. Never an item without a proper id."""
    K = rng.standard_normal((4, 3)).astype(np.float32)
    index = sr.Index(3)
    index.add(K[:2], ids=[500, 600])
    index.remove([500, 600])
    with pytest.raises(ValueError, match="ids must be given on every add"):
        index.add(K)
    index.save(tmp_path / "empty")
    index.compact()
    for empty in (index, sr.Index.load(tmp_path / "empty")):
        empty.add(K)
        assert empty.ids is None
        assert sorted(empty.search(K[:1], 4)[1][0]) == [0, 1, 2, 3]


def test_a_refused_update_leaves_the_numbering_alone(rng):
    index = sr.Index(4, dtype="float16")
    index.add(rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="float16"):
        index.update([3], np.full((1, 4), 1e6))
    assert index.ids is None and len(index) == 10
    index.add(rng.standard_normal((1, 4)))                    # still an index without ids
    assert index.ids is None


def test_updates_and_removals_do_not_rebuild_the_id_lookup(rng):
    """The sorted id lookup is built once; updates and adds of a few items
    join a small lookup of recent rows, and removals touch neither."""
    index = fresh(rng.standard_normal((5000, 3)), np.arange(5000) * 2, "ip", "float32")
    index.update([0], rng.standard_normal((1, 3)))          # grows the arrays (a rebuild)
    index.search(np.ones((1, 3)), 1)
    main = index._lookup()[0]
    index.update([10, 20], rng.standard_normal((2, 3)))
    index.remove([30, 10])
    index.add(rng.standard_normal((3, 3)), ids=[1, 3, 5])
    index.update([20], rng.standard_normal((1, 3)))
    assert index._lookup()[0] is main
    assert index.remove([20, 1, 44]) == 3 and 20 not in index.ids and len(index) == 5000 + 3 - 5


def test_interleaved_changes_match_a_model(rng):
    """A random run of adds, removes, updates (also of one item twice) and
    compactions: ids, keys and search results equal a plain dict model."""
    d = 5
    index = sr.Index(d)
    model = {}
    next_id = 0
    Q = rng.standard_normal((3, d)).astype(np.float32)
    for step in range(120):
        op = rng.integers(4) if model else 0
        if op == 0:
            n = int(rng.integers(1, 40))
            K = rng.standard_normal((n, d)).astype(np.float32)
            ids = np.arange(next_id, next_id + n) * 3
            next_id += n
            index.add(K, ids=ids)
            model.update(zip(ids.tolist(), K))
        elif op == 1:
            gone = rng.choice(list(model), min(len(model), int(rng.integers(1, 10))), replace=False)
            assert index.remove(gone) == len(gone)
            for i in gone:
                del model[int(i)]
        elif op == 2:
            which = rng.choice(list(model), min(len(model), 3), replace=False)
            K = rng.standard_normal((len(which), d)).astype(np.float32)
            index.update(which, K)
            model.update(zip(which.tolist(), K))
        elif step % 10 == 0:
            index.compact()
        assert len(index) == len(model)
        live = dict(zip(index.ids.tolist(), index.keys()))
        assert live.keys() == model.keys()
        for i, k in model.items():
            np.testing.assert_array_equal(live[i], k)
        ids = np.array(list(model))
        K = np.stack([model[i] for i in ids])
        scores = Q @ K.T
        got = index.search(Q, 4)[1]
        for b in range(3):
            want = ids[np.argsort(-scores[b], kind="stable")[:4]]
            np.testing.assert_array_equal(got[b][:len(want)], want)


def test_a_flat_list_is_not_read_as_one_id_per_query(rng):
    """include=[1, 2, 3] for B = 3 is refused (it would mean one id per
    query, not one list for all); so is a 2-D element."""
    index = fresh(rng.standard_normal((10, 3)), np.arange(10), "ip", "float32")
    Q = np.ones((3, 3), np.float32)
    for kw in ("include", "exclude"):
        with pytest.raises(ValueError, match=rf"{kw}\[0\] has shape \(\)"):
            index.search(Q, 2, **{kw: [1, 2, 3]})
        with pytest.raises(ValueError, match=rf"{kw}\[1\] has shape \(1, 2\)"):
            index.search(Q, 2, **{kw: [[1], [[1, 2]], [3]]})
    np.testing.assert_array_equal(index.search(Q, 2, include=[[1, 2, 3]] * 3)[1][:, 0] >= 1, True)


@pytest.mark.parametrize("path", ["gather", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_include_every_metric_and_dtype(small_tiles, monkeypatch, rng, path, dtype, metric):
    """Allow-lists after removals, both paths, every metric and storage
    dtype: top-k equals the float64 reference with every other key
    excluded (on the keys as stored), and so does retrieve with those keys
    at -inf."""
    from reference import attention_ref, topk_ref

    monkeypatch.setattr(config, "INCLUDE_GATHER_SHARE", 1.0 if path == "gather" else 0.0)
    N, d, B = 97, 6, 4
    K = rng.standard_normal((N, d)).astype(np.float32) + (3.0 if metric == "l2" else 0.0)
    ids = np.arange(N) * 2 + 1
    index = fresh(K, ids, metric, dtype, bias=rng.standard_normal(N))
    Kd, bias = index.keys(), index.bias
    index.remove(ids[:9])
    include = [rng.choice(ids, s, replace=False) for s in (5, 30, 80, 1)]
    allowed = [np.isin(ids, inc) & (np.arange(N) >= 9) for inc in include]
    complement = [np.flatnonzero(~a) for a in allowed]
    Q = rng.standard_normal((B, d)).astype(np.float32)
    want_s, want_rows = topk_ref(Q, Kd, 7, metric, bias=bias, exclude=complement)
    got_s, got_ids = index.search(Q, 7, include=include)
    np.testing.assert_array_equal(got_ids, np.where(want_rows >= 0, ids[np.maximum(want_rows, 0)], -1))
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4)
    if metric == "ip":
        for b in range(B):
            b_bias = np.where(allowed[b], bias, -np.inf)
            want_o, want_l = attention_ref(Q[b:b + 1], Kd, scale=1.0, bias=b_bias)
            got_o, got_l = index.retrieve(Q[b:b + 1], include=include[b:b + 1], return_lse=True)
            np.testing.assert_allclose(got_o, want_o, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-5)


def test_csr_allow_list_errors_name_their_part(rng):
    index = fresh(rng.standard_normal((10, 3)), np.arange(10), "ip", "float32")
    Q = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"^include offsets must have shape \(4,\)"):
        index.search(Q, 2, include=(np.array([0, 1, 1]), np.array([1])))
    with pytest.raises(ValueError, match=r"^include offsets must start at 0"):
        index.search(Q, 2, include=(np.array([1, 1, 1, 1]), np.array([1])))
    with pytest.raises(TypeError, match=r"^include ids must be a 1-D integer array"):
        index.search(Q, 2, include=(np.array([0, 1, 1, 1]), np.array([1.0])))
