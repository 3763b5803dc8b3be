"""attention_backward against the float64 references of tests/reference.py
(dense scores, explicit masks, the analytic gradients), which are themselves
checked by finite differences."""

import numpy as np
import pytest

import softretrieval as sr

from reference import (attention_grads_ref, attention_ref, exclusion_mask, sequence_attention_ref,
                       sequence_grads_ref)

TOL = dict(rtol=2e-4, atol=2e-5)


def close(got, ref, tol=TOL):
    got = np.asarray(got)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, **tol)


def run(Q, K, V, dO, dlse=None, **kw):
    """Forward, then backward, as a user would call them."""
    out, lse = sr.attention(Q, K, V, return_lse=True, **kw)
    return sr.attention_backward(Q, K, V, out, lse, dO, dlse, **kw)


def test_reference_gradients_match_finite_differences(rng):
    """The analytic float64 reference is right: central differences of
    loss = sum(out * W) + sum(lse * u) for every metric, with a bias and
    an excluded pair."""
    B, N, d, dv = 3, 6, 4, 2
    Q, K, V = rng.standard_normal((B, d)), rng.standard_normal((N, d)), rng.standard_normal((N, dv))
    W, u, bias = rng.standard_normal((B, dv)), rng.standard_normal(B), rng.standard_normal(N)
    mask = np.zeros((B, N), bool)
    mask[1, 2] = True
    for metric in ("ip", "cosine", "l2"):
        def loss(Q, K, V, bias):
            z = logits(Q, K, metric) + bias
            z[mask] = -np.inf
            m = z.max(1, keepdims=True)
            P = np.exp(z - m)
            lse = np.log(P.sum(1)) + m[:, 0]
            return ((P / P.sum(1, keepdims=True)) @ V * W).sum() + (lse * u).sum()

        ref = attention_grads_ref(Q, K, V, W, u, scale=0.8, bias=bias, metric=metric, mask=mask)
        args = [Q, K, V, bias]
        for arg, grad in zip(range(4), ref):
            np.testing.assert_allclose(grad, numeric_grad(loss, args, arg, 1e-6), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{metric} {arg}")


def numeric_grad(loss, args, arg, eps):
    """Central differences of ``loss(*args)`` with respect to ``args[arg]``."""
    num = np.zeros_like(args[arg])
    for idx in np.ndindex(num.shape):
        hi = [a.copy() for a in args]
        lo = [a.copy() for a in args]
        hi[arg][idx] += eps
        lo[arg][idx] -= eps
        num[idx] = (loss(*hi) - loss(*lo)) / (2 * eps)
    return num


def logits(Q, K, metric, scale=0.8):
    if metric == "ip":
        return scale * Q @ K.T
    if metric == "cosine":
        qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        return scale * qn @ (K / np.linalg.norm(K, axis=1, keepdims=True)).T
    return -scale * ((Q[:, None, :] - K[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("B,N,d,dv", [(1, 5, 3, 2), (9, 37, 5, 3), (20, 70, 7, 9), (3, 1, 4, 1)])
def test_retrieval_gradients_across_tiles(small_tiles, rng, metric, B, N, d, dv):
    """Bias (one key at -inf), per-query exclusions (one row fully
    excluded), grad_lse, d odd, N smaller than a tile and across tiles and
    splits (small_tiles): every gradient equals the float64 reference."""
    Q, K, V = rng.standard_normal((B, d)), rng.standard_normal((N, d)), rng.standard_normal((N, dv))
    dO, dlse = rng.standard_normal((B, dv)), rng.standard_normal(B)
    bias = rng.standard_normal(N)
    bias[0] = -np.inf
    excl = [np.arange(N)] + [np.array([j % N, (5 * j) % N]) for j in range(1, B)]
    g = run(Q, K, V, dO, dlse, scale=0.6, bias=bias, metric=metric, exclude=excl)
    ref = attention_grads_ref(Q, K, V, dO, dlse, scale=0.6, bias=bias, metric=metric,
                              mask=exclusion_mask(B, N, excl))
    for got, want in zip(g, ref):
        close(got, want)
    assert (g.queries[0] == 0).all()
    assert g.bias.shape == (N,) and g.bias[0] == 0


def test_keys_as_values_and_no_lse_gradient(small_tiles, rng):
    """values=None: the keys also serve as values, so their gradient holds
    both parts (grads.values is None); grad_lse omitted means zero."""
    Q, K = rng.standard_normal((6, 4)), rng.standard_normal((30, 4))
    dO = rng.standard_normal((6, 4))
    g = run(Q, K, None, dO)
    dQ, dK, dV, _ = attention_grads_ref(Q, K, K, dO)
    close(g.queries, dQ)
    close(g.keys, dK + dV)
    assert g.values is None and g.bias is None


@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 3), (4, 1)])
def test_heads_causal_window_and_lengths(small_tiles, rng, H, Hkv):
    """Grouped-query heads sum into their KV head; causal with a prefix, a
    sliding window, uneven lengths and a per-head bias."""
    batch, T, S, d, dv = 2, 11, 14, 5, 3
    q = rng.standard_normal((batch, T, H, d))
    k = rng.standard_normal((batch, S, Hkv, d))
    v = rng.standard_normal((batch, S, Hkv, dv))
    dO, dlse = rng.standard_normal((batch, T, H, dv)), rng.standard_normal((batch, T, H))
    bias = rng.standard_normal((Hkv, S))
    lens = (np.array([11, 7]), np.array([14, 9]))
    kw = dict(causal=True, window=6, seq_lens=lens, bias=bias, scale=0.5)
    g = run(q, k, v, dO, dlse, **kw)
    ref = sequence_grads_ref(q, k, v, dO, dlse, scale=0.5, causal=True, window=6, q_lens=lens[0],
                             k_lens=lens[1], bias=bias)
    for got, want in zip(g, ref):
        close(got, want)
    out, lse = sequence_attention_ref(q, k, v, scale=0.5, causal=True, window=6, q_lens=lens[0],
                                      k_lens=lens[1], bias=bias)
    assert np.isneginf(lse[1, 7:]).all() and (g.queries[1, 7:] == 0).all()


def test_multi_head_retrieval(small_tiles, rng):
    """(B, H, d) queries over (N, Hkv, d) keys with exclusions per query."""
    B, N, H, Hkv, d = 5, 23, 4, 2, 3
    q, k, v = (rng.standard_normal(s) for s in ((B, H, d), (N, Hkv, d), (N, Hkv, 2)))
    dO = rng.standard_normal((B, H, 2))
    excl = [np.array([1, 4]), np.array([], int), np.array([22]), np.array([0, 5]), np.array([9])]
    g = run(q, k, v, dO, exclude=excl)
    mask = exclusion_mask(B, N, excl)
    for h in range(H):
        ref = attention_grads_ref(q[:, h], k[:, h // 2], v[:, h // 2], dO[:, h], mask=mask)
        close(g.queries[:, h], ref[0])
    dk = sum(attention_grads_ref(q[:, h], k[:, h // 2], v[:, h // 2], dO[:, h], mask=mask)[1]
             for h in (0, 1))
    close(g.keys[:, 0], dk)


def test_real_embeddings(minilm):
    """The shipped MiniLM vectors (384-d): queries against 2,000 keys."""
    Q, K = minilm["query"][:40], minilm["base"][:2000]
    dO = np.random.default_rng(0).standard_normal((40, 384)).astype(np.float32)
    g = run(Q, K, K, dO, scale=20.0, metric="cosine")
    ref = attention_grads_ref(Q, K, K, dO, scale=20.0, metric="cosine")
    for got, want in zip(g[:3], ref[:3]):
        close(got, want, dict(rtol=1e-3, atol=1e-4))


def test_extreme_inputs_stay_finite(rng):
    """A huge scale (softmax nearly one-hot), -inf biases, a row with no
    valid key: finite gradients, zeros where no weight flows."""
    Q, K, V = rng.standard_normal((4, 8)), rng.standard_normal((50, 8)), rng.standard_normal((50, 3))
    dO = rng.standard_normal((4, 3))
    bias = np.zeros(50)
    bias[10:] = -np.inf
    excl = [np.arange(10), np.array([], int), np.array([], int), np.array([], int)]
    g = run(Q, K, V, dO, scale=1e4, bias=bias, exclude=excl)
    ref = attention_grads_ref(Q, K, V, dO, scale=1e4, bias=bias, mask=exclusion_mask(4, 50, excl))
    assert all(np.isfinite(a).all() for a in g)
    assert (g.queries[0] == 0).all() and (g.keys[10:] == 0).all() and (g.values[10:] == 0).all()
    # logits near 1e4 carry float32 rounding of ~1e-3 (forward and backward alike)
    close(g.values, ref[2], dict(rtol=5e-2, atol=2e-2))


def test_bad_input(rng):
    Q, K, V = rng.standard_normal((3, 4)), rng.standard_normal((10, 4)), rng.standard_normal((10, 2))
    out, lse = attention_ref(Q, K, V)
    dO = np.ones((3, 2))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        sr.attention_backward(Q, K, V, out, lse, np.ones((3, 3)))
    with pytest.raises(ValueError, match="lse must have shape"):
        sr.attention_backward(Q, K, V, out, lse[:2], dO)
    with pytest.raises(ValueError, match="grad_lse must have shape"):
        sr.attention_backward(Q, K, V, out, lse, dO, np.ones(4))
    with pytest.raises(ValueError, match="out must have shape"):
        sr.attention_backward(Q, K, V, out.T, lse, dO)
    with pytest.raises(ValueError, match="lse holds NaN"):
        sr.attention_backward(Q, K, V, out, np.full(3, np.nan), dO)
    with pytest.raises(ValueError, match="device must be one of"):
        sr.attention_backward(Q, K, V, out, lse, dO, device="gpu")
    with pytest.raises(ValueError, match="out is required"):
        sr.attention_backward(Q, K, V, None, lse, dO)
    with pytest.raises(ValueError, match="out holds NaN"):
        sr.attention_backward(Q, K, V, np.full_like(out, np.nan), lse, dO)
    res = sr.topk_attention(Q, K, V, 3)
    with pytest.raises(TypeError, match="TopKAttention"):
        sr.topk_attention_backward(Q, K, V, tuple(res), dO)
    with pytest.raises(ValueError, match="out is required"):
        sr.topk_attention_backward(Q, K, V, res._replace(out=None), dO)
    with pytest.raises(ValueError, match="metric"):
        sr.attention_backward(Q, K, V, out, lse, dO, metric="dot")


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_logsumexp_and_its_backward(small_tiles, rng, metric):
    """sr.logsumexp equals the reference lse, and logsumexp_backward the
    reference gradients of sum(lse * u) (no values: grads.values is None)."""
    B, N, d = 9, 41, 6
    Q, K = rng.standard_normal((B, d)), rng.standard_normal((N, d))
    u, bias = rng.standard_normal(B), rng.standard_normal(N)
    excl = [np.array([2, 3])] * B
    lse = sr.logsumexp(Q, K, scale=0.9, bias=bias, metric=metric, exclude=excl)
    mask = exclusion_mask(B, N, excl)
    ref_z = np.where(mask, -np.inf, logits(Q, K, metric, 0.9) + bias)
    np.testing.assert_allclose(lse, np.log(np.exp(ref_z).sum(1)), rtol=1e-5, atol=1e-5)
    g = sr.logsumexp_backward(Q, K, lse, u, scale=0.9, bias=bias, metric=metric, exclude=excl)
    ref = attention_grads_ref(Q, K, K, np.zeros((B, d)), u, scale=0.9, bias=bias, metric=metric,
                              mask=mask)
    close(g.queries, ref[0])
    close(g.keys, ref[1])
    close(g.bias, ref[3])
    assert g.values is None


def test_l2_far_from_the_origin(rng):
    """l2 on data centred far from the origin (the forward centres them on a
    copy): the gradients are those of the raw data."""
    Q = rng.standard_normal((5, 4)) + 100.0
    K = rng.standard_normal((60, 4)) + 100.0
    V, dO = rng.standard_normal((60, 2)), rng.standard_normal((5, 2))
    g = run(Q, K, V, dO, metric="l2", scale=0.3)
    ref = attention_grads_ref(Q, K, V, dO, scale=0.3, metric="l2")
    for got, want in zip(g[:3], ref[:3]):
        close(got, want, dict(rtol=1e-3, atol=1e-4))


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_topk_attention_backward(small_tiles, rng, metric):
    """out's gradient flows only to each query's selected keys (the float64
    reference with every other key masked), lse's to every key (the full
    reference with no value gradient); k > N pads, exclusions and a bias."""
    B, N, d, dv, k = 7, 40, 5, 3, 6
    Q, K, V = rng.standard_normal((B, d)), rng.standard_normal((N, d)), rng.standard_normal((N, dv))
    dO, dlse, bias = rng.standard_normal((B, dv)), rng.standard_normal(B), rng.standard_normal(N)
    excl = [np.array([1, 2])] * (B - 1) + [np.arange(N - 3)]      # the last query has 3 keys left
    kw = dict(scale=0.7, bias=bias, metric=metric, exclude=excl)
    res = sr.topk_attention(Q, K, V, k, **kw)
    g = sr.topk_attention_backward(Q, K, V, res, dO, dlse, **kw)
    mask = exclusion_mask(B, N, excl)
    unselected = np.ones((B, N), bool)
    for i in range(B):
        unselected[i, res.ids[i][res.ids[i] >= 0]] = False
    part_out = attention_grads_ref(Q, K, V, dO, None, mask=unselected, scale=0.7, bias=bias,
                                   metric=metric)
    part_lse = attention_grads_ref(Q, K, V, np.zeros((B, dv)), dlse, mask=mask, scale=0.7,
                                   bias=bias, metric=metric)
    for got, a, b in zip(g, part_out, part_lse):
        close(got, a + b)
    assert (res.ids[-1, 3:] == -1).all()


@pytest.mark.parametrize("gate", [None, [0.25, 0.75]])
def test_memory_attention_backward(rng, gate):
    """memory_attention_backward against central finite differences of the
    forward itself (float64 differences of a float32 forward, so eps = 1e-3
    and a 2% tolerance), for q, k, v and the gate; the memory's values'
    gradient (memory_grad=True) against the dense reference over each
    query's selected entries."""
    T, H, d, dv = 5, 2, 3, 2
    memory = sr.KNNMemory(d, dv, capacity=12, heads=H)
    memory.write(rng.standard_normal((15, H, d)), rng.standard_normal((15, H, dv)))
    q, k, v = (rng.standard_normal(s) for s in ((T, H, d), (T, H, d), (T, H, dv)))
    W = rng.standard_normal((T, H, dv))
    g = sr.memory_attention_backward(q, k, v, memory, W, topk=3, gate=gate, memory_grad=True)

    def loss(q, k, v, gate=None):
        return float((sr.memory_attention(q, k, v, memory, topk=3, gate=gate)[0] * W).sum())

    args = [q, k, v] + ([] if gate is None else [np.array(gate, float)])
    for i, grad in enumerate([g.q, g.k, g.v] + ([] if gate is None else [g.gate])):
        np.testing.assert_allclose(grad, numeric_grad(loss, args, i, 1e-3), rtol=2e-2, atol=2e-3,
                                   err_msg=str(i))
    assert g.memory_values.shape == (12, H, dv) and g.memory_keys.shape == (12, H, d)
    ids = memory.read(q, k=3).ids
    assert (g.memory_values[np.setdiff1d(np.arange(12), ids[:, 0]), 0] == 0).all()


@pytest.mark.parametrize("k", [None, 4])
def test_memory_read_backward(rng, k):
    """KNNMemory.read_backward: the exact soft read and the top-k read against
    the float64 reference over the live entries (every one, or each query's
    selected ones for out and every one for lse); memory_grad returns the
    entries' gradients, a one-head memory takes 2-D queries."""
    memory = sr.KNNMemory(3, 2, capacity=10, heads=1)
    memory.write(rng.standard_normal((13, 3)), rng.standard_normal((13, 2)))   # wraps
    q, dO, dlse = rng.standard_normal((4, 3)), rng.standard_normal((4, 2)), rng.standard_normal(4)
    g = memory.read_backward(q, dO, dlse, k=k, memory_grad=True)
    keys, values = (a[:, 0] for a in memory.snapshot())
    mask = None
    if k is not None:
        ids = memory.read(q, k=k).ids
        mask = np.ones((4, 10), bool)
        mask[np.arange(4)[:, None], ids] = False
    out_part = attention_grads_ref(q, keys, values, dO, None, mask=mask)
    lse_part = attention_grads_ref(q, keys, values, np.zeros((4, 2)), dlse)
    close(g.queries, out_part[0] + lse_part[0])
    close(g.keys[:, 0], out_part[1] + lse_part[1])
    close(g.values[:, 0], out_part[2])
    assert memory.read_backward(q, dO, k=k).keys is None
