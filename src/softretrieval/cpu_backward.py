"""CPU driver of the backward pass of soft attention (the FlashAttention-2
recipe on the forward's tiles and rules).

For one :class:`devices.Problem` (the same one the forward ran) and the
forward's log-partition, the upstream gradients ``dO`` and ``dlse`` and
``D = rowsum(dO * out)``, every score tile is recomputed instead of stored:

* ``S`` (bq, tn) = queries . keysᵀ, turned into base-2 logits by the
  forward's rules (:func:`cpu._key_terms`, :func:`cpu._masks`: metric terms,
  bias, exclusions, windows);
* ``dP = dO . Vᵀ``, then the weights ``P = 2 ** (S - lse2)`` (``lse2`` the
  row's partition in the same base-2 units) and ``dS = P * (dP - D +
  dlse)``, the gradient of the natural-log logits, by the shared rule
  :func:`rules.weight_grad`;
* ``gv += Pᵀ dO``, ``gk += dSᵀ Q``, ``gb += colsum(dS)``,
  ``gq += (dS * f) . K`` (``f`` the keys' cosine factors, else 1) and
  ``gr += rowsum(dS)``.

Work is split by key ranges, one per parallel item: each item owns its
keys' rows of ``gk``, ``gv`` and ``gb`` (no two items write the same row),
and a partial ``gq``, ``gr`` for every query, summed at the end; the extra
memory is O(items · B · d), never O(B · N). Tiles outside every row's window
of a query block are skipped, as in the forward. The metric's chain rule
(query scale, l2's norms, cosine's normalization) is applied by the caller,
:func:`softretrieval.grad.attention_backward`.
"""

import numpy as np
from numba import njit, prange

from . import config, runtime
from .constants import KEYS_PLAIN, KEYS_UNIT
from .cpu import _FAST, _key_terms, _masks, _squared_norms, _tile, shared

weight_grad = shared.weight_grad


@njit(fastmath=_FAST, cache=True, inline="always")
def _add_rows(dst, r0, src):
    """dst[r0 + i] += src[i] for every row i of src (a tile's sums into the
    running gradients)."""
    for i in range(src.shape[0]):
        d = dst[r0 + i]
        s = src[i]
        for c in range(s.shape[0]):
            d[c] += s[c]


@njit(fastmath=_FAST, cache=True)
def _backward_range(Q, keys, values, logits, masks, lse2, D, dlse, dO, k0, k1, qblock, ktile,
                    gq, gr, gk, gv, gb, stop):
    """Keys ``k0:k1`` against every query: accumulate this range's rows of
    gk (N, d), gv (N, dv), gb (N,) and its partial gq (R, d), gr (R,).
    Arguments as :func:`backward`; stop checked before each tile."""
    K, kscale, kcol = keys.data, keys.scale, keys.col
    V, vscale, vcol = values.data, values.scale, values.col
    bias, key_mode, key_coef = logits
    excl_off, excl_ids, row_lo, row_hi, allow = masks
    R, d = Q.shape
    dv = dO.shape[1]
    has_bias = bias.shape[0] > 0
    windowed = row_lo.shape[0] > 0
    pbuf = np.empty(qblock * ktile, np.float32)
    sbuf = np.empty(qblock * ktile, np.float32)
    terms = np.empty(ktile, np.float32)
    factors = np.ones(ktile, np.float32)
    kbuf = np.empty((ktile, d), np.float32)
    vbuf = np.empty((ktile, dv), np.float32)
    gkt = np.empty((ktile, d), np.float32)
    gvt = np.empty((ktile, dv), np.float32)
    gqt = np.empty((qblock, d), np.float32)
    ptr = np.zeros(qblock, np.int64)
    end = np.zeros(qblock, np.int64)
    for q0 in range(0, R, qblock):
        q1 = min(R, q0 + qblock)
        bq = q1 - q0
        a = k0
        b = k1
        if windowed:
            a = max(a, row_lo[q0:q1].min())
            b = min(b, row_hi[q0:q1].max())
        if a >= b:
            continue
        if excl_off.shape[0] > 0:
            for i in range(bq):
                lo = excl_off[q0 + i]
                hi = excl_off[q0 + i + 1]
                ptr[i] = lo + np.searchsorted(excl_ids[lo:hi], a)
                end[i] = lo + np.searchsorted(excl_ids[lo:hi], b)
        Qb = Q[q0:q1]
        dOb = dO[q0:q1]
        for t0 in range(a, b, ktile):
            if stop[0] != 0:
                return
            t1 = min(t0 + ktile, b)
            tn = t1 - t0
            P = sbuf[: bq * tn].reshape((bq, tn))
            dS = pbuf[: bq * tn].reshape((bq, tn))
            Kt = _tile(K[t0:t1], kcol, d, kbuf, kscale[t0:t1] if kscale.shape[0] > 0 else kscale)
            np.dot(Qb, Kt.T, P)
            if key_mode != KEYS_PLAIN:
                _squared_norms(Kt, terms)
            _key_terms(bias[t0:t1] if has_bias else bias, has_bias, key_mode, key_coef, P, terms,
                       factors)
            _masks(P, t0, excl_ids, ptr[:bq], end[:bq], allow,
                   row_lo[q0:q1] if windowed else row_lo,
                   row_hi[q0:q1] if windowed else row_hi)
            if dv > 0:
                Vt = _tile(V[t0:t1], vcol, dv, vbuf,
                           vscale[t0:t1] if vscale.shape[0] > 0 else vscale)
                np.dot(dOb, Vt.T, dS)
            else:                                  # lse only: dP = 0
                dS[:, :] = np.float32(0.0)
            for i in range(bq):                    # P and dS, by the shared rule
                m = lse2[q0 + i]
                shift = dlse[q0 + i] - D[q0 + i]
                p = P[i]
                s = dS[i]
                total = np.float32(0.0)
                for j in range(tn):
                    p[j], s[j] = weight_grad(p[j], m, s[j], shift)
                    total += s[j]
                gr[q0 + i] += total
            if dv > 0:
                np.dot(P.T, dOb, gvt[:tn])
                _add_rows(gv, t0, gvt[:tn])
            np.dot(dS.T, Qb, gkt[:tn])
            _add_rows(gk, t0, gkt[:tn])
            for i in range(bq):
                s = dS[i]
                for j in range(tn):
                    gb[t0 + j] += s[j]
                if key_mode == KEYS_UNIT:
                    for j in range(tn):
                        s[j] *= factors[j]
            np.dot(dS, Kt, gqt[:bq])
            _add_rows(gq, q0, gqt[:bq])


@njit(parallel=True, cache=True, nogil=True)
def backward(Q, keys, values, logits, masks, lse2, D, dlse, dO, tiling, stop):
    """The backward pass of one problem, in ``nsplit`` parallel key ranges
    (item ``w`` takes range ``0, nsplit - 1, 1, nsplit - 2, ...``: with the
    static schedule each thread gets early and late ranges).

    Q (R, d) float32: the forward's prepared queries (kernel units: scale
    and ``log2(e)`` folded in); keys, values: :class:`devices.Rows`;
    logits: :class:`devices.Logits`; masks: :class:`devices.Masks`, as the
    forward's :func:`cpu.stream` takes them. lse2 (R,) float32: each row's
    log-partition in the kernel's base-2 units (``-inf`` for a row with no
    valid key); D (R,) = rowsum(dO * out), dlse (R,) the lse's upstream
    gradient, dO (R, dv): all float32 (dv = 0: the backward of the lse alone,
    values unread). tiling: ``(nsplit, qblock, ktile)``.
    stop (1,) int64: the call ends early once ``stop[0] != 0``.

    Returns float32 ``(gq (R, d), gr (R,), gk (N, d), gv (N, dv), gb (N,))``
    in natural-log units: ``gq = sum_j dS f_j k_j``, ``gr = rowsum(dS)``,
    ``gk = sum_i dS q_i`` (prepared queries), ``gv = Pᵀ dO``,
    ``gb = colsum(dS)``.
    """
    nsplit, qblock, ktile = tiling
    R, d = Q.shape
    N = keys.data.shape[0]
    dv = dO.shape[1]
    split = (N + nsplit - 1) // nsplit
    gqs = np.empty((nsplit, R, d), np.float32)     # (zeroed by their items: an np.zeros here
    grs = np.empty((nsplit, R), np.float32)        # would be a parallel region of its own)
    gk = np.empty((N, d), np.float32)
    gv = np.empty((N, dv), np.float32)
    gb = np.empty(N, np.float32)
    for w in prange(nsplit):
        r = w // 2 if w % 2 == 0 else nsplit - 1 - w // 2     # zigzag: causal ranges balance
        k0 = r * split
        k1 = min(N, k0 + split)
        gqs[r] = 0.0
        grs[r] = 0.0
        if k0 < k1:                        # each item zeroes its own rows (first touch in parallel)
            gk[k0:k1] = 0.0
            gv[k0:k1] = 0.0
            gb[k0:k1] = 0.0
            _backward_range(Q, keys, values, logits, masks, lse2, D, dlse, dO, k0, k1, qblock,
                            ktile, gqs[r], grs[r], gk, gv, gb, stop)
    gq = np.empty((R, d), np.float32)
    gr = np.empty(R, np.float32)
    for i in prange(R):
        gq[i] = gqs[0, i]
        gr[i] = grs[0, i]
        for w in range(1, nsplit):
            gr[i] += grs[w, i]
            for c in range(d):
                gq[i, c] += gqs[w, i, c]
    return gq, gr, gk, gv, gb


def run(problem, lse2, D, dlse, dO):
    """:func:`backward` on a :class:`devices.Problem` of host arrays, under
    the runtime lock (BLAS on one thread, Ctrl-C honoured); key ranges: two
    per thread, never shorter than ``config.MIN_KEYS_PER_SPLIT``, handed out
    in zigzag order (first, last, second, ...) so that causal ranges, whose
    costs fall with their position, even out across threads."""
    N = problem.keys.data.shape[0]
    nsplit = max(1, min(2 * runtime.num_threads(), N // config.MIN_KEYS_PER_SPLIT))
    tiling = (nsplit, config.QUERY_BLOCK, config.KEY_TILE)
    stop = np.zeros(1, np.int64)
    work = 3 * problem.Q.shape[0] * N * (problem.Q.shape[1] + dO.shape[1])
    return runtime.parallel_call(backward, problem.Q, problem.keys, problem.values, problem.logits,
                                 problem.masks, lse2, D, dlse, dO, tiling, stop, stop=stop,
                                 work=work)
