"""KNNMemory with a batch of independent memories (batch=B) and compact
storage dtypes: against B separate memories, a float32 memory of the decoded
entries, and the float64 reference."""

import pickle

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import cpu, memory, persist, storage
from reference import attention_ref, topk_attention_ref

# float32 rounding: the batched read folds every ring into one problem, so
# its tiles and key splits start elsewhere than a separate memory's
RTOL, ATOL = 2e-5, 2e-6


def fill(memories, batched, rng, steps, heads, d, dv):
    """Apply the same writes to a batched memory and to its separate
    memories: ``steps`` is a list of (batch_index or None, n)."""
    for index, n in steps:
        sel = range(batched.batch) if index is None else np.atleast_1d(index)
        K = rng.standard_normal((len(sel), n, heads, d)).astype(np.float32)
        V = rng.standard_normal((len(sel), n, heads, dv)).astype(np.float32)
        if np.ndim(index) == 0 and index is not None:
            slots = batched.write(K[0], V[0], batch_index=index)[None]
        else:
            slots = batched.write(K, V, batch_index=index)
        for row, b in enumerate(sel):
            np.testing.assert_array_equal(slots[row], memories[b].write(K[row], V[row]))


def assert_reads_match(got, want, k):
    np.testing.assert_allclose(got.out, want.out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.lse, want.lse, rtol=RTOL, atol=ATOL)
    if k is not None:
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.coverage, want.coverage, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [None, 5, 40])
@pytest.mark.parametrize("heads,H,T", [(1, 1, 1), (2, 4, 3), (3, 3, 2)])
def test_batched_read_equals_separate_memories(small_tiles, rng, k, heads, H, T):
    """Partly filled rings (sequence 1 stays below capacity), wrap-around
    (0 and 2 wrap), one-sequence writes, an odd key_dim, a capacity that is
    no multiple of the tiles, k above some sequences' entries: the batched
    read equals B separate memories within float32 rounding (same ids), and
    each sequence equals the float64 reference over its own entries."""
    B, d, dv, cap = 3, 5, 4, 41
    batched = sr.KNNMemory(d, dv, cap, heads=heads, batch=B)
    separate = [sr.KNNMemory(d, dv, cap, heads=heads) for _ in range(B)]
    fill(separate, batched, rng, [(None, 20), ([2, 0], 25), (2, 1), (np.int64(0), 7)], heads, d, dv)
    np.testing.assert_array_equal(batched.sizes, [cap, 20, cap])
    q = rng.standard_normal((B, T, H, d)).astype(np.float32)
    got = batched.read(q, k=k, scale=0.7)
    for b in range(B):
        want = separate[b].read(q[b], k=k, scale=0.7)
        assert_reads_match(sr.MemoryRead(*(None if a is None else a[b] for a in got)), want, k)
        K, V = batched.snapshot(b)
        np.testing.assert_array_equal(K, separate[b].snapshot()[0])
        G = H // heads
        for t in range(T):
            for h in range(H):
                Kh, Vh = K[:, h // G], V[:, h // G]
                if k is None:
                    out, lse = attention_ref(q[b, t, h][None], Kh, Vh, scale=0.7)
                else:
                    out, ids, _, lse, _ = topk_attention_ref(q[b, t, h][None], Kh, Vh, k=k,
                                                             scale=0.7)
                    np.testing.assert_array_equal(got.ids[b, t, h], ids[0])
                np.testing.assert_allclose(got.out[b, t, h], out[0], atol=1e-5)
                np.testing.assert_allclose(got.lse[b, t, h], lse[0], rtol=1e-5)


def test_batched_read_is_one_kernel_call(rng, monkeypatch):
    """Every head and sequence of a batched read run as ONE kernel problem."""
    mem = sr.KNNMemory(8, 3, 50, heads=4, batch=5)
    mem.write(rng.standard_normal((5, 30, 4, 8)), rng.standard_normal((5, 30, 4, 3)))
    calls = []
    run = cpu.run
    monkeypatch.setattr(cpu, "run", lambda p, mode: calls.append(p.Q.shape) or run(p, mode))
    mem.read(rng.standard_normal((5, 2, 8, 8)), k=4)
    mem.read(rng.standard_normal((5, 2, 8, 8)))
    assert calls == [(5 * 2 * 8, 8)] * 2


def test_plan_cuts_query_blocks_where_windows_change(monkeypatch):
    """cpu.plan: rows whose key windows are disjoint never share a block
    (empty windows overlap nothing); overlapping (causal) windows keep the
    plain plan."""
    monkeypatch.setattr(cpu.config, "QUERY_BLOCK", 4)
    lo = np.array([0, 0, 0, 10, 10, 20, 20, 20, 20, 20, 20], np.int64)
    hi = lo + np.array([5, 5, 5, 3, 3, 0, 0, 9, 9, 9, 9])
    qstarts, _ = cpu.plan(lo.size, 40, 2, lo, hi)
    np.testing.assert_array_equal(qstarts, [0, 3, 5, 6, 7, 11])
    causal_hi = np.arange(1, 12, dtype=np.int64)
    qstarts, _ = cpu.plan(11, 11, 2, np.zeros(11, np.int64), causal_hi)
    np.testing.assert_array_equal(qstarts, cpu.plan(11, 11, 2)[0])


def test_clear_some_sequences_leaves_the_others(rng):
    """clear(batch_index) empties those sequences only: the others' entries,
    positions and reads are unchanged (entries bit-identical); the cleared
    ones read zeros and are written from slot 0 again."""
    mem = sr.KNNMemory(4, 2, 10, heads=2, batch=4)
    for n in (7, 6):       # wraps: each sequence's next slot is 3
        mem.write(rng.standard_normal((4, n, 2, 4)), rng.standard_normal((4, n, 2, 2)))
    q = rng.standard_normal((4, 2, 2, 4)).astype(np.float32)
    before = [mem.snapshot(b) for b in range(4)]
    read = mem.read(q, k=3)
    mem.clear(batch_index=[1, 3])
    np.testing.assert_array_equal(mem.sizes, [10, 0, 10, 0])
    after = mem.read(q, k=3)
    for b in (0, 2):
        for x, y in zip(before[b], mem.snapshot(b)):
            np.testing.assert_array_equal(x, y)
        assert_reads_match(sr.MemoryRead(*(a[b] for a in after)),
                           sr.MemoryRead(*(a[b] for a in read)), 3)
    for b in (1, 3):
        assert (after.out[b] == 0).all() and np.isneginf(after.lse[b]).all()
        assert (after.ids[b] == -1).all() and (after.coverage[b] == 0).all()
    mem.clear(2)
    np.testing.assert_array_equal(mem.sizes, [10, 0, 0, 0])
    slots = mem.write(rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 3, 2, 2)),
                      batch_index=[3, 0])
    np.testing.assert_array_equal(slots, [[0, 1, 2], [3, 4, 5]])
    mem.clear()
    assert len(mem) == 0


def encoded(rows, dtype):
    """float32 rows (..., dim) through the storage format and back."""
    flat = rows.reshape(-1, rows.shape[-1])
    data = np.empty(flat.shape, storage.FORMATS[dtype][0])
    scale = np.empty(flat.shape[0], np.float32)
    storage.encode_rows(flat, dtype, data, scale)
    return storage.decode_rows(data, dtype, scale).reshape(rows.shape)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [None, 2])
def test_compact_memory_equals_float32_memory_of_decoded_entries(small_tiles, rng, dtype, batch):
    """A compact memory holds exactly the decoded entries (snapshot) and
    reads within float32 rounding of a float32 memory written with
    storage.decode_rows(encoded); also against the float64 reference."""
    heads, d, dv, cap = 2, 7, 3, 30
    mem = sr.KNNMemory(d, dv, cap, heads=heads, batch=batch, dtype=dtype)
    ref = sr.KNNMemory(d, dv, cap, heads=heads, batch=batch)
    lead = (batch or 1,)
    for n in (20, 17):
        K = rng.standard_normal(lead + (n, heads, d)).astype(np.float32)
        V = rng.standard_normal(lead + (n, heads, dv)).astype(np.float32)
        (K1, V1), (K2, V2) = ((K[0], V[0]), (encoded(K, dtype)[0], encoded(V, dtype)[0])) \
            if batch is None else ((K, V), (encoded(K, dtype), encoded(V, dtype)))
        mem.write(K1, V1)
        ref.write(K2, V2)
    q = rng.standard_normal(lead + (3, 4, d)).astype(np.float32)
    q = q if batch else q[0]
    for b in range(batch or 1):
        for x, y in zip(mem.snapshot(None if batch is None else b),
                        ref.snapshot(None if batch is None else b)):
            np.testing.assert_array_equal(x, y)
    for k in (None, 6):
        assert_reads_match(mem.read(q, k=k), ref.read(q, k=k), k)
    Kd, Vd = mem.snapshot(0 if batch else None)
    qb = q[0] if batch else q
    out, lse = attention_ref(qb[:, 0], Kd[:, 0], Vd[:, 0])
    got = mem.read(q)
    np.testing.assert_allclose((got.out[0] if batch else got.out)[:, 0], out, atol=1e-5)


def test_compact_write_out_of_range_changes_nothing(rng):
    """A float16 write with a value beyond 65504, or NaN in the values, is
    refused (naming the argument) before any slot changes."""
    mem = sr.KNNMemory(3, 2, 5, dtype="float16", batch=2)
    mem.write(rng.standard_normal((2, 4, 1, 3)), rng.standard_normal((2, 4, 1, 2)))
    keys = [mem.snapshot(b) for b in range(2)]
    big = rng.standard_normal((2, 4, 1, 3))
    big[1, 2, 0, 1] = 1e6
    with pytest.raises(ValueError, match="keys exceed the float16 range"):
        mem.write(big, rng.standard_normal((2, 4, 1, 2)))
    with pytest.raises(ValueError, match="values contains NaN"):
        mem.write(rng.standard_normal((2, 4, 1, 3)), np.full((2, 4, 1, 2), np.nan))
    np.testing.assert_array_equal(mem.sizes, [4, 4])
    for b in range(2):
        for x, y in zip(keys[b], mem.snapshot(b)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_batched_compact_save_load_and_pickle_round_trip(tmp_path, rng, dtype):
    mem = sr.KNNMemory(4, 3, 9, heads=2, batch=3, dtype=dtype, metric="cosine")
    mem.write(rng.standard_normal((3, 7, 2, 4)), rng.standard_normal((3, 7, 2, 3)))
    mem.write(rng.standard_normal((2, 5, 2, 4)), rng.standard_normal((2, 5, 2, 3)),
              batch_index=[2, 1])
    q = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    want = mem.read(q, k=4)
    mem.save(tmp_path / "mem")
    for back in (sr.KNNMemory.load(tmp_path / "mem"), pickle.loads(pickle.dumps(mem))):
        assert repr(back) == repr(mem)
        for name in ("_keys", "_values", "_key_scales", "_value_scales", "_size", "_next"):
            np.testing.assert_array_equal(getattr(back, name), getattr(mem, name))
        got = back.read(q, k=4)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)


def test_version_3_memory_still_loads(tmp_path, rng):
    """A folder as version 3 wrote it (float32 (heads, capacity, dim) rings,
    the ring position in meta.json) loads as a memory without batch."""
    mem = sr.KNNMemory(4, 2, 6, heads=2)
    mem.write(rng.standard_normal((8, 2, 4)), rng.standard_normal((8, 2, 2)))
    fields = {"key_dim": 4, "value_dim": 2, "capacity": 6, "heads": 2, "metric": "ip",
              "size": 6, "next": 2}
    persist.save_folder(tmp_path / "v3", memory.FORMAT, 3,
                        {"keys": mem._keys[:, 0], "values": mem._values[:, 0]}, fields)
    back = sr.KNNMemory.load(tmp_path / "v3")
    assert (back.batch, back.dtype, int(back._next[0]), len(back)) == (None, "float32", 2, 6)
    np.testing.assert_array_equal(back._keys, mem._keys)
    back.save(tmp_path / "v3")            # a saved version 3 is replaced by version 4
    assert sr.KNNMemory.load(tmp_path / "v3").snapshot()[1].tolist() == mem.snapshot()[1].tolist()


def test_bad_batch_input(rng):
    mem = sr.KNNMemory(4, 2, 10, heads=2, batch=3)
    ok_k, ok_v = np.ones((3, 2, 2, 4)), np.ones((3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"keys must have shape \(3, n, 2, 4\)"):
        mem.write(np.ones((2, 2, 2, 4)), ok_v)
    with pytest.raises(ValueError, match="keys must have 4 dimensions"):
        mem.write(np.ones((2, 2, 4)), ok_v)
    with pytest.raises(ValueError, match="values"):
        mem.write(ok_k, np.ones((3, 2, 2, 3)))
    for bad in (3, -1, [0, 5]):
        with pytest.raises(ValueError, match="batch_index"):
            mem.write(ok_k[:1], ok_v[:1], batch_index=bad)
        with pytest.raises(ValueError, match="batch_index"):
            mem.clear(batch_index=bad)
    with pytest.raises(ValueError, match="batch_index"):
        mem.write(ok_k[:2], ok_v[:2], batch_index=[1, 1])
    with pytest.raises(TypeError, match="batch_index"):
        mem.clear(batch_index=1.0)
    with pytest.raises(ValueError, match="batch_index"):
        sr.KNNMemory(4, 2, 10).clear(batch_index=0)
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.ones((2, 1, 2, 4)))
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.ones((1, 2, 4)))
    with pytest.raises(ValueError, match="batch_index"):
        mem.snapshot()
    with pytest.raises(ValueError, match="batch"):
        mem.read_backward(np.ones((3, 1, 2, 4)), np.ones((3, 1, 2, 2)))
    with pytest.raises(ValueError, match="batch"):
        sr.memory_attention(np.ones((2, 2, 4)), np.ones((2, 2, 4)), np.ones((2, 2, 2)), mem)
    with pytest.raises(ValueError, match="backward passes take memories without batch"):
        sr.memory_attention_backward(np.ones((2, 2, 4)), np.ones((2, 2, 4)), np.ones((2, 2, 2)), mem,
                                     np.ones((2, 2, 2)), topk=2)
    assert len(mem) == 0


def test_a_first_write_starts_the_packages_threading_layer(tmp_path):
    """The write kernels run through runtime.parallel_call: a process whose
    first kernel call is a write gets the workqueue layer, not Numba's
    default OpenMP threads (which spin beside later reads and neighbours)."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, numba, softretrieval as sr\n"
            "m = sr.KNNMemory(4, 2, 8)\n"
            "m.write(np.ones((3, 4)), np.ones((3, 2)))\n"
            "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=tmp_path)
    assert out.stdout.split()[-1] == "workqueue"


def test_an_empty_batch_index_writes_and_clears_nothing(rng):
    mem = sr.KNNMemory(4, 2, 8, batch=3)
    mem.write(rng.standard_normal((3, 2, 1, 4)), rng.standard_normal((3, 2, 1, 2)))
    before = mem.snapshot(1)
    slots = mem.write(np.zeros((0, 2, 1, 4)), np.zeros((0, 2, 1, 2)), batch_index=[])
    assert slots.shape == (0, 2)
    mem.clear([])
    np.testing.assert_array_equal(mem.sizes, [2, 2, 2])
    for a, b in zip(mem.snapshot(1), before):
        np.testing.assert_array_equal(a, b)
