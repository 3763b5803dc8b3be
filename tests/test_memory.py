"""KNNMemory and memory_attention against float64 references."""

import json
import os
import threading

import numpy as np
import pytest

import softretrieval as sr
from conftest import saved_file

from reference import attention_ref, sequence_attention_ref, topk_attention_ref


def live(mem):
    """The live entries (slots 0..len-1) as (n, heads, dim), as the reference sees them."""
    return mem.snapshot()


def test_soft_and_topk_read_before_and_after_wraparound(small_tiles, rng):
    mem = sr.KNNMemory(6, 3, capacity=50)
    q = rng.standard_normal((7, 6)).astype(np.float32)
    for rounds, expected_len in ((1, 30), (2, 50), (3, 50)):
        keys = rng.standard_normal((30, 6)).astype(np.float32)
        vals = rng.standard_normal((30, 3)).astype(np.float32)
        slots = mem.write(keys, vals)
        assert len(mem) == expected_len
        np.testing.assert_array_equal(slots, (np.arange(30) + 30 * (rounds - 1)) % 50)
        K, V = live(mem)
        np.testing.assert_array_equal(K[slots, 0], keys)
        res = mem.read(q)
        ref_out, ref_lse = attention_ref(q, K[:, 0], V[:, 0])
        np.testing.assert_allclose(res.out, ref_out, atol=1e-5)
        np.testing.assert_allclose(res.lse, ref_lse, rtol=1e-5)
        res = mem.read(q, k=8, scale=0.5)
        out, ids, _, lse, cov = topk_attention_ref(q, K[:, 0], V[:, 0], k=8, scale=0.5)
        np.testing.assert_array_equal(res.ids, ids)
        np.testing.assert_allclose(res.out, out, atol=1e-5)
        np.testing.assert_allclose(res.coverage, cov, atol=1e-5)


def test_multihead_memory_and_grouped_queries(rng):
    mem = sr.KNNMemory(5, 4, capacity=40, heads=2)
    keys = rng.standard_normal((40, 2, 5)).astype(np.float32)
    vals = rng.standard_normal((40, 2, 4)).astype(np.float32)
    mem.write(keys, vals)
    q = rng.standard_normal((3, 4, 5)).astype(np.float32)
    res = mem.read(q)
    ref_out, ref_lse = sequence_attention_ref(q[None], keys[None], vals[None])
    np.testing.assert_allclose(res.out, ref_out[0], atol=1e-5)
    np.testing.assert_allclose(res.lse, ref_lse[0], rtol=1e-5)


def test_empty_memory_reads_zeros(rng):
    mem = sr.KNNMemory(4, 2, capacity=10)
    res = mem.read(np.ones((3, 4), np.float32), k=5)
    assert (res.out == 0).all() and np.isneginf(res.lse).all()
    assert (res.ids == -1).all() and (res.coverage == 0).all()
    mem.write(np.ones((2, 4)), np.ones((2, 2)))
    mem.clear()
    assert len(mem) == 0 and (mem.read(np.ones((1, 4))).out == 0).all()


def test_writing_more_than_capacity_keeps_newest(rng):
    mem = sr.KNNMemory(3, 1, capacity=4)
    keys = rng.standard_normal((10, 3)).astype(np.float32)
    slots = mem.write(keys, np.arange(10, dtype=np.float32)[:, None])
    assert list(slots) == [-1] * 6 + [0, 1, 2, 3]
    assert sorted(mem.snapshot()[1][:, 0, 0]) == [6, 7, 8, 9]


def test_memory_attention_exact_equals_concatenation_reference(small_tiles, rng):
    T, S, H, Hkv, d, dv = 9, 12, 4, 2, 5, 3
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    k = rng.standard_normal((S, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((S, Hkv, dv)).astype(np.float32)
    mem = sr.KNNMemory(d, dv, capacity=60, heads=Hkv)
    mk = rng.standard_normal((60, Hkv, d)).astype(np.float32)
    mv = rng.standard_normal((60, Hkv, dv)).astype(np.float32)
    mem.write(mk, mv)
    out, coverage = sr.memory_attention(q, k, v, mem, topk=6)
    scale = 1 / np.sqrt(d)
    for h in range(H):
        g = h // (H // Hkv)
        _, ids, _, _, cov = topk_attention_ref(q[:, h], mk[:, g], mv[:, g], k=6)
        np.testing.assert_allclose(coverage[:, h], cov, atol=1e-5)
        for t in range(T):
            keys = np.concatenate([mk[ids[t], g], k[: t + S - T + 1, g]])
            vals = np.concatenate([mv[ids[t], g], v[: t + S - T + 1, g]])
            ref, _ = attention_ref(q[t:t + 1, h], keys, vals, scale=scale)
            np.testing.assert_allclose(out[t, h], ref[0], atol=1e-5)


def test_memory_attention_gated(rng):
    q = rng.standard_normal((5, 2, 4)).astype(np.float32)
    k = rng.standard_normal((5, 1, 4)).astype(np.float32)
    v = rng.standard_normal((5, 1, 3)).astype(np.float32)
    mem = sr.KNNMemory(4, 3, capacity=20)
    mem.write(rng.standard_normal((20, 4)), rng.standard_normal((20, 3)))
    gate = np.array([0.25, 0.9])
    out, _ = sr.memory_attention(q, k, v, mem, topk=4, gate=gate)
    local = sr.attention(q, k, v, causal=True)
    remote = mem.read(q, k=4).out
    np.testing.assert_allclose(out, gate[None, :, None] * remote + (1 - gate[None, :, None]) * local,
                               atol=1e-6)
    with pytest.raises(ValueError, match="gate"):
        sr.memory_attention(q, k, v, mem, gate=[0.5, 1.5])


def test_memory_attention_with_empty_memory_is_local(rng):
    q = rng.standard_normal((5, 2, 4)).astype(np.float32)
    k = rng.standard_normal((5, 1, 4)).astype(np.float32)
    mem = sr.KNNMemory(4, 4, capacity=20)
    out, cov = sr.memory_attention(q, k, k, mem, topk=8)
    np.testing.assert_allclose(out, sr.attention(q, k, k, causal=True), atol=1e-6)
    assert (cov == 0).all()


def test_save_load_round_trip_is_bit_exact(tmp_path, rng):
    mem = sr.KNNMemory(4, 2, capacity=8, heads=2, metric="cosine")
    mem.write(rng.standard_normal((11, 2, 4)), rng.standard_normal((11, 2, 2)))
    path = tmp_path / "mem"
    mem.save(path)
    mem.save(path)  # overwriting an existing memory is atomic too
    back = sr.KNNMemory.load(path)
    assert (len(back), back._next, back.metric, back.heads) == (len(mem), mem._next, "cosine", 2)
    np.testing.assert_array_equal(back._keys, mem._keys)
    np.testing.assert_array_equal(back._values, mem._values)
    assert [p for p in os.listdir(tmp_path)] == ["mem"]


def test_damaged_or_truncated_memory_is_refused(tmp_path, rng, refuses_bad_meta):
    mem = sr.KNNMemory(4, 2, capacity=8)
    mem.write(rng.standard_normal((5, 4)), rng.standard_normal((5, 2)))
    path = tmp_path / "mem"
    mem.save(path)
    file = saved_file(path, "keys")
    keys = file.read_bytes()
    file.write_bytes(keys[:-7])
    with pytest.raises(ValueError, match=r"keys\."):
        sr.KNNMemory.load(path)
    file.write_bytes(keys[:-1] + bytes([keys[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        sr.KNNMemory.load(path)
    file.write_bytes(keys)
    meta = json.loads((path / "meta.json").read_text())
    for edit in ({"size": 8}, {"next": 0}, {"metric": "l2"}):   # every field is checksummed
        (path / "meta.json").write_text(json.dumps(dict(meta, **edit)))
        with pytest.raises(ValueError, match="edited"):
            sr.KNNMemory.load(path)
    (path / "meta.json").write_text(json.dumps(meta))
    refuses_bad_meta(sr.KNNMemory.load, path)


def test_concurrent_writes_and_reads_stay_consistent(rng):
    """Each write is one batch whose values all equal its batch number, so a
    read over a consistent snapshot returns a convex mix of whole batches."""
    mem = sr.KNNMemory(8, 1, capacity=64)
    keys = rng.standard_normal((40, 16, 8)).astype(np.float32)
    errors = []

    def writer():
        for b in range(40):
            mem.write(keys[b], np.full((16, 1), b, np.float32))

    def reader():
        for _ in range(40):
            res = mem.read(rng.standard_normal((4, 8)).astype(np.float32), k=16)
            n = (res.ids >= 0).sum(axis=1)
            if not (np.isfinite(res.out).all() and (n <= 64).all()):
                errors.append(res)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(mem) == 64
    assert sorted(set(mem.snapshot()[1][:, 0, 0])) == [36, 37, 38, 39]


@pytest.mark.parametrize("args,exc,match", [
    (dict(key_dim=0, value_dim=2, capacity=4), ValueError, "key_dim"),
    (dict(key_dim=2, value_dim=2, capacity=0), ValueError, "capacity"),
    (dict(key_dim=2, value_dim=2, capacity=2.5), TypeError, "capacity"),
    (dict(key_dim=2, value_dim=2, capacity=4, dtype="int4"), ValueError, "dtype"),
    (dict(key_dim=2, value_dim=2, capacity=4, dtype="float64"), ValueError, "dtype"),
    (dict(key_dim=2, value_dim=2, capacity=4, batch=0), ValueError, "batch"),
    (dict(key_dim=2, value_dim=2, capacity=4, batch=1.5), TypeError, "batch"),
    (dict(key_dim=2, value_dim=2, capacity=4, metric="dot"), ValueError, "metric"),
])
def test_bad_construction(args, exc, match):
    with pytest.raises(exc, match=match):
        sr.KNNMemory(**args)


def test_bad_reads_and_writes(rng):
    mem = sr.KNNMemory(4, 2, capacity=10, heads=2)
    with pytest.raises(ValueError, match="keys"):
        mem.write(np.ones((3, 4)), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="values"):
        mem.write(np.ones((3, 2, 4)), np.ones((3, 2, 3)))
    with pytest.raises(ValueError, match="rows"):
        mem.write(np.ones((3, 2, 4)), np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="keys"):
        mem.write(np.full((1, 2, 4), np.nan), np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.ones((3, 4)))
    with pytest.raises(ValueError, match="capacity"):
        mem.read(np.ones((3, 2, 4)), k=11)
