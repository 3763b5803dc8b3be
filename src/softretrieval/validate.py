"""Input checks shared by every public function.

Each check names the offending argument in its ``TypeError``/``ValueError``.
Documented conversions (no error): float16/float64 arrays are converted to
float32, non-contiguous arrays are copied to C order, read-only arrays are
used as they are (the kernels never write to their inputs).
"""

import math
import numbers

import numpy as np


def float_matrix(x, name, ndim=2):
    """``x`` as a C-contiguous float32 array of ``ndim`` dimensions.

    Raises TypeError for non-floating dtypes (integers, booleans, complex,
    objects) and ValueError for another rank or a zero-length last axis.
    """
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. ragged lists
        raise TypeError(f"{name} must be an array of floats: {exc}") from None
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has a zero-length last axis (shape {arr.shape})")
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused later
        return np.ascontiguousarray(arr, dtype=np.float32)


def all_finite(arr, name):
    """Raise ValueError if ``arr`` holds NaN or inf."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")


def scale_value(scale, dim):
    """The logit scale: ``1/sqrt(dim)`` for None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
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
    arr = np.asarray(bias)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per key), got {arr.shape}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError(f"{name} contains NaN or +inf (use -inf to exclude a key)")
    return arr
