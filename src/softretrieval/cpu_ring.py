"""CPU kernels that write :class:`softretrieval.KNNMemory` rings.

A write moves ``(sequences, n, heads, dim)`` entries into ``(heads, batch,
capacity, dim)`` rings, each sequence from its own ring position, wrapping
at the end: one parallel pass (numpy's transposed assignment ran one thread,
about 3x slower with two). The finiteness check before it is a separate
read-only pass, so a refused write changes nothing. Imported on the first
write, not at ``import softretrieval``; called through
:func:`softretrieval.runtime.parallel_call` like every parallel kernel (its
lock and threading layer: a first write must not start Numba's default
OpenMP threads, which then spin beside the reads).
"""

import numpy as np
from numba import njit, prange

_EXPONENT = np.uint32(0x7F800000)


@njit(parallel=True, cache=True, nogil=True)
def count_non_finite(bits):
    """Rows of ``bits`` (rows, d) uint32 (float32 bit patterns) holding NaN
    or inf (all exponent bits set). Integer tests, so the loop vectorizes."""
    bad = 0
    for i in prange(bits.shape[0]):
        hit = False
        for c in range(bits.shape[1]):
            hit |= (bits[i, c] & _EXPONENT) == _EXPONENT
        bad += hit
    return bad


@njit(parallel=True, cache=True, nogil=True)
def scatter(src, dst, seqs, starts):
    """Write ``src`` (m, n, heads, dim) into ``dst`` (heads, batch, capacity,
    dim) (same dtype): entry r of sequence ``seqs[b]`` goes to slot
    ``(starts[b] + r) % capacity``; n <= capacity. Row scales pass as
    ``dim = 1``."""
    m, n, heads, dim = src.shape
    cap = dst.shape[2]
    for i in prange(m * n):
        b = i // n
        r = i - b * n
        slot = (starts[b] + r) % cap
        s = seqs[b]
        for g in range(heads):
            for c in range(dim):
                dst[g, s, slot, c] = src[b, r, g, c]
