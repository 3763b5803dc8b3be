"""The int8 filter of exact top-k searches over int8 keys, for CPUs with AVX512_VNNI.

A search of a few queries over int8 keys is bound by arithmetic, not memory:
decoding each byte to float32 and multiplying it costs more than reading it
(about 9 ns per 128-byte key on one Zen 4 core, against 4 ns to read it). With
AVX512_VNNI, ``vpdpbusd`` multiplies 64 bytes by 64 bytes and sums them in
int32 lanes in one instruction (:func:`softretrieval.cpu_micro.int8_dot`).
So each query is rounded to int8 too (:func:`quantize_queries`), the keys are
scored exactly in integers against that rounded query, each approximate logit
comes with a certified bound on its error (:func:`slack`), and only the keys
whose approximate logit comes within that bound of the buffer's threshold
are scored again in float32 and offered
(:func:`softretrieval.rules.topk_rescore_scan_row`), as for the bfloat16
filter (:mod:`softretrieval.cpu_bf16`). Every other key is certainly below
the threshold, so the buffer ends as an exact float32 scan leaves it.

The error bound. A query ``q`` (float32, length d) is rounded to ``s q~`` with
``s = max|q| / 127`` and integers ``|q~_c| <= 127``; ``e = q - s q~``. A key
is ``s_k k`` with int8 ``|k_c| <= 128``. The filter's logit is ``s s_k (q~ .
k)``, the integer dot exact, so it differs from the exact ``s_k (q . k)`` by
``s_k |e . k| <= 128 s_k |e|_1``. The float32 rescoring differs from the exact
value by at most ``s_k (gamma(d) 128 |q|_1 + 128 d 2^-126)`` (any order of
additions; a product or query element below the normal range loses at most
``128 * 2^-126``, even where flush-to-zero is on, e.g. after
``torch.set_flush_denormal(True)``). Both are multiplied by the tile's largest ``s_k``
(:func:`slack`); the float32 roundings of the two logits themselves are the
rule's relative part (:data:`softretrieval.rules.FILTER_REL`).

The filter serves plain inner products (no bias, no l2 or cosine terms:
those keys take the float32 path) of keys shorter than ``2^17`` in tiles where ``128 |q|_1``
times the largest scale (and ``128 |q|_1`` itself) stays below ``2^100``
(:func:`usable`). On a CPU without AVX512_VNNI
:func:`available` is false and the kernel compiles to a trap that is never
reached.
"""

import numpy as np
from numba import njit

from . import cpu_micro
from .core import float32_from_bits
from .cpu_bf16 import gamma

#: Bytes per ``vpdpbusd`` step: queries are zero-padded to a multiple.
STEP = 64
#: Above this, ``128 |q|_1 max(1, s_k)`` could let a dot or logit overflow:
#: float32 path.
LIMIT = 2.0**100
#: Keys this long or longer take the float32 path (the integer dots must fit int32).
MAX_D = 2**17

# A float32's bits without its sign, and the smallest such pattern that is
# not finite (inf; NaNs lie above it).
_MAGNITUDE = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)


def available():
    """Whether the filter can run here (AVX512_VNNI, Numba compiling for this CPU)."""
    return cpu_micro.has_vnni()


@njit(cache=True, inline="always")
def padded(d):
    """Query bytes for keys of length d: d rounded up to a multiple of :data:`STEP`."""
    return -(-d // STEP) * STEP


@njit(cache=True)
def quantize_queries(Qb, qi, stats):
    """Round the float32 queries Qb (bq, d) to int8: ``qi`` (bq,
    >= :func:`padded` (d)) the integers (zero past d); ``stats`` (bq, 3)
    float64 each query's scale ``s``, ``128 * sum(q~)`` (what
    :func:`softretrieval.cpu_micro.int8_dot` adds) and the per-unit-scale
    margin ``128 (|e|_1 + gamma(d) |q|_1 + d 2^-126)`` (the module's bound,
    rounded up). Returns the largest ``128 |q|_1``, inf if a query holds NaN
    or inf (:func:`usable`)."""
    bq, d = Qb.shape
    largest = 0.0
    for i in range(bq):
        row = Qb[i]
        top = 0.0
        l1 = 0.0
        for c in range(d):
            a = abs(np.float64(row[c]))
            top = max(top, a)
            l1 += a
        if not l1 < np.inf:
            return np.inf
        largest = max(largest, 128.0 * l1)
        s = top / 127.0
        out = qi[i]
        out[:] = 0
        err = 0.0
        total = 0
        if s > 0:
            for c in range(d):
                x = np.float64(row[c])
                t = min(max(np.rint(x / s), -127.0), 127.0)
                out[c] = np.int8(t)
                total += np.int64(t)
                err += abs(x - s * t)
        stats[i, 0] = s
        stats[i, 1] = 128.0 * total
        # (the float64 sums err and l1 carry at most d roundings of 2^-53 each)
        stats[i, 2] = 128.0 * (err + (gamma(d) + 2.0**-45) * l1 + d * 2.0**-126) \
            * (1.0 + (d + 4) * 2.0**-52) * (1.0 + 2.0**-40)
    return largest


@njit(cache=True, inline="always")
def usable(largest, ks):
    """Whether a tile of keys with row scales ks can go through the filter
    for queries whose largest ``128 |q|_1`` is ``largest``
    (:func:`quantize_queries`): the float32 path's dots (summed before the
    scale is applied) and every logit then stay below :data:`LIMIT` (no
    overflow in either path), and no scale is NaN or inf (the float32 path
    reports those). Also returns the largest scale. ks C-contiguous.

    The largest |scale| is the largest of their IEEE bit patterns without the
    sign, an integer reduction that vectorizes (a float max with NaN
    semantics did not: 0.6 ns per key, a tenth of a single query's search);
    inf and NaN patterns lie above every finite one."""
    bits = ks.view(np.int32)
    top = np.int32(0)
    for j in range(bits.shape[0]):
        top = max(top, np.int32(bits[j] & _MAGNITUDE))
    kmax = float32_from_bits(top)
    return top < _INF_BITS and largest * max(1.0, np.float64(kmax)) < LIMIT, kmax


@njit(cache=True)
def approx_scores(qi, stats, Kraw, kcol, d, ks, S):
    """S (bq, tn) float32 = the filter's logits of the queries (``qi``,
    ``stats`` from :func:`quantize_queries`) against the int8 keys
    ``Kraw[:, kcol:kcol + d]`` (Kraw (tn, W) C-contiguous, d < 2^17) with
    row scales ks (tn,): ``s s_k (q~ . k)``, the integer dots through
    ``vpdpbusd`` (their offset taken back in wrapping int32 arithmetic,
    exact for ``d < 2^17``)."""
    bq, tn = S.shape
    for i in range(bq):
        q = qi[i]
        s = stats[i, 0]
        shift = np.int64(stats[i, 1])
        row = S[i]
        for j in range(tn):
            dot = np.int32(np.int64(cpu_micro.int8_dot(q, Kraw[j, kcol:kcol + d])) - shift)
            row[j] = np.float32(np.float64(dot) * s * np.float64(ks[j]))


@njit(cache=True, inline="always")
def slack(unit, kmax):
    """A query's margin (its ``stats[i, 2]``) in a tile whose largest row
    scale is kmax (:func:`usable`), as float32 (the factor ``1 + 2^-20``
    covers that rounding and the threshold's); plus ``2^-124`` for the
    roundings (or flushes) of either logit into float32's subnormal range."""
    return np.float32(unit * np.float64(kmax) * (1.0 + 2.0**-20) + 2.0**-124)
