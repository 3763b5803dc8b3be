"""Input checks shared by every public function.

Each check names the offending argument in its ``TypeError``/``ValueError``.
Documented conversions (no error): torch tensors and DLPack arrays are read
as numpy arrays (:mod:`softretrieval.interop`), float16/float64 arrays are
converted to float32, non-contiguous arrays are copied to C order, read-only arrays are
used as they are (the kernels never write to their inputs).
"""

import math
import numbers
import os

import numpy as np

from . import interop


def as_array(x, name):
    """``x`` as a numpy array: torch tensors and DLPack arrays are viewed
    without a copy (:func:`softretrieval.interop.host`); a TypeError names
    ``name`` for what cannot be an array of numbers (ragged lists, objects,
    arrays on another device, a tensor that requires grad)."""
    return interop.host(x, name)


def float_matrix(x, name, ndim=2, packed_rows=False):
    """``x`` as a C-contiguous float32 array of ``ndim`` dimensions.

    With ``packed_rows``, a float32 array whose last axis is contiguous is
    returned as it is (a view such as one head of a multi-head array, which
    the kernels read in place). Raises TypeError for non-floating dtypes
    (integers, booleans, complex, objects) and ValueError for another rank or
    a zero-length last axis.
    """
    arr = as_array(x, name)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has a zero-length last axis (shape {arr.shape})")
    if packed_rows and arr.dtype == np.float32 and arr.strides[-1] == arr.itemsize:
        return arr
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused later
        return np.ascontiguousarray(arr, dtype=np.float32)


def all_finite(arr, name):
    """Raise ValueError if ``arr`` holds NaN or inf."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")


def positive_int(value, name):
    """``value`` as an int >= 1: TypeError for non-integers (bools included),
    ValueError below 1. A 0-d integer array (e.g. a torch scalar tensor,
    converted) counts as its integer."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def int64_ids(ids, name):
    """Integer ids as int64; ValueError naming ``name`` for unsigned ids
    beyond int64 (which would wrap to negative numbers)."""
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must be below 2**63, got {ids.max()}")
    return ids.astype(np.int64)


def fits_in_memory(nbytes, what):
    """ValueError naming ``what`` when ``nbytes`` exceed this machine's memory."""
    if nbytes > _physical_memory():
        raise ValueError(f"{what} would take {nbytes / 2**30:,.1f} GiB, more than this "
                         "machine's memory")


def results_fit(rows, k, bytes_per_slot, n_keys):
    """Refuse a ``k`` whose (rows, k) results cannot fit in this machine's
    memory, with a ValueError naming ``k`` (instead of a MemoryError)."""
    need = rows * k * bytes_per_slot
    if need > _physical_memory():
        hint = f"; there are only {n_keys} keys, so k = {n_keys} returns them all" if k > n_keys else ""
        raise ValueError(f"k = {k} is too large: the ({rows}, {k}) results would take "
                         f"{need / 2**30:,.1f} GiB, more than this machine's memory{hint}")


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def scale_value(scale, dim):
    """The logit scale: ``1/sqrt(dim)`` for None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:
        raise ValueError("scale must be finite, got an integer beyond the float range") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def bias_vector(bias, n, name="bias"):
    """Per-key logit bias as float64 (n,), or None; ``-inf`` excludes a key.

    Raises TypeError for non-numeric dtypes, ValueError for a wrong shape,
    NaN or ``+inf``.
    """
    if bias is None:
        return None
    arr = as_array(bias, name)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per key), got {arr.shape}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError(f"{name} contains NaN or +inf (use -inf to exclude a key)")
    return arr


def exclusion_lists(exclude, n_queries, n_keys, name="exclude"):
    """Per-query ids to exclude as CSR ``(offsets (B+1,), ids)`` int64, each
    query's ids sorted; None when ``exclude`` is None.

    ``exclude`` (called ``name`` in errors, e.g. "include" for allow-lists
    in the same form) is a tuple ``(offsets, ids)`` (CSR: query b excludes
    ``ids[offsets[b]:offsets[b+1]]``) or a list of ``n_queries`` integer
    arrays. Ids must lie in ``[0, n_keys)`` (``n_keys=None``: be >= 0);
    duplicates are harmless.
    """
    if exclude is None:
        return None
    if isinstance(exclude, tuple):
        if len(exclude) != 2:
            raise ValueError(f"{name} as a tuple must be (offsets, ids) in CSR form")
        offsets, ids = (as_array(a, name) for a in exclude)
        for what, a in ((f"{name} offsets", offsets), (f"{name} ids", ids)):
            if a.dtype.kind not in "iu" or a.ndim != 1:
                raise TypeError(f"{what} must be a 1-D integer array, got {a.dtype} {a.shape}")
        if offsets.shape != (n_queries + 1,):
            raise ValueError(f"{name} offsets must have shape ({n_queries + 1},), got {offsets.shape}")
        if offsets[0] != 0 or offsets[-1] != ids.shape[0] or (np.diff(offsets) < 0).any():
            raise ValueError(f"{name} offsets must start at 0, never decrease, and end at len(ids)")
    elif isinstance(exclude, list):
        if len(exclude) != n_queries:
            raise ValueError(f"{name} must hold one array per query ({n_queries}), got {len(exclude)}")
        rows = [as_array(r, name) for r in exclude]
        for i, r in enumerate(rows):
            if r.ndim != 1:
                raise ValueError(f"{name} must hold one 1-D array of ids per query: {name}[{i}] has "
                                 f"shape {r.shape} (the same ids for every query: [ids] * B)")
        for r in rows:
            if r.dtype.kind not in "iu" and r.size:
                raise TypeError(f"{name} ids must be integers, got dtype {r.dtype}")
        offsets = np.zeros(n_queries + 1, np.int64)
        np.cumsum([r.size for r in rows], out=offsets[1:])
        rows = [int64_ids(r, f"{name} ids") for r in rows]    # (an empty list may be float)
        ids = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    else:
        raise TypeError(f"{name} must be a tuple (offsets, ids) or a list of arrays, "
                        f"got {type(exclude).__name__}")
    ids = int64_ids(ids, f"{name} ids")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} ids out of range: they must be >= 0, got {ids.min()}")
    if ids.size and n_keys is not None and ids.max() >= n_keys:
        raise ValueError(f"{name} ids out of range: they must lie in [0, {n_keys}), got {ids.max()}")
    offsets = offsets.astype(np.int64)
    return offsets, sort_lists(offsets, ids)


def sort_lists(offsets, ids):
    """The int64 ids of CSR lists ``(offsets, ids)`` with each list sorted
    (``ids`` itself when they already are: the common case costs one pass)."""
    if ids.size < 2:
        return ids
    falls = ids[1:] < ids[:-1]
    falls[_list_starts(offsets, ids.size)] = False          # a new list may start lower
    if not falls.any():
        return ids
    from . import cpu, runtime

    return runtime.parallel_call(cpu.sort_lists, offsets, ids.copy(), blas=False)


def unique_lists(offsets, ids):
    """CSR lists ``(offsets, ids)`` with each list sorted and its repeated
    ids dropped: new ``(offsets, ids)``."""
    ids = sort_lists(offsets, ids)
    if ids.size < 2:
        return offsets, ids
    repeat = ids[1:] == ids[:-1]
    repeat[_list_starts(offsets, ids.size)] = False
    if not repeat.any():
        return offsets, ids
    keep = np.concatenate([[True], ~repeat])
    counts = np.bincount(np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))[keep],
                         minlength=offsets.shape[0] - 1)
    new_off = np.zeros_like(offsets)
    np.cumsum(counts, out=new_off[1:])
    return new_off, ids[keep]


def _list_starts(offsets, n):
    """Where CSR lists of ``n`` ids begin, as positions among the n - 1
    neighbour pairs ``(ids[i], ids[i + 1])``: the pair whose second id
    starts a list (so comparing neighbours must skip it)."""
    inner = offsets[1:-1]
    return inner[(inner > 0) & (inner < n)] - 1


def logit_scale(scale, temperature):
    """The logit scale from ``scale`` or ``temperature`` (1 when neither)."""
    if temperature is None:
        return 1.0 if scale is None else scale
    if scale is not None:
        raise ValueError("give scale or temperature, not both")
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    try:
        t = float(temperature)
    except OverflowError:
        t = math.inf
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t:.3g}")
    if not math.isfinite(1.0 / t):
        raise ValueError(f"temperature is too small: 1 / {t:.3g} overflows")
    return 1.0 / t
