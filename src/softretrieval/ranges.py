"""Range search: every key within a threshold of each query, in FAISS's layout.

:func:`range_search` (and :meth:`softretrieval.Index.range_search`) returns,
for each query, every key whose score is at or above ``threshold`` (similarity,
"ip" and "cosine") or at or below it (squared distance, "l2"), as
``(lims, scores, ids)``: query i's results are ``scores[lims[i]:lims[i + 1]]``
and ``ids[lims[i]:lims[i + 1]]``, best first (higher similarity or lower
distance, then lower id).

How it runs, and why (:func:`solve_range`):

* The hits are collected inside the one streaming kernel (:func:`cpu.stream`,
  a range search is a :class:`devices.Mode`, not a copy of the tile loop):
  each row of a logit tile is offered to :func:`rules.range_scan_row`, which
  keeps every key at or above the query's *logit* threshold. The work is
  split over query blocks and key ranges exactly as for top-k, so a single
  query still uses every core.
* A query's hit count is not known before the scan, and a parallel loop of
  Numba's can neither grow a shared buffer (no atomics on the CPU target)
  nor hand variable-sized arrays back from its iterations. So each query
  gets a fixed number of slots per key range in a first pass (at least
  ``config.RANGE_SLOTS``, more when ``config.RANGE_BUFFER_BYTES`` allows,
  never more than the range's keys: a single query never overflows); hits
  beyond its slots are counted, not stored. The queries that overflowed —
  none when results are few, the usual case — are run again, alone, with
  room for the hits they now know they have (a rerun's tiling can differ,
  so a key within rounding of the threshold may change sides: a query that
  overflows again is simply run again). Memory: the first pass's buffer
  (allocated, written only where hits land) and, for a rerun, about its
  results times the key ranges; never B x N.
* The kernel's threshold is a logit: the score threshold moved into the
  kernel's units (``sign * threshold - row_const``, the inverse of
  :func:`rules.topk_scores_row`) and lowered by a relative 2^-20, so that no
  key whose score meets the threshold is missed by rounding. The finish
  (:func:`rules.range_finish_row`) then computes each hit's score by the
  top-k rule and applies the threshold exactly to that score: the results
  are exactly the keys whose returned score meets the threshold.

Excluded keys (``exclude``, a ``-inf`` bias, an Index's windows) and logits
below about -1e30 are never returned, even with ``threshold = -inf`` ("ip",
"cosine") or ``+inf`` ("l2"), which return every other key. Range search
runs on the CPU.
"""

import math
import numbers
from typing import Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import api, config, devices, gpu_api, interop, validate
from .api import Exclude
from .constants import NEG_INIT
from .devices import Mode

#: Relative amount by which the kernels' logit threshold is lowered below
#: the exact one (float32 rounding of a score is 2^-24 relative), plus an
#: absolute one for thresholds near 0.
MARGIN = 2.0 ** -20
TINY = 1e-37


def check_threshold(threshold) -> float:
    """``threshold`` as a float: TypeError for what is not a number (bools
    included), ValueError for a complex number or NaN. ``±inf`` is allowed
    (everything or nothing); integers beyond the float range become ``±inf``;
    a 0-d array counts as its element."""
    if isinstance(threshold, np.ndarray) and threshold.ndim == 0:
        threshold = threshold.item()
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Number):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    if not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a real number, got {threshold!r}")
    try:
        value = float(threshold)
    except OverflowError:
        value = math.inf if threshold > 0 else -math.inf
    if math.isnan(value):
        raise ValueError("threshold must not be NaN")
    return value


def cpu_kernels(device):
    """The CPU kernels for ``device`` "cpu" or "auto"; ValueError for
    "cuda" (range search runs on the CPU) and for unknown names."""
    if isinstance(device, str) and device == "cuda":
        raise ValueError("range search runs on the CPU: device must be 'cpu' or 'auto', "
                         "got 'cuda'")
    return devices.kernels("cpu" if device == "auto" else device)


@interop.boundary
def range_search(queries: ArrayLike, keys: ArrayLike, threshold: float, *, metric: str = "ip",
                 bias: Optional[ArrayLike] = None, exclude: Exclude = None,
                 device: str = "cpu") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every key within ``threshold`` of each query, in FAISS's layout.

    Parameters
    ----------
    queries : (B, d) float array
    keys : (N, d) float array, N >= 1
    threshold : real. "ip", "cosine": keys with similarity (+ bias) at or
        above it; "l2": keys with squared distance (- bias) at or below it.
        ``-inf`` ("ip", "cosine") or ``+inf`` ("l2") returns every key that
        is not excluded; the opposite infinity returns none. NaN: ValueError.
    metric : "ip" (default), "cosine" or "l2", as in :func:`softretrieval.topk`.
    bias : (N,) real array, optional: added to the similarity, subtracted
        from the distance, as in :func:`softretrieval.topk`; ``-inf`` excludes.
    exclude : per-query ids to skip, as in :func:`softretrieval.topk`.
    device : "cpu" (default) or "auto"; range search runs on the CPU
        ("cuda" and arrays on the GPU raise ValueError).

    Returns
    -------
    lims : (B + 1,) int64; query i's results are entries ``lims[i]`` to
        ``lims[i + 1]`` of:
    scores : (lims[-1],) float32, the scores :func:`softretrieval.topk`
        would give (distances of "l2" without bias floored at 0);
    ids : (lims[-1],) int64 row numbers of the keys.

    Within a query, results are ordered best first (higher similarity,
    lower distance), ties by lower id. FAISS's ``range_search`` differs in
    two ways: its threshold is strict (``>`` for inner products, ``<`` for
    distances) and its results are in no particular order.
    """
    threshold = check_threshold(threshold)
    cpu_kernels(device)
    if gpu_api.on_device(queries, keys, bias):
        raise ValueError("range search runs on the CPU: pass host arrays (e.g. numpy), not arrays "
                         "on the GPU")
    lay, problems = api._problems(queries, keys, None, metric=metric, scale=None, bias=bias,
                                  exclude=exclude, causal=False, window=None, seq_lens=None,
                                  softmax=False)
    return solve_range(lay, problems, threshold, metric, device)


def solve_range(lay, problems, threshold, metric, device="cpu"):
    """Range search of validated problems (from ``api._problems(...,
    softmax=False)`` or ``Index._problems(..., softmax=False)``): 2-D
    layouts only (one problem). Returns ``(lims (B + 1,) int64, scores
    float32, ids int64)`` as :func:`range_search`, ids being the problem's
    key rows."""
    threshold = check_threshold(threshold)
    kernels = cpu_kernels(device)
    if lay.ndim != 2:
        raise ValueError("range search takes 2-D queries (B, d) and keys (N, d); "
                         f"got queries of {lay.ndim} dimensions")
    lims = np.zeros(lay.T + 1, np.int64)
    scores = np.zeros(0, np.float32)
    ids = np.zeros(0, np.int64)
    for _, p in problems:
        if p.Q.shape[0] > 0:
            lims, scores, ids = _solve(p, kernels, threshold, metric)
    return lims, scores, ids


def _solve(p, kernels, threshold, metric):
    """One problem's range search: a first pass with the slots of
    ``config.RANGE_SLOTS`` and ``config.RANGE_BUFFER_BYTES`` per query, then
    reruns of the queries that overflowed."""
    from . import cpu, runtime

    l2 = metric == "l2"
    sign = -1.0 if l2 else 1.0
    clamp = l2 and p.logits.bias.shape[0] == 0
    floor = logit_floor(threshold, sign, p.row_const)
    R, N = p.Q.shape[0], p.keys.data.shape[0]
    rows = np.arange(R)
    nsplit = cpu.plan(R, N, runtime.num_threads())[1]
    room = np.full(R, max(config.RANGE_SLOTS, config.RANGE_BUFFER_BYTES // (12 * R * nsplit)))
    sub = p
    parts = []
    while rows.size:
        room = np.minimum(room, -(-N // nsplit))      # a key range holds no more hits than keys
        slots = np.zeros(rows.size + 1, np.int64)
        np.cumsum(room, out=slots[1:])
        validate.fits_in_memory(12 * nsplit * int(slots[-1]),
                                f"the hit buffers of a range search at threshold {threshold:g} "
                                f"({int(slots[-1])} slots per key range)")
        res = api._run(sub, kernels, Mode(False, False, 0, floor[rows], slots))
        count = res["range_count"]
        total = count.sum(axis=0)
        over = (count > room).any(axis=0)
        count[:, over] = 0
        start, kept, sc, found = runtime.parallel_call(
            cpu.finish_range, res["range_logits"], res["range_ids"], count, slots, sign,
            np.ascontiguousarray(sub.row_const), clamp, threshold, work=int(count.sum()),
            blas=False)
        parts.append((rows, start, kept, sc, found))
        rows = rows[over]
        room = total[over] + total[over] // 16 + 16
        nsplit = cpu.plan(rows.size, N, runtime.num_threads())[1]
        sub = rows_of(p, rows)
    return _assemble(R, parts)


def logit_floor(threshold, sign, row_const):
    """(R,) float32: each query's kernel-logit threshold for a score
    ``threshold``: ``sign * threshold - row_const`` (the inverse of
    :func:`rules.topk_scores_row`'s ``sign * (logit + row_const)``) lowered
    by :data:`MARGIN` relative, so rounding loses no hit; at least
    :data:`constants.NEG_INIT`, so excluded keys never qualify."""
    with np.errstate(over="ignore", invalid="ignore"):
        exact = sign * threshold - np.asarray(row_const, np.float64)
        finite = np.isfinite(exact)
        room = np.where(finite, MARGIN * (np.abs(exact) + np.abs(row_const)) + TINY, 0.0)
        floor = (exact - room).astype(np.float32)
    return np.maximum(floor, NEG_INIT)


def rows_of(p, rows):
    """Problem ``p`` restricted to its query rows ``rows`` (int64, sorted):
    queries, exclusion lists, windows and per-query constants."""
    m = p.masks
    changes = {}
    if m.excl_off.shape[0] > 0:
        counts = np.diff(m.excl_off)[rows]
        off = np.zeros(rows.size + 1, np.int64)
        np.cumsum(counts, out=off[1:])
        take = np.repeat(m.excl_off[rows] - off[:-1], counts) + np.arange(off[-1])
        changes.update(excl_off=off, excl_ids=m.excl_ids[take])
    if m.row_lo.shape[0] > 0:
        changes.update(row_lo=m.row_lo[rows], row_hi=m.row_hi[rows])
    return p._replace(Q=np.ascontiguousarray(p.Q[rows]), masks=m._replace(**changes),
                      row_const=p.row_const[rows])


def _assemble(R, parts):
    """FAISS's ``(lims, scores, ids)`` for R queries from the passes'
    results ``(rows, start, kept, scores, ids)`` (:func:`cpu.finish_range`
    over the queries ``rows``; a later pass's rows hold 0 results in the
    earlier ones)."""
    counts = np.zeros(R, np.int64)
    for rows, _, kept, _, _ in parts:
        counts[rows] = kept
    lims = np.zeros(R + 1, np.int64)
    np.cumsum(counts, out=lims[1:])
    if len(parts) == 1 and (parts[0][2] == np.diff(parts[0][1])).all():
        return lims, parts[0][3], parts[0][4]          # nothing dropped: already in place
    scores = np.empty(lims[-1], np.float32)
    ids = np.empty(lims[-1], np.int64)
    for rows, start, kept, sc, found in parts:
        n = int(kept.sum())
        if n == 0:
            continue
        before = np.cumsum(kept) - kept
        step = np.arange(n) - np.repeat(before, kept)
        dest = np.repeat(lims[rows], kept) + step
        src = np.repeat(start[:-1], kept) + step
        scores[dest] = sc[src]
        ids[dest] = found[src]
    return lims, scores, ids
