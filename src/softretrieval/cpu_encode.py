"""CPU kernel that encodes float rows into compact storage (float16,
bfloat16, int8), one parallel pass per chunk.

It replaces a chain of numpy passes (conversion, decode, a float64 precision
check with two einsums), which held compact ``KNNMemory`` writes to about
0.1 M entries/s. Each row is converted, range-checked, decoded and compared
with its input in one loop; the rules are those of
:func:`softretrieval.storage.encode_rows` (round to nearest even; int8 with
the symmetric row scale ``max|row| / 127``), and the tests compare the bits
with numpy's conversions. Imported on the first compact encode, not at
``import softretrieval``.
"""

import numpy as np
from numba import njit, prange

from .core import cpu as core
from .core import float32_bits

#: Formats, as ``encode`` takes them.
FLOAT16, BFLOAT16, INT8 = 0, 1, 2


@njit(inline="always")
def float_to_half(x):
    """The IEEE half bits (int32, 0..65535) nearest to the finite float32
    ``x`` with ``|x| <= 65504``, ties to even (as numpy's ``astype``)."""
    b = float32_bits(x)
    sign = (b >> np.int32(16)) & np.int32(0x8000)
    a = b & np.int32(0x7FFFFFFF)
    if a >= np.int32(0x38800000):                 # a normal half: rebias, round 23 -> 10 bits
        a = a - np.int32(0x38000000)
        h = (a + np.int32(0x0FFF) + ((a >> np.int32(13)) & np.int32(1))) >> np.int32(13)
    else:                                          # subnormal (or zero): m * 2**-24, m <= 1024
        h = np.int32(np.rint(abs(x) * np.float32(16777216.0)))
    return sign | h


@njit(parallel=True, cache=True, nogil=True)
def encode(x, center, fmt, out, scale_out, rel):
    """Encode float32 rows ``x`` (n, d) (minus ``center`` (d,) when it is not
    empty) as ``fmt``: FLOAT16 and BFLOAT16 write the bits into ``out``
    (n, d) uint16; INT8 writes ``out`` (n, d) int8 and the row scales into
    ``scale_out`` (n,) float32. ``rel`` (n,) float64 gets each row's relative
    error ``|decoded - row| / |row|`` (float16, bfloat16). Returns ``(rows
    with NaN or inf, values out of the format's range)``; rows are written
    regardless (the caller refuses the chunk)."""
    n, d = x.shape
    centred = center.shape[0] > 0
    bad = np.zeros(n, np.int64)
    over = np.zeros(n, np.int64)
    for i in prange(n):
        norm = 0.0
        err = 0.0
        amax = np.float32(0.0)
        for c in range(d):
            v = x[i, c] - center[c] if centred else x[i, c]
            if not np.isfinite(v):
                bad[i] = 1
                v = np.float32(0.0)
            if fmt == INT8:
                amax = max(amax, abs(v))
                continue
            if fmt == FLOAT16:
                if abs(v) > np.float32(65504.0):
                    over[i] = 1
                    v = np.float32(0.0)
                h = float_to_half(v)
                dec = core.half_to_float(h)
            else:
                bits = float32_bits(v)
                top = (bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))) >> np.int32(16)
                h = top & np.int32(0xFFFF)
                if (h & np.int32(0x7F80)) == np.int32(0x7F80):
                    over[i] = 1
                dec = core.bfloat16_to_float(h)
            out[i, c] = h
            norm += np.float64(v) * np.float64(v)
            e = np.float64(dec) - np.float64(v)
            err += e * e
        if fmt == INT8:
            scale = np.float32(amax / np.float32(127.0))
            inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            for c in range(d):
                v = x[i, c] - center[c] if centred else x[i, c]
                q = np.rint(v * inv)
                out[i, c] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
            scale_out[i] = scale
        else:
            rel[i] = np.sqrt(err) / np.sqrt(norm) if norm > 0 else 0.0
    return bad.sum(), over.sum()
