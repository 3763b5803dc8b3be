"""Multi-head / grouped-query and causal sequence modes against explicit-mask references."""

import numpy as np
import pytest

import softretrieval as sr

from reference import sequence_attention_ref, topk_attention_ref, topk_ref


def make(rng, batch, T, S, H, Hkv, d, dv):
    return (rng.standard_normal((batch, T, H, d)).astype(np.float32),
            rng.standard_normal((batch, S, Hkv, d)).astype(np.float32),
            rng.standard_normal((batch, S, Hkv, dv)).astype(np.float32))


def assert_close(out, lse, ref_out, ref_lse):
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-4, atol=1e-4)


HEADS = [(1, 1), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 8)]


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("B,N", [(1, 40), (6, 70), (30, 33)])
def test_multihead_retrieval(small_tiles, rng, H, Hkv, B, N):
    q, k, v = make(rng, 1, B, N, H, Hkv, 5, 3)
    out, lse = sr.attention(q[0], k[0], v[0], return_lse=True)
    assert out.shape == (B, H, 3) and lse.shape == (B, H)
    ref_out, ref_lse = sequence_attention_ref(q, k, v)
    assert_close(out, lse, ref_out[0], ref_lse[0])


@pytest.mark.parametrize("bias_shape", ["shared", "per_head"])
def test_multihead_bias(small_tiles, rng, bias_shape):
    q, k, v = make(rng, 1, 9, 50, 4, 2, 6, 3)
    bias = rng.standard_normal((2, 50)) if bias_shape == "per_head" else rng.standard_normal(50)
    bias[..., ::7] = -np.inf
    out, lse = sr.attention(q[0], k[0], v[0], bias=bias, return_lse=True)
    ref_out, ref_lse = sequence_attention_ref(q, k, v, bias=bias)
    assert_close(out, lse, ref_out[0], ref_lse[0])


@pytest.mark.parametrize("H,Hkv", [(1, 1), (4, 2), (8, 1), (8, 8)])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 37), (17, 17), (20, 45), (33, 40)])
@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_causal_prefix_window(small_tiles, rng, H, Hkv, T, S, window):
    q, k, v = make(rng, 1, T, S, H, Hkv, 4, 3)
    out, lse = sr.attention(q[0], k[0], v[0], causal=True, window=window, return_lse=True)
    ref_out, ref_lse = sequence_attention_ref(q, k, v, causal=True, window=window)
    assert_close(out, lse, ref_out[0], ref_lse[0])


@pytest.mark.parametrize("window", [None, 6])
def test_batched_uneven_lengths(small_tiles, rng, window):
    q, k, v = make(rng, 4, 30, 30, 4, 2, 5, 3)
    lens = np.array([30, 17, 1, 0])
    out, lse = sr.attention(q, k, v, causal=True, window=window, seq_lens=lens, return_lse=True)
    ref_out, ref_lse = sequence_attention_ref(q, k, v, causal=True, window=window,
                                              q_lens=lens, k_lens=lens)
    assert_close(out, lse, ref_out, ref_lse)
    assert (out[1, 17:] == 0).all() and np.isneginf(lse[1, 17:]).all() and (out[3] == 0).all()


def test_batched_prefix_lengths_tuple(small_tiles, rng):
    q, k, v = make(rng, 3, 12, 40, 2, 1, 5, 3)
    q_lens, k_lens = np.array([12, 5, 9]), np.array([40, 21, 9])
    out, lse = sr.attention(q, k, v, causal=True, seq_lens=(q_lens, k_lens), return_lse=True)
    ref = sequence_attention_ref(q, k, v, causal=True, q_lens=q_lens, k_lens=k_lens)
    assert_close(out, lse, *ref)


def test_batched_non_causal_lengths(small_tiles, rng):
    q, k, v = make(rng, 2, 10, 10, 2, 2, 5, 3)
    lens = np.array([10, 4])
    out, lse = sr.attention(q, k, v, seq_lens=lens, return_lse=True)
    assert_close(out, lse, *sequence_attention_ref(q, k, v, q_lens=lens, k_lens=lens))


@pytest.mark.parametrize("T,S", [(64, 64), (16, 80)])
def test_causal_off_by_one(small_tiles, T, S):
    """Values are one-hot positions: out[i, j] is the weight on key j."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, 1, 8)).astype(np.float32)
    k = rng.standard_normal((S, 1, 8)).astype(np.float32)
    v = np.eye(S, dtype=np.float32)[:, None, :]
    out = sr.attention(q, k, v, causal=True, scale=0.1)[:, 0]
    for i in range(T):
        last = i + S - T
        assert (out[i, last + 1:] == 0).all(), f"query {i} saw a key after {last}"
        assert out[i, last] > 0, f"query {i} did not see key {last}"


def test_decode_step_sees_all_keys(rng):
    q, k, v = make(rng, 1, 1, 300, 8, 2, 16, 16)
    a = sr.attention(q[0], k[0], v[0], causal=True)
    b = sr.attention(q[0], k[0], v[0])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_gqa_equals_repeated_kv_heads(rng):
    q, k, v = make(rng, 1, 25, 90, 8, 2, 6, 4)
    gqa = sr.attention(q[0], k[0], v[0], causal=True)
    full = sr.attention(q[0], np.repeat(k[0], 4, axis=1), np.repeat(v[0], 4, axis=1), causal=True)
    np.testing.assert_allclose(gqa, full, atol=1e-6)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (8, 1)])
def test_topk_with_heads(small_tiles, rng, H, Hkv):
    q, k, _ = make(rng, 1, 7, 60, H, Hkv, 5, 1)
    scores, ids = sr.topk(q[0], k[0], 9)
    assert scores.shape == (7, H, 9)
    for h in range(H):
        ref_s, ref_i = topk_ref(q[0, :, h], k[0, :, h // (H // Hkv)], 9)
        np.testing.assert_array_equal(ids[:, h], ref_i)
        np.testing.assert_allclose(scores[:, h], ref_s, atol=1e-5)


def test_topk_attention_with_heads(small_tiles, rng):
    q, k, v = make(rng, 1, 6, 50, 4, 2, 5, 3)
    res = sr.topk_attention(q[0], k[0], v[0], k=7)
    assert res.out.shape == (6, 4, 3) and res.ids.shape == (6, 4, 7) and res.coverage.shape == (6, 4)
    for h in range(4):
        g = h // 2
        out, ids, weights, lse, cov = topk_attention_ref(q[0, :, h], k[0, :, g], v[0, :, g], k=7)
        np.testing.assert_array_equal(res.ids[:, h], ids)
        np.testing.assert_allclose(res.out[:, h], out, atol=1e-5)
        np.testing.assert_allclose(res.coverage[:, h], cov, atol=1e-5)
        np.testing.assert_allclose(res.lse[:, h], lse, rtol=1e-5)


def test_causal_topk_attention_full_k_equals_attention(small_tiles, rng):
    q, k, v = make(rng, 1, 20, 20, 2, 1, 5, 3)
    res = sr.topk_attention(q[0], k[0], v[0], k=20, causal=True)
    out, lse = sr.attention(q[0], k[0], v[0], causal=True, return_lse=True)
    np.testing.assert_allclose(res.out, out, atol=1e-5)
    np.testing.assert_allclose(res.coverage, 1, atol=1e-6)


try:
    import torch
except ImportError:
    torch = None


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("H,Hkv", [(8, 2), (4, 4), (4, 1)])
def test_against_torch_sdpa(rng, H, Hkv):
    F = torch.nn.functional
    q, k, v = make(rng, 2, 40, 40, H, Hkv, 16, 16)
    ours = sr.attention(q, k, v, causal=True)
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=1e-5)
    # T != S: torch's is_causal is top-left aligned, so compare with an explicit bottom-right mask
    q2 = q[:, :10]
    ours = sr.attention(q2, k, v, causal=True)
    mask = torch.ones(10, 40, dtype=torch.bool).tril(diagonal=30)
    ref = F.scaled_dot_product_attention(torch.from_numpy(q2).transpose(1, 2), tk, tv, attn_mask=mask,
                                         enable_gqa=True)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_heads_not_divisible(rng):
    q, k, v = make(rng, 1, 3, 10, 6, 4, 5, 3)
    with pytest.raises(ValueError, match="heads"):
        sr.attention(q[0], k[0], v[0])


def test_mismatched_shapes(rng):
    q, k, v = make(rng, 2, 3, 10, 4, 2, 5, 3)
    with pytest.raises(ValueError, match="batch"):
        sr.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="values"):
        sr.attention(q, k, v[:, :9])
    with pytest.raises(ValueError, match="keys"):
        sr.attention(q, k[0], v)


@pytest.mark.parametrize("window,causal,exc", [(0, True, ValueError), (-2, True, ValueError),
                                               (2.5, True, TypeError), (3, False, ValueError)])
def test_bad_window(rng, window, causal, exc):
    q, k, v = make(rng, 1, 3, 10, 2, 1, 5, 3)
    with pytest.raises(exc, match="window"):
        sr.attention(q[0], k[0], v[0], causal=causal, window=window)


@pytest.mark.parametrize("seq_lens,match", [(np.array([5, 11]), "out of range"),
                                            (np.array([-1, 3]), "out of range"),
                                            (np.array([3]), "seq_lens"),
                                            (np.array([1.0, 2.0]), "seq_lens"),
                                            ((np.array([3, 3]),), "tuple")])
def test_bad_seq_lens(rng, seq_lens, match):
    q, k, v = make(rng, 2, 10, 10, 2, 1, 5, 3)
    with pytest.raises(ValueError, match=match):
        sr.attention(q, k, v, causal=True, seq_lens=seq_lens)


def test_seq_lens_needs_batched_inputs(rng):
    q, k, v = make(rng, 1, 10, 10, 2, 1, 5, 3)
    with pytest.raises(ValueError, match="seq_lens"):
        sr.attention(q[0], k[0], v[0], causal=True, seq_lens=np.array([3]))


def test_single_seq_lens_needs_equal_lengths(rng):
    q, k, v = make(rng, 2, 10, 12, 2, 1, 5, 3)
    with pytest.raises(ValueError, match="T == S"):
        sr.attention(q, k, v, causal=True, seq_lens=np.array([3, 4]))


def test_exclude_not_with_causal(rng):
    q, k, v = make(rng, 1, 4, 10, 2, 1, 5, 3)
    with pytest.raises(ValueError, match="exclude"):
        sr.attention(q[0], k[0], v[0], causal=True, exclude=[np.array([1])] * 4)


def test_causal_must_be_bool(rng):
    q, k, v = make(rng, 1, 4, 10, 2, 1, 5, 3)
    with pytest.raises(TypeError, match="causal"):
        sr.attention(q[0], k[0], v[0], causal="yes")


def test_exclude_with_heads(small_tiles, rng):
    q, k, v = make(rng, 1, 5, 40, 4, 2, 5, 3)
    lists = [rng.choice(40, 15, replace=False) for _ in range(5)]
    lists[3] = np.arange(40)
    out, lse = sr.attention(q[0], k[0], v[0], exclude=lists, return_lse=True)
    scores, ids = sr.topk(q[0], k[0], 6, exclude=lists)
    for h in range(4):
        g = h // 2
        o, l = sr.attention(q[0, :, h], k[0, :, g], v[0, :, g], exclude=lists, return_lse=True)
        np.testing.assert_allclose(out[:, h], o, atol=1e-6)
        np.testing.assert_allclose(lse[:, h], l, rtol=1e-6)
        np.testing.assert_array_equal(ids[:, h], topk_ref(q[0, :, h], k[0, :, g], 6, exclude=lists)[1])
    assert (out[3] == 0).all() and (ids[3] == -1).all()


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4), (2, 1)])
def test_queries_are_never_modified(rng, T, H, Hkv):
    """Each KV head's queries are scaled in a copy of the caller's array
    (api._each_problem), never in the array itself: with one query per
    sequence, a head-major view of it would be contiguous, and scaling in
    place would have overwritten the caller's queries."""
    q, k, v = make(rng, 2, T, 9, H, Hkv, 6, 3)
    for queries in (q, q[0]):
        before = queries.copy()
        sr.attention(queries, k[0] if queries.ndim == 3 else k, v[0] if queries.ndim == 3 else v)
        sr.topk(queries, k[0] if queries.ndim == 3 else k, 3)
        np.testing.assert_array_equal(queries, before)
