"""The per-row rules of every kernel, one source for every target.

Plain Python functions on scalars and 1-D/2-D arrays, like
:mod:`softretrieval.core` and :mod:`softretrieval.topk_buffer`: the CPU
drivers compile them with ``numba.njit(inline="always")`` and the CUDA drivers
as device functions (both through :func:`shared`); they also run as plain
Python (the CUDA simulator runs them so). A driver decides only who computes
which row and where the data sit; what a row's numbers mean is decided here:

* a key's logit: :func:`key_factor`, :func:`key_offset` and :func:`logit`
  (metric terms, bias, and "a ``-inf`` bias excludes the key"), then
  :func:`exclude_row` (per-query exclusion lists) or :func:`include_row`
  (per-query allow-lists), :func:`window_row`
  (causal and sliding-window limits) and :func:`row_max_finite` (the row's
  max and the NaN/inf check);
* the per-tile updates: :func:`softmax_row` (the online-softmax state),
  :func:`topk_scan_row` (offering a tile's keys to a top-k buffer; from
  approximate logits, :func:`topk_rescore_scan_row`) and
  :func:`range_scan_row` (collecting a range search's hits), all three
  finding their keys 16 at a time (:func:`hit_bits`, :func:`core.next_hit`);
* the backward of a weight: :func:`weight_grad`;
* the merge of the online-softmax states of key splits: :func:`merge_row`;
* the merge of the top-k buffers of key splits: :func:`merge_topk_row`;
* the top-k finish: :func:`topk_scores_row` (FAISS's score conventions,
  padding), and the range-search finish built on it: :func:`range_finish_row`;
* the top-k-attention finish: :func:`topk_attention_row` (softmax over the
  top-k logits, the weighted sum of their values, the coverage).

``decode`` (one stored element to float32, by storage dtype) is provided by
each target when it compiles these functions, and :func:`hit_bits` may be
(see :func:`shared`).
"""

import math

import numpy as np

from . import core, topk_buffer
from .constants import KEYS_SQNORM, KEYS_UNIT, LN2, MASKED, NEG_INIT
from .core import float32_bits, float32_from_bits

_EXPONENT = np.int32(0x7F800000)
_MAGNITUDE = np.int32(0x7FFFFFFF)


def key_factor(key_mode, sqnorm):
    """What a key multiplies its dot products by: ``1/|k|`` for cosine
    (``KEYS_UNIT``; 0 for a zero key, which then scores 0), else 1."""
    if key_mode == KEYS_UNIT:
        return np.float32(1.0) / np.float32(math.sqrt(sqnorm)) if sqnorm > 0 else np.float32(0.0)
    return np.float32(1.0)


def key_offset(key_mode, key_coef, sqnorm, bias):
    """What a key adds to its logits: ``key_coef * |k|^2`` for l2
    (``KEYS_SQNORM``), plus its bias in logit units. A bias of ``-inf``
    counts as :data:`constants.MASKED`: that is how it excludes the key
    (any other non-finite term stays non-finite, and is reported)."""
    b = max(bias, MASKED)
    if key_mode == KEYS_SQNORM:
        return np.float32(key_coef * sqnorm + b)
    return np.float32(b)


def logit(s, factor, offset):
    """The logit of a dot product ``s`` (query terms applied) with its key's
    ``factor`` and ``offset``."""
    return s * factor + offset


def exclude_row(row, n, t0, excl_ids, p, pend):
    """Mask the excluded keys of one query in its logits ``row[:n]`` (keys
    ``t0 .. t0 + n - 1``): the sorted ids ``excl_ids[p:pend]`` that fall in
    the tile get :data:`constants.MASKED`. Returns the advanced ``p`` (the
    first id at or beyond the tile), so a scan over ascending tiles reads
    each id once."""
    t1 = t0 + n
    while p < pend and excl_ids[p] < t1:
        if excl_ids[p] >= t0:
            row[excl_ids[p] - t0] = MASKED
        p += 1
    return p


def include_row(row, n, t0, incl_ids, p, pend):
    """Mask every key of one query's logits ``row[:n]`` (keys ``t0 .. t0 +
    n - 1``) that is not in its sorted allow-list ``incl_ids[p:pend]``: the
    inverse of :func:`exclude_row`, with the same pointer convention (returns
    the first id at or beyond the tile). A query whose list is used up gets
    every later key masked."""
    t1 = t0 + n
    j = 0
    while p < pend and incl_ids[p] < t1:
        if incl_ids[p] >= t0:
            keep = incl_ids[p] - t0
            for x in range(j, keep):
                row[x] = MASKED
            j = keep + 1
        p += 1
    for x in range(j, n):
        row[x] = MASKED
    return p


def list_row(row, n, t0, ids, p, pend, allow):
    """One query's id list applied to its logits ``row[:n]``: an allow-list
    (:func:`include_row`) when ``allow``, else exclusions
    (:func:`exclude_row`, skipped once the list is used up). Returns the
    advanced ``p``."""
    if allow:
        return include_row(row, n, t0, ids, p, pend)
    if p < pend:
        return exclude_row(row, n, t0, ids, p, pend)
    return p


def window_row(row, n, t0, lo, hi):
    """Mask the keys of ``row[:n]`` (keys ``t0 ..``) outside the query's
    window ``[lo, hi)`` (causal, sliding-window and length limits)."""
    a = min(max(lo - t0, 0), n)
    b = min(max(hi - t0, a), n)
    for j in range(a):
        row[j] = MASKED
    for j in range(b, n):
        row[j] = MASKED


def row_max_finite(row, n):
    """``(max of row[:n], whether all are finite)``; ``row`` float32, or
    int32 holding their bit patterns (the CPU passes an int32 view: loads of
    integers vectorize best there).

    Works on the bits, because LLVM vectorizes integer max reductions but not
    float ones: ``b ^ ((b >> 31) & 0x7FFFFFFF)`` orders the bit patterns of
    floats like the floats themselves (and is its own inverse); a value is
    NaN or inf when its exponent bits are all set. Every step is cast back
    to int32: Numba widens int32 arithmetic to int64, and the loop then
    vectorized over 8 lanes instead of 16 (twice as slow).
    """
    best = np.int32(-2147483647)
    expo = np.int32(0)
    for j in range(n):
        b = float32_bits(row[j])
        best = max(best, np.int32(b ^ np.int32(np.int32(b >> np.int32(31)) & _MAGNITUDE)))
        expo = max(expo, np.int32(b & _EXPONENT))
    mx = float32_from_bits(np.int32(best ^ np.int32(np.int32(best >> np.int32(31)) & _MAGNITUDE)))
    return mx, expo != _EXPONENT


def softmax_row(row, n, m_old, mx, store):
    """Online-softmax update of one state by its logits ``row[:n]``, whose
    max is ``mx``. With ``store``, ``row[j]`` becomes the weight
    ``2 ** (t - m_new)`` (for the value pass). Returns ``(m_new, c, total)``:
    the new running max, the factor for the old sums (``l`` and ``acc``),
    and the sum of the new weights."""
    m_new, c = core.rescale(m_old, mx)
    total = np.float32(0.0)
    if store:
        for j in range(n):
            p = core.exp2(row[j] - m_new)
            row[j] = p
            total += p
    else:
        for j in range(n):
            total += core.exp2(row[j] - m_new)
    return m_new, c, total


#: Keys per hit mask (:func:`hit_bits`): a scan compares a row's logits
#: with its threshold 16 at a time and visits only the keys at or above it.
HIT_LANES = 16


def hit_bits(row, c0, width, threshold):
    """Which of the ``width <= 16`` float32 logits ``row[c0:c0 + width]``
    are at or above ``threshold`` rounded to float32, as an int32 mask: bit
    ``b`` for ``row[c0 + b]`` (NaN is below every threshold). A float32 logit
    at or above a float64 threshold is at or above its rounding, so no hit
    is lost; a caller with a float64 threshold checks its hits against it
    again. The CPU compiles a whole mask (``width == 16``) to one vector
    compare (:func:`softretrieval.cpu_micro.hit_mask`)."""
    limit = np.float32(threshold)
    bits = np.int32(0)
    for b in range(width):
        bits |= np.int32(row[c0 + b] >= limit) << np.int32(b)
    return bits


def topk_scan_row(row, n, mx, t0, k, bs, bi, count, ts, ti):
    """Offer one query's logits ``row[:n]`` (keys ``t0, t0 + 1, ...``, max
    ``mx``) to its top-k buffer ``bs``, ``bi`` holding ``count`` candidates
    with threshold ``(ts, ti)`` (:mod:`softretrieval.topk_buffer`). Keys
    arrive in increasing id order, so a logit below ``ts`` cannot enter: a
    row whose max is below it is skipped, and in the others only the keys at
    or above it are offered, found 16 at a time by :func:`hit_bits` (a key
    that a compaction has meanwhile put below the threshold is refused by
    the offer). Comparing key by key with a branch cost a k = 1000 scan
    more than its offers did. Returns the new ``(count, ts, ti)``."""
    if mx < ts:
        return count, ts, ti
    for c0 in range(0, n, HIT_LANES):
        bits = hit_bits(row, c0, min(n - c0, HIT_LANES), ts)
        while bits != 0:
            b, bits = core.next_hit(bits)
            j = c0 + b
            count, ts, ti = topk_buffer.offer(bs, bi, count, k, ts, ti, row[j], t0 + j)
    return count, ts, ti


#: Relative part of a filter's margin (:func:`topk_rescore_scan_row`): the
#: float32 roundings of a logit and of the threshold it is compared with.
FILTER_REL = np.float32(2.0**-20)


def dot_row(q, K, j):
    """``q . K[j]`` in float32: q (d,) float32, K (n, >= d) stored rows
    (decoded element by element). The row is indexed in place: a view of it
    per rescored key cost a reference count each."""
    dot = np.float32(0.0)
    for c in range(q.shape[0]):
        dot += q[c] * decode(K[j, c])   # noqa: F821 (given by the target)
    return dot


def topk_rescore_scan_row(row, n, mx, t0, k, bs, bi, count, ts, ti, q, Kt, ks, factors, terms,
                          transformed, slack):
    """:func:`topk_scan_row` for a row of approximate logits: ``row[:n]``
    (max ``mx``) holds, for keys ``t0, t0 + 1, ...``, logits each within
    ``slack + FILTER_REL * |x|`` of the exact float32 logit (``x`` either of
    them; masked keys hold :data:`constants.MASKED` exactly). A key whose
    approximate logit comes within that margin of the threshold ``ts`` could
    enter, so it is scored again exactly — the float32 dot of the query
    ``q`` (d,) with its key row ``Kt[j]`` (float32, or stored int8 times
    its row scale ``ks[j]``; ks (0,) when the rows are float32), turned into
    a logit by ``factors[j]``, ``terms[j]`` (:func:`logit`) when
    ``transformed`` — and offered with that logit; every other key is
    certainly below the threshold. So the buffer ends exactly as an exact
    scan leaves it. Candidates are found 16 at a time by :func:`hit_bits`;
    one that the margin has meanwhile passed is not rescored. Returns the
    new ``(count, ts, ti)``."""
    thr = ts - (slack + FILTER_REL * abs(ts))
    if mx < thr:
        return count, ts, ti
    for c0 in range(0, n, HIT_LANES):
        bits = hit_bits(row, c0, min(n - c0, HIT_LANES), thr)
        while bits != 0:
            b, bits = core.next_hit(bits)
            j = c0 + b
            s = row[j]
            if s < thr:
                continue
            if s != MASKED:
                s = dot_row(q, Kt, j)
                if ks.shape[0] > 0:
                    s *= ks[j]
                if transformed:
                    s = logit(s, factors[j], terms[j])
            count, ts, ti = topk_buffer.offer(bs, bi, count, k, ts, ti, s, t0 + j)
            thr = ts - (slack + FILTER_REL * abs(ts))
    return count, ts, ti


def range_scan_row(row, n, mx, t0, threshold, rs, ri, lo, hi, count):
    """Collect one query's range-search hits from its logits ``row[:n]``
    (keys ``t0, t0 + 1, ...``, max ``mx``): each key whose logit is at or
    above ``threshold`` goes, with its logit, into the next of the query's
    slots ``rs``, ``ri`` ``[lo, hi)`` (float32 logits, int64 ids), in
    increasing id order. ``count`` is the query's hits so far; hits beyond
    its slots are counted but not stored (the driver then runs the query
    again with room for them). Hits are found 16 at a time by
    :func:`hit_bits`, as in :func:`topk_scan_row`. Returns the new count."""
    if mx < threshold:
        return count
    for c0 in range(0, n, HIT_LANES):
        bits = hit_bits(row, c0, min(n - c0, HIT_LANES), threshold)
        while bits != 0:
            b, bits = core.next_hit(bits)
            pos = lo + count
            if pos < hi:
                rs[pos] = row[c0 + b]
                ri[pos] = t0 + c0 + b
            count += 1
    return count


def weight_grad(t, lse2, dp, c):
    """The backward of one softmax weight: ``t`` a base-2 logit, ``lse2`` its
    row's log-partition in the same units (``-inf``: the row has no valid
    key), ``dp = dO . v`` and ``c = dlse - rowsum(dO * out)``. Returns
    ``(p, ds)``: the weight ``2 ** (t - lse2)`` and the gradient of the
    natural-log logit, ``p * (dp + c)``; both 0 in a row with no valid key."""
    if lse2 == -math.inf:
        return np.float32(0.0), np.float32(0.0)
    p = core.exp2(t - lse2)
    return p, p * (dp + c)


def merge_row(m, l, acc, b, out):
    """Merge the P split states of query ``b`` — m, l (P, B) and acc
    (P, B, dv) float32, base 2 — into ``out`` (dv,), normalized. Returns
    the natural-log partition; a query with no valid key gets ``out = 0``
    and ``-inf``."""
    dv = out.shape[0]
    mb = m[0, b]
    lb = l[0, b]
    for c in range(dv):
        out[c] = acc[0, b, c]
    for p in range(1, m.shape[0]):
        mb, lb, c1, c2 = core.merge_pair(mb, lb, m[p, b], l[p, b])
        for c in range(dv):
            out[c] = out[c] * c1 + acc[p, b, c] * c2
    inv_l, lse = core.finalize(mb, lb)
    for c in range(dv):
        out[c] *= inv_l
    return lse


def merge_topk_row(tk_s, tk_i, tk_n, b, k, bs, bi, scores, ids):
    """The best k of query ``b``'s candidates in every split — tk_s, tk_i
    (P, B, cap), tk_n (P, B) — through the buffer ``bs``, ``bi`` (cap,),
    best first (higher logit, then lower id), into ``scores``, ``ids`` (k,).
    Returns how many slots hold a key."""
    n = 0
    ts = NEG_INIT
    ti = -1
    for p in range(tk_n.shape[0]):
        for j in range(tk_n[p, b]):
            n, ts, ti = topk_buffer.offer(bs, bi, n, k, ts, ti, tk_s[p, b, j], tk_i[p, b, j])
    n = topk_buffer.finish(bs, bi, n, k)
    for j in range(n):
        scores[j] = bs[j]
        ids[j] = bi[j]
    return n


def topk_scores_row(logits, ids, n, sign, offset, clamp, pad, scores, ids_out):
    """FAISS's conventions for one query's top-k: the ``n`` found get the
    score ``sign * (logit + offset)`` (the offset in float64: a per-query
    constant the kernel left out, e.g. ``-|q|^2`` for l2), floored at 0 with
    ``clamp`` (distances without a bias); the rest of ``scores``, ``ids_out``
    (k,) get ``pad`` and -1."""
    for j in range(scores.shape[0]):
        if j < n:
            s = np.float32(sign * (np.float64(logits[j]) + offset))
            scores[j] = max(s, np.float32(0.0)) if clamp else s
            ids_out[j] = ids[j]
        else:
            scores[j] = pad
            ids_out[j] = -1


def range_finish_row(logits, ids, n, sign, offset, clamp, threshold):
    """Finish one query's range-search hits in place: the kernel ``logits``
    and ``ids`` (n,) become FAISS's scores (:func:`topk_scores_row`: the
    similarity for ``sign = 1``, the squared distance for ``sign = -1``),
    the hits whose score misses ``threshold`` (below it for similarities,
    above it for distances) are dropped, and the rest are ordered best
    first: higher similarity (lower distance), then lower id
    (:func:`topk_buffer.finish` on ``sign * score``). Returns how many
    remain, in ``logits[:kept]``, ``ids[:kept]``."""
    topk_scores_row(logits, ids, n, sign, offset, clamp, np.float32(0.0), logits, ids)
    limit = sign * threshold
    kept = 0
    for j in range(n):
        key = sign * np.float64(logits[j])
        if key >= limit:
            logits[kept] = key
            ids[kept] = ids[j]
            kept += 1
    topk_buffer.finish(logits, ids, kept, kept)
    for j in range(kept):
        logits[j] = sign * logits[j]
    return kept


def topk_attention_row(logits, ids, n, lse, V, vscale, vcol, out, weights, ids_out):
    """Finish top-k attention for one query: the softmax over its ``n``
    top-k base-2 ``logits`` (best first) with key ``ids``, applied to their
    values ``V[id, vcol:vcol + dv]`` (stored rows, decoded; int8 row scales
    ``vscale`` (N,), else (0,)) into ``out`` (dv,); ``weights`` and
    ``ids_out`` (k,) padded with 0 and -1. Returns the coverage: the share
    of the full softmax mass (natural-log partition ``lse``) the n hold."""
    dv = out.shape[0]
    for c in range(dv):
        out[c] = np.float32(0.0)
    for j in range(weights.shape[0]):
        weights[j] = np.float32(0.0)
        ids_out[j] = -1
    if n == 0:
        return np.float32(0.0)
    top = logits[0]
    total = np.float32(0.0)
    for j in range(n):
        total += core.exp2(logits[j] - top)
    scaled = vscale.shape[0] > 0
    for j in range(n):
        w = core.exp2(logits[j] - top) / total
        i = ids[j]
        weights[j] = w
        ids_out[j] = i
        if scaled:
            w = w * vscale[i]
        for c in range(dv):
            out[c] += w * decode(V[i, vcol + c])   # noqa: F821 (given by the target)
    lse_top = (top + math.log2(total)) * LN2
    return np.float32(min(math.exp(lse_top - lse), 1.0))


#: The rules, in dependency order (each may call the ones before it and the
#: functions of :mod:`core` and :mod:`topk_buffer`).
FUNCTIONS = (key_factor, key_offset, logit, exclude_row, include_row, list_row, window_row,
             row_max_finite, softmax_row, topk_scan_row, dot_row,
             topk_rescore_scan_row, range_scan_row, weight_grad, merge_row,
             merge_topk_row, topk_scores_row, range_finish_row, topk_attention_row)

#: Modules whose functions every target compiles from one source, in order.
SHARED = (core, topk_buffer)


def shared(decorator, decode, hits=None, buffers=None):
    """Compile the shared functions — :mod:`core`'s, :mod:`topk_buffer`'s and
    these rules — for one target: ``decorator`` is its jit (e.g.
    ``numba.njit(inline="always")`` or ``numba.cuda.jit(device=True)``),
    ``decode`` its compiled decoder of one stored element, ``hits`` its
    compiled :func:`hit_bits` if it has a faster one (by default the rule
    itself is compiled), and ``buffers`` the jit for :mod:`topk_buffer` if
    not ``decorator``. Returns a namespace with one attribute per function
    (and ``core``, ``topk_buffer`` namespaces the rules call through)."""
    scope = {"decode": decode}
    scope["hit_bits"] = hits or core.compile_for(decorator, (hit_bits,)).hit_bits
    jits = {topk_buffer: buffers or decorator}
    for module in SHARED:
        scope[module.__name__.rsplit(".", 1)[1]] = core.compile_for(
            jits.get(module, decorator), module.FUNCTIONS, scope)
    compiled = core.compile_for(decorator, FUNCTIONS, scope)
    compiled.core = scope["core"]
    compiled.hit_bits = scope["hit_bits"]
    compiled.topk_buffer = scope["topk_buffer"]
    return compiled
