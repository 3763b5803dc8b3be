"""The top-k buffer update, plain Python on 1-D arrays, shared by every target.

The CPU kernels compile these functions with ``numba.njit`` and the CUDA
kernels with ``numba.cuda.jit(device=True)`` (both through
:func:`softretrieval.core.compile_for`); they also run as plain Python.

A buffer is a pair of 1-D arrays ``bs`` (float32 logits) and ``bi`` (int64
ids) of capacity ``2 k`` (:func:`capacity`) holding ``count`` candidates, and
a threshold ``(ts, ti)``: the k-th best candidate held after the last
compaction (``(NEG_INIT, -1)`` before one). A candidate enters only if it is
better than the threshold; when the buffer is full it is compacted to its
best k by a quickselect, so each offer costs O(1) amortized, whatever the
order of the scores. "Better" means a higher logit, then a lower id, so the
order is total and results do not depend on the order of the offers.

When ids arrive in increasing order (a key scan), a candidate is better than
the threshold exactly when its logit is above ``ts``: a driver may skip keys
whose logit is below ``ts`` without offering them.
"""

import numpy as np

from . import core


def capacity(k):
    """Slots of the buffer for the best ``k``: twice ``k``, so a compaction
    (O(2k)) happens at most once per k candidates that enter."""
    return 2 * k


def better(s1, i1, s2, i2):
    """Whether candidate (s1, i1) ranks above (s2, i2). Bitwise, not
    short-circuit: no branch for the partition loop to mispredict."""
    return (s1 > s2) | ((s1 == s2) & (i1 < i2))


def swap(bs, bi, a, b):
    """Exchange entries a and b."""
    ts = bs[a]
    ti = bi[a]
    bs[a] = bs[b]
    bi[a] = bi[b]
    bs[b] = ts
    bi[b] = ti


#: Entries per block of :func:`partition`'s masks.
BLOCK = 16


def better_bits(bs, bi, c0, ps, pi):
    """Which of the :data:`BLOCK` entries from ``c0`` rank above the pivot
    (ps, pi), as an int32 mask: bit ``b`` for entry ``c0 + b``."""
    block_s = bs[c0:c0 + BLOCK]
    block_i = bi[c0:c0 + BLOCK]
    bits = np.int32(0)
    for b in range(BLOCK):
        bits |= np.int32(better(block_s[b], block_i[b], ps, pi)) << np.int32(b)
    return bits


def partition(bs, bi, lo, hi, ps, pi):
    """Reorder entries ``lo..hi`` so that those better than the pivot
    (ps, pi) come first; returns where the others begin.

    Blocks of :data:`BLOCK` entries are taken from both ends; a mask of the
    left block's misplaced entries (not better) and one of the right
    block's (better) are built without a branch, and misplaced pairs are
    swapped by their lowest set bits (:func:`core.next_hit`) until one block
    is in place, which is then passed (the bit-mask partition of pdqsort).
    The fewer than two blocks left in the middle are partitioned entry by
    entry: each entry is exchanged with the boundary, which moves on only
    past a better one. A plain Lomuto partition of the whole range ran at
    about 11 cycles an entry: each exchange stored to where the next one
    loaded from."""
    left = lo
    right = hi
    ml = np.int32(0)
    mr = np.int32(0)
    full = np.int32((1 << BLOCK) - 1)
    while right - left >= 2 * BLOCK:
        if ml == 0:
            ml = better_bits(bs, bi, left, ps, pi) ^ full
        if mr == 0:
            mr = better_bits(bs, bi, right - BLOCK, ps, pi)
        while ml != 0 and mr != 0:
            a, ml = core.next_hit(ml)
            b, mr = core.next_hit(mr)
            swap(bs, bi, left + a, right - BLOCK + b)
        if ml == 0:
            left += BLOCK
        if mr == 0:
            right -= BLOCK
    store = left
    for j in range(left, right):
        # swap() then testing bs[store] would reload what was just stored
        s = bs[j]
        i = bi[j]
        bs[j] = bs[store]
        bi[j] = bi[store]
        bs[store] = s
        bi[store] = i
        store += better(s, i, ps, pi)
    return store


def select(bs, bi, count, k):
    """Reorder entries ``0..count`` so that ``0..k`` hold the best k (in no
    particular order) and entry ``k - 1`` is the k-th best; ``0 < k <= count``.

    Quickselect with a median-of-three pivot and a branch-free
    :func:`partition`, iterative (no recursion, for the GPU): O(count)
    expected.
    """
    lo = 0
    hi = count - 1
    while lo < hi:
        mid = (lo + hi) // 2
        # Median of three into hi: order (lo, mid, hi) best first, then
        # move the middle one to hi as the pivot.
        if better(bs[mid], bi[mid], bs[lo], bi[lo]):
            swap(bs, bi, mid, lo)
        if better(bs[hi], bi[hi], bs[lo], bi[lo]):
            swap(bs, bi, hi, lo)
        if better(bs[hi], bi[hi], bs[mid], bi[mid]):
            swap(bs, bi, hi, mid)
        swap(bs, bi, mid, hi)
        store = partition(bs, bi, lo, hi, bs[hi], bi[hi])
        swap(bs, bi, store, hi)
        if store == k - 1:
            return
        if store < k - 1:
            lo = store + 1
        else:
            hi = store - 1


def compact(bs, bi, count, k):
    """Keep the best k of ``count`` candidates (when more than k are held).

    Returns ``(count, ts, ti)``: the new count and the threshold, the k-th
    best candidate, which any later candidate must beat.
    """
    select(bs, bi, count, k)
    return k, bs[k - 1], bi[k - 1]


def offer(bs, bi, count, k, ts, ti, s, i):
    """Offer candidate (logit s, id i) to a buffer for the best k.

    Returns the new ``(count, ts, ti)``.
    """
    if better(s, i, ts, ti):
        if count == bs.shape[0]:
            count, ts, ti = compact(bs, bi, count, k)
            if not better(s, i, ts, ti):
                return count, ts, ti
        bs[count] = s
        bi[count] = i
        count += 1
    return count, ts, ti


def sift_down(bs, bi, count, pos):
    """Restore a heap whose root is its worst entry, below ``pos``."""
    while True:
        child = 2 * pos + 1
        if child >= count:
            return
        if child + 1 < count and better(bs[child], bi[child], bs[child + 1], bi[child + 1]):
            child += 1
        if not better(bs[pos], bi[pos], bs[child], bi[child]):
            return
        swap(bs, bi, pos, child)
        pos = child


def finish(bs, bi, count, k):
    """The buffer's best ``min(k, count)`` candidates in entries ``0..n``,
    best first (a heap sort, in place); returns n."""
    if count > k:
        count, _, _ = compact(bs, bi, count, k)
    for pos in range(count // 2 - 1, -1, -1):
        sift_down(bs, bi, count, pos)
    n = count
    while n > 1:
        n -= 1
        swap(bs, bi, 0, n)
        sift_down(bs, bi, n, 0)
    return count


#: The functions in dependency order, for :func:`softretrieval.core.compile_for`.
FUNCTIONS = (capacity, better, swap, better_bits, partition, select, compact, offer,
             sift_down, finish)
