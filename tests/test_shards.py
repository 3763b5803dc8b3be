"""Sharded folders (Index.save_shards, the manifest, checked shard loads) and
the exact merge of shard partials (merging.shard_partial / combine) against
one Index over all the items, in process (tests/test_distributed.py runs the
same through Dask workers)."""

import json
import os

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import datasets, io, merging, shards

from conftest import saved_file
from reference import topk_ref

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def catalog(rng, n=1003, d=17, dv=5, *, dtype="float32", metric="ip", ids=True, values=True,
            bias=True):
    K = rng.standard_normal((n, d)).astype(np.float32)
    index = sr.Index(d, metric=metric, dtype=dtype, value_dim=dv if values else None)
    index.add(K, rng.standard_normal((n, dv)).astype(np.float32) if values else None,
              ids=np.arange(n) * 3 + 7 if ids else None,
              bias=rng.standard_normal(n) if bias else None)
    return index


def sharded_call(index, folder, method, Q, k=None, **options):
    """``method`` through the shards of ``folder``: each shard's partial, merged."""
    manifest = shards.read_manifest(folder)
    bias = options.pop("bias", None)
    parts = [merging.shard_partial(
        shards.load_shard(manifest, i), s.row_offset, method, Q, k, **options,
        bias=bias if bias is None or bias is False else bias[s.row_offset:s.row_offset + s.ntotal])
        for i, s in enumerate(manifest.shards)]
    return merging.combine(method, parts, k, index.metric)


def assert_same(method, got, want):
    """Sharded and single-index results agree: ids exactly, the rest to float32
    rounding. An lse error of 1e-5 is a relative error of 1e-5 in the
    partition function exp(lse), whatever the size of lse."""
    if method == "search":
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-5)
    elif method == "retrieve":
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-5)
    elif method == "logsumexp":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    else:
        np.testing.assert_array_equal(got.ids, want.ids)
        for name in ("out", "weights", "coverage"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(got.lse, want.lse, rtol=1e-6, atol=1e-5)


def single_call(index, method, Q, k=None, **options):
    if method == "retrieve":
        return index.retrieve(Q, return_lse=True, **options)
    return getattr(index, method)(Q, k, **options) if k else getattr(index, method)(Q, **options)


CALLS = [("search", 25, {}), ("retrieve", None, {"scale": 0.7}),
         ("retrieve_topk", 12, {"scale": 0.3}), ("logsumexp", None, {"temperature": 2.0})]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_every_method_equals_one_index(tmp_path, rng, dtype, metric):
    """Uneven shards with an empty one and one smaller than k; bias, exclusions
    (one query loses a whole shard), allow-lists, and every storage dtype."""
    index = catalog(rng, dtype=dtype, metric=metric)
    index.save_shards(tmp_path / "cat", sizes=[400, 0, 3, 600])
    Q = rng.standard_normal((37, 17)).astype(np.float32)
    ids = index.ids
    exclude = [list(ids[i:i + 30]) for i in range(37)]
    exclude[5] = list(ids[:400])                       # every item of shard 0
    include = [list(ids[i::7]) for i in range(37)]
    for method, k, kw in CALLS:
        for options in ({}, {"exclude": exclude}, {"include": include, "exclude": exclude},
                        {"bias": False}, {"bias": rng.standard_normal(len(index))}):
            got = sharded_call(index, tmp_path / "cat", method, Q, k, **kw, **options)
            assert_same(method, got, single_call(index, method, Q, k, **kw, **options))


def test_k_beyond_the_catalog_and_all_excluded(tmp_path, rng):
    index = catalog(rng, n=40)
    index.save_shards(tmp_path / "cat", sizes=[10, 30])
    Q = rng.standard_normal((3, 17)).astype(np.float32)
    everything = [list(index.ids)] * 3
    for method, k, kw in CALLS:
        for options in ({}, {"exclude": everything}):
            kk = None if k is None else 50
            got = sharded_call(index, tmp_path / "cat", method, Q, kk, **kw, **options)
            assert_same(method, got, single_call(index, method, Q, kk, **kw, **options))
    scores, ids = sharded_call(index, tmp_path / "cat", "search", Q, 50, exclude=everything)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_coverage_and_lse_at_large_scales(tmp_path, rng):
    """Top-k attention's coverage measures the top-k's share against the
    merged partition in float64, so it stays exact where the logits are
    large (a float32 partition would lose it: 0.86 instead of 1 at 1e6)."""
    index = catalog(rng, n=500, d=8, values=False, bias=False)
    index.save_shards(tmp_path / "cat", 3)
    Q = rng.standard_normal((50, 8)).astype(np.float32)
    for scale in (1e2, 1e4, 1e6):
        got = sharded_call(index, tmp_path / "cat", "retrieve_topk", Q, 5, scale=scale)
        want = index.retrieve_topk(Q, 5, scale=scale)
        np.testing.assert_allclose(got.coverage, want.coverage, atol=1e-5)
        np.testing.assert_allclose(got.lse, want.lse, rtol=1e-6)
        np.testing.assert_array_equal(got.ids, want.ids)


def test_ties_go_to_the_earlier_item_however_sharded(tmp_path, rng):
    """Integer keys (exact dot products) with many equal scores spread over
    shards: the same ids as one index and as a float64 reference, for every
    way of cutting the catalog."""
    K = rng.integers(-1, 2, (300, 4)).astype(np.float32)
    Q = rng.integers(-1, 2, (20, 4)).astype(np.float32)
    index = sr.Index(4)
    index.add(K, ids=np.arange(300) * 2)
    want_s, want_i = index.search(Q, 40)
    ref_s, ref_i = topk_ref(Q, K, 40)
    np.testing.assert_array_equal(want_i, ref_i * 2)
    for sizes in ([150, 150], [1, 298, 1], [7, 0, 93, 100, 100]):
        index.save_shards(tmp_path / "cat", sizes=sizes)
        scores, ids = sharded_call(index, tmp_path / "cat", "search", Q, 40)
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_array_equal(scores, want_s)


def test_shipped_minilm_shards_equal_faiss(tmp_path):
    paths = datasets.minilm_paths()
    base = io.read_vectors(paths["base"])
    queries = np.ascontiguousarray(io.read_vectors(paths["query"])[:200])
    index = sr.Index(base.shape[1])
    index.add(base)
    index.save_shards(tmp_path / "cat", 3)
    scores, ids = sharded_call(index, tmp_path / "cat", "search", queries, 10)
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.ascontiguousarray(base, np.float32))
    fs, fi = flat.search(queries, 10)
    np.testing.assert_array_equal(ids, fi)
    np.testing.assert_allclose(scores, fs, atol=1e-5)
    for method, k, kw in CALLS[1:]:
        assert_same(method, sharded_call(index, tmp_path / "cat", method, queries, k, **kw),
                    single_call(index, method, queries, k, **kw))


def test_far_l2_keys_as_values_and_no_ids(tmp_path, rng):
    """Keys far from the origin (the index keeps a centre; every shard carries
    it) serve as values; an index without ids shards with row-number ids."""
    K = (rng.standard_normal((500, 6)) + 3000).astype(np.float32)
    index = sr.Index(6, metric="l2")
    index.add(K)
    assert index.center is not None and index.ids is None
    index.save_shards(tmp_path / "cat", 3)
    manifest = shards.read_manifest(tmp_path / "cat")
    assert manifest.ids == "rows"
    assert [shards.load_shard(manifest, i).ids[0] for i in range(3)] == [0, 167, 334]
    Q = (rng.standard_normal((9, 6)) + 3000).astype(np.float32)
    for method, k, kw in CALLS:
        assert_same(method, sharded_call(index, tmp_path / "cat", method, Q, k, **kw),
                    single_call(index, method, Q, k, **kw))


def test_manifest_describes_the_shards(tmp_path, rng):
    index = catalog(rng, n=100)
    index.remove(index.ids[:10])
    index.save_shards(tmp_path / "cat", sizes=[30, 0, 60])
    meta = json.loads((tmp_path / "cat" / "meta.json").read_text())
    assert meta["format"] == "softretrieval.ShardedIndex" and meta["ntotal"] == 90
    assert meta["shards"] == ["shard-00000", "shard-00001", "shard-00002"]
    manifest = shards.read_manifest(tmp_path / "cat")
    assert [(s.ntotal, s.row_offset, s.id_min, s.id_max) for s in manifest.shards] == [
        (30, 0, 37, 124), (0, 30, None, None), (60, 30, 127, 304)]
    loaded = [shards.load_shard(manifest, i) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([s.ids for s in loaded]), index.ids)
    np.testing.assert_array_equal(np.concatenate([s.keys() for s in loaded]), index.keys())
    for i, shard in enumerate(loaded):        # a shard is an ordinary index folder
        again = sr.Index.load(manifest.shards[i].path)
        np.testing.assert_array_equal(again.ids, shard.ids)


def test_bad_shard_arguments(tmp_path, rng):
    index = catalog(rng, n=10)
    for kwargs, error in [({}, ValueError), ({"n_shards": 0}, ValueError),
                          ({"n_shards": 2, "sizes": [5, 5]}, ValueError),
                          ({"sizes": [5, 4]}, ValueError), ({"sizes": [11, -1]}, ValueError),
                          ({"sizes": [5.0, 5.0]}, TypeError), ({"n_shards": 2.0}, TypeError)]:
        with pytest.raises(error):
            index.save_shards(tmp_path / "cat", **kwargs)
    assert not os.path.exists(tmp_path / "cat")


def test_damaged_replaced_or_edited_shards_are_refused_by_name(tmp_path, rng):
    index = catalog(rng, n=100)
    index.save_shards(tmp_path / "cat", 3)
    manifest = shards.read_manifest(tmp_path / "cat")
    shard1 = tmp_path / "cat" / os.path.basename(manifest.shards[1].path)
    keys = saved_file(shard1, "keys")
    raw = bytearray(keys.read_bytes())
    raw[-1] ^= 1
    keys.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard shard-00001 .*checksum mismatch"):
        shards.load_shard(manifest, 1)
    shards.load_shard(manifest, 1, verify=False)          # (only the files' checksums skipped)
    other = catalog(rng, n=34)
    for f in os.listdir(shard1):
        os.remove(shard1 / f)
    other.save(shard1)                                    # a valid index, not the listed one
    with pytest.raises(ValueError, match="shard shard-00001 .* not the one the manifest lists"):
        shards.load_shard(manifest, 1)
    meta = json.loads((tmp_path / "cat" / "meta.json").read_text())
    meta["folders"]["shard-00002"]["ntotal"] += 1          # edited without re-signing
    (tmp_path / "cat" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited"):
        shards.read_manifest(tmp_path / "cat")


def test_manifest_that_disagrees_with_its_shards_is_refused(tmp_path, rng):
    """A manifest re-signed by a buggy writer: offsets that do not tile the
    catalog, counts that disagree with a shard, a missing shard folder."""
    from softretrieval import persist

    index = catalog(rng, n=100)
    index.save_shards(tmp_path / "cat", 2)
    path = tmp_path / "cat" / "meta.json"
    good = json.loads(path.read_text())

    def resign(edit):
        meta = json.loads(json.dumps(good))
        edit(meta)
        meta["checksum"] = persist.meta_checksum(meta)
        path.write_text(json.dumps(meta))

    resign(lambda m: m["folders"]["shard-00001"].update(row_offset=49))
    with pytest.raises(ValueError, match="shard-00001 lists rows from 49"):
        shards.read_manifest(tmp_path / "cat")
    resign(lambda m: m.update(ntotal=101))
    with pytest.raises(ValueError, match="hold 100 items, it says 101"):
        shards.read_manifest(tmp_path / "cat")
    resign(lambda m: m["folders"]["shard-00001"].update(id_max=1))
    with pytest.raises(ValueError, match="shard shard-00001 .* the manifest says"):
        shards.load_shard(shards.read_manifest(tmp_path / "cat"), 1)
    resign(lambda m: m.update(ids="some"))
    with pytest.raises(ValueError, match="ids field is 'some'"):
        shards.read_manifest(tmp_path / "cat")
    resign(lambda m: m["folders"]["shard-00001"].update(ntotal=-1))
    with pytest.raises(ValueError, match="lists -1 items"):
        shards.read_manifest(tmp_path / "cat")
    resign(lambda m: m.update(shards=["shard-00000"]))
    with pytest.raises(ValueError, match="shard list does not match"):
        shards.read_manifest(tmp_path / "cat")
    resign(lambda m: None)
    folder = persist.folder_of(good, "shard-00000")
    os.rename(tmp_path / "cat" / folder, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=f"{folder} of shard-00000 is missing"):
        shards.read_manifest(tmp_path / "cat")


def test_save_shards_replaces_atomically_and_never_touches_what_is_not_ours(tmp_path, rng,
                                                                         monkeypatch):
    first = catalog(rng, n=60)
    first.save_shards(tmp_path / "cat", 2)
    (tmp_path / "cat" / "notes.txt").write_text("mine")
    second = catalog(rng, n=90)
    second.save_shards(tmp_path / "cat", 3)
    manifest = shards.read_manifest(tmp_path / "cat")
    assert manifest.ntotal == 90 and len(manifest.shards) == 3
    assert sorted(os.listdir(tmp_path / "cat")) == sorted(
        ["meta.json", "notes.txt"] + [os.path.basename(s.path) for s in manifest.shards])

    calls = []
    real_save = sr.Index.save

    def failing_save(self, path):                  # the third shard's save fails
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(self, path)

    monkeypatch.setattr(sr.Index, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        first.save_shards(tmp_path / "cat", 4)
    monkeypatch.undo()
    again = shards.read_manifest(tmp_path / "cat")     # the previous save, intact
    assert again == manifest
    for i in range(3):
        shards.load_shard(again, i)
    assert sorted(os.listdir(tmp_path / "cat")) == sorted(
        ["meta.json", "notes.txt"] + [os.path.basename(s.path) for s in again.shards])

    mine = tmp_path / "cat" / os.path.basename(again.shards[0].path)
    (mine / "my-notes.txt").write_text("mine too")
    (mine / "mydir").mkdir()
    second.save_shards(tmp_path / "cat", 2)         # the old shard folder keeps what is yours
    assert sorted(os.listdir(mine)) == ["my-notes.txt", "mydir"]
    assert shards.read_manifest(tmp_path / "cat").ntotal == 90

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="not an intact saved"):
        first.save_shards(tmp_path / "user", 2)
    assert os.listdir(tmp_path / "user") == ["data.csv"]
    with pytest.raises(ValueError, match="not a folder"):
        first.save_shards(tmp_path / "cat" / "meta.json", 2)
    first.save(tmp_path / "plain")                      # an Index folder is not a sharded one
    with pytest.raises(ValueError, match="not an intact saved softretrieval.ShardedIndex"):
        first.save_shards(tmp_path / "plain", 2)
    sr.Index.load(tmp_path / "plain")


def test_merge_topk_equals_one_search_over_the_union(rng):
    """Public merge_topk: each part's FAISS-style top-k merged = a float64
    reference over all the items; ties to the lower id; padding."""
    for metric in ("ip", "l2", "cosine"):
        K = rng.integers(-2, 3, (200, 5)).astype(np.float32)        # exact scores, many ties
        Q = rng.integers(-2, 3, (11, 5)).astype(np.float32)
        owner = rng.integers(0, 4, 200)
        scores, ids = [], []
        for p in range(4):
            rows = np.flatnonzero(owner == p)
            s, i = sr.topk(Q, K[rows], 15 - 3 * p, metric=metric)
            scores.append(s)
            ids.append(np.where(i >= 0, rows[np.maximum(i, 0)], -1))
        got_s, got_i = sr.merge_topk(scores, ids, 12, metric=metric)
        ref_s, ref_i = topk_ref(Q, K, 12, metric=metric)
        if metric != "cosine":                          # (cosine scores are not exact)
            np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_allclose(got_s, ref_s, atol=1e-5)
    s, i = sr.merge_topk(np.zeros((2, 3, 1), np.float32), np.array([[[4], [-1], [6]],
                                                                     [[5], [-1], [-1]]]), 4)
    np.testing.assert_array_equal(i, [[4, 5, -1, -1], [-1, -1, -1, -1], [6, -1, -1, -1]])
    assert np.isneginf(s[1]).all() and s.shape == (3, 4)
    s, i = sr.merge_topk([np.array([[3.0, 1.0]])], [np.array([[9, 2]])], 1, metric="l2")
    assert s.tolist() == [[1.0]] and i.tolist() == [[2]]
    s, i = sr.merge_topk([np.array([[1.0 + 1e-12]]), np.array([[1.0]])], [[[9]], [[1]]], 1)
    assert i.tolist() == [[9]]                                        # ranked in float64
    s, i = sr.merge_topk([np.zeros((0, 3), np.float32)], [np.zeros((0, 3), np.int64)], 4)
    assert s.shape == i.shape == (0, 4)
    heads = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)     # (parts, B, H, k)
    hid = np.arange(2 * 4 * 3 * 5).reshape(2, 4, 3, 5)
    s, i = sr.merge_topk(heads, hid, 5)
    assert s.shape == (4, 3, 5) and np.all(np.diff(s, axis=-1) <= 0)


def test_merge_topk_bad_input():
    s = np.zeros((2, 3), np.float32)
    i = np.arange(6).reshape(2, 3)
    with pytest.raises(ValueError, match="id 1 appears more than once for query 0"):
        sr.merge_topk([s, s], [i, np.array([[1, 7, 8], [9, 10, 11]])], 2)
    with pytest.raises(ValueError, match="ids >= 0"):
        sr.merge_topk([s], [i - 2], 2)
    with pytest.raises(ValueError, match="within int64"):
        sr.merge_topk([s[:, :2]], [np.array([[2**63 + 5, 3]] * 2, np.uint64)], 2)
    with pytest.raises(ValueError, match="k = "):
        sr.merge_topk([s], [i], 10**15)
    with pytest.raises(ValueError, match="NaN"):
        sr.merge_topk([np.full((2, 3), np.nan, np.float32)], [i], 2)
    with pytest.raises(ValueError, match="do not match"):
        sr.merge_topk([s, s[:1]], [i, i[:1]], 2)
    with pytest.raises(ValueError, match="2 parts but ids_list has 1"):
        sr.merge_topk([s, s], [i], 2)
    with pytest.raises(TypeError, match="integer"):
        sr.merge_topk([s], [s], 2)
    with pytest.raises(TypeError, match="floating"):
        sr.merge_topk([i], [i], 2)
    with pytest.raises(ValueError, match="k"):
        sr.merge_topk([s], [i], 0)
    with pytest.raises(ValueError, match="metric"):
        sr.merge_topk([s], [i], 2, metric="dot")
    with pytest.raises(ValueError, match="at least one part"):
        sr.merge_topk([], [], 2)


def test_build_shards_and_info_from_the_command(capsys, tmp_path, rng):
    from test_cli import run

    np.save(tmp_path / "keys.npy", rng.standard_normal((50, 8)).astype(np.float32))
    code, out, _ = run(capsys, "build", "--keys", tmp_path / "keys.npy", "--dtype", "int8", "--shards", 3,
                       "--out", tmp_path / "cat")
    assert code == 0 and "ntotal=50" in out and "in 3 shards" in out
    code, out, _ = run(capsys, "info", tmp_path / "cat")
    described = json.loads(out)
    assert code == 0 and described["ntotal"] == 50 and described["dtype"] == "int8"
    assert [s["ntotal"] for s in described["shards"]] == [17, 17, 16]
    assert described["checksums"] == "ok"
    manifest = shards.read_manifest(tmp_path / "cat")
    keys = saved_file(tmp_path / "cat" / os.path.basename(manifest.shards[2].path), "keys")
    keys.write_bytes(keys.read_bytes()[:-1] + b"\x01")
    code, _, err = run(capsys, "info", tmp_path / "cat")
    assert code == 2 and err.count("\n") == 1 and "shard shard-00002" in err and "checksum" in err
    code, out, _ = run(capsys, "info", tmp_path / "cat", "--fast")
    assert code == 0 and json.loads(out)["checksums"] == "skipped"
    code, _, err = run(capsys, "build", "--keys", tmp_path / "keys.npy", "--shards", 0, "--out",
                       tmp_path / "other")
    assert code == 2 and "--shards must be >= 1" in err


def test_row_number_shards_swapped_in_a_resigned_manifest_are_refused(tmp_path, rng):
    """Without ids of its own, a shard's ids are its catalog rows: a manifest
    re-signed with two shards' order and offsets swapped (which would cut a
    whole-catalog bias onto the wrong items) is refused."""
    from softretrieval import persist

    index = catalog(rng, n=100, ids=False)
    index.save_shards(tmp_path / "cat", 2)
    path = tmp_path / "cat" / "meta.json"
    meta = json.loads(path.read_text())
    meta["shards"] = ["shard-00001", "shard-00000"]
    meta["folders"]["shard-00001"]["row_offset"] = 0
    meta["folders"]["shard-00000"]["row_offset"] = 50
    meta["checksum"] = persist.meta_checksum(meta)
    path.write_text(json.dumps(meta))
    manifest = shards.read_manifest(tmp_path / "cat")
    with pytest.raises(ValueError, match="shard shard-00001 .* its ids are not its rows 0 to 49"):
        shards.load_shard(manifest, 0)


def test_a_legacy_meta_listing_folders_is_not_trusted(tmp_path):
    """A meta.json without a checksum (an older version) that lists child
    folders is refused, so a save never deletes folders on its word."""
    from softretrieval import persist

    (tmp_path / "obj").mkdir()
    (tmp_path / "obj" / "meta.json").write_text(json.dumps(
        {"format": "softretrieval.Index", "version": 1, "files": {}, "folders": {"x": {"folder": "x.1"}}}))
    (tmp_path / "obj" / "x.1").mkdir()
    with pytest.raises(ValueError, match="edited"):
        persist.read_meta(tmp_path / "obj", "softretrieval.Index", 2, legacy=(1,))
