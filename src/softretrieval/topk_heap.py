"""A bounded top-k heap, plain Python on 1-D arrays (a min-heap whose root is
the worst kept candidate), compiled for the CUDA target by
:func:`softretrieval.core.compile_for`-style rebuilding in
:mod:`softretrieval.cuda`. "Better" means a higher score, then a lower id.

The CPU kernels use a vectorized threshold buffer instead (``cpu._topk_row``):
a heap's data-dependent branches do not vectorize, while one GPU thread per
query row inserts rarely once its threshold has risen.
"""


def worse(s1, i1, s2, i2):
    """Whether candidate (s1, i1) ranks below (s2, i2)."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


def swap(hs, hi, a, b):
    """Exchange entries a and b."""
    ts = hs[a]
    ti = hi[a]
    hs[a] = hs[b]
    hi[a] = hi[b]
    hs[b] = ts
    hi[b] = ti


def sift_down(hs, hi, count, pos):
    """Restore the heap below ``pos`` (hs scores, hi ids, ``count`` entries)."""
    while True:
        child = 2 * pos + 1
        if child >= count:
            return
        if child + 1 < count and worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if not worse(hs[child], hi[child], hs[pos], hi[pos]):
            return
        swap(hs, hi, pos, child)
        pos = child


def offer(hs, hi, count, k, s, i):
    """Offer candidate (s, i) to a heap of capacity k holding ``count``;
    returns the new count."""
    if count < k:
        pos = count
        hs[pos] = s
        hi[pos] = i
        while pos > 0:
            parent = (pos - 1) // 2
            if not worse(hs[pos], hi[pos], hs[parent], hi[parent]):
                break
            swap(hs, hi, pos, parent)
            pos = parent
        return count + 1
    if worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        sift_down(hs, hi, count, 0)
    return count


def sort_best_first(hs, hi, count):
    """Heap-sort in place: afterwards entries ``0..count`` are best first."""
    n = count
    while n > 1:
        n -= 1
        swap(hs, hi, 0, n)
        sift_down(hs, hi, n, 0)
