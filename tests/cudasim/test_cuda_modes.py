"""Every mode on the CUDA kernels (simulator) against the float64 references."""

import numpy as np
import pytest

import softretrieval as sr

from reference import attention_ref, sequence_attention_ref, topk_attention_ref, topk_ref

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("B,N,d", [(1, 37, 5), (7, 50, 3), (9, 5, 4)])
def test_soft_retrieval_with_lse_bias_and_exclusions(rng, B, N, d):
    """B crosses query blocks of 4, N tiles of 8 and splits of 8; N < tile."""
    Q, K, V = (rng.standard_normal(s) for s in ((B, d), (N, d), (N, 2)))
    bias = rng.standard_normal(N)
    bias[0] = -np.inf
    out, lse = sr.attention(Q, K, V, scale=0.7, bias=bias, return_lse=True, device="cuda")
    ref_out, ref_lse = attention_ref(Q, K, V, scale=0.7, bias=bias)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    excl = [np.arange(N)] + [np.array([j % N, (3 * j) % N]) for j in range(1, B)]
    out, lse = sr.attention(Q, K, V, exclude=excl, return_lse=True, device="cuda")
    b = np.zeros((B, N))
    for i, e in enumerate(excl):
        b[i, e] = -np.inf
    for i in range(B):
        o, l_ = attention_ref(Q[i:i + 1], K, V, bias=b[i])
        np.testing.assert_allclose(out[i], o[0], **TOL)
        assert lse[i] == l_[0] if np.isneginf(l_[0]) else abs(lse[i] - l_[0]) < 2e-5
    assert (out[0] == 0).all()


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [1, 6, 60])
def test_topk_and_topk_attention(rng, metric, k):
    Q, K = rng.standard_normal((6, 5)), rng.standard_normal((45, 5))
    bias = rng.standard_normal(45)
    excl = [np.array([1, 2]), np.array([], int), np.array([44]), np.arange(45), np.array([0]), np.array([7])]
    scores, ids = sr.topk(Q, K, k, metric=metric, bias=bias, exclude=excl, device="cuda")
    ref_s, ref_i = topk_ref(Q, K, k, metric, bias=bias, exclude=excl)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, **TOL)
    res = sr.topk_attention(Q, K, None, min(k, 10), scale=0.5, metric=metric, exclude=excl,
                            device="cuda")
    out, r_ids, w, lse, cov = topk_attention_ref(Q, K, None, min(k, 10), scale=0.5, exclude=excl,
                                                 metric=metric)
    np.testing.assert_array_equal(res.ids, r_ids)
    np.testing.assert_allclose(res.out, out, **TOL)
    np.testing.assert_allclose(res.weights, w, **TOL)
    np.testing.assert_allclose(res.coverage, cov, **TOL)


def test_topk_ties_go_to_the_lower_id(rng):
    K = np.repeat(rng.standard_normal((3, 4)), 7, axis=0)      # 7 copies of each key
    Q = rng.standard_normal((3, 4))
    _, ids = sr.topk(Q, K, 9, device="cuda")
    np.testing.assert_array_equal(ids, topk_ref(Q, K, 9)[1])


def test_large_k(rng):
    Q, K = rng.standard_normal((2, 3)), rng.standard_normal((1100, 3))
    scores, ids = sr.topk(Q, K, 1024, device="cuda")
    ref_s, ref_i = topk_ref(Q, K, 1024)
    np.testing.assert_allclose(scores, ref_s, **TOL)
    assert (ids == ref_i).mean() > 0.999 and ids.dtype == np.int64


@pytest.mark.parametrize("H,Hkv", [(4, 2), (2, 2), (3, 1)])
def test_multi_head_causal_window_and_lengths(rng, H, Hkv):
    q = rng.standard_normal((2, 6, H, 5))
    k = rng.standard_normal((2, 9, Hkv, 5))
    v = rng.standard_normal((2, 9, Hkv, 3))
    lens = (np.array([6, 4]), np.array([9, 7]))
    out, lse = sr.attention(q, k, v, causal=True, window=4, seq_lens=lens, return_lse=True,
                            device="cuda")
    ref_out, ref_lse = sequence_attention_ref(q, k, v, causal=True, window=4, q_lens=lens[0],
                                              k_lens=lens[1])
    np.testing.assert_allclose(out, ref_out, **TOL)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], **TOL)
    assert np.isneginf(lse[~fin]).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_index_compact_storage(rng, dtype):
    K, V, Q = rng.standard_normal((30, 6)), rng.standard_normal((30, 2)), rng.standard_normal((5, 6))
    index = sr.Index(6, dtype=dtype, value_dim=2)
    index.add(K, V)
    Kd = index.keys().astype(np.float64)
    out, lse = index.retrieve(Q, return_lse=True, device="cuda")
    ref_out, ref_lse = attention_ref(Q, Kd, V, scale=1.0)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(index.logsumexp(Q, device="cuda"), ref_lse, **TOL)
    np.testing.assert_array_equal(index.search(Q, 4, device="cuda")[1], topk_ref(Q, Kd, 4)[1])
    keys_only = sr.Index(6, dtype=dtype)
    keys_only.add(K)
    np.testing.assert_allclose(keys_only.retrieve(Q, device="cuda"),
                               attention_ref(Q, Kd, Kd, scale=1.0)[0], **TOL)


@pytest.fixture
def copied(monkeypatch):
    """The shapes of the host arrays copied to the device, in order."""
    from softretrieval import cuda as gpu

    shapes = []
    real_view = gpu.device_view

    def spy(a):
        if isinstance(a, np.ndarray):
            shapes.append(a.shape)
        return real_view(a)

    monkeypatch.setattr(gpu, "device_view", spy)
    return shapes


def test_index_keeps_its_arrays_on_the_gpu(rng, copied):
    """The stored keys, values and bias are copied to the device once, reused
    by later calls, and dropped when the index changes or on release_device."""
    from softretrieval import cli

    K, V, Q = rng.standard_normal((30, 6)), rng.standard_normal((30, 2)), rng.standard_normal((5, 6))
    bias = rng.standard_normal(30)
    index = sr.Index(6, value_dim=2)
    index.add(K, V, bias=bias)
    for _ in range(2):
        copied.clear()
        out = index.retrieve(Q, device="cuda")
        np.testing.assert_allclose(out, attention_ref(Q, K, V, scale=1.0, bias=bias)[0], **TOL)
        np.testing.assert_array_equal(index.search(Q, 4, device="cuda")[1],
                                      topk_ref(Q, K, 4, bias=bias)[1])
    assert all(shape[0] != 30 for shape in copied), copied     # nothing catalog-sized moved
    K2, V2 = rng.standard_normal((10, 6)), rng.standard_normal((10, 2))
    index.add(K2, V2)
    Kall, Vall, ball = np.vstack([K, K2]), np.vstack([V, V2]), np.concatenate([bias, np.zeros(10)])
    np.testing.assert_allclose(index.retrieve(Q, device="cuda"),
                               attention_ref(Q, Kall, Vall, scale=1.0, bias=ball)[0], **TOL)
    index.bias = -ball
    np.testing.assert_array_equal(index.search(Q, 4, device="cuda")[1],
                                  topk_ref(Q, Kall, 4, bias=-ball)[1])
    np.testing.assert_array_equal(index.search(Q, 4, bias=False, device="cuda")[1],
                                  topk_ref(Q, Kall, 4)[1])
    index.release_device()
    copied.clear()
    res = cli.score_batches(index, Q, "topk", 4, batch_size=2, progress=False, device="cuda")
    assert (40, 6) in copied
    np.testing.assert_array_equal(res["ids"], index.search(Q, 4)[1])


def test_memory_keeps_its_ring_on_the_gpu(rng, copied):
    """A GPU read copies the ring once; later writes move only their rows
    (across the wrap-around too) and reads match the CPU's."""
    mem = sr.KNNMemory(4, 3, capacity=20, heads=2)
    q = rng.standard_normal((3, 4, 4))
    mem.write(rng.standard_normal((7, 2, 4)), rng.standard_normal((7, 2, 3)))
    for step in range(4):
        copied.clear()
        for k in (None, 5):
            a, b = mem.read(q, k=k, device="cuda"), mem.read(q, k=k)
            np.testing.assert_allclose(a.out, b.out, **TOL)
            np.testing.assert_allclose(a.lse, b.lse, **TOL)
            if k is not None:
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_allclose(a.coverage, b.coverage, **TOL)
        assert ((20, 2, 4) in copied) == (step == 0), copied      # the ring moves once
        mem.write(rng.standard_normal((6, 2, 4)), rng.standard_normal((6, 2, 3)))  # wraps at step 2
    mem.release_device()
    with pytest.raises(ValueError, match="queries"):
        mem.read(np.full((1, 4, 4), np.nan), device="cuda")


@pytest.mark.parametrize("dtype,value_dim", [("float32", 2), ("float16", None)])
def test_index_top_k_attention_on_the_gpu(rng, copied, dtype, value_dim):
    """retrieve_topk with device="cuda" gathers the top-k values on the host
    (no catalog-sized copy of them), like the CPU; the command too."""
    from softretrieval import cli

    K, V, Q = rng.standard_normal((30, 6)), rng.standard_normal((30, 2)), rng.standard_normal((5, 6))
    index = sr.Index(6, dtype=dtype, value_dim=value_dim)
    index.add(K, V if value_dim else None, ids=np.arange(30) * 5)
    for _ in range(2):
        copied.clear()
        a, b = index.retrieve_topk(Q, 4, device="cuda"), index.retrieve_topk(Q, 4)
        np.testing.assert_array_equal(a.ids, b.ids)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, **TOL)
    assert all(shape[0] != 30 for shape in copied), copied
    res = cli.score_batches(index, Q, "topk-attention", 4, batch_size=2, progress=False,
                            device="cuda")
    np.testing.assert_array_equal(res["ids"], b.ids)


def test_memory_write_after_a_gpu_read_is_all_or_nothing(rng, monkeypatch):
    """One-head memories take 2-D rows; a write after a GPU read updates the
    device copy, and if that copy fails the write still completes (the copy
    is dropped and made again by the next GPU read)."""
    mem = sr.KNNMemory(4, 3, capacity=10)
    mem.write(rng.standard_normal((6, 4)), rng.standard_normal((6, 3)))
    q = rng.standard_normal((2, 4))
    mem.read(q, device="cuda")
    mem.write(rng.standard_normal((7, 4)), rng.standard_normal((7, 3)))      # wraps
    np.testing.assert_allclose(mem.read(q, device="cuda").out, mem.read(q).out, **TOL)
    dev_keys = mem._device[0]
    monkeypatch.setattr(type(dev_keys), "copy_to_device",
                        lambda self, *a, **kw: (_ for _ in ()).throw(RuntimeError("device lost")))
    keys, values = rng.standard_normal((3, 4)), rng.standard_normal((3, 3))
    slots = mem.write(keys, values)
    monkeypatch.undo()
    assert mem._device is None and len(mem) == 10
    np.testing.assert_array_equal(mem.snapshot()[0][slots, 0], keys.astype(np.float32))
    np.testing.assert_allclose(mem.read(q, device="cuda").out, mem.read(q).out, **TOL)


@pytest.mark.parametrize("metric,with_bias", [("ip", True), ("l2", False)])
def test_non_finite_keys_are_refused_not_excluded(rng, metric, with_bias):
    """Only a -inf bias excludes a key; -inf in the keys is an error on the GPU too."""
    Q, K = rng.standard_normal((3, 4)), rng.standard_normal((30, 4))
    K[7, 1] = -np.inf
    bias = rng.standard_normal(30) if with_bias else None
    with pytest.raises(ValueError, match="keys"):
        sr.topk(Q, K, 4, metric=metric, bias=bias, device="cuda")
    if with_bias:
        K[7, 1] = 1.0
        bias[7] = -np.inf
        assert not (sr.topk(Q, K, 30, metric=metric, bias=bias, device="cuda")[1] == 7).any()


def test_memory_and_auto_device(rng):
    mem = sr.KNNMemory(4, 3, capacity=20, heads=2)
    mem.write(rng.standard_normal((25, 2, 4)), rng.standard_normal((25, 2, 3)))
    q = rng.standard_normal((3, 4, 4))
    for k in (None, 5):
        a = mem.read(q, k=k, device="cuda")
        b = mem.read(q, k=k)
        np.testing.assert_allclose(a.out, b.out, **TOL)
    for compact in (sr.KNNMemory(4, 3, capacity=20, heads=2, batch=3),
                    sr.KNNMemory(4, 3, capacity=20, heads=2, dtype="int8")):
        with pytest.raises(ValueError, match="device='cuda' reads a float32 memory without batch"):
            compact.read(q[None].repeat(3, 0) if compact.batch else q, device="cuda")
    np.testing.assert_allclose(sr.attention(q[:, 0], q[:, 1], device="auto"),
                               attention_ref(q[:, 0], q[:, 1])[0], **TOL)


def test_non_finite_logits_are_reported(rng):
    Q, K = np.ones((2, 3)) * 1e10, rng.standard_normal((12, 3)) * 1e30   # q.k overflows float32
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="non-finite"):
            sr.attention(Q, K, scale=1.0, device=device)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_device_arrays_in_place_outputs_on_device(rng, metric):
    """Inputs already on the device are read in place and every output stays there."""
    from numba import cuda

    Q, K, V = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (40, 5), (40, 3)))
    bias = rng.standard_normal(40).astype(np.float32)
    bias[2] = -np.inf
    dQ, dK, dV, dbias = (cuda.to_device(a) for a in (Q, K, V, bias))
    out, lse = sr.attention(dQ, dK, dV, scale=0.5, bias=dbias, metric=metric, return_lse=True,
                            device="cuda")
    assert hasattr(out, "copy_to_host") and hasattr(lse, "copy_to_host")
    ref_out, ref_lse = sr.attention(Q, K, V, scale=0.5, bias=bias, metric=metric, return_lse=True)
    np.testing.assert_allclose(out.copy_to_host(), ref_out, **TOL)
    np.testing.assert_allclose(lse.copy_to_host(), ref_lse, **TOL)
    excl = [np.array([1]), np.array([], int), np.arange(40), np.array([5]), np.array([0]), np.array([9])]
    scores, ids = sr.topk(dQ, dK, 45, metric=metric, exclude=excl, device="auto")
    ref_s, ref_i = topk_ref(Q, K, 45, metric, exclude=excl)
    np.testing.assert_array_equal(ids.copy_to_host(), ref_i)
    np.testing.assert_allclose(scores.copy_to_host(), ref_s, **TOL)
    res = sr.topk_attention(dQ, dK, dV, 4, scale=0.5, metric=metric, bias=bias, device="cuda")
    want = sr.topk_attention(Q, K, V, 4, scale=0.5, metric=metric, bias=bias)
    for got, ref in zip(res, want):
        np.testing.assert_allclose(got.copy_to_host(), ref, **TOL)


def test_device_array_errors(rng):
    from numba import cuda

    dQ = cuda.to_device(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="pass device='cuda'"):
        sr.attention(dQ, dQ)
    with pytest.raises(TypeError, match="float32"):
        sr.attention(cuda.to_device(np.ones((2, 3))), dQ, device="cuda")
    with pytest.raises(ValueError, match="dimension"):
        sr.topk(dQ, cuda.to_device(np.ones((4, 2), np.float32)), 1, device="cuda")
    with pytest.raises(ValueError, match="4 heads, not a multiple"):
        sr.attention(cuda.to_device(np.ones((2, 4, 3), np.float32)),
                     cuda.to_device(np.ones((5, 3, 3), np.float32)), device="cuda")
    # where host arrays are read (an Index's add, merge), a device array is refused by name
    with pytest.raises(TypeError, match="keys is on the GPU"):
        sr.Index(3).add(dQ)
    with pytest.raises(TypeError, match="outs is on the GPU"):
        sr.merge(dQ, np.zeros(2, np.float32))


@pytest.mark.parametrize("H,Hkv", [(4, 2), (2, 2), (3, 1)])
def test_device_arrays_multi_head_and_sequences(rng, H, Hkv):
    """Batched sequences on the device, read in place: gathered query heads,
    strided KV heads, causal with a prefix, a window and uneven lengths."""
    from numba import cuda

    q = rng.standard_normal((2, 6, H, 5)).astype(np.float32)
    k = rng.standard_normal((2, 9, Hkv, 5)).astype(np.float32)
    v = rng.standard_normal((2, 9, Hkv, 3)).astype(np.float32)
    lens = (np.array([6, 4]), np.array([9, 7]))
    dq, dk, dv = (cuda.to_device(a) for a in (q, k, v))
    out, lse = sr.attention(dq, dk, dv, causal=True, window=4, seq_lens=lens, return_lse=True,
                            device="cuda")
    ref_out, ref_lse = sr.attention(q, k, v, causal=True, window=4, seq_lens=lens, return_lse=True)
    np.testing.assert_allclose(out.copy_to_host(), ref_out, **TOL)
    np.testing.assert_allclose(lse.copy_to_host(), ref_lse, **TOL)
    s1, i1 = sr.topk(dq, dk, 3, causal=True, seq_lens=lens, device="cuda")
    s2, i2 = sr.topk(q, k, 3, causal=True, seq_lens=lens)
    np.testing.assert_array_equal(i1.copy_to_host(), i2)
    np.testing.assert_allclose(s1.copy_to_host(), s2, **TOL)
    r1 = sr.topk_attention(dq[0], dk[0], dv[0], 4, causal=True, device="cuda")   # (T, H, d)
    r2 = sr.topk_attention(q[0], k[0], v[0], 4, causal=True)
    for got, ref in zip(r1, r2):
        np.testing.assert_allclose(got.copy_to_host(), ref, **TOL)


def test_device_arrays_heads_as_one_launch(rng, monkeypatch):
    """Every head of a call is one launch (problems on the grid's third
    axis): grouped-query heads with a per-head bias and exclusions, strided
    device views, and top-k attention of two batch elements reading their
    own values; against the host path."""
    from numba import cuda

    from softretrieval import cuda as gpu

    launches = []
    real = gpu.launch
    monkeypatch.setattr(gpu, "launch", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    q = rng.standard_normal((7, 4, 5)).astype(np.float32)
    k = rng.standard_normal((30, 2, 5)).astype(np.float32)
    v = rng.standard_normal((30, 2, 3)).astype(np.float32)
    bias = rng.standard_normal((2, 30)).astype(np.float32)
    excl = [np.array([j % 30, (7 * j) % 30]) for j in range(7)]
    dq, dk, dv = (cuda.to_device(a) for a in (q, k, v))
    out, lse = sr.attention(dq, dk, dv, bias=bias, exclude=excl, return_lse=True, device="cuda")
    ref_out, ref_lse = sr.attention(q, k, v, bias=bias, exclude=excl, return_lse=True)
    np.testing.assert_allclose(out.copy_to_host(), ref_out, **TOL)
    np.testing.assert_allclose(lse.copy_to_host(), ref_lse, **TOL)
    s1, i1 = sr.topk(dq, dk, 6, bias=bias, exclude=excl, metric="l2", device="cuda")
    s2, i2 = sr.topk(q, k, 6, bias=bias, exclude=excl, metric="l2")
    np.testing.assert_array_equal(i1.copy_to_host(), i2)
    np.testing.assert_allclose(s1.copy_to_host(), s2, **TOL)
    assert len(launches) == 2
    wide = cuda.to_device(rng.standard_normal((7, 9)).astype(np.float32))
    view = wide[:, 2:7]                                       # a strided (7, 5) view
    got = sr.attention(view, dk[:, 0], dv[:, 1], device="cuda").copy_to_host()
    np.testing.assert_allclose(got, sr.attention(wide.copy_to_host()[:, 2:7], k[:, 0], v[:, 1]), **TOL)
    q4 = rng.standard_normal((2, 5, 2, 5)).astype(np.float32)
    k4 = rng.standard_normal((2, 8, 1, 5)).astype(np.float32)
    v4 = rng.standard_normal((2, 8, 1, 3)).astype(np.float32)
    res = sr.topk_attention(*(cuda.to_device(a) for a in (q4, k4, v4)), 3, device="cuda")
    for got, ref in zip(res, sr.topk_attention(q4, k4, v4, 3)):
        np.testing.assert_allclose(got.copy_to_host(), ref, **TOL)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_backward(rng, metric):
    """attention_backward, logsumexp_backward and topk_attention_backward on
    the CUDA kernel equal the CPU's: a bias with a -inf key, exclusions (one
    row fully excluded), key blocks of 4 and query tiles of 3 crossed."""
    B, N, d, dv = 7, 30, 5, 3
    Q, K, V = rng.standard_normal((B, d)), rng.standard_normal((N, d)), rng.standard_normal((N, dv))
    dO, dlse, bias = rng.standard_normal((B, dv)), rng.standard_normal(B), rng.standard_normal(N)
    bias[4] = -np.inf
    excl = [np.arange(N)] + [np.array([j, (7 * j) % N]) for j in range(1, B)]
    kw = dict(scale=0.6, bias=bias, metric=metric, exclude=excl)
    out, lse = sr.attention(Q, K, V, return_lse=True, **kw)
    for got, want in zip(sr.attention_backward(Q, K, V, out, lse, dO, dlse, device="cuda", **kw),
                         sr.attention_backward(Q, K, V, out, lse, dO, dlse, **kw)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    lse = sr.logsumexp(Q, K, **kw)
    for got, want in zip(sr.logsumexp_backward(Q, K, lse, dlse, device="cuda", **kw)[:2],
                         sr.logsumexp_backward(Q, K, lse, dlse, **kw)[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    res = sr.topk_attention(Q, K, V, 4, **kw)
    for got, want in zip(sr.topk_attention_backward(Q, K, V, res, dO, dlse, device="cuda", **kw),
                         sr.topk_attention_backward(Q, K, V, res, dO, dlse, **kw)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_backward_key_columns_split_and_wide_rows(rng, monkeypatch):
    """Two threads per key (blocks of 2 keys, 4 threads: each thread a share
    of its key's columns), and rows too wide for the block's shared memory,
    which run on the CPU's backward: both equal the CPU."""
    from softretrieval import config

    Q, K, V = rng.standard_normal((5, 7)), rng.standard_normal((11, 7)), rng.standard_normal((11, 3))
    dO = rng.standard_normal((5, 3))
    out, lse = sr.attention(Q, K, V, metric="cosine", return_lse=True)
    want = sr.attention_backward(Q, K, V, out, lse, dO, metric="cosine")
    monkeypatch.setattr(config, "CUDA_BACKWARD_KEYS", 2)
    for shared_bytes in (config.CUDA_SHARED_BYTES, 64):
        monkeypatch.setattr(config, "CUDA_SHARED_BYTES", shared_bytes)
        got = sr.attention_backward(Q, K, V, out, lse, dO, metric="cosine", device="cuda")
        for a, b in zip(got[:3], want[:3]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_backward_heads_and_causal_windows(rng):
    """Grouped-query heads, causal with a window and uneven lengths (query
    tiles outside a key block's windows are skipped)."""
    q = rng.standard_normal((2, 7, 4, 3))
    k = rng.standard_normal((2, 9, 2, 3))
    v = rng.standard_normal((2, 9, 2, 2))
    dO = rng.standard_normal((2, 7, 4, 2))
    kw = dict(causal=True, window=4, seq_lens=(np.array([7, 5]), np.array([9, 6])))
    out, lse = sr.attention(q, k, v, return_lse=True, **kw)
    for got, want in zip(sr.attention_backward(q, k, v, out, lse, dO, device="cuda", **kw)[:3],
                         sr.attention_backward(q, k, v, out, lse, dO, **kw)[:3]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gpu_check_script_correctness_pass():
    """scripts/gpu_check.py's correctness pass runs on tiny shapes and finds
    every check within bounds, so a broken script shows before GPU time is spent."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    res = gpu_check.correctness(np.random.default_rng(0), gpu_check.TINY)
    assert len(res) == 17 and gpu_check.failures(res) == []
    assert gpu_check.failures({"soft": (0.1, 0.0), "topk ip: same ids": (0.0, 0.5),
                               "causal": float("nan")}) == ["soft", "topk ip: same ids", "causal"]


@pytest.mark.parametrize("B", [3, 13])
def test_wide_rows(rng, B):
    """Keys wider than a feature chunk and values wider than a block's
    columns (the decode layout at B = 3, the tiled one at B = 13): any
    width works, with chunks of 4 features and several columns per thread."""
    Q, K, V = rng.standard_normal((B, 23)), rng.standard_normal((29, 23)), rng.standard_normal((29, 41))
    out, lse = sr.attention(Q, K, V, return_lse=True, device="cuda")
    ref_out, ref_lse = attention_ref(Q, K, V)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    np.testing.assert_array_equal(sr.topk(Q, K, 5, device="cuda")[1], topk_ref(Q, K, 5)[1])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_index_removal_updates_and_allow_lists(rng, copied, monkeypatch, share):
    """Removed and updated items and allow-lists (masked: share 0; gathered:
    share 1) on the GPU equal the CPU; a removal moves only the bias."""
    from softretrieval import config

    monkeypatch.setattr(config, "INCLUDE_GATHER_SHARE", share)
    K, V, Q = rng.standard_normal((30, 6)), rng.standard_normal((30, 2)), rng.standard_normal((5, 6))
    index = sr.Index(6, value_dim=2)
    index.add(K, V, ids=np.arange(30) * 2)
    index.search(Q, 3, device="cuda")
    copied.clear()
    index.remove([0, 2, 8])
    index.search(Q, 3, device="cuda")
    assert (30, 6) not in copied and (30, 2) not in copied, copied
    index.update([10, 12], K[:2] * 3)
    include = [np.arange(0, 60, 3)] * 4 + [np.array([], np.int64)]
    for kw in ({}, {"include": include}, {"include": include, "exclude": [[6, 9]] * 5}):
        for got, want in zip(index.search(Q, 4, device="cuda", **kw), index.search(Q, 4, **kw)):
            np.testing.assert_allclose(got, want, **TOL)
        got = index.retrieve(Q, return_lse=True, device="cuda", **kw)
        for a, b in zip(got, index.retrieve(Q, return_lse=True, **kw)):
            np.testing.assert_allclose(a, b, **TOL)
        top = index.retrieve_topk(Q, 3, device="cuda", **kw)
        np.testing.assert_array_equal(top.ids, index.retrieve_topk(Q, 3, **kw).ids)


def test_range_search_is_refused_by_the_cuda_target(rng):
    """Range search runs on the CPU: the CUDA target refuses a range mode,
    and device="cuda" is refused before any copy."""
    from softretrieval import api, cuda
    from softretrieval.devices import Mode

    Q, K = rng.standard_normal((3, 4)), rng.standard_normal((20, 4))
    _, problems = api._problems(Q, K, None, metric="ip", scale=None, bias=None, exclude=None,
                                causal=False, window=None, seq_lens=None, softmax=False)
    (_, p), = problems
    mode = Mode(False, False, 0, np.zeros(3, np.float32), np.arange(4, dtype=np.int64))
    with pytest.raises(ValueError, match="CPU"):
        cuda.run(p, mode)
    with pytest.raises(ValueError, match="CPU"):
        sr.range_search(Q, K, 0.5, device="cuda")
