"""Public functions on numpy arrays: validation, preparation and dispatch.

The kernels (:mod:`softretrieval.cpu`) are imported on the first call, not at
``import softretrieval``.
"""

import numpy as np

from . import validate
from .constants import LOG2E, MASKED, NEG_INIT


def _prepare_queries(Q, scale):
    """Queries times ``scale * log2(e)`` in float32 (the kernels' base-2 logits)."""
    Qs = (Q * np.float64(scale * LOG2E)).astype(np.float32)
    if not np.isfinite(Qs).all():
        raise ValueError("scale * queries overflows float32: scale is too large for these queries")
    return Qs


def _prepare_bias(bias, n):
    """Bias in base 2 as float32 (n,), excluded keys at MASKED; (0,) for none."""
    b = validate.bias_vector(bias, n)
    if b is None:
        return np.zeros(0, np.float32)
    with np.errstate(over="ignore"):
        b2 = (b * LOG2E).astype(np.float32)
    if not np.isfinite(b2[b2 > 0]).all():
        raise ValueError("bias has values too large for float32 logits")
    return np.maximum(b2, MASKED)


def _raise_non_finite(keys, values, values_given):
    """Name the argument behind a non-finite score or output."""
    validate.all_finite(keys, "keys")
    if values_given:
        validate.all_finite(values, "values")
    raise ValueError(
        "non-finite result: the logits (scale * q.k + bias) or the weighted sum of "
        "values overflow float32; reduce scale or the norms of keys/values")


def attention(queries, keys, values=None, *, scale=None, bias=None, return_lse=False):
    """Soft retrieval: softmax attention of every query over all keys.

    ``out[b] = sum_n softmax_n(scale * q_b . k_n + bias_n) * v_n``, streamed
    over key tiles with an online softmax; the (B, N) score matrix never
    exists.

    Parameters
    ----------
    queries : (B, d) float array
    keys : (N, d) float array, N >= 1
    values : (N, dv) float array, or None to use the keys as values (soft
        nearest neighbour: a softmax-weighted average of the keys).
    scale : real, default ``1 / sqrt(d)``
    bias : (N,) real array, optional. Additive per-key logit bias (e.g.
        log-popularity, logQ correction); ``-inf`` excludes a key.
    return_lse : bool
        Also return ``lse[b] = log sum_n exp(scale * q_b . k_n + bias_n)``.

    Returns
    -------
    out : (B, dv) float32
    lse : (B,) float32, only with ``return_lse``.

    A query whose keys are all excluded gets ``out = 0`` and ``lse = -inf``.
    Arithmetic is float32 (float16/float64 inputs are converted); logits
    below about -1e30 count as excluded. Non-contiguous inputs are copied.
    NaN or inf in any input raises ``ValueError`` naming it.
    """
    Q = validate.float_matrix(queries, "queries")
    K = validate.float_matrix(keys, "keys")
    V = K if values is None else validate.float_matrix(values, "values")
    N, d = K.shape
    if N == 0:
        raise ValueError("keys is empty: attention needs at least one key")
    if Q.shape[1] != d:
        raise ValueError(f"queries have dimension {Q.shape[1]} but keys have {d}")
    if V.shape[0] != N:
        raise ValueError(f"values have {V.shape[0]} rows but keys have {N}")
    scale = validate.scale_value(scale, d)
    b2 = _prepare_bias(bias, N)
    validate.all_finite(Q, "queries")
    Qs = _prepare_queries(Q, scale)
    if Q.shape[0] == 0:
        out = np.zeros((0, V.shape[1]), np.float32)
        lse = np.zeros(0, np.float32)
    else:
        from . import cpu

        out, lse, bad = cpu.soft_attention(Qs, K, V, b2)
        if bad or not np.isfinite(out).all():
            _raise_non_finite(K, V, values is not None)
    return (out, lse) if return_lse else out


def merge(outs, lses):
    """Combine results over disjoint key sets into the result over their union.

    Parameters
    ----------
    outs : (P, ..., dv) float array, or a sequence of P arrays (..., dv):
        the ``out`` of each part (e.g. ``attention`` on each shard).
    lses : (P, ...) float array, or a sequence of P arrays (...): their
        ``lse``. A part with ``lse = -inf`` (no valid key) has no weight.

    Returns
    -------
    out : (..., dv) float32 and lse : (...) float32, equal (up to float32
    rounding) to one call over all the keys; a row with no valid key in any
    part gets ``out = 0`` and ``lse = -inf``.

    This is the associative merge of online-softmax states that the kernels
    use for key splits: ``lse = log sum_p exp(lse_p)``,
    ``out = sum_p exp(lse_p - lse) * out_p``.
    """
    O = validate.float_matrix(outs, "outs", ndim=np.ndim(outs))
    L = np.asarray(lses)
    if L.dtype.kind != "f":
        raise TypeError(f"lses must be a floating-point array, got dtype {L.dtype}")
    if O.ndim < 2 or O.shape[0] == 0:
        raise ValueError(f"outs must hold at least one part of shape (..., dv), got shape {O.shape}")
    if L.shape != O.shape[:-1]:
        raise ValueError(f"lses must have shape {O.shape[:-1]} to match outs, got {L.shape}")
    if np.isnan(L).any() or np.isposinf(L).any():
        raise ValueError("lses contains NaN or +inf")
    validate.all_finite(O, "outs")
    P = O.shape[0]
    rows = L[0].size
    valid = np.isfinite(L)
    m = np.where(valid, L * LOG2E, NEG_INIT).astype(np.float32).reshape(P, rows)
    l = valid.astype(np.float32).reshape(P, rows)
    acc = O.reshape(P, rows, O.shape[-1])
    from . import cpu

    out, lse = cpu.merge_states(m, l, acc)
    return out.reshape(O.shape[1:]), lse.reshape(L.shape[1:])
