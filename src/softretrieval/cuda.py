"""CUDA drivers (numba-cuda): the streaming kernel of :mod:`softretrieval.cpu`
for the GPU, built on the same core compiled as device functions.

Imported only when a call asks for ``device="cuda"`` (or ``"auto"`` finds a
GPU); needs the ``cuda`` extra (``numba-cuda[cu13]``).

Work is a grid of ``(query blocks, key splits)``; a :class:`Layout` says
who computes what inside a block (:func:`layout_for`): the **decode**
layout for a few query rows (B <= ``config.CUDA_DECODE_ROWS``: a block of
128 threads, a key per thread scored against every row, so a single query
keeps every thread busy and every key row is read once, coalesced), the
**tiled** layout for many (64 rows by 64 keys per tile, each of 256 threads
holding a 4 x 4 register tile of scores). Both are the one kernel of
:func:`stream_kernel`: per key tile, feature chunks of the queries and keys
are decoded into shared memory and multiplied into the register tiles; the
logits go to a shared tile where one thread per row applies the row rules
(exclusions, windows, max and NaN check, the top-k scan into a buffer in
global memory: :mod:`softretrieval.topk_buffer`, the CPU's source); every
thread turns a segment of a row into softmax weights; one thread per row
updates the row's online-softmax state ``(m, l)``; and each thread
accumulates its share of ``weights @ values`` in registers. What a logit
and a weight are is decided by the shared rules
(:mod:`softretrieval.rules`), as on the CPU. Key tiles outside every row's
window of a block are skipped. The states of the key splits are merged by
:func:`rules.merge_row` in a second kernel, a thread per (query, value
column) (flash-decoding: a single query still spreads over the whole GPU),
the top-k buffers by :func:`rules.merge_topk_row` in a third. Inputs and
outputs are the same as :func:`cpu.run`'s. Only shared-memory reductions
and barriers are used (no warp shuffles), so every path also runs under
numba-cuda's simulator.
"""

import functools
import math
from typing import NamedTuple

import numba
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


class Layout(NamedTuple):
    """Who computes what in a streaming kernel's block (all compile-time).

    ``rows`` query rows and ``threads`` threads per block; each thread
    scores a register tile of ``tq`` rows by ``tk`` keys per key tile, rows
    ``g, g + rows/tq, ...`` and keys ``h, h + key_groups, ...`` of the tile
    (interleaved, so a warp reads neighbouring rows of the shared-memory
    tiles); ``chunk`` feature columns of the query and key tiles are staged
    in shared memory at a time; ``max_registers`` caps the registers per
    thread (0: the compiler's choice).
    """

    rows: int
    threads: int
    tq: int
    tk: int
    chunk: int
    max_registers: int = 0

    @property
    def row_groups(self):
        return self.rows // self.tq

    @property
    def key_groups(self):
        return self.threads // self.row_groups

    @property
    def key_tile(self):
        return self.key_groups * self.tk

    @property
    def segment(self):
        """Keys of a row each thread turns into softmax weights."""
        return self.rows * self.key_tile // self.threads


def layout_for(B):
    """The layout for a problem of ``B`` query rows: the decode layout for
    ``B <= config.CUDA_DECODE_ROWS`` (rows rounded up to a power of two,
    ``CUDA_DECODE_THREADS`` keys per tile, a thread scoring its key against
    every row), else the tiled layout (``CUDA_TILE_ROWS`` rows,
    ``CUDA_TILE_THREADS`` threads, ``CUDA_MICRO`` squared register tiles)."""
    micro, chunk = config.CUDA_MICRO, config.CUDA_CHUNK
    if B <= config.CUDA_DECODE_ROWS:
        rows = 1 << max(0, (B - 1).bit_length())
        tq = min(rows, micro)
        lay = Layout(rows, config.CUDA_DECODE_THREADS, tq, rows // tq, chunk)
    else:
        lay = Layout(config.CUDA_TILE_ROWS, config.CUDA_TILE_THREADS, micro, micro, chunk,
                     config.CUDA_TILE_MAX_REGISTERS)
    if (lay.rows % lay.tq or lay.threads % lay.row_groups or lay.rows > lay.threads
            or (lay.rows * lay.key_tile) % lay.threads or lay.key_tile % lay.segment):
        raise ValueError(f"inconsistent CUDA tunables in softretrieval.config: {lay}")
    return lay


def _value_split(lay, vd):
    """``(cw, rr, cc)``: in the value pass a thread owns columns ``c, c + cw,
    ...`` (``cc`` of them) of rows ``g, g + threads/cw, ...`` (``rr``): warps
    of 32 neighbouring columns for several rows (a value loaded once serves
    ``rr`` rows), whole blocks along the columns for a single row."""
    groups = max(1, min(lay.threads // 32, lay.rows))
    cw = min(lay.threads // groups, 32 * -(-max(vd, 1) // 32))
    return cw, -(-lay.rows // (lay.threads // cw)), -(-max(vd, 1) // cw)


def _jit_options(lay):
    """``cuda.jit`` options of a layout's kernel (the simulator takes none)."""
    if lay.max_registers and not numba.config.ENABLE_CUDASIM:
        return {"max_registers": lay.max_registers}
    return {}


@functools.lru_cache(maxsize=None)
def stream_kernel(kdtype, vdtype, lay, vd):
    """The streaming kernel for keys/values stored as ``kdtype``/``vdtype``,
    :class:`Layout` ``lay`` and ``vd`` value columns accumulated (0: no
    value pass); each combination is its own kernel (compiled on first
    launch). Work of a block per key tile:

    1. the query rows' and the tile's keys' feature chunks are decoded into
       shared memory; each thread accumulates its register tile of dot
       products (and its keys' squared norms for l2/cosine);
    2. each thread writes its logits into the block's logit tile (per-key
       terms, bias: :func:`rules.logit`);
    3. one thread per row applies the row rules: exclusions, windows, the
       max and NaN check, the top-k scan;
    4. (soft modes) each thread turns a segment of a row into weights with
       :func:`rules.softmax_row`; one thread per row sums them and rescales
       the row's state;
    5. (with values) each thread accumulates its (row, column) share of the
       weighted values, read from global memory (a warp reads a row's
       neighbouring columns).
    """
    kdec = DECODERS[np.dtype(kdtype)]
    vdec = DECODERS[np.dtype(vdtype)]
    softmax_row = shared.softmax_row
    topk_scan_row = shared.topk_scan_row
    key_factor = shared.key_factor
    key_offset = shared.key_offset
    logit = shared.logit
    list_row = shared.list_row
    window_row = shared.window_row
    row_max_finite = shared.row_max_finite
    rescale = shared.core.rescale
    QB, NT, TQ, TK, DC = lay.rows, lay.threads, lay.tq, lay.tk, lay.chunk
    RG, KG, KT, SL = lay.row_groups, lay.key_groups, lay.key_tile, lay.segment
    NSEG = KT // SL
    KLOADS = -(-KT * DC // NT)
    QLOADS = -(-QB * DC // NT)
    CW, RR, CC = _value_split(lay, vd)
    RV = NT // CW
    VU = max(2, 8 // CC)
    S_SIZE, ACC, VREG = TQ * TK, RR * CC, VU * CC
    Q_TILE, K_TILE, L_TILE, T_TILE = (QB, DC + 1), (KT, DC + 1), (QB, KT + 1), (QB, NSEG)

    @cuda.jit(**_jit_options(lay))
    def kernel(Q, qmult, qunit, qsq_coef, K4, kscale, V4, vscale, kcol, vcol, bias2, bias_mult,
               key_mode, key_coef, excl_off, excl_ids, allow, row_lo, row_hi, want_soft, k,
               m_out, l_out, acc_out, tk_s, tk_i, tk_n, bad):
        pz = cuda.blockIdx.z               # the problem: batch element bb, KV head g
        Hkv = K4.shape[2]
        bb = pz // Hkv
        g = pz - bb * Hkv
        T = Q.shape[1]
        G = Q.shape[2] // Hkv              # query heads per KV head: row r is (r // G, r % G)
        d = Q.shape[3]
        B = T * G
        K = K4[bb, :, g]
        V = V4[bb, :, g]
        bias = bias2[g if bias2.shape[0] > 1 else 0]
        N = K.shape[0]
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * QB
        sp = cuda.blockIdx.y
        split = (N + cuda.gridDim.y - 1) // cuda.gridDim.y
        nrows = min(QB, B - row0)
        q_sm = cuda.shared.array(Q_TILE, float32)
        k_sm = cuda.shared.array(K_TILE, float32)
        L = cuda.shared.array(L_TILE, float32)
        tot = cuda.shared.array(T_TILE, float32)
        m_sm = cuda.shared.array(QB, float32)
        mx_sm = cuda.shared.array(QB, float32)
        corr_sm = cuda.shared.array(QB, float32)
        qs_sm = cuda.shared.array(QB, float32)
        rowc_sm = cuda.shared.array(QB, float32)
        limits = cuda.shared.array(2, int64)
        s = cuda.local.array(S_SIZE, float32)
        nk = cuda.local.array(TK, float32)
        qv = cuda.local.array(TQ, float32)
        kv = cuda.local.array(TK, float32)
        kreg = cuda.local.array(KLOADS, float32)
        qreg = cuda.local.array(QLOADS, float32)
        acc = cuda.local.array(ACC, float32)
        vreg = cuda.local.array(VREG, float32)
        for e in range(RR * CC):
            acc[e] = float32(0.0)
        own = tid < nrows                  # the thread of row tid in the row phases
        grow = row0 + tid
        gt = grow // G                     # its position, and its query head
        gh = g * G + grow - gt * G
        lo = 0
        hi = N
        windowed = row_lo.shape[1] > 0
        if windowed and own:
            lo = row_lo[bb, gt]
            hi = row_hi[bb, gt]
        if tid == 0:
            limits[0] = N
            limits[1] = 0
        if tid < QB:
            qs = float32(0.0)
            rowc = float32(0.0)
            if own:
                qn2 = float32(0.0)
                for c in range(d):
                    qn2 += Q[bb, gt, gh, c] * Q[bb, gt, gh, c]
                qs = qmult
                if qunit:
                    qs = qmult / math.sqrt(qn2) if qn2 > 0 else float32(0.0)
                if qsq_coef != 0:      # (l2 only: for others qn2 may overflow harmlessly)
                    rowc = qsq_coef * qn2
            qs_sm[tid] = qs
            rowc_sm[tid] = rowc
            m_sm[tid] = NEG_INIT
        cuda.syncthreads()
        if own:
            cuda.atomic.min(limits, 0, lo)
            cuda.atomic.max(limits, 1, hi)
        cuda.syncthreads()
        k0 = max(sp * split, limits[0])
        k1 = min(min(N, sp * split + split), limits[1])
        p = 0
        pend = 0
        if excl_off.shape[0] > 0 and own:
            p = excl_off[gt]
            pend = excl_off[gt + 1]
            while p < pend and excl_ids[p] < k0:
                p += 1
        norms = key_mode != KEYS_PLAIN
        scaled_k = kscale.shape[0] > 0
        scaled_v = vscale.shape[0] > 0
        with_bias = bias.shape[0] > 0
        rg = tid // KG                     # the register tile's first row and key
        kg = tid - rg * KG
        srow = tid // NSEG                 # the row segment turned into weights
        sa = (tid - srow * NSEG) * SL
        vr = tid // CW                     # the value pass's first row and column
        vc = tid - vr * CW
        l = float32(0.0)
        count = 0
        ts = NEG_INIT
        ti = -1
        nbad = 0
        for t0 in range(k0, k1, KT):
            tn = min(KT, k1 - t0)
            for e in range(TQ * TK):
                s[e] = float32(0.0)
            for jj in range(TK):
                nk[jj] = float32(0.0)
            for c0 in range(0, d, DC):
                for e in range(KLOADS):
                    idx = tid + e * NT
                    j = idx // DC
                    c = idx - j * DC
                    x = float32(0.0)
                    if j < tn and c0 + c < d:
                        x = kdec(K[t0 + j, kcol + c0 + c])
                        if scaled_k:
                            x *= kscale[t0 + j]
                    kreg[e] = x
                for e in range(QLOADS):
                    idx = tid + e * NT
                    i = idx // DC
                    c = idx - i * DC
                    x = float32(0.0)
                    if i < nrows and c0 + c < d:
                        t = (row0 + i) // G
                        x = Q[bb, t, g * G + row0 + i - t * G, c0 + c]
                    qreg[e] = x
                cuda.syncthreads()         # the previous chunk's readers are done
                for e in range(KLOADS):
                    idx = tid + e * NT
                    j = idx // DC
                    if j < KT:
                        k_sm[j, idx - j * DC] = kreg[e]
                for e in range(QLOADS):
                    idx = tid + e * NT
                    i = idx // DC
                    if i < QB:
                        q_sm[i, idx - i * DC] = qreg[e]
                cuda.syncthreads()
                for c in range(DC):
                    for i in range(TQ):
                        qv[i] = q_sm[rg + RG * i, c]
                    for jj in range(TK):
                        kv[jj] = k_sm[kg + KG * jj, c]
                        if norms:
                            nk[jj] += kv[jj] * kv[jj]
                    for i in range(TQ):
                        for jj in range(TK):
                            s[i * TK + jj] += qv[i] * kv[jj]
            for jj in range(TK):
                j = kg + KG * jj
                if j < tn:
                    b = bias[t0 + j] * bias_mult if with_bias else float32(0.0)
                    factor = key_factor(key_mode, nk[jj])
                    offset = key_offset(key_mode, key_coef, nk[jj], b)
                    for i in range(TQ):
                        r = rg + RG * i
                        L[r, j] = logit(s[i * TK + jj] * qs_sm[r], factor, offset) + rowc_sm[r]
            cuda.syncthreads()
            if own:
                row = L[tid]
                p = list_row(row, tn, t0, excl_ids, p, pend, allow)
                if windowed:
                    window_row(row, tn, t0, lo, hi)
                mx, finite = row_max_finite(row, tn)
                if not finite:
                    nbad += 1
                if k > 0:
                    count, ts, ti = topk_scan_row(row, tn, mx, t0, k, tk_s[pz, sp, grow],
                                                  tk_i[pz, sp, grow], count, ts, ti)
                mx_sm[tid] = mx
            if not want_soft:
                continue
            cuda.syncthreads()
            if srow < nrows:
                total = float32(0.0)
                if sa < tn:
                    _, _, total = softmax_row(L[srow, sa:], min(SL, tn - sa), m_sm[srow],
                                              mx_sm[srow], vd > 0)
                tot[srow, sa // SL] = total
            cuda.syncthreads()
            if own:
                m_new, corr = rescale(m_sm[tid], mx_sm[tid])
                total = float32(0.0)
                for e in range(NSEG):
                    total += tot[tid, e]
                l = l * corr + total
                m_sm[tid] = m_new
                corr_sm[tid] = corr
            cuda.syncthreads()
            if vd == 0:
                continue
            for ir in range(RR):
                r = vr + RV * ir
                if r < nrows:
                    corr = corr_sm[r]
                    for ic in range(CC):
                        acc[ir * CC + ic] *= corr
            for j0 in range(0, tn, VU):    # VU keys' values in flight per thread
                for u in range(VU):
                    j = j0 + u
                    for ic in range(CC):
                        col = vc + CW * ic
                        x = float32(0.0)
                        if j < tn and col < vd:
                            x = vdec(V[t0 + j, vcol + col])
                            if scaled_v:
                                x *= vscale[t0 + j]
                        vreg[u * CC + ic] = x
                for u in range(VU):
                    j = j0 + u
                    if j < tn:
                        for ir in range(RR):
                            r = vr + RV * ir
                            if r < nrows:
                                w = L[r, j]
                                for ic in range(CC):
                                    acc[ir * CC + ic] += w * vreg[u * CC + ic]
        if own:
            m_out[pz, sp, grow] = m_sm[tid]
            l_out[pz, sp, grow] = l
            tk_n[pz, sp, grow] = count
            if nbad > 0:
                cuda.atomic.add(bad, 0, nbad)
        for ir in range(RR):
            r = vr + RV * ir
            for ic in range(CC):
                col = vc + CW * ic
                if r < nrows and col < vd:
                    acc_out[pz, sp, row0 + r, col] = acc[ir * CC + ic]

    _COMPILED[f"stream {np.dtype(kdtype)}/{np.dtype(vdtype)} {tuple(lay)} vd={vd}"] = (kernel, NT)
    return kernel


#: The streaming kernels made so far (name -> (dispatcher, threads)), for
#: resource reports; see :func:`compiled_kernels`.
_COMPILED = {}


def compiled_kernels():
    """Every kernel made so far: name -> (dispatcher, threads per block). A
    dispatcher's ``get_regs_per_thread()`` / ``get_shared_mem_per_block()``
    report the resources of each signature it compiled."""
    rows = config.CUDA_QUERY_BLOCK
    return dict(_COMPILED, **{"merge_states": (merge_states_kernel, rows),
                              "merge_topk": (merge_topk_kernel, rows),
                              "finish_topk": (finish_topk_kernel, rows)})


@cuda.jit
def merge_states_kernel(m, l, acc, out, lse):
    """One thread per (query, value column): merge the key splits' states
    (m, l (P, splits, R), acc (P, splits, R, dv)) for that column and
    normalize (:func:`rules.merge_row` on one column, as
    :func:`cpu.merge_states` on the whole row) into the stacked ``out``
    (P * R, dv); column 0 writes ``lse`` (P * R,)."""
    R = m.shape[2]
    width = max(out.shape[1], 1)
    t = cuda.grid(1)
    q = t // width
    c = t - q * width
    if q < out.shape[0]:
        p = q // R
        x = shared.merge_row(m[p], l[p], acc[p, :, :, c:c + 1], q - p * R, out[q, c:c + 1])
        if c == 0:
            lse[q] = x


@cuda.jit
def merge_topk_kernel(tk_s, tk_i, tk_n, k, bs, bi, scores, ids, count):
    """One thread per query: the best k of every split's buffer (tk_s, tk_i
    (P, splits, R, cap), tk_n (P, splits, R)), best first, through a buffer
    ``bs``, ``bi`` (P * R, capacity(k)) into the stacked ``scores``, ``ids``
    (P * R, k) (:func:`rules.merge_topk_row`, as :func:`cpu.merge_topk`)."""
    q = cuda.grid(1)
    R = tk_n.shape[2]
    if q < scores.shape[0]:
        p = q // R
        count[q] = shared.merge_topk_row(tk_s[p], tk_i[p], tk_n[p], q - p * R, k, bs[q], bi[q],
                                         scores[q], ids[q])


def plan(B, N):
    """``(layout, nqb, nsplit)``: the :class:`Layout` for ``B`` rows, its
    query blocks, and enough key splits that the grid holds about
    ``config.CUDA_MIN_BLOCKS`` blocks, each split at least
    ``config.CUDA_MIN_KEYS_PER_SPLIT`` keys."""
    lay = layout_for(B)
    nqb = -(-B // lay.rows)
    nsplit = max(1, min(-(-config.CUDA_MIN_BLOCKS // nqb), N // config.CUDA_MIN_KEYS_PER_SPLIT))
    return lay, nqb, nsplit


def launch(problem, mode, query=QueryTerms(), lse_dtype=np.float64):
    """Run the kernels on a :class:`devices.Problem` whose arrays are on the
    device (host arrays are copied), in :class:`devices.Mode` ``mode``, in
    one launch of each kernel.

    A problem is one query block against one key set (``Q`` (R, d), keys
    (N, W), ``bias`` (N,) or (0,), windows (R,) or (0,), exclusions over the
    R rows), or the heads of a call (the GPU-resident path of
    :mod:`softretrieval.gpu_api`): ``Q`` (batch, T, H, d), keys and values
    (batch, S, Hkv, W), ``bias`` (Hkv or 1, S) or (1, 0), windows
    (batch, T) or (1, 0), exclusions over the T positions; the problems
    (batch element, KV head) are the grid's third dimension, and the rows
    of problem ``p = b * Hkv + g`` are the ``R = T * G`` pairs
    (position ``t``, query head ``g * G + i``) in that order.
    ``query`` (:class:`devices.QueryTerms`): the query terms the kernel
    applies itself, for queries that never visit the host. Returns device
    arrays stacked over the problems' rows (P * R, ...): ``out``, ``lse``
    (``lse_dtype``), ``topk_logits``, ``topk_ids``, ``topk_count`` as
    asked, and ``bad`` (host int: rows of key tiles that held NaN or inf).
    A range search (``mode.range_min``) runs on the CPU only: ValueError.
    """
    to = device_view
    Q, keys, values = to(problem.Q), problem.keys, problem.values
    want_soft, want_acc, k, range_min, _ = mode
    if range_min.shape[0] > 0:
        raise ValueError("range search runs on the CPU: use device='cpu' or 'auto'")
    bias, key_mode, key_coef = problem.logits
    excl_off, excl_ids, row_lo, row_hi, allow = problem.masks
    K4 = to(keys.data)
    V4 = K4 if values.data is keys.data or not want_acc else to(values.data)
    bias2, row_lo, row_hi = to(bias), to(row_lo), to(row_hi)
    if len(Q.shape) == 2:                      # one problem: (1, R, 1, ...) views
        Q, K4, V4 = (unit_axes(a, (0, 2)) for a in (Q, K4, V4))
        bias2, row_lo, row_hi = (unit_axes(a, (0,)) for a in (bias2, row_lo, row_hi))
    batch, T, H, d = Q.shape
    N, Hkv = K4.shape[1], K4.shape[2]
    P, R = batch * Hkv, T * (H // Hkv)
    vd = values.width if want_acc else 0
    lay, nqb, nsplit = plan(R, N)
    cap = topk_buffer.capacity(max(k, 1))
    m = cuda.device_array((P, nsplit, R), np.float32)
    l = cuda.device_array((P, nsplit, R), np.float32)
    acc = cuda.device_array((P, nsplit, R, vd), np.float32)
    tk_s = cuda.device_array((P, nsplit, R, cap), np.float32)
    tk_i = cuda.device_array((P, nsplit, R, cap), np.int64)
    tk_n = cuda.device_array((P, nsplit, R), np.int64)
    bad = to(np.zeros(1, np.int64))
    kernel = stream_kernel(np.dtype(K4.dtype), np.dtype(V4.dtype), lay, vd)
    kernel[(nqb, nsplit, P), lay.threads](
        Q, np.float32(query.qmult), query.qunit, np.float32(query.qsq_coef), K4,
        to(keys.scale), V4, to(values.scale), keys.col, values.col, bias2,
        np.float32(query.bias_mult), key_mode, np.float32(key_coef),
        to(excl_off), to(excl_ids), allow, row_lo, row_hi, want_soft, k, m, l, acc,
        tk_s, tk_i, tk_n, bad)
    res = {"bad": int(bad.copy_to_host()[0])}
    threads = config.CUDA_QUERY_BLOCK
    rows = P * R
    if want_soft:
        res["out"] = cuda.device_array((rows, vd), np.float32)
        res["lse"] = cuda.device_array(rows, lse_dtype)
        merge_states_kernel[-(-rows * max(vd, 1) // threads), threads](m, l, acc, res["out"],
                                                                       res["lse"])
    if k > 0:
        res["topk_logits"] = to(np.full((rows, k), NEG_INIT, np.float32))
        res["topk_ids"] = to(np.full((rows, k), -1, np.int64))
        res["topk_count"] = cuda.device_array(rows, np.int64)
        merge_topk_kernel[-(-rows // threads), threads](
            tk_s, tk_i, tk_n, k, cuda.device_array((rows, cap), np.float32),
            cuda.device_array((rows, cap), np.int64), res["topk_logits"], res["topk_ids"],
            res["topk_count"])
    return res


def unit_axes(a, where):
    """A view of the device array ``a`` (any strides) with axes of length 1
    inserted at the positions ``where`` (ascending)."""
    shape, strides = list(a.shape), list(a.strides)
    for w in where:
        shape.insert(w, 1)
        strides.insert(w, 0)
    if hasattr(a, "gpu_data"):                     # a numba device array
        return type(a)(shape=tuple(shape), strides=tuple(strides), dtype=a.dtype,
                       gpu_data=a.gpu_data)
    index = [slice(None)] * len(a.shape)           # the simulator's (numpy underneath)
    for w in where:
        index.insert(w, None)
    return a[tuple(index)]


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
    """One thread per stacked row: :func:`rules.topk_attention_row` (as
    :func:`cpu.finish_topk_attention`) for values stored as ``vdtype``.
    Arguments: logits, ids (P * R, k'), count (P * R,), lse (P * R,), V4
    (batch, S, Hkv, W) (row ``q`` reads problem ``q // R``'s values, as
    :func:`launch` stacks them), vscale, vcol, R, and the outputs out
    (P * R, dv), weights, ids_out (P * R, k), coverage (P * R,)."""
    row_rule = shared_for(vdtype).topk_attention_row

    @cuda.jit
    def kernel(logits, ids, count, lse, V4, vscale, vcol, R, out, weights, ids_out, coverage):
        q = cuda.grid(1)
        if q < logits.shape[0]:
            p = q // R
            Hkv = V4.shape[2]
            bb = p // Hkv
            V = V4[bb, :, p - bb * Hkv]
            coverage[q] = row_rule(logits[q], ids[q], count[q], lse[q], V, vscale, vcol, out[q],
                                   weights[q], ids_out[q])

    return kernel


@cuda.jit
def scatter_heads_kernel(src, dst, Hkv):
    """dst (batch, T, H, X) from the stacked rows src (P * R, X) of
    :func:`launch` (problem ``p = b * Hkv + g``, row ``r = t * G + i`` is
    query head ``g * G + i`` at position ``t``): one thread per element."""
    e = cuda.grid(1)
    X = src.shape[1]
    q = e // X
    if q >= src.shape[0]:
        return
    c = e - q * X
    T = dst.shape[1]
    G = dst.shape[2] // Hkv
    R = T * G
    p = q // R
    r = q - p * R
    b = p // Hkv
    t = r // G
    dst[b, t, (p - b * Hkv) * G + r - t * G, c] = src[q, c]
