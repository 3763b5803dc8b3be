"""CPU drivers: tiling, the parallel split, and BLAS, around the shared core.

Work is cut into ``nqb x nsplit`` items: ``nqb`` equal query blocks times
``nsplit`` key ranges. Each item streams its key range tile by tile and keeps
one online-softmax state per query (see :mod:`softretrieval.core`); the states
of the key ranges are then merged with :func:`core.merge_pair`. The B x N
score matrix never exists: only one ``(query block, key tile)`` score tile per
item does.

Inputs reach these functions already validated by :mod:`softretrieval.api`:
C-contiguous float32, queries pre-multiplied by ``scale * log2(e)`` and the
bias by ``log2(e)`` (excluded keys at :data:`core.MASKED`).
"""

import numpy as np
from numba import njit, prange

from . import config, core, runtime
from .constants import NEG_INIT
from .core import float32_from_bits

exp2 = core.cpu.exp2
rescale = core.cpu.rescale
merge_pair = core.cpu.merge_pair
finalize = core.cpu.finalize

# Fast-math without 'nnan'/'ninf': loops still vectorize (reassociation), and
# a NaN or inf among the scores stays detectable, see ``_softmax_tile``.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


_EXPONENT = np.int32(0x7F800000)
_MAGNITUDE = np.int32(0x7FFFFFFF)


@njit(cache=True)
def _row_max_finite(bits):
    """Max of a float32 vector given as its int32 bits, and whether all are finite.

    Works on the bits because LLVM vectorizes integer max reductions but not
    Numba's float ``max``: ``b ^ ((b >> 31) & 0x7FFFFFFF)`` orders the bit
    patterns of floats like the floats themselves (and is its own inverse).
    A value is NaN or inf when its exponent bits are all set.
    """
    best = np.int32(-2147483647)
    expo = np.int32(0)
    for j in range(bits.shape[0]):
        b = bits[j]
        best = max(best, b ^ ((b >> 31) & _MAGNITUDE))
        expo = max(expo, b & _EXPONENT)
    mx = float32_from_bits(best ^ ((best >> 31) & _MAGNITUDE))
    return mx, expo != _EXPONENT


@njit(fastmath=_FAST, cache=True)
def _softmax_tile(S, bias, has_bias, m, l, corr):
    """Online-softmax update of a block of states by one tile of scores.

    S (bq, tn) float32: base-2 logits without bias, overwritten by the
    weights ``2 ** (t - m_new)``. bias (tn,) float32, read when ``has_bias``.
    m, l, corr (bq,) float32: the states' max and sum, updated in place, and
    the factor ``corr`` by which each accumulator must be rescaled.
    Returns the number of rows that held a NaN or inf score.
    """
    bad = 0
    bits = S.view(np.int32)
    for i in range(S.shape[0]):
        row = S[i]
        if has_bias:
            for j in range(row.shape[0]):
                row[j] += bias[j]
        mx, finite = _row_max_finite(bits[i])
        if not finite:
            bad += 1
        m_new, c = rescale(m[i], mx)
        total = np.float32(0.0)
        for j in range(row.shape[0]):
            p = exp2(row[j] - m_new)
            row[j] = p
            total += p
        l[i] = l[i] * c + total
        m[i] = m_new
        corr[i] = c
    return bad


@njit(fastmath=_FAST, cache=True)
def _range_block(Qb, K, V, bias, has_bias, k0, k1, ktile, m, l, acc):
    """Stream keys ``k0:k1`` into the states of a block of several queries.

    Qb (bq, d), K (N, d), V (N, dv), bias (N,) or (0,): float32.
    m, l (bq,) and acc (bq, dv) float32: the block's states, updated.
    Scores and the weighted values are BLAS products on one tile at a time.
    """
    bq = Qb.shape[0]
    dv = V.shape[1]
    scores = np.empty(bq * ktile, np.float32)
    pv = np.empty((bq, dv), np.float32)
    corr = np.empty(bq, np.float32)
    bad = 0
    for t0 in range(k0, k1, ktile):
        t1 = min(t0 + ktile, k1)
        S = scores[: bq * (t1 - t0)].reshape((bq, t1 - t0))
        np.dot(Qb, K[t0:t1].T, S)
        bad += _softmax_tile(S, bias[t0:t1], has_bias, m, l, corr)
        np.dot(S, V[t0:t1], pv)
        for i in range(bq):
            a = acc[i]
            p = pv[i]
            for c in range(dv):
                a[c] = a[c] * corr[i] + p[c]
    return bad


@njit(fastmath=_FAST, cache=True)
def _range_few(Qb, K, V, bias, has_bias, k0, k1, ktile, m, l, acc):
    """As :func:`_range_block` for a few queries, with SIMD loops, not BLAS.

    Each key and value row is loaded once and used by every query of the
    block; for one query this is a bandwidth-bound streaming loop.
    """
    bq, d = Qb.shape
    dv = V.shape[1]
    scores = np.empty(bq * ktile, np.float32)
    corr = np.empty(bq, np.float32)
    bad = 0
    for t0 in range(k0, k1, ktile):
        t1 = min(t0 + ktile, k1)
        Kt = K[t0:t1]
        Vt = V[t0:t1]
        S = scores[: bq * (t1 - t0)].reshape((bq, t1 - t0))
        for j in range(t1 - t0):
            k = Kt[j]
            for i in range(bq):
                q = Qb[i]
                dot = np.float32(0.0)
                for c in range(d):
                    dot += q[c] * k[c]
                S[i, j] = dot
        bad += _softmax_tile(S, bias[t0:t1], has_bias, m, l, corr)
        for i in range(bq):
            a = acc[i]
            for c in range(dv):
                a[c] *= corr[i]
        for j in range(t1 - t0):
            v = Vt[j]
            for i in range(bq):
                p = S[i, j]
                a = acc[i]
                for c in range(dv):
                    a[c] += p * v[c]
    return bad


@njit(parallel=True, cache=True, nogil=True)
def soft_states(Q, K, V, bias, has_bias, nqb, nsplit, ktile, ktile_few, few_queries):
    """Online-softmax states of every query over ``nsplit`` key ranges.

    Q (B, d), K (N, d), V (N, dv), bias (N,) or (0,): float32, C-contiguous.
    Query blocks of at most ``few_queries`` use SIMD loops over tiles of
    ``ktile_few`` keys, larger ones BLAS over tiles of ``ktile`` keys.
    Returns ``(m, l, acc, bad)``: m, l (nsplit, B) and acc (nsplit, B, dv)
    float32, one state per key range, and ``bad`` the count of (query, tile)
    pairs that met a NaN or inf score.
    """
    B = Q.shape[0]
    N = K.shape[0]
    dv = V.shape[1]
    qblock = (B + nqb - 1) // nqb
    split = (N + nsplit - 1) // nsplit
    m = np.full((nsplit, B), NEG_INIT, np.float32)
    l = np.zeros((nsplit, B), np.float32)
    acc = np.zeros((nsplit, B, dv), np.float32)
    bad = np.zeros(nqb * nsplit, np.int64)
    for w in prange(nqb * nsplit):
        qb = w // nsplit
        sp = w - qb * nsplit
        q0 = qb * qblock
        q1 = min(B, q0 + qblock)
        k0 = sp * split
        k1 = min(N, k0 + split)
        if q0 >= q1 or k0 >= k1:
            continue
        if q1 - q0 <= few_queries:
            bad[w] = _range_few(Q[q0:q1], K, V, bias, has_bias, k0, k1, ktile_few,
                                m[sp, q0:q1], l[sp, q0:q1], acc[sp, q0:q1])
        else:
            bad[w] = _range_block(Q[q0:q1], K, V, bias, has_bias, k0, k1, ktile,
                                  m[sp, q0:q1], l[sp, q0:q1], acc[sp, q0:q1])
    return m, l, acc, bad.sum()


@njit(cache=True)
def merge_states(m, l, acc):
    """Merge states over disjoint key sets and normalize them.

    m, l (P, B) and acc (P, B, dv) float32: P partial states per query, in
    the base-2 convention of :mod:`softretrieval.core`.
    Returns ``(out (B, dv) float32, lse (B,) float32)``; a query with no
    valid key gets ``out = 0`` and ``lse = -inf``.
    """
    P, B = m.shape
    dv = acc.shape[2]
    out = np.empty((B, dv), np.float32)
    lse = np.empty(B, np.float32)
    for b in range(B):
        mb = m[0, b]
        lb = l[0, b]
        o = out[b]
        o[:] = acc[0, b]
        for p in range(1, P):
            mb, lb, c1, c2 = merge_pair(mb, lb, m[p, b], l[p, b])
            a = acc[p, b]
            for c in range(dv):
                o[c] = o[c] * c1 + a[c] * c2
        inv_l, lse[b] = finalize(mb, lb)
        for c in range(dv):
            o[c] *= inv_l
    return out, lse


def plan(B, N, threads):
    """Split of the work: ``(nqb, nsplit)`` query blocks and key ranges.

    Many queries: equal query blocks of at most ``config.QUERY_BLOCK``, their
    count a multiple of ``threads``, and one key range. Few queries (fewer
    than ``config.MIN_QUERIES_PER_THREAD`` per thread): one query block and
    ``threads`` key ranges, merged afterwards, so a single query still uses
    every core; never ranges shorter than ``config.MIN_KEYS_PER_SPLIT``.
    """
    if B >= threads * config.MIN_QUERIES_PER_THREAD:
        rounds = -(-B // (threads * config.QUERY_BLOCK))
        return threads * rounds, 1
    nqb = -(-B // config.QUERY_BLOCK)
    nsplit = max(1, min(threads, N // config.MIN_KEYS_PER_SPLIT))
    return nqb, nsplit


def soft_attention(Qs, K, V, bias):
    """Soft retrieval of prepared float32 inputs (see the module docstring).

    Qs (B, d), K (N, d), V (N, dv), bias (N,) or (0,) for none.
    Returns ``(out (B, dv), lse (B,), bad)`` with ``bad`` as in
    :func:`soft_states`.
    """
    nqb, nsplit = plan(Qs.shape[0], K.shape[0], runtime.num_threads())
    m, l, acc, bad = runtime.parallel_call(
        soft_states, Qs, K, V, bias, bias.shape[0] > 0, nqb, nsplit,
        config.KEY_TILE, config.KEY_TILE_FEW, config.FEW_QUERIES)
    out, lse = merge_states(m, l, acc)
    return out, lse, bad
