"""CPU drivers: tiling, the parallel split, and BLAS, around the shared core.

Work is cut into ``nqb x nsplit`` items: ``nqb`` equal query blocks times
``nsplit`` key ranges. Each item streams its key range tile by tile. For each
``(query block, key tile)`` it computes one score tile, turns it into logits
(per-key terms, bias, exclusions), and feeds it to whichever consumers the
mode asks for:

* the online-softmax state per query (``m``, ``l``) and, for soft retrieval,
  the weighted sum of values ``acc`` (see :mod:`softretrieval.core`);
* a top-k buffer per query (:mod:`softretrieval.topk_buffer`, shared with
  the CUDA kernels).

The states of the key ranges are then merged (:func:`merge_states`,
:func:`merge_topk`). The B x N score matrix never exists.

Inputs reach these functions already validated and prepared by
:mod:`softretrieval.api`: C-contiguous float32, queries pre-multiplied by the
logit scale (times ``log2(e)`` when a softmax is wanted), the bias in the same
units (``-inf`` for an excluded key, which :func:`rules.key_offset` turns
into :data:`constants.MASKED`), and exclusions as CSR with the ids of each
query sorted. What a logit is, and the merges and finishes, are the shared
rules of :mod:`softretrieval.rules`; the online-softmax tile update and the
top-k scan below are this driver's loops around :mod:`softretrieval.core`
and :mod:`softretrieval.topk_buffer`.
"""

import numpy as np
from numba import njit, prange
from numba import types as nbtypes
from llvmlite import ir
from numba.core.extending import intrinsic, overload

from . import config, core, cpu_bf16, cpu_int8, cpu_micro, rules, runtime
from .constants import KEYS_PLAIN, MASKED, NEG_INIT

bfloat16_to_float = core.cpu.bfloat16_to_float
half_to_float = core.cpu.half_to_float

# Fast-math without 'nnan'/'ninf': NaN and inf flow through to the outputs,
# where the API detects them (a NaN in the values must not be folded away).
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def f16c_to_float(typingctx, bits):
    """float32 of the IEEE half whose bits are the uint16 ``bits``: an LLVM
    ``fpext``, which becomes the F16C ``vcvtph2ps`` instruction on x86 (3x
    faster than the portable bit manipulation of ``core.half_to_float``, which
    the other targets use). The CPU's own decoder instruction, not a second
    copy of a rule: ``decode`` below picks it for float16 storage where Numba
    compiles for F16C. Without F16C (e.g. ``NUMBA_CPU_NAME=generic``, for a
    cache shared by several CPUs) LLVM turns it into a call of a runtime
    function that Numba does not link, and the process aborts."""
    sig = nbtypes.float32(nbtypes.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def decode(x):
    """float32 value of one stored element, by the dtype the kernels see
    (:mod:`softretrieval.storage`): float32 as is, uint16 the bits of a
    float16, int16 the bits of a bfloat16, int8 an integer (to be multiplied
    by its row's scale). Chosen at compile time, so loops stay branch-free."""
    raise NotImplementedError("compiled only")


@overload(decode, inline="always")
def _decode_for(x):
    if x == nbtypes.float32:
        return lambda x: x
    if x == nbtypes.uint16:
        if cpu_micro.target_features().get("f16c", False):
            return lambda x: f16c_to_float(x)
        return lambda x: half_to_float(x)
    if x == nbtypes.int16:
        return lambda x: bfloat16_to_float(x)
    if x == nbtypes.int8:
        return lambda x: np.float32(x)
    return None


_rule_hit_bits = core.compile_for(njit(inline="always"), (rules.hit_bits,)).hit_bits


@njit(inline="always")
def _hit_bits(row, c0, width, threshold):
    """:func:`rules.hit_bits`, a whole mask in one vector compare
    (:func:`cpu_micro.hit_mask`). row: a row of a score tile (C-contiguous)."""
    if width == rules.HIT_LANES:
        return cpu_micro.hit_mask(row, c0, threshold)
    return _rule_hit_bits(row, c0, width, threshold)


#: The shared core, top-k buffer and per-row rules (:mod:`softretrieval.rules`),
#: compiled for the CPU and inlined into the kernels below. The top-k buffer's
#: functions are compiled apart, without reference counting (``_nrt=False``:
#: they allocate nothing), and left to LLVM to inline: inlined by Numba, each
#: offer of a candidate counted references to the two buffer arrays in
#: atomic calls (about 20 ns an offer in a scan harness; 2% of a top-1000
#: search over 1M keys).
shared = rules.shared(njit(inline="always"), decode, _hit_bits, njit(_nrt=False))
topk_offer = shared.topk_buffer.offer
topk_finish = shared.topk_buffer.finish
topk_capacity = shared.topk_buffer.capacity


def has_dtype(X, dtype):
    """Whether the array X holds ``dtype`` (a numpy scalar type), known at
    compile time: e.g. ``has_dtype(K, np.float32)``."""
    return X.dtype == dtype


@overload(has_dtype, inline="always")
def _has_dtype_for(X, dtype):
    same = X.dtype == dtype.instance_type
    return lambda X, dtype: same


def _tile(X, col, width, buf, scale):
    """Rows ``X[:, col:col + width]`` of a tile as packed float32 (rows, width).

    X (rows, W) C-contiguous in a storage dtype (see :func:`decode`); scale
    (rows,) the int8 row scales, else (0,). A float32 tile with W == width is
    returned as it is; otherwise (one head of a multi-head array, ``col =
    head * width``, or compact storage) the rows are decoded into the scratch
    ``buf``, each from a contiguous row slice, which vectorizes.
    """
    raise NotImplementedError("compiled only")


@overload(_tile, jit_options={"fastmath": _FAST})
def _tile_for(X, col, width, buf, scale):
    plain = X.dtype == nbtypes.float32

    def impl(X, col, width, buf, scale):
        if plain and X.shape[1] == width:
            return X
        out = buf[: X.shape[0]]
        scaled = scale.shape[0] > 0
        for j in range(X.shape[0]):
            seg = X[j, col:col + width]
            o = out[j]
            if scaled:
                s = scale[j]
                for c in range(width):
                    o[c] = decode(seg[c]) * s
            else:
                for c in range(width):
                    o[c] = decode(seg[c])
        return out

    return impl


@njit(fastmath=_FAST, cache=True)
def _scores(Qb, Kt, S, simd):
    """S (bq, tn) = Qb (bq, d) . Kt (tn, d)^T: SIMD loops (each key row read
    once for all queries; best for a few queries) or BLAS."""
    if not simd:
        np.dot(Qb, Kt.T, S)
        return
    bq, d = Qb.shape
    for j in range(Kt.shape[0]):
        k = Kt[j]
        for i in range(bq):
            q = Qb[i]
            dot = np.float32(0.0)
            for c in range(d):
                dot += q[c] * k[c]
            S[i, j] = dot


@njit(cache=True, inline="always")
def _four_rows(X, j0, col, width):
    """Rows j0..j0+3 of a tile (columns ``col:col + width``) and their
    indices; past the tile's end the last row repeats."""
    last = X.shape[0] - 1
    j1 = min(j0 + 1, last)
    j2 = min(j0 + 2, last)
    j3 = min(j0 + 3, last)
    return (j1, j2, j3, X[j0, col:col + width], X[j1, col:col + width],
            X[j2, col:col + width], X[j3, col:col + width])


@njit(fastmath=_FAST, cache=True)
def _scores_rows(Qb, Kraw, kcol, ks, S, norms, want_norms):
    """SIMD scores of a tile of compact keys, S (bq, tn) = Qb . K^T.

    Elements are decoded in registers (decoding into a buffer first costs a
    store and a reload per element, more than the bytes saved), and every
    inner loop carries four independent sums so it is not bound by the
    latency of one chain of FMAs: four queries against one key while at
    least four queries remain, then one query against four keys. With
    ``want_norms`` also ``norms[j] = |k_j|^2``.

    Kraw (tn, W) in a storage dtype (:func:`decode`), the keys in columns
    ``kcol:kcol + d``; ks (tn,) int8 row scales, else (0,).
    """
    bq, d = Qb.shape
    tn = Kraw.shape[0]
    scaled = ks.shape[0] > 0
    quads = bq - bq % 4
    for j in range(tn if quads > 0 or want_norms else 0):   # nothing to do for < 4 plain queries
        k = Kraw[j, kcol:kcol + d]
        s = ks[j] if scaled else np.float32(1.0)
        for i0 in range(0, quads, 4):
            q0 = Qb[i0]
            q1 = Qb[i0 + 1]
            q2 = Qb[i0 + 2]
            q3 = Qb[i0 + 3]
            d0 = np.float32(0.0)
            d1 = np.float32(0.0)
            d2 = np.float32(0.0)
            d3 = np.float32(0.0)
            for c in range(d):
                x = decode(k[c])
                d0 += q0[c] * x
                d1 += q1[c] * x
                d2 += q2[c] * x
                d3 += q3[c] * x
            S[i0, j] = d0 * s
            S[i0 + 1, j] = d1 * s
            S[i0 + 2, j] = d2 * s
            S[i0 + 3, j] = d3 * s
        if want_norms:
            sq = np.float32(0.0)
            for c in range(d):
                x = decode(k[c])
                sq += x * x
            norms[j] = sq * s * s
    if quads == bq:
        return
    for j0 in range(0, tn, 4):
        # The last group of a tile repeats its last key: same sums, same slots.
        j1, j2, j3, k0, k1, k2, k3 = _four_rows(Kraw, j0, kcol, d)
        for i in range(quads, bq):
            q = Qb[i]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for c in range(d):
                qc = q[c]
                a0 += qc * decode(k0[c])
                a1 += qc * decode(k1[c])
                a2 += qc * decode(k2[c])
                a3 += qc * decode(k3[c])
            if scaled:
                a0 *= ks[j0]
                a1 *= ks[j1]
                a2 *= ks[j2]
                a3 *= ks[j3]
            S[i, j3] = a3
            S[i, j2] = a2
            S[i, j1] = a1
            S[i, j0] = a0


@njit(fastmath=_FAST, cache=True)
def _accumulate(S, Vt, acc, corr, simd, micro, width, pv):
    """acc (bq, dv) = acc * corr + S (bq, tn) . Vt (tn, dv): SIMD loops (a
    few queries), the float32 micro-kernel (``micro``: AVX-512F or AVX2,
    dv a multiple of its ``cpu_micro.COLS`` columns; :func:`cpu_micro.fma_rows`,
    1.1-1.15x BLAS's rate here), or BLAS into the scratch pv (bq, dv). width (bq,) int64 or
    (0,): the micro-kernel reads only the first ``width[i]`` weights of row
    i's block (the others are 0: keys outside the row's window)."""
    bq, dv = acc.shape
    if micro and dv % cpu_micro.COLS == 0:
        for i in range(bq):
            a = acc[i]
            for c in range(dv):
                a[c] *= corr[i]
        full = bq - bq % cpu_micro.ROWS
        for r0 in range(0, full, cpu_micro.ROWS):
            n = cpu_micro.block_width(width, r0, S.shape[1])
            for c0 in range(0, dv, cpu_micro.COLS):
                cpu_micro.fma_rows(S[r0:, :n], Vt[:n, c0:], acc[r0:, c0:])
        if full < bq:
            # The last rows through zero-padded copies of a full register tile.
            n = cpu_micro.block_width(width, full, S.shape[1])
            ps = np.zeros((cpu_micro.ROWS, n), np.float32)
            pa = np.zeros((cpu_micro.ROWS, dv), np.float32)
            ps[: bq - full] = S[full:, :n]
            pa[: bq - full] = acc[full:]
            for c0 in range(0, dv, cpu_micro.COLS):
                cpu_micro.fma_rows(ps, Vt[:n, c0:], pa[:, c0:])
            acc[full:] = pa[: bq - full]
        return
    if simd:
        for i in range(bq):
            a = acc[i]
            for c in range(dv):
                a[c] *= corr[i]
        for j in range(Vt.shape[0]):
            v = Vt[j]
            for i in range(bq):
                p = S[i, j]
                a = acc[i]
                for c in range(dv):
                    a[c] += p * v[c]
        return
    np.dot(S, Vt, pv)
    for i in range(bq):
        a = acc[i]
        p = pv[i]
        for c in range(dv):
            a[c] = a[c] * corr[i] + p[c]


@njit(fastmath=_FAST, cache=True)
def _accumulate_rows(S, Vraw, vcol, vs, acc, corr):
    """acc (bq, dv) = acc * corr + S (bq, tn) . V for a tile of compact values
    (the SIMD path), each element decoded in registers next to its
    multiply-add, four value rows per pass over an accumulator row (a quarter
    of its loads and stores). Vraw (tn, W) in a storage dtype
    (:func:`decode`), values in columns ``vcol:vcol + dv``; vs (tn,) int8 row
    scales, else (0,)."""
    bq, dv = acc.shape
    tn = Vraw.shape[0]
    scaled = vs.shape[0] > 0
    for i in range(bq):
        a = acc[i]
        for c in range(dv):
            a[c] *= corr[i]
    for j0 in range(0, tn, 4):
        # Past the tile's end a group repeats its last row with weight 0.
        j1, j2, j3, v0, v1, v2, v3 = _four_rows(Vraw, j0, vcol, dv)
        for i in range(bq):
            p0 = S[i, j0]
            p1 = S[i, j1] if j0 + 1 < tn else np.float32(0.0)
            p2 = S[i, j2] if j0 + 2 < tn else np.float32(0.0)
            p3 = S[i, j3] if j0 + 3 < tn else np.float32(0.0)
            if scaled:
                p0 *= vs[j0]
                p1 *= vs[j1]
                p2 *= vs[j2]
                p3 *= vs[j3]
            a = acc[i]
            for c in range(dv):
                a[c] += (p0 * decode(v0[c]) + p1 * decode(v1[c])
                         + p2 * decode(v2[c]) + p3 * decode(v3[c]))


@njit(fastmath=_FAST, cache=True)
def _squared_norms(Kt, out):
    """out[j] = |Kt[j]|^2 for the rows of a key tile."""
    for j in range(Kt.shape[0]):
        k = Kt[j]
        sq = np.float32(0.0)
        for c in range(k.shape[0]):
            sq += k[c] * k[c]
        out[j] = sq


@njit(fastmath=_FAST, cache=True)
def _key_terms(bias_t, has_bias, key_mode, key_coef, S, terms, factors):
    """Turn dot products into logits, in place, by the shared rules
    (:func:`rules.key_factor`, :func:`rules.key_offset`, :func:`rules.logit`).

    bias_t (tn,) (read when ``has_bias``), S (bq, tn); terms (>= tn,) holds
    the keys' squared norms on entry unless ``key_mode == KEYS_PLAIN``, then
    their offsets; factors (>= tn,) scratch.
    """
    tn = S.shape[1]
    if key_mode == KEYS_PLAIN and not has_bias:
        return
    for j in range(tn):
        b = bias_t[j] if has_bias else np.float32(0.0)
        factors[j] = shared.key_factor(key_mode, terms[j])
        terms[j] = shared.key_offset(key_mode, key_coef, terms[j], b)
    for i in range(S.shape[0]):
        row = S[i]
        for j in range(tn):
            row[j] = shared.logit(row[j], factors[j], terms[j])


@njit(cache=True)
def _masks(S, t0, excl_ids, ptr, end, allow, lo, hi):
    """Mask each row's excluded keys, or with ``allow`` the keys not in its
    allow-list (:func:`rules.list_row`; ``ptr`` advances per row), and keys
    outside its window ``[lo[i], hi[i])`` (:func:`rules.window_row`, when
    ``lo`` is not empty)."""
    tn = S.shape[1]
    for i in range(S.shape[0]):
        ptr[i] = shared.list_row(S[i], tn, t0, excl_ids, ptr[i], end[i], allow)
        if lo.shape[0] > 0:
            shared.window_row(S[i], tn, t0, lo[i], hi[i])


@njit(cache=True)
def _filter_terms(kn, d, factors, terms, transformed):
    """What the bfloat16 filter's margin needs of a key tile
    (:func:`cpu_bf16.margin_terms`): ``(max |k| |factor|, max |factor|, max
    |offset|)`` over its keys — kn (tn,) their squared norms
    (:func:`cpu_bf16.pack_keys`); factors and
    terms (offsets) as :func:`_key_terms` left them when ``transformed``.
    Offsets of masked keys (a ``-inf`` bias) are left out: their logits stay
    far below any threshold either way."""
    if not transformed:
        return cpu_bf16.norm_bound(kn.max(), d), 1.0, 0.0
    kf = 0.0
    fa = 0.0
    omax = 0.0
    for j in range(kn.shape[0]):
        f = abs(np.float64(factors[j]))
        kf = max(kf, cpu_bf16.norm_bound(kn[j], d) * f)
        fa = max(fa, f)
        if terms[j] > MASKED / 2:
            omax = max(omax, abs(np.float64(terms[j])))
    return kf, fa, omax


@njit(fastmath=_FAST, cache=True)
def _stream_range(Qb, keys, values, logits, excl_ids, ptr, end, allow, lo, hi, k0, k1, ktile, simd,
                  filt, filt8, micro, mode, states, stop):
    """Stream keys ``k0:k1`` into the states of one query block.

    Qb (bq, d) float32. keys, values: :class:`devices.Rows` (the keys are
    ``keys.data[:, keys.col:keys.col + d]`` in a storage dtype
    (:func:`decode`), int8 row scales in ``keys.scale``; likewise the
    ``values.width`` value columns). logits: :class:`devices.Logits`.
    excl_ids: the sorted excluded ids, row i's in ``excl_ids[ptr[i]:end[i]]``
    (ptr, end (bq,)); with ``allow`` they are allow-lists instead. lo, hi
    (bq,) or (0,): each row's key window. mode:
    :class:`devices.Mode`. states: ``(m, l, acc, tk_s, tk_i, tk_n, tk_ts,
    tk_ti, rg_min, rg_slot, rg_n, rg_s, rg_i)``: m, l (bq,), acc (bq, dv)
    online-softmax states, updated when ``want_soft`` (acc only when
    ``want_acc``); tk_s, tk_i (bq, cap), tk_n, tk_ts, tk_ti (bq,) top-k
    buffers and their thresholds, updated when ``k > 0``; for a range
    search (rg_min not empty), row i's logit threshold ``rg_min[i]``, its
    hit count ``rg_n[i]`` and its slots ``rg_slot[i]:rg_slot[i + 1]`` of
    the range's hit buffers rg_s, rg_i (:func:`rules.range_scan_row`).
    stop (1,) int64: the range ends early (its states incomplete) once
    ``stop[0] != 0``, checked before each tile. With ``filt`` (a CPU with
    AVX512_BF16), the BLAS tiles of a top-k search (no softmax, no range) are scored in bfloat16
    and only the keys that may enter a buffer are scored again in float32
    (:mod:`softretrieval.cpu_bf16`); tiles whose norms are too large for
    its error bound are scored in float32. With ``filt8`` (a CPU with
    AVX512_VNNI), the SIMD tiles of a top-k search over int8 keys with
    plain inner products are scored in integers against int8-rounded
    queries, likewise rescoring only the keys that may enter
    (:mod:`softretrieval.cpu_int8`). Returns the number of rows of
    score tiles that held a NaN or inf.
    """
    K, kscale, kcol = keys.data, keys.scale, keys.col
    V, vscale, vcol = values.data, values.scale, values.col
    bias, key_mode, key_coef = logits
    want_soft, want_acc, k, _, _ = mode
    m, l, acc, tk_s, tk_i, tk_n, tk_ts, tk_ti, rg_min, rg_slot, rg_n, rg_s, rg_i = states
    ranged = rg_min.shape[0] > 0
    bq, d = Qb.shape
    dv = acc.shape[1]
    has_bias = bias.shape[0] > 0
    scores = cpu_micro.aligned_empty(bq * ktile, np.float32)
    terms = np.empty(ktile, np.float32)
    factors = np.empty(ktile, np.float32)
    corr = np.ones(bq, np.float32)
    pv = np.empty((bq, dv), np.float32)
    kplain = has_dtype(K, np.float32)
    # Scratch for decoded or head-packed key tiles (compact keys on the SIMD
    # path decode in registers instead).
    kbuf = np.empty((ktile if (K.shape[1] != d if kplain else not simd) else 0, d), np.float32)
    micro = micro and not simd
    # Value tiles are decoded, or copied for the AVX2 register tile
    # (cpu_micro.aligned_rows), into vbuf.
    realign = micro and cpu_micro.LANES == 8 and dv % cpu_micro.COLS == 0
    vrows = ktile if want_acc and (V.shape[1] != dv or not has_dtype(V, np.float32) or realign) else 0
    vbuf = cpu_micro.aligned_empty(vrows * dv, np.float32).reshape((vrows, dv))
    kscaled = kscale.shape[0] > 0
    vscaled = vscale.shape[0] > 0
    transformed = key_mode != KEYS_PLAIN or has_bias
    # Packed operands of the micro-kernels (cpu_micro.tile_products): the
    # bfloat16 filter's query pairs, their norm bounds and key tiles; the
    # float32 queries and key tiles; the scratch of the edge register tiles.
    filt = filt and k > 0 and not want_soft and not ranged and not simd
    filt8 = (filt8 and k > 0 and not want_soft and not ranged and simd and has_dtype(K, np.int8)
             and not transformed and d < cpu_int8.MAX_D)
    rows, cols = cpu_micro.ROWS, cpu_micro.COLS
    d2 = (d + 1) // 2
    qrows = -(-bq // rows) * rows
    kblocks = -(-ktile // cols)
    qp = cpu_micro.aligned_empty(qrows * d2 if filt else 0, np.uint32).reshape((-1, d2))
    qn = np.empty(bq if filt else 0, np.float64)
    kp = cpu_micro.aligned_empty(kblocks * d2 * cols if filt else 0, np.uint32).reshape(
        (-1, d2, cols))
    kn = np.empty(ktile if filt else 0, np.float32)
    pairs = np.empty((ktile if filt else 0, d2), np.uint32)
    qf32 = cpu_micro.aligned_empty(qrows * d if micro else 0, np.float32).reshape((-1, d))
    kf32 = cpu_micro.aligned_empty(kblocks * d * cols if micro else 0, np.float32).reshape(
        (-1, d, cols))
    edge = cpu_micro.aligned_empty(rows * cols, np.float32).reshape((rows, cols))
    qtop = cpu_bf16.pack_queries(Qb, qp, qn) if filt else 0.0
    qi = np.empty((bq if filt8 else 0, cpu_int8.padded(d)), np.int8)
    qstats = np.empty((bq if filt8 else 0, 3), np.float64)
    qtop8 = cpu_int8.quantize_queries(Qb, qi, qstats) if filt8 else np.inf
    kmax = np.float32(0.0)
    if micro:
        cpu_micro.pad_rows(Qb, qf32)
    # Keys of the tile each row may see (key windows: causal), so that the
    # micro-kernels skip the register tiles past every row's window.
    width = np.empty(bq if lo.shape[0] > 0 else 0, np.int64)
    bad = 0
    for t0 in range(k0, k1, ktile):
        if stop[0] != 0:
            break
        t1 = min(t0 + ktile, k1)
        S = scores[: bq * (t1 - t0)].reshape((bq, t1 - t0))
        ks = kscale[t0:t1] if kscaled else kscale
        approx = False
        Kt = kbuf
        for i in range(width.shape[0]):
            width[i] = min(max(hi[i] - t0, 0), t1 - t0)
        approx8 = False
        if filt8:
            approx8, kmax = cpu_int8.usable(qtop8, ks)
        if approx8:
            cpu_int8.approx_scores(qi, qstats, K[t0:t1], kcol, d, ks, S)
        elif simd and not kplain:
            _scores_rows(Qb, K[t0:t1], kcol, ks, S, terms, key_mode != KEYS_PLAIN)
        else:
            Kt = _tile(K[t0:t1], kcol, d, kbuf, ks)
            if filt:
                ktop = cpu_bf16.pack_keys(Kt, kp, kn, pairs)
                approx = max(qtop, ktop, qtop * ktop) < cpu_bf16.NORM_LIMIT
            if approx:
                cpu_micro.tile_products(qp, kp, S, edge, True, width)
            elif micro:
                cpu_micro.pack_columns(Kt, kf32)
                cpu_micro.tile_products(qf32, kf32, S, edge, False, width)
            else:
                _scores(Qb, Kt, S, simd)
            if key_mode != KEYS_PLAIN:
                _squared_norms(Kt, terms)
        _key_terms(bias[t0:t1] if has_bias else bias, has_bias, key_mode, key_coef, S, terms,
                   factors)
        _masks(S, t0, excl_ids, ptr, end, allow, lo, hi)
        if approx:
            ma, mb = cpu_bf16.margin_terms(*_filter_terms(kn[: t1 - t0], d, factors, terms,
                                                          transformed), d)
        bits = S.view(np.int32)
        for i in range(bq):
            mx, finite = shared.row_max_finite(bits[i], t1 - t0)
            if not finite:
                bad += 1
            if k > 0 and approx:
                tk_n[i], tk_ts[i], tk_ti[i] = shared.topk_rescore_scan_row(
                    S[i], t1 - t0, mx, t0, k, tk_s[i], tk_i[i], tk_n[i], tk_ts[i], tk_ti[i], Qb[i],
                    Kt, kscale[:0], factors, terms, transformed, cpu_bf16.slack(qn[i], ma, mb))
            elif k > 0 and approx8:
                tk_n[i], tk_ts[i], tk_ti[i] = shared.topk_rescore_scan_row(
                    S[i], t1 - t0, mx, t0, k, tk_s[i], tk_i[i], tk_n[i], tk_ts[i], tk_ti[i], Qb[i],
                    K[t0:t1, kcol:kcol + d], ks, factors, terms, False,
                    cpu_int8.slack(qstats[i, 2], kmax))
            elif k > 0:
                tk_n[i], tk_ts[i], tk_ti[i] = shared.topk_scan_row(
                    S[i], t1 - t0, mx, t0, k, tk_s[i], tk_i[i], tk_n[i], tk_ts[i], tk_ti[i])
            if ranged:
                rg_n[i] = shared.range_scan_row(S[i], t1 - t0, mx, t0, rg_min[i], rg_s, rg_i,
                                                rg_slot[i], rg_slot[i + 1], rg_n[i])
            if want_soft:
                m[i], corr[i], total = shared.softmax_row(S[i], t1 - t0, m[i], mx, want_acc)
                l[i] = l[i] * corr[i] + total
        if not want_acc:
            continue
        vs = vscale[t0:t1] if vscaled else vscale
        if simd and not has_dtype(V, np.float32):
            _accumulate_rows(S, V[t0:t1], vcol, vs, acc, corr)
        else:
            Vt = _tile(V[t0:t1], vcol, dv, vbuf, vs)
            if realign:
                Vt = cpu_micro.aligned_rows(Vt, vbuf)
            _accumulate(S, Vt, acc, corr, simd, micro, width, pv)
    return bad


@njit(cache=True)
def _stream_states(nsplit, B, dv, k, slots, items):
    """The per-split states :func:`stream` fills (see its Returns), initial,
    plus its per-item counts of bad rows (items,). Allocated here, outside
    the parallel kernel: there every ``np.full``/``np.zeros`` would become a
    parallel region of its own, each costing a thread wake-up (~0.1 ms)."""
    cap = topk_capacity(k) if k > 0 else 0
    return (np.full((nsplit, B), NEG_INIT, np.float32), np.zeros((nsplit, B), np.float32),
            np.zeros((nsplit, B, dv), np.float32), np.empty((nsplit, B, cap), np.float32),
            np.empty((nsplit, B, cap), np.int64), np.zeros((nsplit, B), np.int64),
            np.full((nsplit, B), NEG_INIT, np.float32), np.full((nsplit, B), -1, np.int64),
            np.empty((nsplit, slots), np.float32), np.empty((nsplit, slots), np.int64),
            np.zeros((nsplit, B), np.int64), np.zeros(items, np.int64))


@njit(cache=True)
def _total(x):
    """Sum of a 1-d array, serially (see :func:`_stream_states`)."""
    s = 0
    for v in x:
        s += v
    return s


@njit(parallel=True, cache=True, nogil=True)
def stream(Q, keys, values, logits, masks, tiling, mode, stop):
    """Stream every key past every query, in ``nqb x nsplit`` parallel items.

    Q (B, d) float32, C-contiguous. keys, values: :class:`devices.Rows`
    (C-contiguous storage rows, e.g. one head of a multi-head array at its
    column offset); logits: :class:`devices.Logits`; masks:
    :class:`devices.Masks` — CSR exclusion lists (or allow-lists) sorted per query, and the
    int64 key window ``[lo, hi)`` of each query (causal and sliding-window
    modes, folded problems): key tiles outside every window of a block are
    skipped, tiles that cross a window edge masked. tiling: ``(qstarts,
    nsplit, ktile, ktile_simd, simd_queries, filt, filt8, micro)``: query block b is rows
    ``qstarts[b]:qstarts[b + 1]`` (qstarts (nqb + 1,) int64, from
    :func:`plan`); each block's key range (all N keys, or the span of its
    rows' windows) is cut into ``nsplit`` equal ranges; blocks of at most
    ``simd_queries`` rows use SIMD loops over tiles of ``ktile_simd`` keys,
    larger ones BLAS over tiles of ``ktile``; blocks are visited in zigzag
    order (first, last, second, ...) so each thread's share mixes cheap and
    costly causal blocks. mode: :class:`devices.Mode`. stop (1,) int64: set it non-zero to
    end the call early (the results are then incomplete:
    :func:`runtime.parallel_call` discards them).

    Returns ``(m, l, acc, tk_s, tk_i, tk_n, rg_s, rg_i, rg_n, bad)``, one
    entry per key range: m, l (nsplit, B) and acc (nsplit, B, dv) float32
    online-softmax states (acc only with ``want_acc``); tk_s (nsplit, B,
    cap) float32 logits and tk_i (nsplit, B, cap) int64 ids of top-k
    candidates (cap = ``topk_buffer.capacity(k)``), tk_n (nsplit, B) their
    counts (with ``k > 0``); for a range search, rg_s (nsplit, slots)
    float32 logits and rg_i int64 ids of each range's hits, query b's in
    slots ``range_slots[b]:range_slots[b + 1]`` in increasing id order, and
    rg_n (nsplit, B) their counts (hits past the slots included); ``bad``
    the number of score-tile rows that held NaN or inf.
    """
    K = keys.data
    dv = values.width
    excl_off, excl_ids, row_lo, row_hi, allow = masks
    qstarts, nsplit, ktile, ktile_simd, simd_queries, filt, filt8, micro = tiling
    want_soft, want_acc, k, range_min, range_slots = mode
    B = Q.shape[0]
    N = K.shape[0]
    nqb = qstarts.shape[0] - 1
    slots = range_slots[B] if range_min.shape[0] > 0 else 0
    m, l, acc, tk_s, tk_i, tk_n, tk_ts, tk_ti, rg_s, rg_i, rg_n, bad = _stream_states(
        nsplit, B, dv if want_acc else 0, k, slots, nqb * nsplit)
    windowed = row_lo.shape[0] > 0
    for w in prange(nqb * nsplit):
        zz = w // nsplit
        sp = w - zz * nsplit
        qb = zz // 2 if zz % 2 == 0 else nqb - 1 - zz // 2
        q0 = qstarts[qb]
        q1 = qstarts[qb + 1]
        lo_b, hi_b = 0, N
        if windowed and q0 < q1:
            lo_b = max(0, row_lo[q0:q1].min())
            hi_b = min(N, row_hi[q0:q1].max())
        split = (hi_b - lo_b + nsplit - 1) // nsplit
        k0 = lo_b + sp * split
        k1 = min(hi_b, k0 + split)
        if q0 >= q1 or k0 >= k1:
            continue
        ptr = np.zeros(q1 - q0, np.int64)
        end = np.zeros(q1 - q0, np.int64)
        if excl_off.shape[0] > 0:
            for i in range(q1 - q0):
                lo = excl_off[q0 + i]
                hi = excl_off[q0 + i + 1]
                ptr[i] = lo + np.searchsorted(excl_ids[lo:hi], k0)
                end[i] = lo + np.searchsorted(excl_ids[lo:hi], k1)
        simd = q1 - q0 <= simd_queries
        tile = ktile_simd if simd else ktile
        states = (m[sp, q0:q1], l[sp, q0:q1], acc[sp, q0:q1], tk_s[sp, q0:q1], tk_i[sp, q0:q1],
                  tk_n[sp, q0:q1], tk_ts[sp, q0:q1], tk_ti[sp, q0:q1], range_min[q0:q1],
                  range_slots[q0:q1 + 1], rg_n[sp, q0:q1], rg_s[sp], rg_i[sp])
        bad[w] = _stream_range(Q[q0:q1], keys, values, logits, excl_ids, ptr, end, allow,
                               row_lo[q0:q1], row_hi[q0:q1], k0, k1, tile, simd, filt, filt8, micro,
                               mode, states, stop)
    return m, l, acc, tk_s, tk_i, tk_n, rg_s, rg_i, rg_n, _total(bad)


@njit(cache=True)
def merge_states(m, l, acc):
    """Merge states over disjoint key sets and normalize them
    (:func:`rules.merge_row` per query).

    m, l (P, B) and acc (P, B, dv) float32: P partial states per query, in
    the base-2 convention of :mod:`softretrieval.core`.
    Returns ``(out (B, dv) float32, lse (B,) float64)``; a query with no
    valid key gets ``out = 0`` and ``lse = -inf``.
    """
    B = m.shape[1]
    out = np.empty((B, acc.shape[2]), np.float32)
    lse = np.empty(B, np.float64)
    for b in range(B):
        lse[b] = shared.merge_row(m, l, acc, b, out[b])
    return out, lse


@runtime.with_serial_twin
@njit(parallel=True, cache=True, nogil=True)
def merge_topk(tk_s, tk_i, tk_n, k):
    """Best k of the candidates of every key range, best first
    (:func:`rules.merge_topk_row` per query).

    tk_s, tk_i (P, B, cap), tk_n (P, B) as returned by :func:`stream`.
    Returns ``(scores (B, k) float32, ids (B, k) int64, count (B,))``: order
    by higher logit then lower id; slots past ``count`` hold NEG_INIT and -1.
    """
    B = tk_n.shape[1]
    scores = np.full((B, k), NEG_INIT, np.float32)
    ids = np.full((B, k), -1, np.int64)
    count = np.empty(B, np.int64)
    cap = topk_capacity(k)
    for b in prange(B):
        bs = np.empty(cap, np.float32)
        bi = np.empty(cap, np.int64)
        count[b] = shared.merge_topk_row(tk_s, tk_i, tk_n, b, k, bs, bi, scores[b], ids[b])
    return scores, ids, count


@runtime.with_serial_twin
@njit(parallel=True, cache=True, nogil=True)
def finish_topk(logits, ids, count, sign, offsets, clamp, pad, k):
    """Top-k scores and ids with FAISS's conventions (:func:`rules.topk_scores_row`
    per query) from :func:`merge_topk`'s logits, ids (B, k') and count (B,);
    offsets (B,) float64 per-query constants. Returns ``(scores (B, k)
    float32, ids (B, k) int64)``."""
    B = logits.shape[0]
    scores = np.empty((B, k), np.float32)
    ids_out = np.empty((B, k), np.int64)
    for b in prange(B):
        shared.topk_scores_row(logits[b], ids[b], count[b], sign, offsets[b], clamp, pad, scores[b],
                               ids_out[b])
    return scores, ids_out


@runtime.with_serial_twin
@njit(parallel=True, cache=True, nogil=True)
def finish_range(rg_s, rg_i, rg_n, slots, sign, offsets, clamp, threshold):
    """Range-search results with FAISS's score conventions from
    :func:`stream`'s per-split hits: rg_s, rg_i (P, slots[-1]), rg_n (P, B)
    (every count within its query's slots ``slots[b]:slots[b + 1]``;
    a query to leave out has count 0); offsets (B,) float64 per-query
    constants. Each query's hits are gathered from the splits and finished
    by :func:`rules.range_finish_row` (scores, the exact threshold test,
    best first), in place in one staging buffer. Returns ``(start (B + 1,),
    kept (B,), scores, ids)``: query b's results are the first ``kept[b]``
    entries from ``start[b]`` of the float32 scores and int64 ids."""
    P, B = rg_n.shape
    start = np.empty(B + 1, np.int64)       # (np.zeros and .sum() here would each be a
    start[0] = 0                            # parallel region of its own: see _stream_states)
    for b in range(B):
        hits = 0
        for p in range(P):
            hits += rg_n[p, b]
        start[b + 1] = start[b] + hits
    scores = np.empty(start[B], np.float32)
    ids = np.empty(start[B], np.int64)
    kept = np.empty(B, np.int64)
    for b in prange(B):
        o = start[b]
        for p in range(P):
            n = rg_n[p, b]
            scores[o:o + n] = rg_s[p, slots[b]:slots[b] + n]
            ids[o:o + n] = rg_i[p, slots[b]:slots[b] + n]
            o += n
        kept[b] = shared.range_finish_row(scores[start[b]:o], ids[start[b]:o], o - start[b], sign,
                                          offsets[b], clamp, threshold)
    return start, kept, scores, ids


@runtime.with_serial_twin
@njit(parallel=True, cache=True, nogil=True)
def finish_topk_attention(logits, ids, count, lse, V, vscale, vcol, dv, k):
    """Top-k attention from merged top-k buffers (:func:`rules.topk_attention_row`
    per query): logits, ids (B, k') and count (B,) from :func:`merge_topk`,
    lse (B,) natural-log partitions; V (N, WV) in a storage dtype with int8
    row scales ``vscale`` (N,), else (0,), the values in columns ``vcol:vcol + dv``.
    Returns ``(out (B, dv), ids (B, k), weights (B, k), coverage (B,))``."""
    B = logits.shape[0]
    out = np.empty((B, dv), np.float32)
    ids_out = np.empty((B, k), np.int64)
    weights = np.empty((B, k), np.float32)
    coverage = np.empty(B, np.float32)
    for b in prange(B):
        coverage[b] = shared.topk_attention_row(logits[b], ids[b], count[b], lse[b], V, vscale,
                                                vcol, out[b], weights[b], ids_out[b])
    return out, ids_out, weights, coverage


@njit(parallel=True, cache=True, nogil=True)
def gather_rows(src, rows, out):
    """``out[i] = src[rows[i]]`` for (N, W) rows of any numeric dtype (a
    storage dtype's bit patterns), in parallel: the rows an allow-list
    scores, gathered end to end."""
    for i in prange(rows.shape[0]):
        r = rows[i]
        for c in range(src.shape[1]):
            out[i, c] = src[r, c]


@njit(cache=True)
def scaled_rows(Q, mult, out):
    """``out = float32(Q * mult)``; returns whether all are finite. Q (R, d)
    float32 or float64 (any strides) times the float64 ``mult``, each
    product rounded once to float32 (the bits of numpy's ``(Q *
    mult).astype(np.float32)``, without its float64 temporary); out (R, d)
    float32, which may be Q itself."""
    R, d = Q.shape
    expo = np.int32(0)
    for i in range(R):
        q = Q[i]
        o = out[i]
        for c in range(d):
            o[c] = np.float32(np.float64(q[c]) * mult)
        for c in range(d):
            expo = max(expo, np.int32(core.float32_bits(o[c]) & np.int32(0x7F800000)))
    return expo != np.int32(0x7F800000)


@njit(parallel=True, cache=True, nogil=True)
def sort_lists(offsets, ids):
    """Sort each CSR list ``ids[offsets[b]:offsets[b + 1]]`` in place, the
    lists in parallel."""
    for b in prange(offsets.shape[0] - 1):
        ids[offsets[b]:offsets[b + 1]] = np.sort(ids[offsets[b]:offsets[b + 1]])
    return ids


def plan(B, N, threads, row_lo=None, row_hi=None):
    """Split of the work: ``(qstarts, nsplit)``, query blocks (block b is
    rows ``qstarts[b]:qstarts[b + 1]``) and key ranges per block.

    Many queries: query blocks of at most ``config.QUERY_BLOCK`` rows (give
    or take half a register tile: :func:`_cuts`), equal to within a register
    tile, their count a multiple of ``threads``, and one key range. Few queries (fewer
    than ``config.MIN_QUERIES_PER_THREAD`` per thread): one query block and
    ``threads`` key ranges, merged afterwards, so a single query still uses
    every core; never ranges shorter than ``config.MIN_KEYS_PER_SPLIT``.

    With key windows (row_lo, row_hi (B,) int64), a block never spans two
    runs of rows whose windows are disjoint (:func:`window_runs`): a
    problem folded from several (e.g. every head and sequence of a
    ``KNNMemory`` over one flat key array, each run of rows with its own
    window) then streams each key once, not once per run. Each run is cut
    into blocks of at most ``config.QUERY_BLOCK``; with fewer blocks than
    threads, their key ranges are split too.
    """
    runs = None if row_lo is None or row_lo.shape[0] == 0 else window_runs(row_lo, row_hi)
    if runs is None or runs.shape[0] <= 2:
        if B >= threads * config.MIN_QUERIES_PER_THREAD:
            nqb, nsplit = threads * -(-B // (threads * config.QUERY_BLOCK)), 1
        else:
            nqb = -(-B // config.QUERY_BLOCK)
            nsplit = max(1, min(threads, N // config.MIN_KEYS_PER_SPLIT))
        return np.append(_cuts(B, nqb), B).astype(np.int64), nsplit
    lens = np.diff(runs)
    pieces = -(-lens // config.QUERY_BLOCK)             # blocks per run, of equal size
    run = np.repeat(np.arange(lens.shape[0]), pieces)
    piece = np.arange(run.shape[0]) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    qstarts = np.append(runs[:-1][run] + _cuts(lens[run], pieces[run], piece), B).astype(np.int64)
    nqb = qstarts.shape[0] - 1
    span = int((row_hi - row_lo).max())
    nsplit = 1 if nqb >= threads else max(1, min(-(-threads // nqb), span // config.MIN_KEYS_PER_SPLIT))
    return qstarts, nsplit


def _cuts(length, pieces, piece=None):
    """Starts of ``pieces`` blocks of about equal size over ``length`` rows
    (piece numbers ``piece``, default all): each rounded to the nearest
    multiple of the micro-kernels' ``cpu_micro.ROWS`` once the blocks span
    a few register tiles, so that only a run's last block ends in a partial
    register tile (scored and accumulated through zero-padded copies: about
    3% of a d = 64 tile)."""
    piece = np.arange(pieces) if piece is None else piece
    start = length * piece // pieces
    r = cpu_micro.ROWS
    return np.where(length >= 4 * r * pieces, np.minimum((start + r // 2) // r * r, length), start)


def window_runs(row_lo, row_hi):
    """Boundaries (runs + 1,) int64 of the runs of consecutive rows whose
    key windows ``[row_lo, row_hi)`` overlap the previous row's (an empty
    window overlaps nothing)."""
    cut = (row_hi[:-1] <= row_lo[1:]) | (row_hi[1:] <= row_lo[:-1])
    inner = np.flatnonzero(cut) + 1
    return np.concatenate(([0], inner, [row_lo.shape[0]])).astype(np.int64)


#: The target protocol (:class:`softretrieval.devices.Target`).
NAME = "cpu"
IS_GPU = False


def available():
    """The CPU target always runs."""
    return True


def device_view(a):
    """The CPU kernels read host arrays in place."""
    return a


def run(problem, mode):
    """Plan, run :func:`stream` under the runtime lock, and merge the splits.

    problem: a :class:`devices.Problem` of host arrays; mode: a
    :class:`devices.Mode`. Returns a dict with, as asked: ``out`` (R, dv)
    and ``lse`` (R,) (base-e, of the prepared logits), ``topk_logits``
    (R, k), ``topk_ids`` (R, k), ``topk_count`` (R,); for a range search
    the unmerged per-split hits ``range_logits``, ``range_ids`` (P, slots)
    and ``range_count`` (P, R) (see :func:`stream`); and ``bad`` (count of
    score rows with NaN/inf).
    """
    Q = problem.Q
    qstarts, nsplit = plan(Q.shape[0], problem.keys.data.shape[0], runtime.num_threads(),
                           problem.masks.row_lo, problem.masks.row_hi)
    filt = config.BF16_FILTER and cpu_bf16.available()
    filt8 = config.INT8_FILTER and cpu_int8.available()
    micro = config.MICRO_KERNELS and cpu_micro.has_fma_tiles()
    sizes = np.diff(qstarts)
    fewest = max(1, int(sizes.min())) if sizes.size else 1
    ktile_few = max(config.KEY_TILE_FEW, config.FEW_TILE_SCORES // fewest // 64 * 64)
    tiling = (qstarts, nsplit, config.KEY_TILE, ktile_few, config.FEW_QUERIES, filt, filt8, micro)
    stop = np.zeros(1, np.int64)
    lo, hi = problem.masks.row_lo, problem.masks.row_hi
    pairs = Q.shape[0] * problem.keys.data.shape[0] if lo.shape[0] == 0 else int((hi - lo).sum())
    work = pairs * (Q.shape[1] + (problem.values.width if mode.want_acc else 0))
    # BLAS runs only in blocks past the SIMD path's size, where the
    # micro-kernels are off or the values' width is not a multiple of theirs;
    # limiting BLAS's threads costs ~0.15 ms a call (threadpoolctl).
    blas = int(sizes.max(initial=0)) > config.FEW_QUERIES and (
        not micro or (mode.want_acc and problem.values.width % cpu_micro.COLS != 0))
    m, l, acc, tk_s, tk_i, tk_n, rg_s, rg_i, rg_n, bad = runtime.parallel_call(
        stream, Q, problem.keys, problem.values, problem.logits, problem.masks, tiling, mode, stop,
        stop=stop, work=work, blas=blas)
    res = {"bad": bad}
    if mode.want_soft:
        res["out"], res["lse"] = merge_states(m, l, acc)
    if mode.k > 0:
        res["topk_logits"], res["topk_ids"], res["topk_count"] = runtime.parallel_call(
            merge_topk, tk_s, tk_i, tk_n, mode.k, work=Q.shape[0] * mode.k, blas=False)
    if mode.range_min.shape[0] > 0:
        res["range_logits"], res["range_ids"], res["range_count"] = rg_s, rg_i, rg_n
    return res
