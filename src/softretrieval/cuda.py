"""CUDA drivers (numba-cuda): the streaming kernel of :mod:`softretrieval.cpu`
for the GPU, built on the same core compiled as device functions.

Imported only when a call asks for ``device="cuda"`` (or ``"auto"`` finds a
GPU); needs the ``cuda`` extra (``numba-cuda[cu13]``).

Work is a grid of ``(query blocks, key splits)``. A block of
``config.CUDA_QUERY_BLOCK`` threads holds one query row per thread: its
online-softmax state ``(m, l)`` in registers, its accumulator row in a
per-thread local array (sized at compile time) and its top-k in a buffer
in global memory (:mod:`softretrieval.topk_buffer`, the CPU's source). Each
key tile (:func:`key_tile` keys) is decoded by the whole block into shared
memory (keys, values and, for l2/cosine, their squared norms); every
thread then writes its logits for the tile into a local array (per-key terms,
bias, exclusions, key window), takes their max, and updates its state with
``core.rescale`` / ``core.exp2`` once per tile, as the CPU kernel does; what a
logit is (metric terms, bias, exclusions, windows, the NaN check) is decided
by the shared rules (:mod:`softretrieval.rules`). Key tiles outside every
row's window of a block are skipped. The states of the key splits are merged
by :func:`rules.merge_row` in a second kernel (flash-decoding: a single query
still spreads over many blocks), the top-k buffers by
:func:`rules.merge_topk_row` in a third. Inputs and outputs are the same as
:func:`cpu.run`'s.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, int64

from . import config, core, rules, topk_buffer
from .devices import QueryTerms
from .constants import KEYS_PLAIN, NEG_INIT

_device = cuda.jit(device=True)
#: The shared core as CUDA device functions.
dev = core.compile_for(_device)


@cuda.jit(device=True)
def _same(x):
    return x


@cuda.jit(device=True)
def _integer(x):
    return float32(x)


#: Decoder of one stored element per storage dtype (see :mod:`softretrieval.storage`).
DECODERS = {np.dtype(np.float32): _same, np.dtype(np.uint16): dev.half_to_float,
            np.dtype(np.int16): dev.bfloat16_to_float, np.dtype(np.int8): _integer}


@functools.lru_cache(maxsize=None)
def shared_for(vdtype):
    """The shared core, top-k buffer and per-row rules
    (:mod:`softretrieval.rules`) as device functions, decoding values
    stored as ``vdtype``."""
    return rules.shared(_device, DECODERS[np.dtype(vdtype)])


#: The shared functions for float32 values (every kernel but the top-k
#: attention finish of compact values).
shared = shared_for(np.float32)


#: The target protocol (:class:`softretrieval.devices.Target`).
NAME = "cuda"
IS_GPU = True


def available():
    """Whether a CUDA GPU (or the simulator) can run the kernels."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reads as no GPU
        return False


@functools.lru_cache(maxsize=None)
def stream_kernel(kdtype, vdtype, tile, vd):
    """The streaming kernel for keys/values stored as ``kdtype``/``vdtype``,
    key tiles of ``tile`` keys and ``vd`` value columns accumulated (0: no
    value pass); ``tile`` and ``vd`` size per-thread local arrays, so each
    combination is its own kernel (compiled on first launch)."""
    kdec = DECODERS[np.dtype(kdtype)]
    vdec = DECODERS[np.dtype(vdtype)]
    softmax_row = shared.softmax_row
    topk_scan_row = shared.topk_scan_row
    key_factor = shared.key_factor
    key_offset = shared.key_offset
    logit = shared.logit
    exclude_row = shared.exclude_row
    window_row = shared.window_row
    row_max_finite = shared.row_max_finite
    acc_size = max(vd, 1)

    @cuda.jit
    def kernel(Q, qmult, qunit, qsq_coef, K, kscale, V, vscale, kcol, vcol, bias, bias_mult,
               key_mode, key_coef, excl_off, excl_ids, row_lo, row_hi, want_soft, k,
               m_out, l_out, acc_out, tk_s, tk_i, tk_n, bad):
        B, d = Q.shape
        N = K.shape[0]
        nthreads = cuda.blockDim.x
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x * nthreads + tid
        sp = cuda.blockIdx.y
        split = (N + cuda.gridDim.y - 1) // cuda.gridDim.y
        active = row < B
        shared_mem = cuda.shared.array(0, float32)
        ktile = shared_mem[: tile * d]
        vtile = shared_mem[tile * d: tile * (d + vd)]
        norms = shared_mem[tile * (d + vd): tile * (d + vd + 1)]
        limits = cuda.shared.array(2, int64)
        logits = cuda.local.array(tile, float32)
        acc = cuda.local.array(acc_size, float32)
        for c in range(vd):
            acc[c] = float32(0.0)
        lo = 0
        hi = N
        windowed = row_lo.shape[0] > 0
        if windowed and active:
            lo = row_lo[row]
            hi = row_hi[row]
        if tid == 0:
            limits[0] = N
            limits[1] = 0
        cuda.syncthreads()
        if active:
            cuda.atomic.min(limits, 0, lo)
            cuda.atomic.max(limits, 1, hi)
        cuda.syncthreads()
        k0 = max(sp * split, limits[0])
        k1 = min(min(N, sp * split + split), limits[1])
        p = 0
        pend = 0
        if excl_off.shape[0] > 0 and active:
            p = excl_off[row]
            pend = excl_off[row + 1]
            while p < pend and excl_ids[p] < k0:
                p += 1
        qs = float32(0.0)
        rowc = float32(0.0)
        if active:
            qn2 = float32(0.0)
            for c in range(d):
                qn2 += Q[row, c] * Q[row, c]
            qs = qmult
            if qunit:
                qs = qmult / math.sqrt(qn2) if qn2 > 0 else float32(0.0)
            if qsq_coef != 0:          # (l2 only: for others qn2 may overflow harmlessly)
                rowc = qsq_coef * qn2
        m = NEG_INIT
        l = float32(0.0)
        count = 0
        ts = NEG_INIT
        ti = -1
        nbad = 0
        for t0 in range(k0, k1, tile):
            tn = min(tile, k1 - t0)
            cuda.syncthreads()
            for idx in range(tid, tn * d, nthreads):
                j = idx // d
                x = kdec(K[t0 + j, kcol + idx - j * d])
                ktile[idx] = x * kscale[t0 + j] if kscale.shape[0] > 0 else x
            for idx in range(tid, tn * vd, nthreads):
                j = idx // vd
                x = vdec(V[t0 + j, vcol + idx - j * vd])
                vtile[idx] = x * vscale[t0 + j] if vscale.shape[0] > 0 else x
            cuda.syncthreads()
            if key_mode != KEYS_PLAIN:
                for j in range(tid, tn, nthreads):
                    sq = float32(0.0)
                    for c in range(d):
                        sq += ktile[j * d + c] * ktile[j * d + c]
                    norms[j] = sq
                cuda.syncthreads()
            if not active:
                continue
            for j in range(tn):
                s = float32(0.0)
                for c in range(d):
                    s += Q[row, c] * ktile[j * d + c]
                b = bias[t0 + j] * bias_mult if bias.shape[0] > 0 else float32(0.0)
                logits[j] = logit(s * qs, key_factor(key_mode, norms[j]),
                                  key_offset(key_mode, key_coef, norms[j], b)) + rowc
            if p < pend:
                p = exclude_row(logits, tn, t0, excl_ids, p, pend)
            if windowed:
                window_row(logits, tn, t0, lo, hi)
            mx, finite = row_max_finite(logits, tn)
            if not finite:
                nbad += 1
            if k > 0:
                count, ts, ti = topk_scan_row(logits, tn, mx, t0, k, tk_s[sp, row],
                                              tk_i[sp, row], count, ts, ti)
            if want_soft:
                m, corr, total = softmax_row(logits, tn, m, mx, vd > 0)
                l = l * corr + total
                for c in range(vd):
                    acc[c] *= corr
                for j in range(tn):
                    w = logits[j]            # the weight, stored by softmax_row
                    for c in range(vd):
                        acc[c] += w * vtile[j * vd + c]
        if active:
            m_out[sp, row] = m
            l_out[sp, row] = l
            for c in range(vd):
                acc_out[sp, row, c] = acc[c]
            tk_n[sp, row] = count
            if nbad > 0:
                cuda.atomic.add(bad, 0, nbad)

    return kernel


@cuda.jit
def merge_states_kernel(m, l, acc, out, lse):
    """One thread per query: merge the key splits' states and normalize
    (:func:`rules.merge_row`, as :func:`cpu.merge_states`)."""
    b = cuda.grid(1)
    if b < m.shape[1]:
        lse[b] = shared.merge_row(m, l, acc, b, out[b])


@cuda.jit
def merge_topk_kernel(tk_s, tk_i, tk_n, k, bs, bi, scores, ids, count):
    """One thread per query: the best k of every split's buffer, best first,
    through a buffer ``bs``, ``bi`` (B, capacity(k)) (:func:`rules.merge_topk_row`,
    as :func:`cpu.merge_topk`)."""
    b = cuda.grid(1)
    if b < tk_n.shape[1]:
        count[b] = shared.merge_topk_row(tk_s, tk_i, tk_n, b, k, bs[b], bi[b], scores[b], ids[b])


def key_tile(d, vd):
    """Keys per shared-memory tile for keys of ``d`` and ``vd`` accumulated
    value columns: ``config.CUDA_KEY_TILE``, fewer when a tile of keys,
    values and norms would not fit ``config.CUDA_SHARED_BYTES``. Raises
    ValueError when not even one key fits."""
    per_key = 4 * (d + vd + 1)
    if per_key > config.CUDA_SHARED_BYTES:
        raise ValueError(f"keys of dimension {d} with {vd} value columns are too wide for the CUDA "
                         f"kernels ({per_key} bytes of shared memory per key, "
                         f"{config.CUDA_SHARED_BYTES} available); use device='cpu'")
    return min(config.CUDA_KEY_TILE, config.CUDA_SHARED_BYTES // per_key)


def plan(B, N):
    """``(nqb, nsplit, threads)``: query blocks of ``config.CUDA_QUERY_BLOCK``
    threads, and enough key splits that the grid holds about
    ``config.CUDA_MIN_BLOCKS`` blocks, each split at least
    ``config.CUDA_MIN_KEYS_PER_SPLIT`` keys."""
    threads = config.CUDA_QUERY_BLOCK
    nqb = -(-B // threads)
    nsplit = max(1, min(-(-config.CUDA_MIN_BLOCKS // nqb), N // config.CUDA_MIN_KEYS_PER_SPLIT))
    return nqb, nsplit, threads


def launch(problem, mode, query=QueryTerms(), lse_dtype=np.float64):
    """Run the kernels on a :class:`devices.Problem` whose arrays are on the
    device (host arrays are copied), in :class:`devices.Mode` ``mode``.
    ``query`` (:class:`devices.QueryTerms`): the query terms the kernel
    applies itself, for queries that never visit the host. Returns device
    arrays ``out``, ``lse`` (``lse_dtype``), ``topk_logits``, ``topk_ids``,
    ``topk_count`` as asked, and ``bad`` (host int: rows of key tiles that held NaN or
    inf).
    """
    Q, keys, values = problem.Q, problem.keys, problem.values
    K, V = keys.data, values.data
    want_soft, want_acc, k = mode
    bias, key_mode, key_coef = problem.logits
    excl_off, excl_ids, row_lo, row_hi = problem.masks
    B, d = Q.shape
    N = K.shape[0]
    vd = values.width if want_acc else 0
    nqb, nsplit, threads = plan(B, N)
    tile = key_tile(d, vd)
    to = device_view
    cap = topk_buffer.capacity(max(k, 1))
    m = cuda.device_array((nsplit, B), np.float32)
    l = cuda.device_array((nsplit, B), np.float32)
    acc = cuda.device_array((nsplit, B, vd), np.float32)
    tk_s = cuda.device_array((nsplit, B, cap), np.float32)
    tk_i = cuda.device_array((nsplit, B, cap), np.int64)
    tk_n = cuda.device_array((nsplit, B), np.int64)
    bad = to(np.zeros(1, np.int64))
    dK = to(K)
    dV = dK if V is K or not want_acc else to(V)    # values unread without want_acc
    kernel = stream_kernel(np.dtype(dK.dtype), np.dtype(dV.dtype), tile, vd)
    shared = 4 * tile * (d + vd + 1)
    kernel[(nqb, nsplit), threads, 0, shared](
        to(Q), np.float32(query.qmult), query.qunit, np.float32(query.qsq_coef), dK,
        to(keys.scale), dV, to(values.scale), keys.col, values.col, to(bias),
        np.float32(query.bias_mult), key_mode, np.float32(key_coef),
        to(excl_off), to(excl_ids), to(row_lo), to(row_hi), want_soft, k, m, l, acc,
        tk_s, tk_i, tk_n, bad)
    res = {"bad": int(bad.copy_to_host()[0])}
    rows = -(-B // threads)
    if want_soft:
        res["out"] = cuda.device_array((B, vd), np.float32)
        res["lse"] = cuda.device_array(B, lse_dtype)
        merge_states_kernel[rows, threads](m, l, acc, res["out"], res["lse"])
    if k > 0:
        res["topk_logits"] = to(np.full((B, k), NEG_INIT, np.float32))
        res["topk_ids"] = to(np.full((B, k), -1, np.int64))
        res["topk_count"] = cuda.device_array(B, np.int64)
        merge_topk_kernel[rows, threads](
            tk_s, tk_i, tk_n, k, cuda.device_array((B, cap), np.float32),
            cuda.device_array((B, cap), np.int64), res["topk_logits"], res["topk_ids"],
            res["topk_count"])
    return res


def device_view(a):
    """A device view of ``a``: device arrays and ``__cuda_array_interface__``
    objects in place, host arrays copied."""
    if isinstance(a, np.ndarray):
        return cuda.to_device(a)
    if hasattr(a, "__cuda_array_interface__"):     # CuPy, torch, numba device arrays
        return cuda.as_cuda_array(a)
    return a                                      # the simulator's device arrays


def run(problem, mode):
    """:func:`cpu.run` on the GPU: same arguments (host arrays are copied to
    the device), same results (host arrays)."""
    res = launch(problem, mode)
    return {name: a if name == "bad" else a.copy_to_host() for name, a in res.items()}


@cuda.jit
def finish_topk_kernel(logits, ids, count, sign, clamp, pad, scores_out, ids_out):
    """One thread per query: kernel logits (B, k') to ``(scores, ids)`` (B, k)
    with FAISS's conventions (:func:`rules.topk_scores_row`, as
    :func:`cpu.finish_topk`; the kernel's logits already hold the query's
    constant, so the offset is 0)."""
    b = cuda.grid(1)
    if b < logits.shape[0]:
        shared.topk_scores_row(logits[b], ids[b], count[b], sign, 0.0, clamp, pad, scores_out[b],
                               ids_out[b])


@functools.lru_cache(maxsize=None)
def finish_topk_attention_kernel(vdtype):
    """One thread per query: :func:`rules.topk_attention_row` (as
    :func:`cpu.finish_topk_attention`) for values stored as ``vdtype``.
    Arguments: logits, ids (B, k'), count (B,), lse (B,), V, vscale, vcol,
    and the outputs out (B, dv), weights, ids_out (B, k), coverage (B,)."""
    row_rule = shared_for(vdtype).topk_attention_row

    @cuda.jit
    def kernel(logits, ids, count, lse, V, vscale, vcol, out, weights, ids_out, coverage):
        b = cuda.grid(1)
        if b < logits.shape[0]:
            coverage[b] = row_rule(logits[b], ids[b], count[b], lse[b], V, vscale, vcol, out[b],
                                   weights[b], ids_out[b])

    return kernel


@cuda.jit
def gather_rows_kernel(src, dst):
    """dst (T * G, X) = src (T, G, X) row by row: the stacked query heads of a
    KV head as one contiguous block (src may be any strided view)."""
    r = cuda.grid(1)
    G = src.shape[1]
    if r >= dst.shape[0]:
        return
    for c in range(dst.shape[1]):
        dst[r, c] = src[r // G, r - (r // G) * G, c]


@cuda.jit
def scatter_rows_kernel(src, dst):
    """dst (T, G, X) = src (T * G, X): a problem's rows back into the heads."""
    r = cuda.grid(1)
    G = dst.shape[1]
    if r >= src.shape[0]:
        return
    for c in range(src.shape[1]):
        dst[r // G, r - (r // G) * G, c] = src[r, c]


@cuda.jit
def scatter_values_kernel(src, dst):
    """dst (T, G) = src (T * G,): one value per row back into the heads."""
    r = cuda.grid(1)
    G = dst.shape[1]
    if r < src.shape[0]:
        dst[r // G, r - (r // G) * G] = src[r]
