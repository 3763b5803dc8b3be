"""Compact storage of key (and value) rows: float32, float16, bfloat16, int8.

The kernels decode stored rows tile by tile into float32 (see
``cpu._tile`` and :func:`softretrieval.core.half_to_float`) and accumulate in
float32, so a compact format halves or quarters the bytes read per key, which
is what bounds speed when few queries stream over many keys.

========== ==================== ================= ===========================
name       stored array         kernels see       value of element ``x[j, c]``
========== ==================== ================= ===========================
float32    float32              float32           ``x[j, c]``
float16    float16 (IEEE half)  uint16 (its bits) ``x[j, c]``
bfloat16   uint16 (bit pattern) int16 (same bits) ``float32(bits << 16)``
int8       int8 + float32 scale int8              ``x[j, c] * scale[j]``
========== ==================== ================= ===========================

The dtype the kernels see selects the decoder at compile time
(``cpu.decode``), so no format flag travels with the arrays.

Encoding rounds to nearest (even); int8 uses a symmetric per-row scale
``max|row| / 127``. Values outside a format's range raise ``ValueError``, and
so do rows that float16 or bfloat16 cannot hold to within
:data:`MAX_RELATIVE_ERROR` (rows of tiny values fall below float16's normal
range, 6.1e-5, and lose their precision: keys of size 1e-8 all round to 0).
"""

from typing import NamedTuple

import numpy as np

#: Storage name -> (numpy dtype of the stored array, dtype the kernels see).
FORMATS = {
    "float32": (np.dtype(np.float32), np.dtype(np.float32)),
    "float16": (np.dtype(np.float16), np.dtype(np.uint16)),
    "bfloat16": (np.dtype(np.uint16), np.dtype(np.int16)),
    "int8": (np.dtype(np.int8), np.dtype(np.int8)),
}

#: Rows encoded at a time, so encoding never holds a float copy of a whole catalog.
ENCODE_CHUNK = 65536

#: Largest relative error ``|decoded - row| / |row|`` a float16 or bfloat16
#: row may have (their rounding alone gives at most 4.9e-4 and 3.9e-3).
MAX_RELATIVE_ERROR = 1e-2


class Stored(NamedTuple):
    """Rows in a storage format, as the kernels take them."""

    data: np.ndarray   # (N, d): float32, uint16 (float16 bits), int16 (bfloat16 bits) or int8
    scale: np.ndarray  # (N,) float32 row scales for int8, else (0,)


def check_dtype(dtype):
    """The storage name for ``dtype`` (a name or numpy dtype); ValueError if unknown."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in FORMATS:
        raise ValueError(f"dtype must be one of {tuple(FORMATS)}, got {dtype!r}")
    return name


def encode_rows(x, dtype, data_out, scale_out, center=None, name="keys"):
    """Encode float rows ``x`` (n, d) into ``data_out`` (n, d) (and, for int8,
    the row scales into ``scale_out`` (n,)), in chunks of :data:`ENCODE_CHUNK`;
    with ``center`` (d,), the rows ``x - center``. ``name`` names ``x`` in
    the errors.

    Raises ValueError for NaN or inf (after conversion to float32) and, naming
    the format, for a value out of its range (float16: |x| > 65504; bfloat16:
    rounds to inf) or a row it cannot hold to :data:`MAX_RELATIVE_ERROR`.
    Rows before the offending chunk are already written.
    """
    for lo in range(0, x.shape[0], ENCODE_CHUNK):
        hi = min(lo + ENCODE_CHUNK, x.shape[0])
        with np.errstate(over="ignore"):
            chunk = np.ascontiguousarray(x[lo:hi], dtype=np.float32)
        if dtype == "float32":
            if not np.isfinite(chunk).all():
                raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
            data_out[lo:hi] = chunk if center is None else (chunk - center).astype(np.float32)
            continue
        _encode_compact(chunk, dtype, data_out[lo:hi],
                        None if scale_out is None else scale_out[lo:hi], center, name)


def _encode_compact(chunk, dtype, data_out, scale_out, center, name):
    """One chunk into a compact format by the kernels of :mod:`cpu_encode`
    (one parallel pass), with encode_rows's errors."""
    from . import cpu_encode, runtime

    center = (np.zeros(chunk.shape[1], np.float32) if center is None
              else np.asarray(center, np.float32))
    rel = np.zeros(chunk.shape[0])
    if dtype == "int8":
        bad, over = runtime.parallel_call(cpu_encode.encode_int8, chunk, center, data_out,
                                          scale_out, blas=False)
    else:
        kernel = cpu_encode.encode_half if dtype == "float16" else cpu_encode.encode_bfloat
        out = data_out.view(np.uint16) if dtype == "float16" else data_out
        bad, over = runtime.parallel_call(kernel, chunk, center, out, rel, blas=False)
    if bad:
        raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
    if over and dtype == "float16":
        raise ValueError(f"{name} exceed the float16 range (|x| <= 65504): "
                         "use dtype='bfloat16' or 'float32'")
    if over:
        raise ValueError(f"{name} exceed the bfloat16 range")
    if dtype != "int8":
        _check_precision(rel, dtype, name)


def _check_precision(rel, dtype, name):
    """ValueError when a row's relative error ``rel`` (n,) exceeds MAX_RELATIVE_ERROR."""
    worst = rel.max(initial=0.0)
    if worst > MAX_RELATIVE_ERROR:
        raise ValueError(
            f"{name} lose precision in {dtype}: {int((rel > MAX_RELATIVE_ERROR).sum())} rows have a "
            f"relative error above {MAX_RELATIVE_ERROR:g} (worst {worst:.3g}); their values are "
            "too small for the format (float16's normal range starts at 6.1e-5): scale them "
            "up, or use dtype='float32' or 'int8'")


def decode_rows(data, dtype, scale=None):
    """Stored rows back to float32 (n, d), as the kernels see them."""
    if dtype == "float32":
        return np.asarray(data, np.float32)
    if dtype == "float16":
        return np.asarray(data).astype(np.float32)
    if dtype == "bfloat16":
        return (np.asarray(data).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(data).astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def stored(data, dtype, scale):
    """The kernels' view of stored rows: a :class:`Stored`."""
    scale = scale if dtype == "int8" else np.zeros(0, np.float32)
    return Stored(data.view(FORMATS[dtype][1]), scale)
