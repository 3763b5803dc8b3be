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
from .cpu import _FAST
from .core import float32_bits



_MAGNITUDE = np.int32(0x7FFFFFFF)
_EXPONENT = np.int32(0x7F800000)       # magnitude bits at or above it: inf or NaN
_HALF_MAX = np.int32(0x477FE000)       # the bits of 65504.0, float16's largest


@njit(inline="always")
def float_to_half(x):
    """The IEEE half bits (int32, 0..65535) nearest to the finite float32
    ``x`` with ``|x| <= 65504``, ties to even (as numpy's ``astype``).
    Branch-free (both roundings computed, one selected), so a row's loop
    vectorizes."""
    b = float32_bits(x)
    sign = (b >> np.int32(16)) & np.int32(0x8000)
    a = b & np.int32(0x7FFFFFFF)
    r = a - np.int32(0x38000000)                  # a normal half: rebias, round 23 -> 10 bits
    normal = (r + np.int32(0x0FFF) + ((r >> np.int32(13)) & np.int32(1))) >> np.int32(13)
    tiny = min(abs(x), np.float32(6.103515625e-05))   # subnormal (or zero): m * 2**-24, m <= 1024
    subnormal = np.int32(np.rint(tiny * np.float32(16777216.0)))
    return sign | (normal if a >= np.int32(0x38800000) else subnormal)


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def encode_half(x, center, out, rel):
    """float32 rows ``x`` (n, d) minus ``center`` (d,) as IEEE half bits in
    ``out`` (n, d) uint16, each row's relative error
    ``|decoded - row| / |row|`` in ``rel`` (n,) float64. Returns ``(values
    that are NaN or inf, values beyond 65504)``; rows are written regardless
    (the caller refuses the chunk; a bad value is encoded as 0)."""
    n, d = x.shape
    bad = 0
    over = 0
    for i in prange(n):
        norm = 0.0                               # float64: squares of tiny values must not
        err = 0.0                                # underflow (a row of 1e-23 would pass as 0)
        nbad = 0
        nover = 0
        for c in range(d):
            v = x[i, c] - center[c]
            mag = float32_bits(v) & _MAGNITUDE   # integer tests: fast-math cannot drop them
            nbad += mag >= _EXPONENT
            nover += mag > _HALF_MAX                 # (inf too: reported as inf first)
            v = v if mag <= _HALF_MAX else np.float32(0.0)
            h = float_to_half(v)
            out[i, c] = np.uint16(h)
            e = np.float64(core.half_to_float(h)) - np.float64(v)
            norm += np.float64(v) * np.float64(v)
            err += e * e
        bad += nbad
        over += nover
        rel[i] = np.sqrt(err / norm) if norm > 0 else 0.0
    return bad, over


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def encode_bfloat(x, center, out, rel):
    """As :func:`encode_half`, into bfloat16 bits (round to nearest even);
    out of range: rounding to inf."""
    n, d = x.shape
    bad = 0
    over = 0
    for i in prange(n):
        norm = 0.0                               # up to 3.4e38: squares in float64
        err = 0.0
        nbad = 0
        nover = 0
        for c in range(d):
            v = x[i, c] - center[c]
            fin = (float32_bits(v) & _MAGNITUDE) < _EXPONENT
            nbad += not fin
            v = v if fin else np.float32(0.0)
            bits = float32_bits(v)
            h = ((bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1)))
                 >> np.int32(16)) & np.int32(0xFFFF)
            nover += (h & np.int32(0x7F80)) == np.int32(0x7F80)
            out[i, c] = np.uint16(h)
            e = np.float64(core.bfloat16_to_float(h)) - np.float64(v)
            norm += np.float64(v) * np.float64(v)
            err += e * e
        bad += nbad
        over += nover
        rel[i] = np.sqrt(err) / np.sqrt(norm) if norm > 0 else 0.0
    return bad, over


@njit(parallel=True, fastmath={"nsz", "reassoc"}, cache=True, nogil=True)
def encode_int8(x, center, out, scale_out):
    """float32 rows ``x`` (n, d) minus ``center`` (d,) as int8 ``out``
    (n, d) with the symmetric row scales ``max|row| / 127`` in
    ``scale_out`` (n,) float32. Returns ``(values that are NaN or inf, 0)``.
    (No ``arcp``: the scale is an exact division, as numpy's.)"""
    n, d = x.shape
    bad = 0
    for i in prange(n):
        amax = np.float32(0.0)
        nbad = 0
        for c in range(d):
            v = x[i, c] - center[c]
            fin = (float32_bits(v) & _MAGNITUDE) < _EXPONENT
            nbad += not fin
            amax = max(amax, abs(v) if fin else np.float32(0.0))
        scale = np.float32(amax / np.float32(127.0))
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        tiny = (float32_bits(inv) & _MAGNITUDE) >= _EXPONENT   # 1 / scale overflows: divide
        for c in range(d):
            v = x[i, c] - center[c]
            r = v / scale if tiny else v * inv
            q = np.rint(r) if (float32_bits(v) & _MAGNITUDE) < _EXPONENT else np.float32(0.0)
            out[i, c] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
        scale_out[i] = scale
        bad += nbad
    return bad, 0
