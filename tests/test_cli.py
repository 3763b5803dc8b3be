"""The softretrieval command, vector file formats, and the datasets helpers."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cli, datasets, io


def run(capsys, *argv):
    """Run the command in-process: (exit status, stdout, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def write_fvecs(path, x):
    io.write_output(str(path), {"x": np.asarray(x, np.float32)})


@pytest.fixture
def files(tmp_path, rng):
    keys = rng.standard_normal((300, 12)).astype(np.float32)
    values = rng.standard_normal((300, 3)).astype(np.float32)
    queries = rng.standard_normal((37, 12)).astype(np.float32)
    np.save(tmp_path / "keys.npy", keys)
    np.save(tmp_path / "values.npy", values)
    write_fvecs(tmp_path / "queries.fvecs", queries)
    np.save(tmp_path / "ids.npy", np.arange(300, dtype=np.int64) * 2)
    np.save(tmp_path / "bias.npy", rng.standard_normal(300))
    return tmp_path, keys, values, queries


def test_build_info_and_score_match_the_api(capsys, files):
    tmp, keys, values, queries = files
    code, out, _ = run(capsys, "build", "--keys", tmp / "keys.npy", "--values", tmp / "values.npy",
                       "--ids", tmp / "ids.npy", "--bias", tmp / "bias.npy", "--dtype", "float16",
                       "--out", tmp / "idx")
    assert code == 0 and "ntotal=300" in out
    code, out, _ = run(capsys, "info", tmp / "idx")
    assert code == 0 and '"dtype": "float16"' in out and '"checksums": "ok"' in out
    index = sr.Index.load(tmp / "idx")
    for mode, ext in (("topk", ".npz"), ("topk", ".ivecs"), ("soft", ".npz"), ("soft", ".fvecs"),
                      ("topk-attention", ".npz"), ("topk-attention", ".npy")):
        dest = tmp / f"{mode}{ext}"
        code, out, _ = run(capsys, "score", "--index", tmp / "idx", "--queries",
                           tmp / "queries.fvecs", "--mode", mode, "-k", 7, "--temperature", 0.5,
                           "--batch-size", 10, "--quiet", "--out", dest)
        assert code == 0 and str(dest) in out
        if mode == "topk":
            want = dict(zip(("scores", "ids"), index.search(queries, 7)))
        elif mode == "soft":
            want = dict(zip(("out", "lse"), index.retrieve(queries, temperature=0.5, return_lse=True)))
        else:
            want = index.retrieve_topk(queries, 7, temperature=0.5)._asdict()
        if ext == ".npz":
            got = dict(np.load(dest))
            assert got.keys() == want.keys()
        elif ext == ".ivecs":
            got = {"ids": io.read_ivecs(dest)}
        elif ext == ".fvecs":
            got = {"out": io.read_fvecs(dest)}
        else:
            got = {"out": np.load(dest)}
        for name, arr in got.items():
            # batches of 10 take the SIMD path, the API's 37 queries BLAS: float32 rounding
            np.testing.assert_allclose(arr, want[name], rtol=1e-5, atol=1e-5)
    assert not [f for f in os.listdir(tmp) if ".tmp-" in f]


def test_score_keys_file_with_groundtruth_recall(capsys, tmp_path):
    paths = datasets.minilm_paths()
    code, out, _ = run(capsys, "score", "--keys", paths["base"], "--queries", paths["query"],
                       "--mode", "topk", "-k", 10, "--groundtruth", paths["groundtruth"], "--quiet",
                       "--out", tmp_path / "top10.npz")
    assert code == 0
    assert "recall@10 against" in out and out.strip().endswith("1.0000")


def test_demo_and_validate_on_shipped_data(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", tmp_path, "--quiet")
    assert code == 0 and "recall@10" in out and "1.0000" in out
    assert sorted(os.listdir(tmp_path)) == ["minilm_soft.npz", "minilm_top10.npz"]
    paths = datasets.minilm_paths()
    code, out, _ = run(capsys, "validate", "--base", paths["base"], "--queries", paths["query"],
                       "--groundtruth", paths["groundtruth"], "-k", 10)
    assert code == 0
    assert "against FAISS IndexFlatIP: 1.0000" in out and "(FAISS: 1.0000)" in out


def test_hdf5_and_bvecs_inputs(capsys, tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    train = rng.integers(0, 255, (120, 8)).astype(np.float32)
    test = rng.integers(0, 255, (9, 8)).astype(np.float32)
    gt = sr.topk(test, train, 5)[1]
    with h5py.File(tmp_path / "data.hdf5", "w") as f:
        f["train"], f["test"], f["neighbors"] = train, test, gt
    h5 = tmp_path / "data.hdf5"
    code, out, _ = run(capsys, "score", "--keys", h5, "--queries", f"{h5}:test", "--mode", "topk",
                       "-k", 5, "--groundtruth", f"{h5}:neighbors", "--quiet",
                       "--out", tmp_path / "o.npz")
    assert code == 0 and out.strip().endswith("1.0000")
    rec = np.concatenate([np.full((120, 4), 0, np.uint8), train.astype(np.uint8)], axis=1)
    rec[:, :4] = np.frombuffer(np.int32(8).tobytes(), np.uint8)
    rec.tofile(tmp_path / "base.bvecs")
    np.testing.assert_array_equal(io.read_vectors(str(tmp_path / "base.bvecs")), train)
    (tmp_path / "cut.bvecs").write_bytes((tmp_path / "base.bvecs").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        io.read_vectors(str(tmp_path / "cut.bvecs"))
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        io.read_vectors(f"{h5}:nope")
    with pytest.raises(ValueError, match="name the HDF5 dataset"):
        io.read_vectors(str(h5))


def test_bad_invocations_are_one_line_errors(capsys, files):
    tmp, keys, values, queries = files
    write_fvecs(tmp / "q5.fvecs", np.ones((2, 5)))
    (tmp / "cut.fvecs").write_bytes((tmp / "queries.fvecs").read_bytes()[:-2])
    cases = [
        ("score", "--keys", tmp / "missing.npy", "--queries", tmp / "queries.fvecs", "--mode", "soft", "--out", tmp / "o.npy"),
        ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "q5.fvecs", "--mode", "soft", "--out", tmp / "o.npy"),
        ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "queries.fvecs", "--mode", "hard", "--out", tmp / "o.npy"),
        ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "cut.fvecs", "--mode", "soft", "--out", tmp / "o.npy"),
        ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "queries.fvecs", "--mode", "soft", "--out", tmp / "o.ivecs"),
        ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "queries.fvecs", "--mode", "topk", "-k", 0, "--out", tmp / "o.npy"),
        ("score", "--queries", tmp / "queries.fvecs", "--mode", "topk", "--out", tmp / "o.npy"),
        ("build", "--keys", tmp / "ids.npy", "--out", tmp / "bad"),
        ("info", tmp / "nothing"),
        ("frobnicate",),
    ]
    for argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("softretrieval: error: "), (argv, err)
        assert "Traceback" not in err
    assert not (tmp / "o.npy").exists() and not (tmp / "o.ivecs").exists()


def test_score_device_option(capsys, files):
    """--device auto scores where the kernels can run (the CPU without a GPU);
    --device cuda without a GPU is a one-line error naming the extra."""
    from softretrieval import devices

    tmp, keys, _, queries = files
    argv = ("score", "--keys", tmp / "keys.npy", "--queries", tmp / "queries.fvecs", "--mode",
            "topk", "-k", 5, "--quiet")
    code, _, _ = run(capsys, *argv, "--device", "auto", "--out", tmp / "auto.npz")
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp / "auto.npz")["ids"], sr.topk(queries, keys, 5)[1])
    if not devices.is_gpu(devices.kernels("auto")):
        code, _, err = run(capsys, *argv, "--device", "cuda", "--out", tmp / "gpu.npz")
        assert code == 2 and err.count("\n") == 1 and "softretrieval[cuda]" in err
        assert not (tmp / "gpu.npz").exists()


def test_interrupted_score_writes_nothing(capsys, files, monkeypatch):
    tmp, *_ = files

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sr.Index, "search", interrupt)
    code, _, err = run(capsys, "score", "--keys", tmp / "keys.npy", "--queries",
                       tmp / "queries.fvecs", "--mode", "topk", "--quiet", "--out", tmp / "o.npz")
    assert code == 130 and "nothing was written" in err
    assert not [f for f in os.listdir(tmp) if f.startswith("o.") or ".tmp-" in f]


def test_console_script_is_installed(tmp_path):
    """The installed entry point, run as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "softretrieval")
    script = script if os.path.exists(script) else shutil.which("softretrieval")
    assert script, "the softretrieval console script is not installed"
    res = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "score" in res.stdout
    res = subprocess.run([script, "info", str(tmp_path / "none")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("softretrieval: error:")


def test_clustered_catalogs_are_seeded_and_unit_norm():
    a = datasets.clustered(1000, 16, clusters=8, seed=3)
    b = datasets.clustered(1000, 16, clusters=8, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (1000, 16)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert not np.array_equal(a, datasets.clustered(1000, 16, clusters=8, seed=4))
    items, queries = datasets.catalog(2000, 50, 16, clusters=8, seed=1)
    # Queries share the items' centers: each has a close item (cosine > 0.7).
    assert (sr.topk(queries, items, 1)[0][:, 0] > 0.7).all()


def test_load_minilm_matches_fixture(minilm):
    data = datasets.load_minilm()
    np.testing.assert_array_equal(data["base"], minilm["base"])
    assert data["groundtruth"].shape == (1000, 100)
