"""Defects found by probing the installed package as a new user would: each
once a silent wrong answer, a crash or an unclear error, now a correct
result or a clear error naming the argument (see docs/guarantees.md)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import faiss
import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cli, io

from reference import scores_ref, topk_ref


def run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code or 0, out, err


# ---------------------------------------------------------------- silent wrong answers


def test_an_empty_add_does_not_decide_ids(rng):
    index = sr.Index(4)
    index.add(np.zeros((0, 4)), ids=[])
    index.add(rng.standard_normal((3, 4)))
    assert index.ids is None
    assert sorted(index.search(rng.standard_normal((1, 4)), 3)[1][0]) == [0, 1, 2]
    index = sr.Index(4)
    index.add(np.zeros((0, 4)))
    index.add(rng.standard_normal((3, 4)), ids=[7, 8, 9])
    index.add(np.zeros((0, 4)))                 # still fine: adds nothing
    np.testing.assert_array_equal(index.ids, [7, 8, 9])
    with pytest.raises(ValueError, match="every add or on none"):
        index.add(rng.standard_normal((1, 4)))


def test_exclusions_hold_while_another_thread_adds(rng):
    """A search maps its exclusions on the snapshot it searches, so an
    excluded id never comes back while adds grow and reallocate the index."""
    dim = 8
    index = sr.Index(dim)
    index.add(rng.standard_normal((64, dim)), ids=np.arange(64) + 10**9)
    Q = rng.standard_normal((3, dim)).astype(np.float32)
    stop = threading.Event()

    def adder():   # ids below the first ones: they sort before them
        base = 0
        while not stop.is_set():
            index.add(rng.standard_normal((37, dim)), ids=np.arange(base, base + 37))
            base += 37

    thread = threading.Thread(target=adder)
    thread.start()
    try:
        for _ in range(300):
            best = index.search(Q, 5)[1]
            _, got = index.search(Q, 5, exclude=[row for row in best])
            for row, banned in zip(got, best):
                assert not np.isin(row, banned).any()
    finally:
        stop.set()
        thread.join()


def test_kernel_calls_from_several_threads_queue_and_agree(rng):
    Q, K, V = rng.standard_normal((300, 16)), rng.standard_normal((5000, 16)), rng.standard_normal((5000, 4))
    want = sr.attention(Q, K, V), sr.topk(Q, K, 5)[1]
    results, errors = [], []

    def call():
        try:
            for _ in range(3):
                results.append((sr.attention(Q, K, V), sr.topk(Q, K, 5)[1]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for out, ids in results:
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(ids, want[1])


def test_an_add_inside_a_search_does_not_shift_its_exclusions(monkeypatch, rng):
    """The same race made deterministic: an add lands after the search took
    its snapshot (here, while it validates the queries)."""
    from softretrieval import validate

    index = sr.Index(4)
    index.add(rng.standard_normal((20, 4)), ids=np.arange(20) + 10**9)
    Q = rng.standard_normal((2, 4))
    best = index.search(Q, 3)[1]
    real = validate.float_matrix

    def float_matrix_then_add(x, name, *args, **kwargs):
        if name == "queries":
            index.add(rng.standard_normal((50, 4)), ids=np.arange(50) + 100 * len(index))
        return real(x, name, *args, **kwargs)

    monkeypatch.setattr(validate, "float_matrix", float_matrix_then_add)
    _, got = index.search(Q, 3, exclude=list(best))
    for row, banned in zip(got, best):
        assert not np.isin(row, banned).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_topk_attention_refuses_non_finite_selected_values(rng, bad):
    K = rng.standard_normal((40, 5))
    V = rng.standard_normal((40, 3))
    V[7, 1] = bad
    with pytest.raises(ValueError, match="values"):
        sr.topk_attention(K[7:8] * 10, K, V, k=3)
    q = rng.standard_normal((2, 4, 5))
    with pytest.raises(ValueError, match="values"):
        sr.topk_attention(q, K[:, None].repeat(2, 1), V[:, None].repeat(2, 1), k=40)


def test_score_refuses_ids_beyond_ivecs(capsys, tmp_path, rng):
    np.save(tmp_path / "keys.npy", rng.standard_normal((30, 4)))
    np.save(tmp_path / "ids.npy", np.arange(30, dtype=np.int64) + 2**31 - 5)
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 4)))
    assert run(capsys, "build", "--keys", tmp_path / "keys.npy", "--ids", tmp_path / "ids.npy",
               "--out", tmp_path / "idx")[0] == 0
    code, _, err = run(capsys, "score", "--index", tmp_path / "idx", "--queries", tmp_path / "q.npy",
                       "--mode", "topk", "--out", tmp_path / "out.ivecs")
    assert code == 2 and ".ivecs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.ivecs").exists()
    with pytest.raises(ValueError, match="32-bit"):
        io.write_output(str(tmp_path / "x.ivecs"), {"ids": np.array([[2**31]])})
    with pytest.raises(ValueError, match="float32"):
        io.write_output(str(tmp_path / "x.fvecs"), {"x": np.array([[1e300]])})
    assert sorted(os.listdir(tmp_path)) == ["ids.npy", "idx", "keys.npy", "q.npy"]
    code, _, _ = run(capsys, "score", "--index", tmp_path / "idx", "--queries", tmp_path / "q.npy",
                     "--mode", "topk", "--out", tmp_path / "out.npy")
    assert code == 0 and np.load(tmp_path / "out.npy").min() >= 2**31 - 5


def test_bad_groundtruth_writes_nothing(capsys, tmp_path, rng):
    np.save(tmp_path / "keys.npy", rng.standard_normal((30, 4)))
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 4)))
    np.save(tmp_path / "gt.npy", np.zeros((5, 10), np.int64))     # 5 rows for 3 queries
    for gt in ("missing.ivecs", "gt.npy"):
        code, _, err = run(capsys, "score", "--keys", tmp_path / "keys.npy", "--queries",
                           tmp_path / "q.npy", "--mode", "topk", "--groundtruth", tmp_path / gt,
                           "--quiet", "--out", tmp_path / "out.npz")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("offset", [3000.0, 1e5])
def test_l2_far_from_the_origin(rng, offset):
    """Points sharing a large offset: the float32 expansion |q|^2 - 2 q.k +
    |k|^2 would cancel (top-1 recall 0.035 at offset 3000); centring keeps
    every digit. Against FAISS and a float64 reference, functional and Index."""
    N, B, d = 2000, 40, 16
    K = (rng.standard_normal((N, d)) + offset).astype(np.float32)
    Q = (K[rng.choice(N, B)] + 0.3 * rng.standard_normal((B, d))).astype(np.float32)
    want_d, want_i = topk_ref(Q, K, 10, metric="l2")
    flat = faiss.IndexFlatL2(d)
    flat.add(K)
    _, faiss_i = flat.search(Q, 10)
    index = sr.Index(d, metric="l2")
    index.add(K[:1000])
    index.add(K[1000:])                         # later adds use the first add's center
    assert index.center is not None
    np.testing.assert_allclose(index.keys(), K, rtol=0, atol=offset * 1e-6)
    for dist, ids in (sr.topk(Q, K, 10, metric="l2"), index.search(Q, 10)):
        np.testing.assert_array_equal(ids[:, 0], want_i[:, 0])
        np.testing.assert_array_equal(ids[:, 0], faiss_i[:, 0])
        assert np.mean([np.isin(a, b).mean() for a, b in zip(ids, want_i)]) >= 0.99
        np.testing.assert_allclose(dist, want_d, rtol=1e-3, atol=1e-2)
    out, lse = sr.attention(Q, K, metric="l2", scale=0.5, return_lse=True)
    ref = -0.5 * scores_ref(Q, K, "l2")
    m = ref.max(axis=1, keepdims=True)
    w = np.exp(ref - m)
    np.testing.assert_allclose(lse, (m[:, 0] + np.log(w.sum(1))), rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(out, (w / w.sum(1, keepdims=True)) @ K, rtol=1e-5, atol=offset * 1e-5)
    soft = index.retrieve(Q, scale=0.5)          # keys as values: the center is added back
    np.testing.assert_allclose(soft, out, rtol=1e-5, atol=offset * 1e-5)
    res = index.retrieve_topk(Q, 5, scale=0.5)
    assert np.abs(res.out - out).max() < offset * 0.01


def test_l2_near_the_origin_is_not_centred(rng):
    index = sr.Index(8, metric="l2")
    index.add(rng.standard_normal((100, 8)) + 0.5)
    assert index.center is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compact_storage_refuses_keys_it_cannot_hold(rng, dtype):
    index = sr.Index(8, dtype=dtype)
    keys = rng.standard_normal((50, 8))
    index.add(keys)
    tiny = keys * (1e-8 if dtype == "float16" else 1e-42)
    with pytest.raises(ValueError, match="relative error"):
        index.add(tiny)
    assert len(index) == 50                     # nothing was added
    if dtype == "float16":
        index.add(keys * 1e-3)                  # small but normal: fine
        assert len(index) == 100


# ---------------------------------------------------------------- crashes and unclear errors


INTERRUPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import softretrieval as sr
    rng = np.random.default_rng(0)
    K = rng.standard_normal((400_000, 64), dtype=np.float32)
    Q = rng.standard_normal((4096, 64), dtype=np.float32)
    sr.attention(Q[:300], K[:20_000])          # compiled (or loaded from the cache)
    print("ready", flush=True)
    try:
        sr.attention(Q, K) if sys.argv[1] == "attention" else sr.topk(Q, K, 10)
        print("finished")
    except KeyboardInterrupt:
        print("KeyboardInterrupt", time.perf_counter(), flush=True)
    out, lse = sr.attention(Q[:3], K[:1000], return_lse=True)   # the package still works
    print("after", np.isfinite(lse).all())
""")


def interrupt(args, after=0.5):
    """Start ``args``, wait for its 'ready' line, send SIGINT after ``after``
    seconds; returns (returncode, output, time.perf_counter() at the signal)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(after)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, sent


@pytest.mark.parametrize("mode", ["attention", "topk"])
def test_ctrl_c_interrupts_a_long_kernel_call(mode):
    """The call (seconds of work) ends with KeyboardInterrupt soon after the
    signal, not a SystemError after it completes, and later calls work."""
    code, out, err, sent = interrupt([sys.executable, "-c", INTERRUPT, mode])
    assert code == 0, err
    lines = out.split()
    assert "finished" not in lines and "SystemError" not in err
    assert lines[0] == "KeyboardInterrupt" and float(lines[1]) - sent < 3.0
    assert lines[-2:] == ["after", "True"]


def test_ctrl_c_in_the_command_exits_130_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "keys.npy", rng.standard_normal((400_000, 64), dtype=np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((8192, 64), dtype=np.float32))
    script = ("import sys; print('ready', flush=True); from softretrieval.cli import main; "
              "main(sys.argv[1:])")
    code, out, err, _ = interrupt(
        [sys.executable, "-c", script, "score", "--keys", str(tmp_path / "keys.npy"),
         "--queries", str(tmp_path / "q.npy"), "--mode", "soft", "--batch-size", "8192",
         "--quiet", "--out", str(tmp_path / "out.npy")], after=3.0)
    assert code == 130
    assert err.strip() == "softretrieval: interrupted; nothing was written"
    assert sorted(os.listdir(tmp_path)) == ["keys.npy", "q.npy"]


def test_import_and_calls_under_python_OO():
    # (a small compiled call: Numba keeps a separate cache for -OO, so a kernel would compile anew)
    code = ("import numpy as np, softretrieval as sr; "
            "print(sr.merge(np.ones((2, 4, 3)), np.zeros((2, 4)))[0].shape, sr.attention.__doc__)")
    out = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(4, 3) None"


@pytest.mark.parametrize("k", [10**9, 2**62])
def test_huge_k_is_a_clear_error(capsys, tmp_path, rng, k):
    Q, K = rng.standard_normal((3, 4)), rng.standard_normal((10, 4))
    for call in (lambda: sr.topk(Q, K, k), lambda: sr.topk_attention(Q, K, k=k)):
        with pytest.raises(ValueError, match=f"k = {k} is too large"):
            call()
    index = sr.Index(4)
    index.add(K)
    with pytest.raises(ValueError, match="k = "):
        index.search(Q, k)
    with pytest.raises(ValueError, match="k = "):
        index.retrieve_topk(Q, k)
    np.save(tmp_path / "k.npy", K)
    np.save(tmp_path / "q.npy", Q)
    code, _, err = run(capsys, "score", "--keys", tmp_path / "k.npy", "--queries", tmp_path / "q.npy",
                       "--mode", "topk", "-k", k, "--out", tmp_path / "o.npz")
    assert code == 2 and "k = " in err and len(err.strip().splitlines()) == 1


def test_k_beyond_n_still_pads(rng):
    Q, K = rng.standard_normal((2, 4)), rng.standard_normal((5, 4))
    scores, ids = sr.topk(Q, K, 1000)
    assert ids.shape == (2, 1000) and (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_bvecs_keys_and_queries_in_build_and_score(capsys, tmp_path, rng):
    def write_bvecs(path, x):
        rec = np.empty((x.shape[0], x.shape[1] + 4), np.uint8)
        rec[:, :4] = np.frombuffer(np.int32(x.shape[1]).tobytes(), np.uint8)
        rec[:, 4:] = x
        rec.tofile(path)

    base = rng.integers(0, 255, (200, 16)).astype(np.uint8)
    queries = rng.integers(0, 255, (7, 16)).astype(np.uint8)
    write_bvecs(tmp_path / "base.bvecs", base)
    write_bvecs(tmp_path / "q.bvecs", queries)
    assert run(capsys, "build", "--keys", tmp_path / "base.bvecs", "--metric", "l2",
               "--out", tmp_path / "idx")[0] == 0
    code, _, err = run(capsys, "score", "--index", tmp_path / "idx", "--queries",
                       tmp_path / "q.bvecs", "--mode", "topk", "-k", 5, "--quiet",
                       "--out", tmp_path / "o.npy")
    assert code == 0, err
    want = topk_ref(queries.astype(np.float64), base.astype(np.float64), 5, metric="l2")[1]
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy")[:, 0], want[:, 0])


@pytest.mark.parametrize("call,match", [
    (lambda: sr.attention([[1.0, 2.0], [1.0]], np.ones((3, 2))), "queries"),
    (lambda: sr.attention(np.ones((2, 2)), [[1.0, 2.0], [3.0]]), "keys"),
    (lambda: sr.attention(np.ones((2, 2)), np.ones((3, 2)), [[1.0], [2.0, 3.0], [1.0]]), "values"),
    (lambda: sr.topk(np.ones((2, 2)), np.ones((3, 2)), 2, bias=[1.0, [2.0], 3.0]), "bias"),
    (lambda: sr.merge([np.zeros((2, 3)), np.zeros((3, 3))], [np.zeros(2), np.zeros(3)]), "outs"),
    (lambda: sr.merge([np.zeros((2, 3))] * 2, [np.zeros(2), np.zeros(3)]), "lses"),
])
def test_ragged_inputs_name_the_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_ragged_inputs_to_index_and_memory_name_the_argument(rng):
    ragged = [[1.0, 2.0, 3.0, 4.0], [1.0]]
    index = sr.Index(4)
    with pytest.raises(TypeError, match="keys"):
        index.add(ragged)
    index.add(rng.standard_normal((5, 4)))
    with pytest.raises(TypeError, match="queries"):
        index.search(ragged, 2)
    with pytest.raises(TypeError, match="ids"):
        sr.Index(4).add(rng.standard_normal((2, 4)), ids=[[1], [2, 3]])
    mem = sr.KNNMemory(4, 4, 10)
    with pytest.raises(TypeError, match="keys"):
        mem.write(ragged, np.ones((2, 4)))
    with pytest.raises(TypeError, match="queries"):
        mem.read(ragged)


def test_gate_and_exclude_messages(rng):
    mem = sr.KNNMemory(4, 4, 10)
    mem.write(rng.standard_normal((5, 4)), rng.standard_normal((5, 4)))
    q = rng.standard_normal((3, 1, 4))
    with pytest.raises(TypeError, match="gate"):
        sr.memory_attention(q, q, q, mem, gate="x")
    with pytest.raises(ValueError, match="gate"):
        sr.memory_attention(q, q, q, mem, gate=[1.5])
    index = sr.Index(4)
    index.add(rng.standard_normal((10, 4)), ids=np.arange(10) * 3)
    with pytest.raises(ValueError, match=r"must be >= 0, got -1"):
        index.search(rng.standard_normal((2, 4)), 3, exclude=[[-1], [2]])


def test_demo_runs_from_an_installed_wheel(tmp_path):
    """Build the wheel, unpack it, and run the demo from outside the checkout
    with only the wheel's files for softretrieval (no editable install)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         f"print(b.build_wheel({str(tmp_path / 'dist')!r}))"],
        cwd=root, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = z.namelist()
    assert "softretrieval/data/minilm-pystdlib-384d/base.fvecs" in names
    deps = {os.path.dirname(os.path.dirname(m.__file__)) for m in (np, faiss)}
    import numba
    import scipy
    import threadpoolctl
    import tqdm
    deps |= {os.path.dirname(os.path.dirname(m.__file__)) for m in (numba, scipy, tqdm)}
    deps.add(os.path.dirname(threadpoolctl.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), *sorted(deps)]))
    # -S: no site-packages .pth files, so the editable install's finder is not loaded
    code = ("import softretrieval, sys; assert softretrieval.__file__.startswith(sys.argv[1]), "
            "softretrieval.__file__; from softretrieval.cli import main; main(sys.argv[2:])")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "site"), "demo",
                          "--quiet", "--out", str(tmp_path / "results")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recall@10" in out.stdout and "1.0000" in out.stdout
    assert sorted(os.listdir(tmp_path / "results")) == ["minilm_soft.npz", "minilm_top10.npz"]


def test_demo_with_a_wrong_root_names_the_option(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--root", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "--root" in err and "root=" not in err



# ---------------------------------------------------------------- found by the second probe


@pytest.mark.parametrize("extra,match", [
    (["--temperature", "0"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--scale", "inf"], "scale"),
    (["--device", "cuda"], "cuda"),
    (["--out", "{tmp}/missing/out.npy"], "does not exist"),
])
def test_score_refuses_before_scoring_in_one_line(capsys, tmp_path, rng, extra, match):
    np.save(tmp_path / "keys.npy", rng.standard_normal((30, 4)))
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 4)))
    from softretrieval import cuda as gpu
    if "cuda" in extra and gpu.available():
        pytest.skip("a GPU is present")
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "out.npy")]
    code, _, err = run(capsys, "score", "--keys", tmp_path / "keys.npy", "--queries",
                       tmp_path / "q.npy", "--mode", "soft", *extra, *out)   # progress bar on
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["keys.npy", "q.npy"]


def test_command_input_files_that_are_not_arrays(capsys, tmp_path, rng):
    np.savez(tmp_path / "keys.npy", a=rng.standard_normal((5, 4)))        # an .npz named .npy
    np.save(tmp_path / "q.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "k2.npy", rng.standard_normal((5, 2)))
    for argv in (["build", "--keys", tmp_path / "keys.npy", "--out", tmp_path / "idx"],
                 ["build", "--keys", tmp_path / "k2.npy", "--ids", tmp_path / "keys.npy",
                  "--out", tmp_path / "idx"],
                 ["validate", "--base", tmp_path / "q.npy", "--queries", tmp_path / "q.npy"],
                 ["score", "--keys", tmp_path / "k2.npy", "--queries", tmp_path / "q.npy",
                  "--mode", "topk", "--out", tmp_path / "o.npy"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    proc = subprocess.run([sys.executable, "-m", "softretrieval", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("softretrieval: error:")


def test_overflowing_and_unsigned_arguments_are_named(rng):
    Q, K = rng.standard_normal((2, 4)), rng.standard_normal((6, 4))
    with pytest.raises(ValueError, match="scale"):
        sr.attention(Q, K, scale=10**400)
    index = sr.Index(4)
    index.add(K)
    for t in (10**400, 5e-324):
        with pytest.raises(ValueError, match="temperature"):
            index.retrieve(Q, temperature=t)
    seq = rng.standard_normal((5, 1, 4)).astype(np.float32)
    np.testing.assert_allclose(sr.attention(seq, seq, seq, causal=True, window=10**30),
                               sr.attention(seq, seq, seq, causal=True), rtol=1e-6)
    with pytest.raises(ValueError, match="capacity"):
        sr.KNNMemory(8, 8, 10**13)
    with pytest.raises(ValueError, match="dtype"):
        sr.Index(8, dtype=[1])
    big = np.array([2**63, 2**63 + 1], np.uint64)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        sr.Index(4).add(K[:2], ids=big)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        sr.topk(Q, K, 2, exclude=[big, big])


def test_an_empty_memory_still_checks_its_input():
    mem = sr.KNNMemory(4, 2, 8)
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.full((1, 4), np.nan))
    with pytest.raises(TypeError, match="queries"):
        mem.read(np.ones((1, 4), np.int64))
    with pytest.raises(TypeError, match="scale"):
        mem.read(np.ones((1, 4)), scale="x")
    assert np.isneginf(mem.read(np.ones((1, 4))).lse).all()


def test_merge_of_lses_near_the_float32_limit(rng):
    o = rng.standard_normal((2, 3)).astype(np.float32)
    out, lse = sr.merge([o, o], [np.full(2, 3e38, np.float32)] * 2)
    np.testing.assert_allclose(out, o, rtol=1e-6)
    assert np.isfinite(lse).all() and (lse == np.float32(3e38)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("metric,with_bias", [("ip", True), ("l2", False), ("cosine", True),
                                              ("l2", True)])
@pytest.mark.parametrize("B", [1, 40])
def test_non_finite_keys_with_a_bias_or_l2_are_refused(small_tiles, rng, bad, metric, with_bias, B):
    """Only a -inf BIAS excludes a key; a -inf in the keys is an error on
    every path (the shared logit rule clamps the bias, not the logit)."""
    Q, K = rng.standard_normal((B, 4)), rng.standard_normal((60, 4))
    K[37, 2] = bad
    bias = rng.standard_normal(60) if with_bias else None
    for call in (lambda: sr.topk(Q, K, 5, metric=metric, bias=bias),
                 lambda: sr.attention(Q, K, metric=metric, bias=bias)):
        with pytest.raises(ValueError, match="keys"):
            call()
    if with_bias:
        bias[37] = -np.inf                     # ... unless the bias excludes that very key
        K[37, 2] = 1.0
        _, ids = sr.topk(Q, K, 60, metric=metric, bias=bias)
        assert not (ids == 37).any() and (ids[:, :59] >= 0).all()
