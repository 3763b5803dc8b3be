"""ShardedIndex on a Dask LocalCluster (2 worker processes, 1 thread each,
loopback only): every method against one Index over the same items, the
shipped real data against FAISS, refusals, and a worker killed mid-call."""

import os
import signal
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import datasets, io, shards
from softretrieval.distributed import ShardedIndex

from conftest import saved_file
from test_cli import run
from test_shards import CALLS, DTYPES, assert_same, catalog, single_call

distributed = pytest.importorskip("distributed")


def local_cluster():
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=":0")


@pytest.fixture(scope="module")
def client():
    with local_cluster() as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.mark.parametrize("dtype, metric", zip(DTYPES, ["ip", "l2", "cosine", "ip"]))
def test_every_method_equals_one_index(client, tmp_path, rng, dtype, metric):
    index = catalog(rng, dtype=dtype, metric=metric)
    index.save_shards(tmp_path / "cat", sizes=[400, 0, 3, 600])
    Q = rng.standard_normal((37, 17)).astype(np.float32)
    ids = index.ids
    exclude = [list(ids[i:i + 30]) for i in range(37)]
    exclude[5] = list(ids[:400])                       # every item of shard 0
    include = [list(ids[i::7]) for i in range(37)]
    with ShardedIndex(tmp_path / "cat", client) as sh:
        assert (sh.ntotal, sh.n_shards, sh.dim, sh.dtype) == (1003, 4, 17, dtype)
        for method, k, kw in CALLS:
            for options in ({}, {"exclude": exclude, "include": include},
                            {"bias": rng.standard_normal(1003)}):
                assert_same(method, single_call(sh, method, Q, k, **kw, **options),
                            single_call(index, method, Q, k, **kw, **options))
        assert_same("search", sh.search(Q, 700), index.search(Q, 700))     # k beyond shards


def test_shipped_minilm_equals_faiss_and_one_index(client, tmp_path):
    paths = datasets.minilm_paths()
    base = io.read_vectors(paths["base"])
    queries = np.ascontiguousarray(io.read_vectors(paths["query"]))
    index = sr.Index(base.shape[1])
    index.add(base)
    index.save_shards(tmp_path / "cat", sizes=[1000, 2942, 4000])
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.ascontiguousarray(base, np.float32))
    fs, fi = flat.search(queries, 10)
    with ShardedIndex(tmp_path / "cat", client) as sh:
        scores, ids = sh.search(queries, 10)
        np.testing.assert_array_equal(ids, fi)
        np.testing.assert_allclose(scores, fs, atol=1e-5)
        for method, k, kw in CALLS[1:]:
            assert_same(method, single_call(sh, method, queries, k, **kw),
                        single_call(index, method, queries, k, **kw))


def test_in_memory_index_and_row_number_ids(client, rng):
    index = catalog(rng, n=500, ids=False, values=False, bias=False)
    Q = rng.standard_normal((5, 17)).astype(np.float32)
    with ShardedIndex(index, client) as sh:                 # one shard per worker
        assert sh.n_shards == 2 and sh.value_dim is None
        for method, k, kw in CALLS:
            assert_same(method, single_call(sh, method, Q, k, exclude=[[0, 499]] * 5, **kw),
                        single_call(index, method, Q, k, exclude=[[0, 499]] * 5, **kw))
        with pytest.raises(ValueError, match="exclude"):      # row numbers are checked, as by the index
            sh.search(Q, 3, exclude=[[500]] * 5)
    with ShardedIndex(index, client, sizes=[0, 100, 400]) as sh:
        assert_same("search", sh.search(Q, 9), index.search(Q, 9))


def test_relative_folder_from_another_directory(client, tmp_path, rng, monkeypatch):
    """The workers started elsewhere: a relative folder is the client's."""
    index = catalog(rng, n=60)
    index.save_shards(tmp_path / "cat", 2)
    monkeypatch.chdir(tmp_path)
    Q = rng.standard_normal((2, 17)).astype(np.float32)
    with ShardedIndex("cat", client) as sh:
        assert_same("search", sh.search(Q, 4), index.search(Q, 4))


def test_torch_tensors_in_and_out(client, rng):
    torch = pytest.importorskip("torch")
    index = catalog(rng, n=200)
    with ShardedIndex(index, client, n_shards=3) as sh:
        scores, ids = sh.search(torch.from_numpy(rng.standard_normal((4, 17)).astype(np.float32)), 5)
        assert isinstance(ids, torch.Tensor) and ids.shape == (4, 5)


def test_bad_calls_are_refused_here(client, tmp_path, rng):
    index = catalog(rng, n=50)
    index.save_shards(tmp_path / "cat", 2)
    Q = rng.standard_normal((3, 17)).astype(np.float32)
    sh = ShardedIndex(tmp_path / "cat", client)
    for call, error, match in [
            (lambda: sh.search(Q[:, :5], 3), ValueError, "dimension 5"),
            (lambda: sh.search(np.full((1, 17), np.nan, np.float32), 3), ValueError, "queries"),
            (lambda: sh.search(Q, 0), ValueError, "k"),
            (lambda: sh.retrieve(Q, bias=np.zeros(49)), ValueError, r"bias must have shape \(50,\)"),
            (lambda: sh.retrieve(Q, scale=float("nan")), ValueError, "scale"),
            (lambda: sh.logsumexp(Q, exclude=[[1]]), ValueError, "exclude")]:
        with pytest.raises(error, match=match):
            call()
    sh.close()
    with pytest.raises(ValueError, match="closed"):
        sh.search(Q, 3)
    with pytest.raises(ValueError, match="n_shards and sizes are for an in-memory Index"):
        ShardedIndex(tmp_path / "cat", client, n_shards=2)
    with pytest.raises(ValueError, match="n_shards"):
        ShardedIndex(index, client, n_shards=0)
    empty = sr.Index(17)
    empty.save_shards(tmp_path / "empty", 2)
    with ShardedIndex(tmp_path / "empty", client) as sh, pytest.raises(ValueError, match="empty"):
        sh.search(Q, 3)


def test_damaged_or_mismatched_shards_are_refused_on_open(client, tmp_path, rng):
    index = catalog(rng, n=100)
    index.save_shards(tmp_path / "cat", 3)
    manifest = shards.read_manifest(tmp_path / "cat")
    keys = saved_file(tmp_path / "cat" / os.path.basename(manifest.shards[2].path), "keys")
    raw = bytearray(keys.read_bytes())
    raw[-3] ^= 4
    keys.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard shard-00002 .*checksum mismatch"):
        ShardedIndex(tmp_path / "cat", client)
    with ShardedIndex(tmp_path / "cat", client, verify=False) as sh:   # (files' checksums skipped)
        assert sh.search(rng.standard_normal((1, 17)), 1)[1].shape == (1, 1)
    with pytest.raises(ValueError, match="not a saved softretrieval.ShardedIndex"):
        ShardedIndex(tmp_path / "nothing", client)


def test_worker_killed_during_a_call_reloads_its_shard_elsewhere(tmp_path, rng):
    """A worker process is killed while a call runs: its shard is loaded again
    from the folder on a live worker and the call returns the same answer."""
    index = sr.Index(64, dtype="float16")
    index.add(rng.standard_normal((200_000, 64)).astype(np.float32))
    index.save_shards(tmp_path / "cat", sizes=[80_000, 120_000])
    Q = rng.standard_normal((4096, 64)).astype(np.float32)
    want_s, want_i = index.search(Q, 10)
    with local_cluster() as cluster, distributed.Client(cluster) as client:
        with ShardedIndex(tmp_path / "cat", client) as sh:
            sh.search(Q[:1], 1)                                     # both shards loaded, warm
            holder = next(iter(client.who_has(sh._futures[1]).values()))[0]
            pid = client.run(os.getpid, workers=[holder])[holder]
            killer = threading.Timer(0.1, os.kill, (pid, signal.SIGKILL))
            start = time.perf_counter()
            killer.start()
            scores, ids = sh.search(Q, 10)
            took = time.perf_counter() - start
            killer.join()
            print(f"the call took {took:.2f} s")
            assert took > 0.1                                       # the kill came mid-call
            np.testing.assert_array_equal(ids, want_i)
            np.testing.assert_allclose(scores, want_s, rtol=1e-6, atol=1e-5)
            assert holder not in {w for ws in client.who_has(sh._futures).values() for w in ws}
            scores, ids = sh.search(Q[:7], 10)                       # and later calls too
            np.testing.assert_array_equal(ids, want_i[:7])


def test_command_on_a_cluster(capsys, client, tmp_path):
    """build --shards, then score with --workers (a local cluster of its own)
    and --scheduler (this module's cluster): the results of the unsharded
    index, recall on the shipped ground truth."""
    paths = datasets.minilm_paths()
    code, out, _ = run(capsys, "build", "--keys", paths["base"], "--shards", 3, "--out", tmp_path / "cat")
    assert code == 0 and "in 3 shards" in out
    run(capsys, "build", "--keys", paths["base"], "--out", tmp_path / "plain")
    common = ["--queries", paths["query"], "--mode", "topk-attention", "-k", 10, "--temperature",
              0.05, "--quiet", "--batch-size", 400]
    code, out, _ = run(capsys, "score", "--index", tmp_path / "plain", *common, "--out",
                       tmp_path / "want.npz")
    assert code == 0
    want = np.load(tmp_path / "want.npz")
    for cluster in (["--workers", 2], ["--scheduler", client.scheduler.address]):
        code, out, err = run(capsys, "score", "--index", tmp_path / "cat", *cluster, *common,
                             "--groundtruth", paths["groundtruth"], "--out", tmp_path / "got.npz")
        assert code == 0, err
        assert "recall@10 against" in out and out.rstrip().endswith("1.0000")
        got = np.load(tmp_path / "got.npz")
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_allclose(got["out"], want["out"], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(got["lse"], want["lse"], rtol=1e-6, atol=1e-5)


def test_parquet_partitions_on_a_cluster_and_a_rerun(capsys, client, tmp_path):
    """Parquet query files scored as partitions on the workers: one output per
    file, equal to the single-process Parquet output; a rerun writes only the
    partitions missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_parquet import fixed

    paths = datasets.minilm_paths()
    Q = io.read_vectors(paths["query"])
    (tmp_path / "qs").mkdir()
    for i, (lo, hi) in enumerate(((0, 300), (300, 300), (300, 301), (301, 1000))):
        pq.write_table(pa.table({"emb": fixed(Q[lo:hi]), "qid": pa.array([f"q{j}" for j in range(lo, hi)])}),
                       tmp_path / "qs" / f"day-{i}.parquet")
    run(capsys, "build", "--keys", paths["base"], "--dtype", "float16", "--shards", 2, "--out",
        tmp_path / "cat")
    run(capsys, "build", "--keys", paths["base"], "--dtype", "float16", "--out", tmp_path / "plain")
    address = ["--scheduler", client.scheduler.address]
    for mode in ("topk", "soft"):
        common = ["--queries", tmp_path / "qs", "--column", "emb", "--id-column", "qid", "--mode", mode,
                  "-k", 7, "--quiet"]
        code, _, err = run(capsys, "score", "--index", tmp_path / "plain", *common, "--out",
                           tmp_path / f"{mode}.parquet")
        assert code == 0, err
        code, out, err = run(capsys, "score", "--index", tmp_path / "cat", *address, *common,
                             "--out", tmp_path / mode)
        assert code == 0, err
        assert "scored 1000 queries in 3 partitions" in out
        parts = sorted(os.listdir(tmp_path / mode))
        assert parts == ["day-0.parquet", "day-2.parquet", "day-3.parquet",
                         "run.json"]                           # (an empty file has no partition)
        parts = parts[:-1]
        got = pa.concat_tables([pq.read_table(tmp_path / mode / p) for p in parts])
        want = pq.read_table(tmp_path / f"{mode}.parquet")
        assert got.column_names == want.column_names and got.num_rows == want.num_rows
        for name in got.column_names:
            a, b = got[name].combine_chunks(), want[name].combine_chunks()
            if pa.types.is_floating(a.type) or pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
                np.testing.assert_allclose(np.asarray(a.flatten() if a.type.num_fields else a),
                                           np.asarray(b.flatten() if b.type.num_fields else b),
                                           rtol=1e-6, atol=1e-5)
            else:
                assert a.equals(b), name
    kept = (tmp_path / "topk" / parts[0]).stat().st_mtime_ns
    os.remove(tmp_path / "topk" / parts[2])                        # a crash before the last one
    rerun = ["score", "--index", tmp_path / "cat", *address, "--queries", tmp_path / "qs", "--column",
             "emb", "--id-column", "qid", "--mode", "topk", "--quiet", "--out", tmp_path / "topk"]
    code, out, _ = run(capsys, *rerun, "-k", 7, "--batch-size", 100)    # (batches: same results)
    assert code == 0 and "scored 699 queries in 1 partitions" in out
    assert "(2 partitions already written)" in out
    assert sorted(os.listdir(tmp_path / "topk")) == parts + ["run.json"]
    assert (tmp_path / "topk" / parts[0]).stat().st_mtime_ns == kept
    again = pa.concat_tables([pq.read_table(tmp_path / "topk" / p) for p in parts])
    assert again["item_id"].equals(pq.read_table(tmp_path / "topk.parquet")["item_id"])
    code, _, err = run(capsys, *rerun, "-k", 8)                         # another run's folder
    assert code == 2 and "holds partitions of another run (its k differ" in err


def test_command_refusals_on_a_cluster(capsys, client, tmp_path, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_parquet import fixed

    index = catalog(rng, n=50, values=False)
    index.save_shards(tmp_path / "cat", 2)
    index.save(tmp_path / "plain")
    (tmp_path / "qs").mkdir()
    pq.write_table(pa.table({"emb": fixed(rng.standard_normal((4, 17)))}), tmp_path / "qs" / "a.parquet")
    pq.write_table(pa.table({"emb": pa.array([[1.0, 2.0]] * 3)}), tmp_path / "qs" / "b.parquet")
    address = ["--scheduler", client.scheduler.address]
    queries = ["--queries", tmp_path / "qs", "--column", "emb", "--mode", "topk", "--quiet"]
    for argv, message in [
            (["--index", tmp_path / "cat", *queries, "--out", tmp_path / "o"],
             "is a sharded index: give --workers N"),
            (["--index", tmp_path / "plain", *address, *queries, "--out", tmp_path / "o"],
             "serve a sharded index folder"),
            (["--index", tmp_path / "cat", *address, *queries, "--out", tmp_path / "o"],
             "b.parquet: column 'emb' has dimension 2 but the index has 17"),
            (["--index", tmp_path / "cat", "--workers", 0, *queries, "--out", tmp_path / "o"],
             "--workers must be >= 1"),
            (["--index", tmp_path / "cat", *address, "--device", "cuda", "--queries",
              tmp_path / "qs" / "a.parquet", "--column", "emb", "--mode", "topk", "--out",
              tmp_path / "o.npz"], "a sharded index runs on its workers' CPUs"),
            (["--index", tmp_path / "cat", *address, "--device", "cuda", *queries, "--out",
              tmp_path / "o"], "a sharded index runs on its workers' CPUs"),
            (["--index", tmp_path / "cat", *address, "--queries", tmp_path / "qs" / "a.parquet",
              "--column", "emb", "--mode", "topk", "--out", tmp_path / "o.csv"], "mode topk writes")]:
        code, _, err = run(capsys, "score", *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_every_worker_killed_during_a_call(tmp_path, rng):
    """All workers die at once (or the only one): the nannies start new ones,
    the shards are loaded again there, and the call still returns."""
    index = sr.Index(32)
    index.add(rng.standard_normal((100_000, 32)).astype(np.float32))
    index.save_shards(tmp_path / "cat", 2)
    Q = rng.standard_normal((4096, 32)).astype(np.float32)
    want = index.search(Q, 5)[1]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        with ShardedIndex(tmp_path / "cat", client) as sh:
            sh.search(Q[:1], 1)
            pids = client.run(os.getpid)
            killer = threading.Timer(0.1, lambda: [os.kill(p, signal.SIGKILL) for p in pids.values()])
            killer.start()
            got = sh.search(Q, 5)[1]
            killer.join()
            np.testing.assert_array_equal(got, want)
            assert set(client.run(os.getpid).values()).isdisjoint(pids.values())


def test_command_errors_stay_one_line_with_a_local_cluster(tmp_path, rng):
    """The installed command with --workers: a bad partition fails on a worker,
    and the terminal shows one line, no worker log."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = catalog(rng, n=30, values=False)
    index.save_shards(tmp_path / "cat", 2)
    (tmp_path / "qs").mkdir()
    pq.write_table(pa.table({"emb": pa.array([[1.0, 2.0]] * 3)}), tmp_path / "qs" / "b.parquet")
    proc = subprocess.run([sys.executable, "-m", "softretrieval", "score", "--index", str(tmp_path / "cat"),
                           "--workers", "1", "--queries", str(tmp_path / "qs"), "--column", "emb",
                           "--mode", "topk", "--quiet", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "has dimension 2 but the index has 17" in proc.stderr, proc.stderr
