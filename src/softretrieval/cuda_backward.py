"""CUDA driver of the backward pass of soft attention: the recipe of
:mod:`softretrieval.cpu_backward` (same inputs, same outputs, same units)
with the per-key and per-row rules of :mod:`softretrieval.rules` compiled as
device functions.

Layout: a block owns a tile of ``config.CUDA_BACKWARD_KEYS`` keys (fewer when
``d + dv`` is wide), staged in shared memory once with their values and
per-key terms, and streams every query row past them in tiles of
``config.CUDA_BACKWARD_ROWS``. Per query tile: each thread scores some
(row, key) pairs (logits by :func:`rules.logit`), one thread per row applies
the exclusions or allow-lists and windows (:func:`rules.list_row`,
:func:`rules.window_row`), each pair gets ``dP = dO . v``, then ``P`` and
``dS = P (dP - D + dlse)`` by the shared :func:`rules.weight_grad`; the
block's keys accumulate ``gv``, ``gk``, ``gb`` in registers (each thread a
key and a share of its columns: no two blocks write the same key), and each
(row, column) pair adds the tile's ``dS f . K`` to ``gq`` (and each row its
``rowsum(dS)`` to ``gr``) with atomic adds. Query tiles outside every row
window of the key tile are skipped. Only shared memory and barriers, so the
simulator runs it. Not yet measured on a GPU; the atomics on ``gq`` (one per
row, column and key tile) are the first thing to replace by a query-parallel
pass if they show in a profile.
"""

import functools

import numpy as np
from numba import cuda, float32, int64

from . import config
from .constants import KEYS_UNIT
from .cuda import DECODERS, device_view, shared

weight_grad = shared.weight_grad


@cuda.jit(device=True)
def _first_at_or_after(ids, lo, hi, x):
    """Index of the first of the sorted ``ids[lo:hi]`` that is >= x."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ids[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def key_tile(d, dv):
    """Keys per block for keys of ``d`` and ``dv`` value columns:
    ``config.CUDA_BACKWARD_KEYS``, at most a block's threads, fewer so that
    the block's shared arrays fit ``config.CUDA_SHARED_BYTES``; None when not
    even one key fits (the caller then runs the CPU's backward)."""
    rows = config.CUDA_BACKWARD_ROWS
    fixed = 4 * rows * (d + dv + 4) + 16           # query and dO tiles, the L and dS pads, win
    per_key = 4 * (d + dv + 4 + 2 * rows)          # key and value rows, L and dS columns, terms
    fit = (config.CUDA_SHARED_BYTES - fixed) // per_key
    if fit < 1:
        return None
    return int(min(config.CUDA_BACKWARD_KEYS, config.CUDA_QUERY_BLOCK, fit))


@functools.lru_cache(maxsize=None)
def _stager(dtype):
    """A device function that decodes rows ``t0 .. t0 + tn`` of ``X`` stored
    as ``dtype`` (columns ``col .. col + width``, int8 row scales ``xscale``
    or (0,)) into the shared tile ``sm`` (rows past tn: 0), the block's
    ``nthreads`` threads sharing the elements."""
    dec = DECODERS[dtype]

    @cuda.jit(device=True)
    def stage(sm, X, xscale, col, t0, tn, width, tid, nthreads):
        for e in range(tid, sm.shape[0] * width, nthreads):
            j = e // width
            c = e - j * width
            x = float32(0.0)
            if j < tn:
                x = dec(X[t0 + j, col + c])
                if xscale.shape[0] > 0:
                    x *= xscale[t0 + j]
            sm[j, c] = x

    return stage


@functools.lru_cache(maxsize=None)
def backward_kernel(kdtype, vdtype, d, dv, KT):
    """The backward kernel for keys/values stored as ``kdtype``/``vdtype``,
    ``d`` key and ``dv`` value columns, ``KT`` keys per block (all sizes of
    its shared tiles and register accumulators are compile-time)."""
    stage_keys = _stager(np.dtype(kdtype))
    stage_values = _stager(np.dtype(vdtype))
    key_factor = shared.key_factor
    key_offset = shared.key_offset
    logit = shared.logit
    list_row = shared.list_row
    window_row = shared.window_row
    QB = config.CUDA_BACKWARD_ROWS
    NT = config.CUDA_QUERY_BLOCK
    G = max(1, NT // KT)                      # column groups: thread t owns key t % KT
    KACC = -(-d // G)
    VACC = max(1, -(-dv // G))
    Q_TILE, O_TILE = (QB, d + 1), (QB, dv + 1)
    K_TILE, V_TILE, S_TILE = (KT, d + 1), (KT, dv + 1), (QB, KT + 1)

    @cuda.jit
    def kernel(Q, K, kscale, kcol, V, vscale, vcol, bias, key_mode, key_coef, excl_off, excl_ids,
               allow, row_lo, row_hi, lse2, D, dlse, dO, gq, gr, gk, gv, gb):
        R = Q.shape[0]
        N = K.shape[0]
        tid = cuda.threadIdx.x
        t0 = cuda.blockIdx.x * KT
        tn = min(KT, N - t0)
        q_sm = cuda.shared.array(Q_TILE, float32)
        o_sm = cuda.shared.array(O_TILE, float32)
        k_sm = cuda.shared.array(K_TILE, float32)
        v_sm = cuda.shared.array(V_TILE, float32)
        L = cuda.shared.array(S_TILE, float32)
        dS = cuda.shared.array(S_TILE, float32)
        factor = cuda.shared.array(KT, float32)
        offset = cuda.shared.array(KT, float32)
        win = cuda.shared.array(2, int64)
        kacc = cuda.local.array(KACC, float32)
        vacc = cuda.local.array(VACC, float32)
        for e in range(KACC):
            kacc[e] = float32(0.0)
        for e in range(VACC):
            vacc[e] = float32(0.0)
        bacc = float32(0.0)
        stage_keys(k_sm, K, kscale, kcol, t0, tn, d, tid, NT)
        stage_values(v_sm, V, vscale, vcol, t0, tn, dv, tid, NT)
        cuda.syncthreads()
        if tid < tn:
            sq = float32(0.0)
            for c in range(d):
                sq += k_sm[tid, c] * k_sm[tid, c]
            b = bias[t0 + tid] if bias.shape[0] > 0 else float32(0.0)
            factor[tid] = key_factor(key_mode, sq)
            offset[tid] = key_offset(key_mode, key_coef, sq, b)
        mine = tid % KT                        # the key this thread accumulates
        group = tid // KT
        windowed = row_lo.shape[0] > 0
        for r0 in range(0, R, QB):
            rn = min(QB, R - r0)
            if tid == 0:                       # do this query tile's windows meet the keys?
                win[0] = N
                win[1] = 0
                if windowed:
                    for i in range(rn):
                        win[0] = min(win[0], row_lo[r0 + i])
                        win[1] = max(win[1], row_hi[r0 + i])
            cuda.syncthreads()
            if windowed and (win[1] <= t0 or win[0] >= t0 + tn):
                cuda.syncthreads()
                continue
            for e in range(tid, QB * d, NT):
                i = e // d
                c = e - i * d
                q_sm[i, c] = Q[r0 + i, c] if i < rn else float32(0.0)
            for e in range(tid, QB * dv, NT):
                i = e // dv
                c = e - i * dv
                o_sm[i, c] = dO[r0 + i, c] if i < rn else float32(0.0)
            cuda.syncthreads()
            for e in range(tid, QB * KT, NT):  # the logits of each (row, key) pair
                i = e // KT
                j = e - i * KT
                s = float32(0.0)
                for c in range(d):
                    s += q_sm[i, c] * k_sm[j, c]
                L[i, j] = logit(s, factor[j], offset[j])
            cuda.syncthreads()
            if tid < rn:                        # the row rules, one thread per row
                row = r0 + tid
                if excl_off.shape[0] > 0:
                    lo = excl_off[row]
                    hi = excl_off[row + 1]
                    list_row(L[tid], tn, t0, excl_ids, _first_at_or_after(excl_ids, lo, hi, t0),
                             hi, allow)
                if windowed:
                    window_row(L[tid], tn, t0, row_lo[row], row_hi[row])
            cuda.syncthreads()
            for e in range(tid, QB * KT, NT):  # weights and the logits' gradient
                i = e // KT
                j = e - i * KT
                g = float32(0.0)
                p = float32(0.0)
                if i < rn and j < tn:
                    dp = float32(0.0)
                    for c in range(dv):
                        dp += o_sm[i, c] * v_sm[j, c]
                    p, g = weight_grad(L[i, j], lse2[r0 + i], dp, dlse[r0 + i] - D[r0 + i])
                L[i, j] = p
                dS[i, j] = g
            cuda.syncthreads()
            if tid < G * KT and mine < tn:     # this block's keys: gv, gk, gb
                for i in range(rn):
                    p = L[i, mine]
                    g = dS[i, mine]
                    for e in range(VACC):
                        c = group + G * e
                        if c < dv:
                            vacc[e] += p * o_sm[i, c]
                    for e in range(KACC):
                        c = group + G * e
                        if c < d:
                            kacc[e] += g * q_sm[i, c]
                    bacc += g
            for e in range(tid, QB * d, NT):   # every row's share of gq from these keys
                i = e // d
                c = e - i * d
                if i < rn:
                    acc = float32(0.0)
                    for j in range(tn):
                        f = factor[j] if key_mode == KEYS_UNIT else float32(1.0)
                        acc += dS[i, j] * f * k_sm[j, c]
                    cuda.atomic.add(gq, (r0 + i, c), acc)
            if tid < rn:
                total = float32(0.0)
                for j in range(tn):
                    total += dS[tid, j]
                cuda.atomic.add(gr, r0 + tid, total)
            cuda.syncthreads()
        if tid < G * KT and mine < tn:
            for e in range(VACC):
                c = group + G * e
                if c < dv:
                    gv[t0 + mine, c] = vacc[e]
            for e in range(KACC):
                c = group + G * e
                if c < d:
                    gk[t0 + mine, c] = kacc[e]
            if group == 0:
                gb[t0 + mine] = bacc

    return kernel


def run(problem, lse2, D, dlse, dO):
    """:func:`cpu_backward.run` on the GPU: same arguments (host arrays are
    copied to the device), same results (host arrays). Rows too wide for a
    block's shared memory (d + dv beyond about 1,400) run on the CPU's
    backward instead."""
    Q, keys, values = problem.Q, problem.keys, problem.values
    KT = key_tile(Q.shape[1], dO.shape[1])
    if KT is None:
        from . import cpu_backward

        return cpu_backward.run(problem, lse2, D, dlse, dO)
    bias, key_mode, key_coef = problem.logits
    excl_off, excl_ids, row_lo, row_hi, allow = problem.masks
    R, d = Q.shape
    N = keys.data.shape[0]
    dv = dO.shape[1]
    to = device_view
    K = to(keys.data)
    V = K if values.data is keys.data else to(values.data)
    gq = to(np.zeros((R, d), np.float32))
    gr = to(np.zeros(R, np.float32))
    gk = cuda.device_array((N, d), np.float32)
    gv = cuda.device_array((N, dv), np.float32)
    gb = cuda.device_array(N, np.float32)
    kernel = backward_kernel(np.dtype(K.dtype), np.dtype(V.dtype), d, dv, KT)
    kernel[-(-N // KT), config.CUDA_QUERY_BLOCK](
        to(Q), K, to(keys.scale), keys.col, V, to(values.scale), values.col, to(bias), key_mode,
        np.float32(key_coef), to(excl_off), to(excl_ids), allow, to(row_lo), to(row_hi), to(lse2), to(D),
        to(dlse), to(np.ascontiguousarray(dO)), gq, gr, gk, gv, gb)
    return tuple(a.copy_to_host() for a in (gq, gr, gk, gv, gb))
