"""The shared vocabulary of the public layer: metrics, how a metric and a
scale become the kernels' logit terms, bias preparation, far-from-origin
centring for "l2", and the result types.

Both public halves use it — :mod:`softretrieval.api` (host arrays) and
:mod:`softretrieval.gpu_api` (arrays already on the GPU) — and it imports
neither, so the public layer has no import cycle.
"""

from typing import NamedTuple, Optional

import numpy as np

from . import validate
from .constants import KEYS_PLAIN, KEYS_SQNORM, KEYS_UNIT, LOG2E

METRICS = ("ip", "cosine", "l2")

#: Rows of the keys sampled to decide whether "l2" data are far from the origin.
FAR_SAMPLE = 256
#: "l2" rows whose mean's squared norm exceeds this many times their mean
#: squared distance from the mean count as far from the origin.
FAR_RATIO = 16.0


def check_metric(metric):
    """``metric`` if it is one of :data:`METRICS`, else ValueError naming it."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


class LogitTerms(NamedTuple):
    """How a metric and a scale turn a dot product ``s = q.k`` into a logit.

    ``logit = qmult * s`` (``s`` of the unit query when ``qunit``), then the
    per-key part of ``key_mode`` with ``key_coef`` (see
    :data:`constants.KEYS_PLAIN`), then ``+ qsq_coef * |q|^2`` (a per-query
    constant) and ``+ bias``. With a softmax the logits are base 2
    (``unit = log2(e)`` folded in); without, the raw similarity.
    """

    qmult: float
    qunit: bool
    qsq_coef: float
    key_mode: int
    key_coef: float
    unit: float


def logit_terms(metric, scale, d, softmax):
    """The :class:`LogitTerms` of ``metric`` ("ip", "cosine", "l2"), ``scale``
    (None: ``1/sqrt(d)``) for keys of dimension ``d``: the one place a metric
    is mapped to kernel terms, for the host and the device paths alike."""
    check_metric(metric)
    unit = LOG2E if softmax else 1.0
    mult = validate.scale_value(scale, d) * unit if softmax else 1.0
    if metric == "cosine":
        return LogitTerms(mult, True, 0.0, KEYS_UNIT, 0.0, unit)
    if metric == "l2":       # -scale |q - k|^2 = 2 scale q.k - scale |k|^2 - scale |q|^2
        return LogitTerms(2.0 * mult, False, -mult, KEYS_SQNORM, -mult, unit)
    return LogitTerms(mult, False, 0.0, KEYS_PLAIN, 0.0, unit)


def prepare_bias(bias, n, unit):
    """Bias in logit units (times ``unit``) as float32 (n,); (0,) for none.
    ``-inf`` stays ``-inf``: the kernels' shared rule
    (:func:`softretrieval.rules.key_offset`) makes such a key an excluded one."""
    b = validate.bias_vector(bias, n)
    if b is None:
        return np.zeros(0, np.float32)
    with np.errstate(over="ignore"):
        b2 = (b * unit).astype(np.float32)
    if not np.isfinite(b2[b2 > 0]).all():
        raise ValueError("bias has values too large for float32 logits")
    return b2


def far_center(rows):
    """For "l2": the mean of ``rows`` (n, d) as (d,) float32 when the rows lie
    far from the origin compared with their spread, else None.

    Squared distances are computed as ``|q|^2 - 2 q.k + |k|^2`` (so that the
    dot products run on BLAS); in float32 this cancels when every point
    shares a large offset (e.g. coordinates around 3000: no correct digit
    left). Distances do not change when queries and keys are shifted by the
    same point, so such data are shifted by their mean first.
    """
    X = np.asarray(rows, np.float64)
    if X.shape[0] == 0 or not np.isfinite(X).all():
        return None            # (non-finite keys are refused later, by name)
    mean = X.mean(axis=0)
    spread = ((X - mean) ** 2).sum(axis=1).mean()
    if (mean ** 2).sum() <= FAR_RATIO * spread:
        return None
    return mean.astype(np.float32)


class TopKAttention(NamedTuple):
    """Result of :func:`softretrieval.topk_attention` (all float32 but ``ids``).

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


class MemoryRead(NamedTuple):
    """Result of :meth:`softretrieval.KNNMemory.read` (float32 but ``ids``).

    out (B, heads, value_dim) — or (B, value_dim) for a one-head memory read
    with 2-D queries; lse like out without its last axis (over the whole live
    memory); with top-k, ids (..., k) int64 slots (-1 where fewer entries
    exist) and coverage (...) the share of the full softmax mass in the top-k.
    """

    out: np.ndarray
    lse: np.ndarray
    ids: Optional[np.ndarray] = None
    coverage: Optional[np.ndarray] = None
