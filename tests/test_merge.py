"""merge(): partial results over disjoint key sets combine into the single-call result."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import softretrieval as sr

from reference import merge_ref


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 6), N=st.integers(1, 60),
       parts=st.integers(1, 6), d=st.integers(1, 9), with_bias=st.booleans())
def test_split_keys_and_merge_equals_single_call(seed, B, N, parts, d, with_bias):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((B, d)).astype(np.float32)
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, 3)).astype(np.float32)
    bias = None
    if with_bias:
        bias = rng.standard_normal(N) * 2
        bias[rng.random(N) < 0.3] = -np.inf
    full_out, full_lse = sr.attention(Q, K, V, bias=bias, return_lse=True)
    owner = rng.integers(0, parts, N)
    outs, lses = [], []
    for p in range(parts):
        sel = owner == p
        if not sel.any():
            continue
        out, lse = sr.attention(Q, K[sel], V[sel], bias=None if bias is None else bias[sel],
                                return_lse=True)
        outs.append(out)
        lses.append(lse)
    out, lse = sr.merge(outs, lses)
    np.testing.assert_allclose(out, full_out, atol=1e-5)
    np.testing.assert_allclose(lse, full_lse, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(full_lse))


def test_merge_matches_float64_reference_with_empty_parts(rng):
    outs = rng.standard_normal((4, 5, 3)).astype(np.float32)
    lses = (rng.standard_normal((4, 5)) * 50).astype(np.float32)
    lses[1, :] = -np.inf
    outs[1, :] = 0
    lses[:, 2] = -np.inf
    outs[:, 2] = 0
    out, lse = sr.merge(outs, lses)
    ref_out, ref_lse = merge_ref(outs, lses)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
    assert (out[2] == 0).all() and np.isneginf(lse[2])


def test_merge_keeps_leading_shape(rng):
    outs = rng.standard_normal((3, 2, 4, 6)).astype(np.float32)
    lses = rng.standard_normal((3, 2, 4)).astype(np.float32)
    out, lse = sr.merge(list(outs), list(lses))
    assert out.shape == (2, 4, 6) and lse.shape == (2, 4)
    ref_out, ref_lse = merge_ref(outs, lses)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


def test_merge_is_associative(rng):
    outs = rng.standard_normal((3, 7, 4)).astype(np.float32)
    lses = (rng.standard_normal((3, 7)) * 10).astype(np.float32)
    left = sr.merge([sr.merge(outs[:2], lses[:2])[0], outs[2]],
                    [sr.merge(outs[:2], lses[:2])[1], lses[2]])
    right = sr.merge([outs[0], sr.merge(outs[1:], lses[1:])[0]],
                     [lses[0], sr.merge(outs[1:], lses[1:])[1]])
    np.testing.assert_allclose(left[0], right[0], atol=1e-6)
    np.testing.assert_allclose(left[1], right[1], rtol=1e-6)


def test_merge_bad_input(rng):
    outs = rng.standard_normal((2, 3, 4)).astype(np.float32)
    lses = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="lses"):
        sr.merge(outs, lses[:, :2])
    with pytest.raises(ValueError, match="lses"):
        sr.merge(outs, np.where(lses > 0, np.nan, lses))
    with pytest.raises(ValueError, match="lses"):
        sr.merge(outs, np.full_like(lses, np.inf))
    with pytest.raises(TypeError, match="lses"):
        sr.merge(outs, lses.astype(int))
    bad = outs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="outs"):
        sr.merge(bad, lses)
    with pytest.raises(ValueError, match="outs"):
        sr.merge(np.zeros((0, 3, 4), np.float32), np.zeros((0, 3), np.float32))
    with pytest.raises(TypeError, match="outs"):
        sr.merge(outs.astype(int), lses)
