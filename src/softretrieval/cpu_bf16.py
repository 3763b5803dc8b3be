"""The bfloat16 filter of exact top-k searches, for CPUs with AVX512_BF16.

A top-k search needs every score only to decide which keys can enter the
buffer; almost none can. With AVX512_BF16 (AMD Zen 4 and later, Intel Cooper
Lake, Sapphire Rapids and later) the instruction ``vdpbf16ps`` multiplies
pairs of bfloat16 numbers and accumulates in float32 at twice the rate of
float32 FMAs. So a query block is scored against a key tile in bfloat16
(:func:`softretrieval.cpu_micro.tile_products`), each approximate logit comes with a certified bound on
its error (:func:`slack`), and only the keys whose approximate logit comes
within that bound of the buffer's threshold are scored again in float32 and
offered (:func:`softretrieval.rules.topk_rescore_scan_row`). Every other key
is certainly below the threshold, so the buffer ends as an exact float32
scan leaves it: same ids, same float32 scores (up to the order of a float32
dot product's additions).

The error bound (``q``, ``k`` the float32 query and key; ``u = 2^-8``, the
unit roundoff of bfloat16, whose significand has 8 bits): rounding each
element to bfloat16 changes it by at most ``u`` relative; the products of
two bfloat16 numbers are exact in float32; ``vdpbf16ps`` adds them in
float32 (at most ``d + 2`` roundings of ``2^-24``), and the float32 rescoring
adds with at most ``d`` roundings. So the filter's dot and the exact float32
dot differ by at most ``c * sum |q_c k_c| <= c * |q| |k|`` (Cauchy-Schwarz),
``c = 2u + u^2 + 4 gamma(d + 2)`` with ``gamma(n) = n 2^-24 / (1 - n 2^-24)``,
plus an absolute term for the subnormal numbers the instruction flushes to
zero. The logit's factor and offset (:func:`softretrieval.rules.logit`) scale
this and add float32 roundings of the logit itself
(:data:`softretrieval.rules.FILTER_REL`). A tile whose norms could overflow
bfloat16 (above ``2^100``) is scored in float32 instead.

The micro-kernel is LLVM IR (:func:`softretrieval.cpu_micro.bf16_dots`), so
the cached kernels are compiled for this CPU only (Numba keys its cache by
CPU). On a CPU without AVX512_BF16 it compiles to a trap and is never
called: :func:`available` is false there, and the drivers take the float32
path.
"""

import math

import numpy as np
from numba import njit

from . import cpu_micro
from .core import float32_bits

_U = 2.0**-8
_EPS = 2.0**-24
_TINY = 2.0**-120
#: Query norms, key norms or their products at or above this could overflow
#: a bfloat16 element or dot: such tiles take the float32 path.
NORM_LIMIT = 2.0**100


def available():
    """Whether the filter can run: Numba compiles for AVX512_BF16
    (:func:`softretrieval.cpu_micro.target_features`)."""
    return cpu_micro.has_bf16()


@njit(cache=True, inline="always")
def gamma(n):
    """The bound ``n u / (1 - n u)`` on the relative error of a float32 sum of
    ``n`` terms (u = 2^-24), in any order."""
    return n * _EPS / (1 - n * _EPS)


@njit(cache=True)
def coefficient(d):
    """``c`` of the module's error bound for dot products of length ``d``."""
    return 2 * _U + _U * _U + 4 * gamma(d + 2)


@njit(cache=True, inline="always")
def _bf16(x):
    """The bfloat16 nearest the float32 ``x`` (ties to even), as the low 16
    bits of an int64 (finite ``x`` below the largest bfloat16)."""
    b = np.int64(float32_bits(x)) & 0xFFFFFFFF
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(cache=True, inline="always")
def _pair(row, c):
    """Features ``2c`` and ``2c + 1`` of ``row`` as two bfloat16 in a uint32
    (the second is 0 past the end of an odd-length row)."""
    lo = _bf16(row[2 * c])
    hi = _bf16(row[2 * c + 1]) if 2 * c + 1 < row.shape[0] else np.int64(0)
    return np.uint32(lo | (hi << 16))


@njit(cache=True, inline="always")
def _upper_norm(row):
    """An upper bound of the Euclidean norm of the float32 ``row`` (float64
    sums, rounded up)."""
    sq = 0.0
    for c in range(row.shape[0]):
        sq += np.float64(row[c]) * np.float64(row[c])
    return math.sqrt(sq) * (1.0 + 2.0**-40)


@njit(cache=True)
def pack_queries(Qb, qp, qn):
    """Pack the float32 queries Qb (bq, d) for
    :func:`softretrieval.cpu_micro.tile_products`: qp
    (>= ceil(bq / cpu_micro.ROWS) * cpu_micro.ROWS, ceil(d / 2)) uint32 (rows past bq zero), qn
    (bq,) float64 upper bounds of their norms. Returns the largest norm (inf
    if a norm is not finite: a NaN would not survive ``max``)."""
    bq = Qb.shape[0]
    top = 0.0
    for i in range(qp.shape[0]):
        out = qp[i]
        if i >= bq:
            out[:] = 0
            continue
        for c in range(out.shape[0]):
            out[c] = _pair(Qb[i], c)
        qn[i] = _upper_norm(Qb[i])
        top = max(top, qn[i]) if qn[i] < np.inf else np.inf
    return top


@njit(cache=True, inline="always")
def norm_bound(sq, d):
    """An upper bound of the norm of a float32 vector of length ``d`` from
    ``sq``, the float32 sum of its squares in any order: relative error at
    most gamma(d), plus at most ``2^-149`` per square or sum that falls into
    the subnormal range."""
    return math.sqrt(np.float64(sq) * (1.0 + 1.01 * gamma(d + 2)) + 2 * (d + 2) * 2.0**-149) \
        * (1.0 + 2.0**-22)


@njit(cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def pack_keys(Kt, kp, kn, pairs):
    """Pack the float32 key tile Kt (tn, d) for
    :func:`softretrieval.cpu_micro.tile_products`: kp (>= ceil(tn /
    cpu_micro.COLS), ceil(d / 2), cpu_micro.COLS) uint32 pairs of bfloat16 (keys past tn zero), kn
    (tn,) float32 the keys' squared norms (see
    :func:`norm_bound`); pairs (>= tn, ceil(d / 2)) uint32 scratch. Returns
    the bound of the largest norm, inf if a key holds NaN or inf (the tile
    then takes the float32 path, which reports them; a NaN would not survive
    ``max``, and rounding one to bfloat16 could make it finite)."""
    tn, d = Kt.shape
    d2 = kp.shape[1]
    top = np.float32(0.0)
    total = np.float32(0.0)
    for j in range(tn):
        row = Kt[j]
        sq = np.float32(0.0)
        for c in range(d):
            sq += row[c] * row[c]
        kn[j] = sq
        top = max(top, sq)
        total += sq
        out = pairs[j]
        for c in range(d2):
            out[c] = _pair(row, c)
    cpu_micro.pack_columns(pairs[:tn], kp)
    return norm_bound(top, d) if total < np.inf else np.inf


@njit(cache=True)
def margin_terms(kf, fa, omax, d):
    """``(a, b)``: a query's approximate logits in a key tile are within
    ``slack = qn * a + b`` of the exact ones (see the module's error bound),
    qn its norm bound. kf is the tile's largest ``|k| * |factor|``, fa its
    largest ``|factor|``, omax its largest ``|offset|`` (1 and 0 for plain dot
    products). Both include the roundings of evaluating them and of
    :func:`slack`."""
    inflate = (1.0 + 2.0**-12) * (1.0 + 2.0**-20)
    rd = math.sqrt(d)
    a = (kf * (coefficient(d) + 2.0**-21) + _TINY * fa * rd) * inflate
    b = (_TINY * (fa * d + rd * kf) + 2.0**-21 * omax) * inflate
    return a, b


@njit(cache=True, inline="always")
def slack(qn, a, b):
    """The margin of a query with norm bound ``qn`` in a tile with margin
    terms ``(a, b)`` (:func:`margin_terms`), float32; inf if it would
    overflow."""
    bound = qn * a + b
    return np.float32(bound) if bound < 1e38 else np.float32(np.inf)
