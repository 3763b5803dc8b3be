"""Parquet query tables and result files, through the softretrieval command
and directly: the same results as the .npy path on the shipped data, ids
passed through, one-line errors naming the column, atomic writes."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softretrieval import cli, datasets, io, parquet
from test_cli import run

MODES = ("topk", "soft", "topk-attention")


def fixed(Q):
    Q = np.ascontiguousarray(Q)
    return pa.FixedSizeListArray.from_arrays(pa.array(Q.ravel()), Q.shape[1])


def lists(Q):
    offsets = pa.array(np.arange(0, Q.size + 1, Q.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(Q).ravel()))


def vectors(column):
    """A fixed-size-list or list column as a (n, d) numpy array."""
    column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    """The shipped MiniLM queries as .npy and as Parquet tables, and the .npz
    results of every mode with the .npy queries."""
    tmp = tmp_path_factory.mktemp("minilm")
    paths = datasets.minilm_paths()
    Q = io.read_vectors(paths["query"])
    np.save(tmp / "q.npy", Q)
    pq.write_table(pa.table({"emb": fixed(Q)}), tmp / "fixed.parquet")
    pq.write_table(pa.table({"emb": lists(Q)}), tmp / "list.parquet", row_group_size=128)
    os.mkdir(tmp / "split")
    for i, (lo, hi) in enumerate(((0, 300), (300, 701), (701, 1000))):
        pq.write_table(pa.table({"emb": fixed(Q[lo:hi])}), tmp / "split" / f"part-{i}.parquet")
    (tmp / "split" / "README.txt").write_text("not a Parquet file: ignored")
    common = ["--keys", paths["base"], "-k", 10, "--temperature", 0.05, "--batch-size", 256, "--quiet"]
    want = {}
    for mode in MODES:
        cli.main([str(a) for a in ("score", *common, "--queries", tmp / "q.npy", "--mode", mode,
                                   "--out", tmp / f"{mode}.npz")])
        want[mode] = dict(np.load(tmp / f"{mode}.npz"))
    return tmp, common, want


@pytest.mark.parametrize("queries", ["fixed.parquet", "list.parquet", "split", "split/part-*.parquet"])
@pytest.mark.parametrize("mode", MODES)
def test_parquet_queries_match_the_npy_path(capsys, minilm_runs, queries, mode):
    tmp, common, want = minilm_runs
    want = want[mode]
    out = tmp / f"{queries.replace('/', '_').replace('*', 'x')}-{mode}.parquet"
    code, stdout, err = run(capsys, "score", *common, "--queries", tmp / queries, "--column", "emb",
                            "--mode", mode, "--out", out)
    assert code == 0, err
    assert stdout.startswith("scored 1000 queries x 7942 items") and str(out) in stdout
    got = pq.read_table(out)
    if mode == "topk":
        assert got.column_names == ["query_id", "rank", "item_id", "score"]
        assert [f.type for f in got.schema] == [pa.int64(), pa.int32(), pa.int64(), pa.float32()]
        np.testing.assert_array_equal(got["query_id"].to_numpy(), np.repeat(np.arange(1000), 10))
        np.testing.assert_array_equal(got["rank"].to_numpy(), np.tile(np.arange(10), 1000))
        np.testing.assert_array_equal(got["item_id"].to_numpy().reshape(1000, 10), want["ids"])
        np.testing.assert_allclose(got["score"].to_numpy().reshape(1000, 10), want["scores"],
                                   rtol=1e-6, atol=1e-6)
        return
    np.testing.assert_array_equal(got["query_id"].to_numpy(), np.arange(1000))
    assert got.schema.field("out").type == pa.list_(pa.float32(), 384)
    np.testing.assert_allclose(vectors(got["out"]), want["out"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["lse"].to_numpy(), want["lse"], rtol=1e-6, atol=1e-6)
    if mode == "soft":
        assert got.column_names == ["query_id", "out", "lse"]
    else:
        assert got.column_names == ["query_id", "item_ids", "weights", "out", "lse", "coverage"]
        assert got.schema.field("item_ids").type == pa.list_(pa.int64())
        assert got.schema.field("weights").type == pa.list_(pa.float32())
        np.testing.assert_array_equal(vectors(got["item_ids"]), want["ids"])
        np.testing.assert_allclose(vectors(got["weights"]), want["weights"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["coverage"].to_numpy(), want["coverage"], rtol=1e-6, atol=1e-6)


def test_parquet_queries_to_npz_with_groundtruth(capsys, minilm_runs):
    """Parquet queries into the existing outputs: the same .npz, and recall by row order."""
    tmp, common, want = minilm_runs
    code, out, err = run(capsys, "score", *common, "--queries", tmp / "split", "--column", "emb",
                         "--mode", "topk", "--groundtruth", datasets.minilm_paths()["groundtruth"],
                         "--out", tmp / "split-topk.npz")
    assert code == 0, err
    assert out.strip().endswith("1.0000")
    got = dict(np.load(tmp / "split-topk.npz"))
    assert got.keys() == want["topk"].keys()        # row numbers are not query_ids
    np.testing.assert_array_equal(got["ids"], want["topk"]["ids"])


@pytest.fixture
def small(tmp_path, rng):
    keys = rng.standard_normal((300, 12)).astype(np.float32)
    Q = rng.standard_normal((9, 12)).astype(np.float32)
    np.save(tmp_path / "keys.npy", keys)
    return tmp_path, Q


def test_query_ids_pass_through(capsys, small):
    tmp, Q = small
    names = [f"user-{i}" for i in range(len(Q))]
    numbers = np.arange(len(Q), dtype=np.int64) * 1000 + 7
    pq.write_table(pa.table({"emb": fixed(Q), "name": names, "num": numbers}), tmp / "q.parquet")
    argv = ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "q.parquet", "--column", "emb",
            "-k", 3, "--quiet")
    code, _, err = run(capsys, *argv, "--id-column", "name", "--mode", "topk", "--out", tmp / "t.parquet")
    assert code == 0, err
    got = pq.read_table(tmp / "t.parquet")
    assert got.schema.field("query_id").type == pa.string()
    assert got["query_id"].to_pylist() == [n for n in names for _ in range(3)]
    code, _, err = run(capsys, *argv, "--id-column", "name", "--mode", "soft", "--out", tmp / "s.parquet")
    assert code == 0 and pq.read_table(tmp / "s.parquet")["query_id"].to_pylist() == names
    # an .npz holds numeric ids as query_ids, and has no place for strings
    code, _, _ = run(capsys, *argv, "--id-column", "num", "--mode", "topk", "--out", tmp / "n.npz")
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp / "n.npz")["query_ids"], numbers)
    code, _, _ = run(capsys, *argv, "--id-column", "name", "--mode", "topk", "--out", tmp / "s.npz")
    assert code == 0 and sorted(np.load(tmp / "s.npz").keys()) == ["ids", "scores"]
    # vector-file queries into Parquet: row numbers as ids
    np.save(tmp / "q.npy", Q)
    code, _, err = run(capsys, "score", "--keys", tmp / "keys.npy", "--queries", tmp / "q.npy", "-k", 3,
                       "--quiet", "--mode", "soft", "--out", tmp / "v.parquet")
    assert code == 0, err
    np.testing.assert_array_equal(pq.read_table(tmp / "v.parquet")["query_id"].to_numpy(), np.arange(9))


def test_write_results_drops_padding(tmp_path):
    """Slots without an item (id -1) are left out of both list layouts."""
    ids = np.array([[5, 3, -1], [-1, -1, -1], [7, -1, -1]], np.int64)
    scores = np.array([[0.9, 0.5, -np.inf], [-np.inf] * 3, [0.2, -np.inf, -np.inf]], np.float32)
    weights = np.array([[0.75, 0.25, 0], [0, 0, 0], [1, 0, 0]], np.float32)
    out = np.arange(6, dtype=np.float32).reshape(3, 2)
    lse = np.array([1, 2, 3], np.float32)
    path = tmp_path / "t.parquet"
    parquet.write_results(path, "topk", {"ids": ids, "scores": scores}, pa.array(["a", "b", "c"]))
    got = pq.read_table(path).to_pydict()
    assert got == {"query_id": ["a", "a", "c"], "rank": [0, 1, 0], "item_id": [5, 3, 7],
                   "score": [pytest.approx(0.9), 0.5, pytest.approx(0.2)]}
    result = {"out": out, "ids": ids, "weights": weights, "lse": lse, "coverage": lse / 4}
    parquet.write_results(path, "topk-attention", result, [10, 11, 12])
    got = pq.read_table(path).to_pydict()
    assert got["query_id"] == [10, 11, 12]
    assert got["item_ids"] == [[5, 3], [], [7]] and got["weights"] == [[0.75, 0.25], [], [1.0]]
    assert got["out"] == [[0, 1], [2, 3], [4, 5]] and got["coverage"] == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="2 query ids for 3 result rows"):
        parquet.write_results(path, "soft", {"out": out, "lse": lse}, [1, 2])


def test_malformed_query_tables_are_one_line_errors(capsys, small):
    tmp, Q = small
    short = Q.tolist()
    short[3] = short[3][:-1]
    null_value = Q.tolist()
    null_value[4][2] = None
    tables = {
        "wrong_length": ({"emb": pa.array(short, pa.list_(pa.float32()))}, "emb", ["'emb'", "row 3 has 11 values"]),
        "null_row": ({"emb": pa.array(Q.tolist()[:2] + [None] + Q.tolist()[3:], pa.list_(pa.float32()))}, "emb", ["'emb'", "row 2 is null"]),
        "null_value": ({"emb": pa.array(null_value, pa.list_(pa.float64(), 12))}, "emb", ["'emb'", "row 4 holds a null"]),
        "ints": ({"emb": pa.array(Q.astype(np.int32).tolist(), pa.list_(pa.int32()))}, "emb", ["'emb'", "list of float"]),
        "strings": ({"emb": [str(r) for r in Q]}, "emb", ["'emb'", "list of float"]),
        "missing": ({"emb": fixed(Q), "qid": np.arange(9)}, "vec", ["no column 'vec'", "['emb', 'qid']"]),
        "null_id": ({"emb": fixed(Q), "qid": [1, 2, None, 4, 5, 6, 7, 8, 9]}, "emb", ["id column 'qid'", "row 2 is null"]),
        "huge": ({"emb": pa.array((Q.astype(np.float64) * np.where(np.arange(9) == 6, 1e300, 1)[:, None]).tolist(),
                                  pa.list_(pa.float64(), 12))}, "emb", ["'emb'", "row 6 holds values beyond the float32"]),
        "same_id": ({"emb": fixed(Q)}, "emb", ["the id column 'emb' is the embedding column"]),
    }
    base = ("score", "--keys", tmp / "keys.npy", "--mode", "topk", "--quiet", "--out", tmp / "o.parquet")
    for name, (columns, column, words) in tables.items():
        pq.write_table(pa.table(columns), tmp / f"{name}.parquet")
        extra = {"null_id": ("--id-column", "qid"), "same_id": ("--id-column", "emb")}.get(name, ())
        code, _, err = run(capsys, *base, "--queries", tmp / f"{name}.parquet", "--column", column, *extra)
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("softretrieval: error: "), (name, err)
        assert all(w in err for w in words), (name, err)
    pq.write_table(pa.table({"emb": fixed(Q[:, :5])}), tmp / "split-1.parquet")
    pq.write_table(pa.table({"emb": fixed(Q)}), tmp / "split-0.parquet")
    np.save(tmp / "q.npy", Q)
    (tmp / "garbage.parquet").write_bytes(b"not a Parquet file at all")
    other = {
        ("--queries", tmp / "garbage.parquet", "--column", "emb"): "garbage.parquet: not a readable Parquet",
        ("--queries", tmp / "null_id.parquet"): "--column NAME",
        ("--queries", tmp / "nothing-*.parquet", "--column", "emb"): "nothing-*.parquet: no Parquet files",
        ("--queries", tmp / "split-*.parquet", "--column", "emb"): "has dimension 5 where",
        ("--queries", tmp / "q.npy", "--column", "emb"): "--column and --id-column are for Parquet",
        ("--queries", tmp / "run[2].npy", "--column", "emb"): "--column and --id-column are for Parquet",
    }
    np.save(tmp / "run[2].npy", Q)            # an existing file is what it is, brackets or not
    for argv, words in other.items():
        code, _, err = run(capsys, *base, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp / "o.parquet").exists()


def test_failed_write_leaves_the_old_output(capsys, small, monkeypatch):
    tmp, Q = small
    pq.write_table(pa.table({"emb": fixed(Q)}), tmp / "q.parquet")
    (tmp / "o.parquet").write_bytes(b"the previous results")

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", fail)
    code, out, err = run(capsys, "score", "--keys", tmp / "keys.npy", "--queries", tmp / "q.parquet",
                         "--column", "emb", "--mode", "soft", "--quiet", "--out", tmp / "o.parquet")
    assert code == 2 and err == "softretrieval: error: No space left on device\n" and "scored" not in out
    assert (tmp / "o.parquet").read_bytes() == b"the previous results"
    assert sorted(os.listdir(tmp)) == ["keys.npy", "o.parquet", "q.parquet"]


def test_float16_and_float64_read_as_float32(tmp_path, rng):
    Q = rng.standard_normal((40, 6))
    for dtype, make in ((np.float16, fixed), (np.float64, lists), (np.float32, lists)):
        want = Q.astype(dtype)
        pq.write_table(pa.table({"v": make(want), "i": np.arange(40)}), tmp_path / "q.parquet",
                       row_group_size=7)        # several chunks
        ids, got = parquet.read_queries(tmp_path / "q.parquet", "v", id_start=100)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (40, 6)
        np.testing.assert_array_equal(got, want.astype(np.float32))
        np.testing.assert_array_equal(ids.to_numpy(), np.arange(100, 140))
    assert parquet.read_queries(tmp_path / "q.parquet", "v", "i")[0].to_pylist() == list(range(40))


def test_query_files_and_read_all(tmp_path, rng):
    Q = rng.standard_normal((10, 4)).astype(np.float32)
    os.mkdir(tmp_path / "d")
    for i, (lo, hi) in enumerate(((0, 3), (3, 3), (3, 10))):   # an empty file in the middle
        pq.write_table(pa.table({"v": fixed(Q[lo:hi])}), tmp_path / "d" / f"p{i}.parquet")
    files = [str(tmp_path / "d" / f"p{i}.parquet") for i in range(3)]
    assert parquet.query_files(tmp_path / "d") == files
    assert parquet.query_files(str(tmp_path / "d" / "p[02].parquet")) == [files[0], files[2]]
    assert parquet.query_files(files[1]) == [files[1]]
    ids, got = parquet.read_all(tmp_path / "d", "v")
    np.testing.assert_array_equal(got, Q)
    np.testing.assert_array_equal(ids.to_numpy(), np.arange(10))
    with pytest.raises(ValueError, match="no Parquet files found"):
        parquet.query_files(tmp_path / "none")


def test_pyarrow_is_imported_only_when_needed(capsys, small, monkeypatch):
    code = ("import sys, softretrieval, softretrieval.cli, softretrieval.parquet; "
            "assert 'pyarrow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    tmp, Q = small
    np.save(tmp / "q.npy", Q)
    monkeypatch.setitem(sys.modules, "pyarrow", None)       # as if not installed
    code, _, err = run(capsys, "score", "--keys", tmp / "keys.npy", "--queries", tmp / "q.npy",
                       "--mode", "soft", "--out", tmp / "o.parquet")
    assert code == 2 and err == 'softretrieval: error: Parquet needs pyarrow: pip install "softretrieval[parquet]"\n'
    assert not (tmp / "o.parquet").exists()
