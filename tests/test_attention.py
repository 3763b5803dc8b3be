"""attention() against the float64 reference: shapes, real data, numerics, bad input."""

import subprocess
import sys

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import config

from reference import attention_ref


def assert_matches(out, lse, ref_out, ref_lse, out_tol=1e-5, lse_tol=1e-4):
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=out_tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=lse_tol, atol=lse_tol)


def make(rng, B, N, d, dv):
    Q = rng.standard_normal((B, d)).astype(np.float32)
    K = rng.standard_normal((N, d)).astype(np.float32)
    V = rng.standard_normal((N, dv)).astype(np.float32)
    return Q, K, V


# (B, N, d, dv): with small_tiles (query block 8, key tile 16, SIMD tile 8,
# SIMD for <= 2 queries, key splits for < 8 queries) these cross every edge.
EDGE_SHAPES = [
    (1, 1, 1, 1), (1, 7, 3, 2), (1, 100, 17, 5), (2, 1, 4, 4), (2, 33, 5, 5),
    (3, 16, 8, 8), (7, 17, 33, 4), (8, 64, 9, 9), (9, 15, 6, 2), (17, 100, 7, 12),
    (40, 257, 13, 3), (64, 1000, 16, 16),
]


@pytest.mark.parametrize("B,N,d,dv", EDGE_SHAPES)
def test_edge_shapes_small_tiles(small_tiles, rng, B, N, d, dv):
    Q, K, V = make(rng, B, N, d, dv)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    assert out.shape == (B, dv) and lse.shape == (B,)
    assert_matches(out, lse, *attention_ref(Q, K, V))


@pytest.mark.parametrize("B,N,d,dv", [(1, 3001, 129, 64), (5, 2500, 32, 7), (16, 4097, 64, 64),
                                       (17, 3000, 31, 16), (300, 5000, 32, 32), (1030, 1500, 20, 8)])
def test_default_tiles(rng, B, N, d, dv):
    Q, K, V = make(rng, B, N, d, dv)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    assert_matches(out, lse, *attention_ref(Q, K, V))


@pytest.mark.parametrize("B", [1, 5, 40])
def test_keys_as_values(small_tiles, rng, B):
    Q, K, _ = make(rng, B, 150, 11, 1)
    out, lse = sr.attention(Q, K, return_lse=True, scale=0.7)
    assert out.shape == (B, 11)
    assert_matches(out, lse, *attention_ref(Q, K, K, scale=0.7))


def test_without_lse_returns_out_only(rng):
    Q, K, V = make(rng, 3, 50, 8, 4)
    out = sr.attention(Q, K, V)
    assert isinstance(out, np.ndarray) and out.shape == (3, 4)


@pytest.mark.parametrize("scale", [None, 20.0])
def test_minilm_real_embeddings(minilm, rng, scale):
    base, query = minilm["base"], minilm["query"][:200]
    values = rng.standard_normal((base.shape[0], 48)).astype(np.float32)
    out, lse = sr.attention(query, base, values, scale=scale, return_lse=True)
    assert_matches(out, lse, *attention_ref(query, base, values, scale=scale))
    out, lse = sr.attention(query[:3], base, scale=scale, return_lse=True)
    assert_matches(out, lse, *attention_ref(query[:3], base, base, scale=scale))


def test_minilm_soft_nearest_neighbour_is_near_top1_at_low_temperature(minilm):
    base, query, gt = minilm["base"], minilm["query"][:50], minilm["gt"]
    out = sr.attention(query, base, scale=1e4)
    np.testing.assert_allclose(out, base[gt[:50, 0]], atol=1e-5)


def test_bias_with_excluded_keys(small_tiles, rng):
    Q, K, V = make(rng, 12, 200, 10, 6)
    bias = rng.standard_normal(200) * 3
    bias[rng.random(200) < 0.6] = -np.inf
    out, lse = sr.attention(Q, K, V, bias=bias, return_lse=True)
    assert_matches(out, lse, *attention_ref(Q, K, V, bias=bias))
    keep = np.isfinite(bias)
    out2, lse2 = sr.attention(Q, K[keep], V[keep], bias=bias[keep], return_lse=True)
    np.testing.assert_allclose(out, out2, atol=1e-6)
    np.testing.assert_allclose(lse, lse2, rtol=1e-6)


@pytest.mark.parametrize("B", [1, 2, 3, 20])
def test_all_keys_excluded_gives_zero_and_minus_inf(small_tiles, rng, B):
    Q, K, V = make(rng, B, 40, 5, 3)
    bias = np.full(40, -np.inf)
    out, lse = sr.attention(Q, K, V, bias=bias, return_lse=True)
    assert (out == 0).all()
    assert np.isneginf(lse).all()


def test_single_valid_key(small_tiles, rng):
    Q, K, V = make(rng, 9, 40, 5, 3)
    bias = np.full(40, -np.inf)
    bias[17] = 0.5
    out, lse = sr.attention(Q, K, V, bias=bias, return_lse=True)
    np.testing.assert_allclose(out, np.repeat(V[17:18], 9, axis=0), atol=1e-6)
    np.testing.assert_allclose(lse, Q @ K[17] / np.sqrt(5) + 0.5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_huge_scale_no_overflow(small_tiles, rng, scale):
    Q, K, V = make(rng, 10, 300, 16, 4)
    Q = K[rng.integers(0, 300, 10)] + 0.01 * Q
    out, lse = sr.attention(Q, K, V, scale=scale, return_lse=True)
    ref_out, ref_lse = attention_ref(Q, K, V, scale=scale)
    assert_matches(out, lse, ref_out, ref_lse)


def test_keys_with_huge_norms(small_tiles, rng):
    Q, K, V = make(rng, 10, 300, 16, 4)
    K *= np.float32(1e4) * rng.random((300, 1)).astype(np.float32)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    assert_matches(out, lse, *attention_ref(Q, K, V))


def test_large_negative_and_positive_bias(small_tiles, rng):
    Q, K, V = make(rng, 6, 100, 8, 4)
    bias = rng.standard_normal(100) * 1e6
    out, lse = sr.attention(Q, K, V, bias=bias, return_lse=True)
    assert_matches(out, lse, *attention_ref(Q, K, V, bias=bias))


def test_scale_zero_is_uniform_average(rng):
    Q, K, V = make(rng, 4, 100, 8, 4)
    out, lse = sr.attention(Q, K, V, scale=0.0, return_lse=True)
    np.testing.assert_allclose(out, np.repeat(V.mean(0, keepdims=True), 4, 0), atol=1e-6)
    np.testing.assert_allclose(lse, np.log(100), rtol=1e-6)


def _configs():
    return [
        dict(NUM_THREADS=1),
        dict(NUM_THREADS=2),
        dict(NUM_THREADS=1, QUERY_BLOCK=8, KEY_TILE=16, KEY_TILE_FEW=8, FEW_TILE_SCORES=0, FEW_QUERIES=2,
             MIN_QUERIES_PER_THREAD=4, MIN_KEYS_PER_SPLIT=8),
        dict(NUM_THREADS=2, QUERY_BLOCK=8, KEY_TILE=16, KEY_TILE_FEW=8, FEW_TILE_SCORES=0, FEW_QUERIES=2,
             MIN_QUERIES_PER_THREAD=4, MIN_KEYS_PER_SPLIT=8),
        dict(NUM_THREADS=2, KEY_TILE=100, KEY_TILE_FEW=33, FEW_TILE_SCORES=0, MIN_KEYS_PER_SPLIT=100),
    ]


@pytest.mark.parametrize("B", [1, 2, 7, 100])
def test_invariant_across_tiles_and_threads(monkeypatch, rng, B):
    Q, K, V = make(rng, B, 3000, 24, 10)
    results = []
    for cfg in _configs():
        with monkeypatch.context() as mp:
            for name, value in cfg.items():
                mp.setattr(config, name, value)
            results.append(sr.attention(Q, K, V, return_lse=True))
    for out, lse in results[1:]:
        np.testing.assert_allclose(out, results[0][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(lse, results[0][1], rtol=1e-6, atol=1e-6)


def blocks(B, nqb):
    """The driver's query-block starts (nqb + 1,) for nqb equal blocks of B rows."""
    return np.minimum(np.arange(nqb + 1, dtype=np.int64) * -(-B // nqb), B)


@pytest.mark.parametrize("nqb,nsplit", [(1, 1), (1, 5), (3, 1), (3, 7), (4, 2)])

def test_driver_any_split(rng, nqb, nsplit):
    """The CPU driver with any number of query blocks and key ranges, merged."""
    from softretrieval import cpu, runtime
    from softretrieval.constants import LOG2E
    from softretrieval.devices import Logits, Masks, Mode, Rows

    Q, K, V = make(rng, 11, 123, 6, 5)
    Qs = (Q * (LOG2E / np.sqrt(6))).astype(np.float32)
    none = np.zeros(0, np.int64)
    f32 = np.zeros(0, np.float32)
    m, l, acc, _, _, _, _, _, _, bad = runtime.parallel_call(
        cpu.stream, Qs, Rows(K, f32, 0, 6), Rows(V, f32, 0, 5), Logits(f32, 0, np.float32(0)),
        Masks(none, none, none, none), (blocks(11, nqb), nsplit, 16, 8, 2, False, False, False), Mode(True, True, 0),
        np.zeros(1, np.int64))
    out, lse = cpu.merge_states(m, l, acc)
    assert bad == 0
    lse = lse.astype(np.float32)
    assert_matches(out, lse, *attention_ref(Q, K, V))


def test_stop_flag_ends_the_stream_before_its_next_tile(rng):
    """What Ctrl-C sets (runtime.parallel_call): the kernel returns at once,
    its states untouched (the caller discards them)."""
    from softretrieval import cpu, runtime
    from softretrieval.constants import NEG_INIT
    from softretrieval.devices import Logits, Masks, Mode, Rows

    Q, K, V = make(rng, 11, 123, 6, 5)
    none = np.zeros(0, np.int64)
    f32 = np.zeros(0, np.float32)
    m, l, acc, _, _, tk_n, _, _, _, _ = runtime.parallel_call(
        cpu.stream, Q.astype(np.float32), Rows(K, f32, 0, 6), Rows(V, f32, 0, 5), Logits(f32, 0, np.float32(0)),
        Masks(none, none, none, none), (blocks(11, 2), 3, 16, 8, 2, False, False, False), Mode(True, True, 4),
        np.ones(1, np.int64))
    assert (m == NEG_INIT).all() and (l == 0).all() and (acc == 0).all() and (tk_n == 0).all()


# ---------------------------------------------------------------- bad input

def test_empty_queries_give_empty_outputs(rng):
    _, K, V = make(rng, 1, 10, 4, 3)
    out, lse = sr.attention(np.zeros((0, 4), np.float32), K, V, return_lse=True)
    assert out.shape == (0, 3) and lse.shape == (0,)


@pytest.mark.parametrize("which,shape", [("queries", (4,)), ("queries", (2, 3, 4)),
                                         ("keys", (10,)), ("keys", (10, 4, 1)), ("values", (10,))])
def test_wrong_rank(rng, which, shape):
    args = dict(queries=np.ones((2, 4), np.float32), keys=np.ones((10, 4), np.float32),
                values=np.ones((10, 3), np.float32))
    args[which] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=which):
        sr.attention(args["queries"], args["keys"], args["values"])


def test_mismatched_dims(rng):
    Q, K, V = make(rng, 2, 10, 4, 3)
    with pytest.raises(ValueError, match="dimension"):
        sr.attention(Q[:, :3], K, V)
    with pytest.raises(ValueError, match="values"):
        sr.attention(Q, K, V[:9])


def test_empty_keys(rng):
    with pytest.raises(ValueError, match="keys is empty"):
        sr.attention(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="zero-length"):
        sr.attention(np.ones((2, 0), np.float32), np.zeros((3, 0), np.float32))


@pytest.mark.parametrize("which", ["queries", "keys", "values"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("B", [1, 40])
def test_non_finite_inputs(small_tiles, rng, which, bad, B):
    args = dict(zip(["queries", "keys", "values"], make(rng, B, 50, 4, 3)))
    args[which][min(1, B - 1) if which == "queries" else 37, 2] = bad
    with pytest.raises(ValueError, match=which):
        sr.attention(args["queries"], args["keys"], args["values"])


def test_nan_in_keys_used_as_values(rng):
    _, K, _ = make(rng, 1, 50, 4, 3)
    K[3, 1] = np.nan
    with pytest.raises(ValueError, match="keys"):
        sr.attention(np.ones((2, 4), np.float32), K)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool, np.complex64, object])
@pytest.mark.parametrize("which", ["queries", "keys", "values"])
def test_non_float_dtypes(which, dtype):
    args = dict(queries=np.ones((2, 4), np.float32), keys=np.ones((10, 4), np.float32),
                values=np.ones((10, 3), np.float32))
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError, match=which):
        sr.attention(args["queries"], args["keys"], args["values"])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_are_converted(rng, dtype):
    Q, K, V = make(rng, 3, 40, 8, 4)
    Q, K, V = Q.astype(dtype), K.astype(dtype), V.astype(dtype)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    assert out.dtype == np.float32
    ref = attention_ref(Q.astype(np.float32), K.astype(np.float32), V.astype(np.float32))
    assert_matches(out, lse, *ref)


def test_float64_beyond_float32_range_is_refused(rng):
    Q, K, V = make(rng, 3, 40, 8, 4)
    K = K.astype(np.float64)
    K[5, 0] = 1e300
    with pytest.raises(ValueError, match="keys"):
        sr.attention(Q, K, V)


def test_non_contiguous_and_read_only_inputs_work(rng):
    Q, K, V = make(rng, 6, 80, 8, 4)
    Kf = np.asfortranarray(K)
    Vs = np.repeat(V, 2, axis=1)[:, ::2]
    Q.setflags(write=False)
    out, lse = sr.attention(Q, Kf, Vs, return_lse=True)
    assert_matches(out, lse, *attention_ref(Q, K, V))
    Qr = np.ascontiguousarray(Q[::2])
    out2 = sr.attention(Q[::2], K, V)
    np.testing.assert_array_equal(out2, sr.attention(Qr, K, V))


def test_lists_are_accepted():
    out = sr.attention([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0], [0.0]], scale=1.0)
    e = np.exp(1.0)
    np.testing.assert_allclose(out, [[e / (e + 1)]], rtol=1e-6)


@pytest.mark.parametrize("bias,exc", [(np.zeros(9), ValueError), (np.zeros((10, 1)), ValueError),
                                      (np.full(10, np.nan), ValueError), (np.full(10, np.inf), ValueError),
                                      (np.array(["a"] * 10), TypeError), (np.zeros(10, complex), TypeError)])
def test_bad_bias(rng, bias, exc):
    Q, K, V = make(rng, 2, 10, 4, 3)
    with pytest.raises(exc, match="bias"):
        sr.attention(Q, K, V, bias=bias)


def test_integer_bias_is_accepted(rng):
    Q, K, V = make(rng, 2, 10, 4, 3)
    bias = np.arange(10)
    assert_matches(*sr.attention(Q, K, V, bias=bias, return_lse=True), *attention_ref(Q, K, V, bias=bias))


@pytest.mark.parametrize("scale,exc", [(np.nan, ValueError), (np.inf, ValueError), ("2", TypeError),
                                       (True, TypeError), (1 + 2j, TypeError)])
def test_bad_scale(rng, scale, exc):
    Q, K, V = make(rng, 2, 10, 4, 3)
    with pytest.raises(exc, match="scale"):
        sr.attention(Q, K, V, scale=scale)


def test_scale_overflowing_float32(rng):
    Q, K, V = make(rng, 2, 10, 4, 3)
    with pytest.raises(ValueError, match="scale"):
        sr.attention(Q, K, V, scale=1e38)
    with pytest.raises(ValueError, match="overflow"):
        sr.attention(Q * 1e19, K * 1e19, V, scale=1.0)


def test_values_overflowing_float32(rng):
    Q, K, V = make(rng, 2, 10, 4, 3)
    V[:] = 3e38
    with pytest.raises(ValueError, match="overflow"):
        sr.attention(Q, K, V, scale=0.0)


def test_without_numba_cuda_cpu_paths_work_and_cuda_names_the_extra():
    """A process where numba-cuda cannot be imported: import softretrieval and
    every CPU path work, "auto" falls back, "cuda" names the extra."""
    code = """
import sys
import numpy as np
sys.modules["numba.cuda"] = None            # as if numba-cuda were not installed
import softretrieval as sr
Q, K = np.ones((2, 3)), np.arange(12.0).reshape(4, 3)
ref = sr.attention(Q, K)
np.testing.assert_allclose(sr.attention(Q, K, device="auto"), ref)
assert sr.topk(Q, K, 2, device="auto")[1].tolist() == [[3, 2], [3, 2]]
index = sr.Index(3)
index.add(K)
assert index.search(Q, 1, device="auto")[1].tolist() == [[3], [3]]
try:
    sr.attention(Q, K, device="cuda")
except ValueError as exc:
    assert "softretrieval[cuda]" in str(exc), exc
else:
    raise AssertionError("device='cuda' did not raise")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    with pytest.raises(ValueError, match="device must be one of"):
        sr.topk(np.ones((2, 3)), np.ones((4, 3)), 1, device="tpu")
