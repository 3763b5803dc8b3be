"""Public functions on numpy arrays: validation, preparation and dispatch.

Every mode goes through :func:`_prepare`, which validates the inputs and
turns ``metric``, ``scale`` and ``bias`` into what the kernels take (queries
pre-scaled, a per-key term, a per-query constant). The kernels
(:mod:`softretrieval.cpu`) are imported on the first call, not at
``import softretrieval``.
"""

from typing import NamedTuple

import numpy as np

from . import validate
from .constants import KEYS_PLAIN, KEYS_SQNORM, KEYS_UNIT, LN2, LOG2E, MASKED, NEG_INIT

METRICS = ("ip", "cosine", "l2")


class TopKAttention(NamedTuple):
    """Result of :func:`topk_attention` (all float32 but ``ids``).

    out (B, dv): softmax over the top-k keys applied to their values.
    ids (B, k) int64: the top-k keys, best first; -1 where fewer are valid.
    weights (B, k): their softmax weights (0 for -1 slots); rows sum to 1.
    lse (B,): log-partition over the FULL catalog.
    coverage (B,): share of the full softmax mass the top-k keys hold,
    ``exp(lse_topk - lse)``; 0 for a query with no valid key.
    """

    out: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    lse: np.ndarray
    coverage: np.ndarray


class _Prepared(NamedTuple):
    Q: np.ndarray          # (B, d) float32, the kernel's queries (pre-scaled)
    K: np.ndarray          # (N, d) float32
    V: np.ndarray          # (N, dv) float32
    values_given: bool
    bias: np.ndarray       # (N,) float32 in logit units, or (0,)
    key_mode: int
    key_coef: float
    row_const: np.ndarray  # (B,) float64, natural-log units: logit = kernel logit + row_const
    exclude: object        # (offsets, ids) or None


def _prepare(queries, keys, values, *, metric, scale, bias, exclude, softmax):
    """Validate and turn the inputs into the kernels' terms.

    With ``softmax`` the kernel logits are base 2 (``log2(e)`` folded into
    the scale and the bias); without, they are the raw similarity
    (``scale`` = 1).
    """
    Q = validate.float_matrix(queries, "queries")
    K = validate.float_matrix(keys, "keys")
    V = K if values is None else validate.float_matrix(values, "values")
    N, d = K.shape
    if N == 0:
        raise ValueError("keys is empty: at least one key is needed")
    if Q.shape[1] != d:
        raise ValueError(f"queries have dimension {Q.shape[1]} but keys have {d}")
    if V.shape[0] != N:
        raise ValueError(f"values have {V.shape[0]} rows but keys have {N}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    validate.all_finite(Q, "queries")
    unit = LOG2E if softmax else 1.0
    mult = validate.scale_value(scale, d) * unit if softmax else 1.0
    row_const = np.zeros(Q.shape[0])
    key_mode, key_coef = KEYS_PLAIN, 0.0
    if metric == "cosine":
        norms = np.linalg.norm(Q.astype(np.float64), axis=1, keepdims=True)
        Q = np.divide(Q, norms, out=np.zeros(Q.shape), where=norms > 0)
        key_mode = KEYS_UNIT
    elif metric == "l2":
        row_const = -(mult / unit) * np.einsum("ij,ij->i", Q.astype(np.float64), Q.astype(np.float64))
        key_mode, key_coef = KEYS_SQNORM, -mult
        mult *= 2.0
    with np.errstate(over="ignore"):
        Qs = (Q * np.float64(mult)).astype(np.float32)
    if not np.isfinite(Qs).all():
        raise ValueError("scale * queries overflows float32: scale is too large for these queries")
    return _Prepared(Qs, K, V, values is not None, _prepare_bias(bias, N, unit), key_mode,
                     key_coef, row_const, validate.exclusion_lists(exclude, Q.shape[0], N))


def _prepare_bias(bias, n, unit):
    """Bias in logit units as float32 (n,), excluded keys at MASKED; (0,) for none."""
    b = validate.bias_vector(bias, n)
    if b is None:
        return np.zeros(0, np.float32)
    with np.errstate(over="ignore"):
        b2 = (b * unit).astype(np.float32)
    if not np.isfinite(b2[b2 > 0]).all():
        raise ValueError("bias has values too large for float32 logits")
    return np.maximum(b2, MASKED)


def _run(p, **mode):
    """Run the kernels on prepared inputs; name the argument behind a NaN/inf."""
    from . import cpu

    res = cpu.run(p.Q, p.K, p.V, p.bias, key_mode=p.key_mode, key_coef=p.key_coef,
                  exclude=p.exclude, **mode)
    out = res.get("out")
    if res["bad"] or (out is not None and not np.isfinite(out).all()):
        validate.all_finite(p.K, "keys")
        if p.values_given:
            validate.all_finite(p.V, "values")
        raise ValueError(
            "non-finite result: the logits (scale * q.k + bias) or the weighted sum of "
            "values overflow float32; reduce scale or the norms of keys/values")
    return res


def _with_row_const(lse, row_const):
    return (lse + row_const).astype(np.float32)


def attention(queries, keys, values=None, *, scale=None, bias=None, metric="ip",
              exclude=None, return_lse=False):
    """Soft retrieval: softmax attention of every query over all keys.

    ``out[b] = sum_n softmax_n(logit(q_b, k_n) + bias_n) * v_n``, streamed
    over key tiles with an online softmax; the (B, N) score matrix never
    exists. ``logit`` is ``scale * q.k`` (``metric="ip"``),
    ``scale * cos(q, k)`` (``"cosine"``) or ``-scale * |q - k|^2`` (``"l2"``).

    Parameters
    ----------
    queries : (B, d) float array
    keys : (N, d) float array, N >= 1
    values : (N, dv) float array, or None to use the keys as values (soft
        nearest neighbour: a softmax-weighted average of the keys).
    scale : real, default ``1 / sqrt(d)``
    bias : (N,) real array, optional. Additive per-key logit bias (e.g.
        log-popularity, logQ correction); ``-inf`` excludes a key.
    metric : "ip" (default), "cosine" or "l2".
    exclude : per-query ids to skip: a tuple ``(offsets (B+1,), ids)`` (CSR)
        or a list of B integer arrays.
    return_lse : bool
        Also return ``lse[b] = log sum_n exp(logit + bias_n)``.

    Returns
    -------
    out : (B, dv) float32
    lse : (B,) float32, only with ``return_lse``.

    A query whose keys are all excluded gets ``out = 0`` and ``lse = -inf``.
    Arithmetic is float32 (float16/float64 inputs are converted); logits
    below about -1e30 count as excluded. Non-contiguous inputs are copied.
    NaN or inf in any input raises ``ValueError`` naming it.
    """
    p = _prepare(queries, keys, values, metric=metric, scale=scale, bias=bias,
                 exclude=exclude, softmax=True)
    if p.Q.shape[0] == 0:
        out, lse = np.zeros((0, p.V.shape[1]), np.float32), np.zeros(0, np.float32)
    else:
        res = _run(p, want_soft=True, want_acc=True)
        out, lse = res["out"], _with_row_const(res["lse"], p.row_const)
    return (out, lse) if return_lse else out


def _check_k(k):
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _pad(a, k, fill):
    if a.shape[1] == k:
        return a
    out = np.full((a.shape[0], k), fill, a.dtype)
    out[:, : a.shape[1]] = a
    return out


def topk(queries, keys, k, *, metric="ip", bias=None, exclude=None):
    """Exact top-k retrieval, with FAISS's conventions.

    Parameters
    ----------
    queries : (B, d) float array
    keys : (N, d) float array, N >= 1
    k : int >= 1 (k > N is allowed: the tail is padded)
    metric : "ip" (inner product), "cosine" (inner product of the
        normalized vectors; the caller's arrays are not modified, a zero
        vector scores 0) or "l2" (squared Euclidean distance).
    bias : (N,) real array, optional: added to the similarity ("ip",
        "cosine") or subtracted from the distance ("l2"); ``-inf`` excludes.
    exclude : per-query ids to skip, as in :func:`attention`.

    Returns
    -------
    scores : (B, k) float32. Similarities in descending order ("ip",
        "cosine"), or squared distances in ascending order ("l2").
    ids : (B, k) int64. Ties are broken by the lower id. Where fewer than k
        keys are valid the tail holds id -1 and score -inf (+inf for "l2").
    """
    k = _check_k(k)
    p = _prepare(queries, keys, None, metric=metric, scale=None, bias=bias,
                 exclude=exclude, softmax=False)
    B = p.Q.shape[0]
    if B == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    res = _run(p, want_soft=False, want_acc=False, k=min(k, p.K.shape[0]))
    logits, ids, count = res["topk_logits"], res["topk_ids"], res["topk_count"]
    valid = np.arange(logits.shape[1])[None, :] < count[:, None]
    if metric == "l2":
        scores = (-p.row_const[:, None] - logits).astype(np.float32)
        if p.bias.shape[0] == 0:
            np.maximum(scores, 0, out=scores)
        scores[~valid] = np.inf
        return _pad(scores, k, np.inf), _pad(ids, k, -1)
    scores = logits.copy()
    scores[~valid] = -np.inf
    return _pad(scores, k, -np.inf), _pad(ids, k, -1)


def topk_attention(queries, keys, values=None, k=32, *, scale=None, bias=None, metric="ip",
                   exclude=None):
    """Top-k attention: softmax over each query's k best keys, in one pass.

    Arguments as :func:`attention`, plus ``k`` (int >= 1; k > N is allowed).
    One pass over the keys finds the top-k by logit and the full-catalog
    log-partition, so ``coverage`` (the share of the full softmax mass that
    the top-k keys hold) costs nothing extra: it tells whether k was large
    enough. Returns a :class:`TopKAttention`.
    """
    k = _check_k(k)
    p = _prepare(queries, keys, values, metric=metric, scale=scale, bias=bias,
                 exclude=exclude, softmax=True)
    B, dv = p.Q.shape[0], p.V.shape[1]
    if B == 0:
        z = np.zeros((0, k), np.float32)
        return TopKAttention(np.zeros((0, dv), np.float32), np.zeros((0, k), np.int64), z,
                             np.zeros(0, np.float32), np.zeros(0, np.float32))
    res = _run(p, want_soft=True, want_acc=False, k=min(k, p.K.shape[0]))
    from . import cpu

    logits, ids, count = res["topk_logits"], res["topk_ids"], res["topk_count"]
    valid = np.arange(logits.shape[1])[None, :] < count[:, None]
    top = np.where(count > 0, logits[:, 0], 0.0).astype(np.float64)
    w = np.where(valid, np.exp2(logits - top[:, None]), 0.0)
    total = w.sum(axis=1)
    weights = np.divide(w, total[:, None], out=np.zeros_like(w), where=total[:, None] > 0)
    weights = weights.astype(np.float32)
    out = cpu.gather_weighted(p.V, ids, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse_top = (top + np.log2(total)) * LN2   # float64, like the kernel's lse
        coverage = np.where(count > 0, np.minimum(np.exp(lse_top - res["lse"]), 1.0), 0.0)
    lse = _with_row_const(res["lse"], p.row_const)
    return TopKAttention(out, _pad(ids, k, -1), _pad(weights, k, 0.0), lse,
                         coverage.astype(np.float32))


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
    return out.reshape(O.shape[1:]), lse.astype(np.float32).reshape(L.shape[1:])
