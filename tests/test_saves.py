"""Saving never destroys what the user owns, and a crash at any point of a
save leaves the old or the new object loadable (Index, KNNMemory and the
build command share :mod:`softretrieval.persist`)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cli, shards


def make_index(seed, n=40, dim=6):
    rng = np.random.default_rng(seed)
    index = sr.Index(dim, value_dim=3, dtype="int8")
    index.add(rng.standard_normal((n, dim)), rng.standard_normal((n, 3)),
              ids=rng.permutation(10 * n)[:n], bias=rng.standard_normal(n))
    return index


def make_memory(seed):
    rng = np.random.default_rng(seed)
    mem = sr.KNNMemory(4, 2, capacity=16, heads=2)
    mem.write(rng.standard_normal((11, 2, 4)), rng.standard_normal((11, 2, 2)))
    return mem


def same_index(a, b):
    return (repr(a) == repr(b) and np.array_equal(a.keys(), b.keys())
            and np.array_equal(a.ids, b.ids) and np.array_equal(a.bias, b.bias))


def listing(folder):
    return sorted(os.listdir(folder))


def only_ours(folder):
    """The folder holds meta.json and exactly the files (and child folders,
    each only its own) it lists."""
    meta = json.loads((folder / "meta.json").read_text())
    children = [f["folder"] for f in meta.get("folders", {}).values()]
    return (listing(folder) == sorted(["meta.json"] + [f["file"] for f in meta["files"].values()]
                                      + children)
            and all(only_ours(folder / child) for child in children))


def load_shards(path):
    """A sharded folder's shards, loaded and checked, as one Index."""
    manifest = shards.read_manifest(path)
    parts = [shards.load_shard(manifest, i, mmap=False) for i in range(len(manifest.shards))]
    whole = sr.Index(parts[0].dim, value_dim=parts[0].value_dim, dtype=parts[0].dtype)
    for part in parts:
        if len(part):
            whole.add(part.keys(), part._values, ids=part.ids, bias=part.bias)
    return whole


SAVERS = {
    "Index.save": lambda path: make_index(1).save(path),
    "KNNMemory.save": lambda path: make_memory(1).save(path),
    "build --out": lambda path: cli.main(["build", "--keys", str(path.parent / "keys.npy"),
                                          "--out", str(path)]),
}


@pytest.fixture
def keys_file(tmp_path):
    np.save(tmp_path / "keys.npy", np.random.default_rng(0).standard_normal((20, 4)))


@pytest.mark.parametrize("saver", SAVERS)
def test_save_refuses_a_folder_that_is_not_ours(tmp_path, keys_file, saver):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("four years of work")
    with pytest.raises((ValueError, SystemExit)):
        SAVERS[saver](folder)
    assert listing(folder) == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "four years of work"
    assert listing(tmp_path) == ["keys.npy", "thesis"]


@pytest.mark.parametrize("saver", SAVERS)
def test_save_refuses_a_file(tmp_path, keys_file, saver):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises((ValueError, SystemExit)):
        SAVERS[saver](target)
    assert target.read_text() == "mine"
    assert listing(tmp_path) == ["keys.npy", "notes.txt"]     # nothing moved aside, nothing left


def test_save_refuses_another_kind_and_damaged_meta(tmp_path):
    make_memory(1).save(tmp_path / "mem")
    with pytest.raises(ValueError, match="not an intact saved softretrieval.Index"):
        make_index(1).save(tmp_path / "mem")
    assert isinstance(sr.KNNMemory.load(tmp_path / "mem"), sr.KNNMemory)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="refusing"):
        make_index(1).save(folder)
    assert (folder / "meta.json").read_text() == "{not json"


def test_save_into_an_empty_folder_and_replace_keeping_foreign_files(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    make_index(1).save(folder)
    assert only_ours(folder) and same_index(sr.Index.load(folder), make_index(1))
    (folder / "README.txt").write_text("my notes about this index")
    make_index(2).save(folder)
    assert same_index(sr.Index.load(folder), make_index(2))
    assert (folder / "README.txt").read_text() == "my notes about this index"
    (folder / "README.txt").unlink()
    assert only_ours(folder)          # the old generation's files are gone
    assert listing(tmp_path) == ["idx"]


def test_replacing_the_files_an_index_is_mapped_from(tmp_path, rng):
    make_index(1).save(tmp_path / "idx")
    mapped = sr.Index.load(tmp_path / "idx", mmap=True)
    Q = rng.standard_normal((5, 6))
    before = mapped.search(Q, 4)
    make_index(2).save(tmp_path / "idx")        # old files unlinked, not truncated
    after = mapped.search(Q, 4)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    mapped.save(tmp_path / "idx")               # and saving the mapped index back works
    assert same_index(sr.Index.load(tmp_path / "idx"), make_index(1))


def test_legacy_folders_still_load(tmp_path):
    """Folders saved before meta.json had a checksum (Index v1, KNNMemory v2)
    load; saving over them upgrades them in place."""
    from softretrieval import persist

    for obj, version in ((make_index(1), 1), (make_memory(1), 2)):
        folder = tmp_path / type(obj).__name__
        if version == 2:    # the layout of KNNMemory versions 2 and 3: one float32 ring per head
            fields = {"key_dim": obj.key_dim, "value_dim": obj.value_dim, "capacity": obj.capacity,
                      "heads": obj.heads, "metric": obj.metric, "size": len(obj),
                      "next": int(obj._next[0])}
            persist.save_folder(folder, "softretrieval.KNNMemory", 3,
                                {"keys": obj._keys[:, 0], "values": obj._values[:, 0]}, fields)
        else:
            obj.save(folder)
        meta = json.loads((folder / "meta.json").read_text())
        for name, info in meta["files"].items():
            (folder / info.pop("file")).rename(folder / f"{name}.npy")
        meta.pop("checksum")
        (folder / "meta.json").write_text(json.dumps(dict(meta, version=version)))
        back = type(obj).load(folder)
        assert repr(back) == repr(obj)
        back.save(folder)
        assert only_ours(folder)
        assert json.loads((folder / "meta.json").read_text())["version"] != version
        assert repr(type(obj).load(folder)) == repr(obj)
    assert persist.meta_checksum({"a": 1}) == persist.meta_checksum({"a": 1, "checksum": "x"})


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[4])
    import test_saves
    import softretrieval.cpu    # imported first: its Numba caches' set-up calls os.makedirs, no save step
    path, kill_at, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = [0]

    def deadly(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    for name in ("makedirs", "fsync", "rename", "replace", "unlink", "rmdir"):
        setattr(os, name, deadly(getattr(os, name)))
    if kind == "shards":
        test_saves.make_index(2).save_shards(path, sizes=[25, 15])
    else:
        (test_saves.make_index(2) if kind == "index" else test_saves.make_memory(2)).save(path)
    print(calls[0])
""")


@pytest.mark.parametrize("kind", ["index", "memory", "shards"])
@pytest.mark.parametrize("existing", [True, False])
def test_a_save_killed_at_any_point_leaves_old_or_new(tmp_path, kind, existing):
    """SIGKILL the saving process at each of its file-system steps in turn
    (folder creation, every fsync, rename and unlink): the path then loads
    as the old or the new object, never neither; the next save cleans up.
    ("shards": Index.save_shards, two shards, loaded and checked whole.)"""
    make, load = {"index": (make_index, sr.Index.load), "memory": (make_memory, sr.KNNMemory.load),
                  "shards": (make_index, load_shards)}[kind]
    old, new = make(1), make(2)
    same = same_index if kind != "memory" else (
        lambda a, b: repr(a) == repr(b) and np.array_equal(a._keys, b._keys))
    save = (lambda obj: obj.save_shards(path, sizes=[25, 15])) if kind == "shards" else (
        lambda obj: obj.save(path))
    path = tmp_path / "obj"
    outcomes = set()
    for kill_at in range(1, 80):
        if existing:
            save(old)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at), kind,
                               os.path.dirname(__file__)], capture_output=True, text=True)
        if proc.returncode == 0:
            assert int(proc.stdout) == kill_at - 1      # every step was tried
            assert same(load(path), new) and only_ours(path)
            break
        assert proc.returncode == -9, proc.stderr
        if not existing and not path.exists():
            outcomes.add("absent")
        else:
            got = load(path)
            assert same(got, new) or (existing and same(got, old))
            outcomes.add("new" if same(got, new) else "old")
        save(new)          # a later save succeeds and removes what the killed one left
        assert only_ours(path) and same(load(path), new)
        for entry in listing(tmp_path):
            if entry != "obj":    # killed between making its folder and locking it: empty,
                assert entry.startswith(".obj.new-") and not os.listdir(tmp_path / entry)
                os.rmdir(tmp_path / entry)   # (a save removes these once a minute old)
        shutil.rmtree(path)
    else:
        pytest.fail("the save never completed")
    assert outcomes == ({"old", "new"} if existing else {"absent", "new"})


def test_concurrent_saves_to_one_path_leave_one_of_them(tmp_path):
    """Saves of different objects to one path from several threads (or
    processes) are serialized by a lock on the folder: the path then holds
    one of them, whole, and only its files."""
    objects = [make_index(seed, n=3000 + 500 * seed) for seed in range(4)]
    for existing in (False, True):
        path = tmp_path / f"idx{existing}"
        if existing:
            make_index(9).save(path)
        errors = []

        def save(obj):
            try:
                obj.save(path)
            except BaseException as exc:       # only "created meanwhile by another save" may happen
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(obj,)) for obj in objects]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = sr.Index.load(path)
        assert any(same_index(got, obj) for obj in objects) and only_ours(path)
        assert all(isinstance(e, ValueError) and "created by someone else" in str(e)
                   for e in errors), errors
        assert not existing or not errors
    assert sorted(listing(tmp_path)) == ["idxFalse", "idxTrue"]


def test_loads_racing_saves_read_a_whole_generation(tmp_path):
    objects = [make_index(1, n=2000), make_index(2, n=2500)]
    path = tmp_path / "idx"
    objects[0].save(path)
    stop = threading.Event()

    def saver():
        i = 0
        while not stop.is_set():
            objects[i % 2].save(path)
            i += 1

    thread = threading.Thread(target=saver)
    thread.start()
    try:
        for _ in range(60):
            got = sr.Index.load(path)
            assert any(same_index(got, obj) for obj in objects)
    finally:
        stop.set()
        thread.join()


def test_a_file_removed_while_it_is_read_is_a_retry_not_a_crash(tmp_path, monkeypatch):
    """A racing save can remove a file between meta.json's read and the
    file's checksum: that is the ValueError the load retries on (a new
    meta.json) or reports, never a bare FileNotFoundError."""
    from softretrieval import persist

    path = tmp_path / "idx"
    make_index(1).save(path)
    real_sha256 = persist.sha256

    def vanished(file):
        raise FileNotFoundError(file)

    monkeypatch.setattr(persist, "sha256", vanished)
    with pytest.raises(ValueError, match=r"keys\.[0-9a-f]+\.npy is missing"):
        sr.Index.load(path)
    calls = []
    real = persist._read_meta

    def newer_meta(*args, **kw):
        calls.append(1)
        if len(calls) == 2:                     # the retry's check sees a new generation
            monkeypatch.setattr(persist, "sha256", real_sha256)
            make_index(2).save(path)
        return real(*args, **kw)

    monkeypatch.setattr(persist, "_read_meta", newer_meta)
    assert same_index(sr.Index.load(path), make_index(2))


def test_a_damaged_or_forged_meta_is_not_trusted_by_a_save(tmp_path):
    """A folder whose meta.json fails its checksum is refused by save as by
    load (its file list is not trusted to decide what to delete); files of
    yours named like ours survive a save; a legacy version number on a
    current meta.json does not bypass the checksum."""
    path = tmp_path / "idx"
    make_index(1).save(path)
    (path / "mydata.csv").write_text("precious")
    (path / "embeddings.0123456789abcdef.npy").write_bytes(b"mine too")
    make_index(2).save(path)
    assert (path / "mydata.csv").read_text() == "precious"
    assert (path / "embeddings.0123456789abcdef.npy").read_bytes() == b"mine too"
    meta = json.loads((path / "meta.json").read_text())
    forged = dict(meta, files=dict(meta["files"], x={"file": "mydata.csv", "sha256": "0"}))
    (path / "meta.json").write_text(json.dumps(forged))
    with pytest.raises(ValueError, match="edited"):
        make_index(3).save(path)
    assert (path / "mydata.csv").read_text() == "precious"
    for version in (1,):
        (path / "meta.json").write_text(json.dumps(dict(meta, version=version, metric="l2")))
        with pytest.raises(ValueError, match="edited"):
            sr.Index.load(path)


def test_save_path_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path must not be empty"):
        make_index(1).save("")
    with pytest.raises(TypeError, match="path"):
        make_index(1).save(3)
    make_index(1).save(b"bytes_path")
    assert same_index(sr.Index.load("bytes_path"), make_index(1))
    (tmp_path / "dirmeta").mkdir()
    (tmp_path / "dirmeta" / "meta.json").mkdir()
    with pytest.raises(ValueError, match="meta.json"):
        sr.Index.load(tmp_path / "dirmeta")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "meta.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="damaged"):
        sr.Index.load(tmp_path / "deep")
    assert sorted(listing(tmp_path)) == ["bytes_path", "deep", "dirmeta"]


def test_pickle_round_trips(tmp_path, rng):
    index = make_index(3)
    index.save(tmp_path / "idx")
    far = sr.Index(5, metric="l2")
    far.add(rng.standard_normal((30, 5)) + 3000.0)
    Q = rng.standard_normal((4, 6))
    for obj in (index, sr.Index.load(tmp_path / "idx", mmap=True)):
        back = pickle.loads(pickle.dumps(obj))
        assert same_index(back, obj)
        for a, b in zip(back.retrieve_topk(Q, 3), obj.retrieve_topk(Q, 3)):
            np.testing.assert_array_equal(a, b)
        back.add(rng.standard_normal((2, 6)), rng.standard_normal((2, 3)), ids=[10**6, 10**6 + 1])
        assert len(back) == len(obj) + 2
    back = pickle.loads(pickle.dumps(far))
    np.testing.assert_array_equal(back.center, far.center)
    np.testing.assert_array_equal(back.search(Q[:, :5] + 3000, 3)[1], far.search(Q[:, :5] + 3000, 3)[1])
    mem = make_memory(4)
    back = pickle.loads(pickle.dumps(mem))
    q = rng.standard_normal((3, 2, 4))
    for a, b in zip(back.read(q, k=4), mem.read(q, k=4)):
        np.testing.assert_array_equal(a, b)
    back.write(rng.standard_normal((1, 2, 4)), rng.standard_normal((1, 2, 2)))
    assert len(back) == len(mem) + 1


def test_a_save_removes_only_dead_temporaries(tmp_path):
    """Hidden folders of saves to the same path that died are removed by the
    next save: a .tmp- folder whose lock is free, an empty .new- folder over
    a minute old; a fresh .new- folder (a save about to lock it) is kept,
    and so is anything else."""
    dead_tmp = tmp_path / ".idx.tmp-0123456789abcdef"
    dead_tmp.mkdir()
    (dead_tmp / "keys.0123456789abcdef.npy").write_bytes(b"half")
    old_new = tmp_path / ".idx.new-0123456789abcdef"
    old_new.mkdir()
    os.utime(old_new, (time.time() - 3600, time.time() - 3600))
    fresh_new = tmp_path / ".idx.new-fedcba9876543210"
    fresh_new.mkdir()
    (tmp_path / ".idx.tmp-notours").mkdir()
    make_index(1).save(tmp_path / "idx")
    assert listing(tmp_path) == [".idx.new-fedcba9876543210", ".idx.tmp-notours", "idx"]
