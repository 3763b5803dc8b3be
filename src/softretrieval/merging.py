"""Combining results over disjoint parts of a catalog (shards, time windows,
memories) into the result over their union, exactly.

* :func:`merge_topk` (public): top-k lists by score, then id.
* :func:`softretrieval.merge` (in :mod:`softretrieval.api`): soft outputs by
  their log-partitions.
* :func:`shard_partial` and :func:`combine`: what one shard of an index
  computes for a query batch, and the merge of the shards' partials into
  the answer of one :class:`softretrieval.Index` over all their items. A
  top-k partial carries the kernel's own logits and the items' catalog rows,
  so the merge orders candidates exactly as one index's key splits are
  ordered (higher logit, then the earlier row) and finishes them with the
  same code; a soft partial is ``(out, lse)``.

Everything here runs on the host with numpy and the CPU kernels; nothing
needs a distributed engine (:mod:`softretrieval.distributed` ships
:func:`shard_partial` to Dask workers and calls :func:`combine`).
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import api, devices, interop, storage, terms, validate
from .constants import NEG_INIT

#: The query methods a shard serves.
METHODS = ("search", "retrieve", "retrieve_topk", "logsumexp")


@interop.boundary
def merge_topk(scores_list: Sequence[ArrayLike], ids_list: Sequence[ArrayLike], k: int, *,
               metric: str = "ip") -> Tuple[np.ndarray, np.ndarray]:
    """Combine top-k lists over disjoint item sets into the top-k over their union.

    Parameters
    ----------
    scores_list : a sequence of P arrays ``(..., k_p)`` (or one ``(P, ..., k')``
        array) of float scores, e.g. each shard's ``Index.search`` scores.
        The leading axes (queries, heads) must agree; ``k_p`` may differ.
    ids_list : the matching int ids, same shapes. A slot with id -1 is empty
        (FAISS's padding) and its score is ignored.
    k : int >= 1 (more than the candidates is allowed: the tail is padded).
    metric : "ip" or "cosine" (higher scores first) or "l2" (lower first).

    Returns
    -------
    scores (..., k) float32 and ids (..., k) int64, best first (ranked in
    the inputs' precision), ties broken by the lower id, padded with id -1
    and score -inf ("l2": +inf): the result one search over all the items
    would give, given each part returned at least its own best k (and,
    for ties, when ids ascend with the items' order, as row numbers do:
    :meth:`Index.search` breaks ties by the earlier row).

    Raises ValueError when an id appears twice for a query (the parts must
    be disjoint), an id is below -1 or beyond int64, a kept score is NaN,
    or the shapes disagree.
    """
    k = validate.positive_int(k, "k")
    metric = terms.check_metric(metric)
    scores = _parts(scores_list, "scores_list", "f")
    ids = _parts(ids_list, "ids_list", "iu")
    if len(scores) != len(ids):
        raise ValueError(f"scores_list has {len(scores)} parts but ids_list has {len(ids)}")
    lead = scores[0].shape[:-1]
    for p, (s, i) in enumerate(zip(scores, ids)):
        if s.shape[:-1] != lead or i.shape != s.shape:
            raise ValueError(f"part {p}: scores {s.shape} and ids {i.shape} do not match the "
                             f"leading shape {lead} of part 0")
    rows = int(np.prod(lead))
    validate.results_fit(rows, k, 12, sum(s.shape[-1] for s in scores))
    if rows == 0:
        return (np.zeros(lead + (k,), np.float32), np.zeros(lead + (k,), np.int64))
    S = np.concatenate([s.reshape(rows, -1) for s in scores], axis=1)
    ids = np.concatenate([_int64_ids(i).reshape(rows, -1) for i in ids], axis=1)
    valid = ids >= 0
    if np.isnan(S[valid]).any():
        raise ValueError("scores_list has NaN scores")
    _refuse_shared_ids(ids, valid)
    pos = _best(S if metric != "l2" else -S, ids, k)
    kept = pos >= 0
    at = np.maximum(pos, 0)
    out_s = np.where(kept, np.take_along_axis(S, at, axis=1),
                     np.inf if metric == "l2" else -np.inf).astype(np.float32)
    out_i = np.where(kept, np.take_along_axis(ids, at, axis=1), -1)
    return out_s.reshape(lead + (k,)), out_i.reshape(lead + (k,))


def _parts(parts, name, kinds):
    """A sequence of P >= 1 arrays of at least one axis, of dtype kind in ``kinds``."""
    if isinstance(parts, (list, tuple)):
        arrays = [validate.as_array(a, f"{name}[{p}]") for p, a in enumerate(parts)]
    else:
        whole = validate.as_array(parts, name)
        arrays = list(whole) if whole.ndim >= 2 else [whole]
    if not arrays:
        raise ValueError(f"{name} must hold at least one part")
    for p, a in enumerate(arrays):
        if a.ndim < 1 or a.dtype.kind not in kinds:
            what = "floating-point" if kinds == "f" else "integer"
            raise TypeError(f"{name}[{p}] must be a {what} array of shape (..., k), "
                            f"got dtype {a.dtype} and shape {a.shape}")
    return arrays


def _int64_ids(ids):
    """Ids as int64: ValueError for ids below -1 (the padding) or beyond int64."""
    if ids.size and (ids.min() < -1 or (ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max)):
        raise ValueError("ids_list must hold ids >= 0 (and -1 for an empty slot) within int64")
    return ids.astype(np.int64)


def _refuse_shared_ids(ids, valid):
    """ValueError when a row's valid ids repeat (parts that overlap)."""
    s = np.sort(np.where(valid, ids, -1), axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        r, c = np.argwhere(dup)[0]
        raise ValueError(f"id {s[r, c + 1]} appears more than once for query {r}: merged parts "
                         "must hold disjoint items")


def _best(keys, ids, k):
    """Positions (R, k) of each row's best k candidates: valid ones
    (``ids >= 0``) by higher key, then lower id; -1 past the valid ones."""
    R, W = ids.shape
    valid = ids >= 0
    order = np.lexsort((ids, np.where(valid, -keys, 0), ~valid), axis=-1)[:, :k]
    n = valid.sum(axis=1)
    pos = np.full((R, k), -1, np.int64)
    pos[:, :order.shape[1]] = np.where(np.arange(order.shape[1]) < n[:, None], order, -1)
    return pos


class TopkPartial(NamedTuple):
    """A shard's top-k candidates for B queries (``c`` = min(k, its items)).

    logits (B, c) float32: the kernel's logits (base 2 with a softmax),
    best first; rows (B, c) int64: the items' rows in the whole catalog;
    ids (B, c) int64: their external ids; count (B,): slots that hold an
    item (the rest are padding); row_const (B,) float64: the per-query
    constant the kernel left out; lse (B,) float32: the kernel's natural-log
    partition over the shard (top-k attention, float64), else None; values (B, c, dv)
    float32: the candidates' values (top-k attention), else None; clamp: the
    shard floors "l2" distances at 0 (no bias).
    """

    logits: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    count: np.ndarray
    row_const: np.ndarray
    lse: Optional[np.ndarray]
    values: Optional[np.ndarray]
    clamp: bool


def shard_partial(index, row_offset, method, queries, k=None, **options):
    """What the shard ``index`` (an :class:`softretrieval.Index` holding the
    catalog's rows from ``row_offset`` on) contributes to ``method`` (one
    of :data:`METHODS`) for float32 ``queries`` (B, dim): a
    :class:`TopkPartial` ("search", "retrieve_topk"), ``(out, lse)``
    ("retrieve") or ``lse`` ("logsumexp"); an empty shard contributes
    nothing (no candidates, ``lse = -inf``). ``options`` are the method's
    keyword arguments (``bias`` already cut to this shard's items)."""
    B = queries.shape[0]
    if len(index) == 0:
        return _empty_partial(method, B, index.value_dim or index.dim)
    if method == "retrieve":
        return index.retrieve(queries, return_lse=True, **options)
    if method == "logsumexp":
        return index.logsumexp(queries, **options)
    softmax = method == "retrieve_topk"
    scale = validate.logit_scale(options.pop("scale", None), options.pop("temperature", None))
    snap, _, problems = index._problems(queries, softmax=softmax, scale=scale if softmax else None,
                                        bias=options.get("bias"), exclude=options.get("exclude"),
                                        include=options.get("include"), device="cpu",
                                        values_on_host=True)
    ((_, p),) = problems
    res, logits, rows, count = api._run_topk(p, devices.kernels("cpu"), k, want_soft=softmax)
    local = snap.stored_rows(rows)
    values = None
    if softmax:
        at = np.maximum(local, 0).ravel()
        if snap.values is not None:
            values = snap.values[at]
        else:
            stored = snap.keys.data[at].view(storage.FORMATS[index.dtype][0])
            values = storage.decode_rows(stored, index.dtype,
                                         snap.keys.scale[at] if index.dtype == "int8" else None)
            if snap.center is not None:
                values = values + snap.center
        values = values.reshape(rows.shape + (values.shape[1],)).astype(np.float32)
    clamp = index.metric == "l2" and p.logits.bias.shape[0] == 0
    return TopkPartial(logits, np.where(local >= 0, local + row_offset, -1), snap.external(rows),
                       count, np.asarray(p.row_const, np.float64), res["lse"] if softmax else None,
                       values, clamp)


def _empty_partial(method, B, dv):
    if method == "retrieve":
        return np.zeros((B, dv), np.float32), np.full(B, -np.inf, np.float32)
    if method == "logsumexp":
        return np.full(B, -np.inf, np.float32)
    none = np.zeros((B, 0), np.int64)
    soft = method == "retrieve_topk"
    return TopkPartial(np.zeros((B, 0), np.float32), none, none, np.zeros(B, np.int64), None,
                       np.full(B, -np.inf) if soft else None,
                       np.zeros((B, 0, dv), np.float32) if soft else None, None)


def combine(method, parts, k=None, metric="ip"):
    """Merge the shards' partials (:func:`shard_partial`, in catalog order)
    into the result of one index over all their items, as the index's
    ``method`` returns it."""
    if method == "logsumexp":
        return _merge_lse(parts).astype(np.float32)
    if method == "retrieve":
        out, lse = api.merge([o for o, _ in parts], [s for _, s in parts])
        return out, lse
    full = [p for p in parts if p.row_const is not None]
    logits, rows, ids, count, values = _merge_candidates(parts, k)
    row_const = full[0].row_const
    if method == "search":
        from . import cpu, runtime

        l2 = metric == "l2"
        pad = np.float32(np.inf if l2 else -np.inf)
        return runtime.parallel_call(cpu.finish_topk, logits, ids, count, -1.0 if l2 else 1.0,
                                     row_const, all(p.clamp for p in full), pad, k,
                                     work=count.shape[0] * k, blas=False)
    return _finish_attention(logits, ids, count, values, _merge_lse([p.lse for p in parts]),
                             row_const, k)


def _merge_lse(lses):
    """log sum exp over the parts' (B,) log-partitions, float64 (a top-k
    attention finish measures the top-k's share against it: rounding it to
    float32 first would cost that share its precision at large logits)."""
    L = np.stack([np.asarray(s, np.float64) for s in lses])
    with np.errstate(divide="ignore"):
        return np.logaddexp.reduce(L, axis=0)


def _merge_candidates(parts, k):
    """The best ``min(k, candidates)`` of every part's candidates per query,
    by higher logit then earlier row: ``(logits, rows, ids, count, values)``
    with values (B, c, dv) or None."""
    logits = np.concatenate([p.logits for p in parts], axis=1)
    rows = np.concatenate([np.where(np.arange(p.rows.shape[1]) < p.count[:, None], p.rows, -1)
                           for p in parts], axis=1)
    pos = _best(logits, rows, min(k, max(rows.shape[1], 1)))
    kept = pos >= 0
    at = np.maximum(pos, 0)
    take = lambda a: np.take_along_axis(a, at, axis=1)  # noqa: E731
    out_logits = np.where(kept, take(logits), NEG_INIT).astype(np.float32)
    out_rows = np.where(kept, take(rows), -1)
    ids = np.where(kept, take(np.concatenate([p.ids for p in parts], axis=1)), -1)
    values = None
    if parts[0].values is not None:
        V = np.concatenate([p.values for p in parts], axis=1)
        values = np.take_along_axis(V, at[:, :, None], axis=1)
    return out_logits, out_rows, ids, kept.sum(axis=1).astype(np.int64), values


def _finish_attention(logits, ids, count, values, lse, row_const, k):
    """Top-k attention from merged candidates: the finish of one index
    (:func:`cpu.finish_topk_attention`) over the candidates' own values."""
    from . import cpu, runtime

    B, c = logits.shape
    dv = values.shape[2]
    V = values.reshape(B * c, dv)
    slot = np.where(np.arange(c) < count[:, None], np.arange(B)[:, None] * c + np.arange(c), -1)
    out, slots, weights, coverage = runtime.parallel_call(
        cpu.finish_topk_attention, logits, slot, count, lse, V, np.zeros(0, np.float32), 0, dv, k,
        work=B * k, blas=False)
    if not np.isfinite(out).all():
        raise ValueError("non-finite result: the weighted sum of values overflows float32")
    flat_ids = ids.reshape(-1)
    out_ids = np.where(slots >= 0, flat_ids[np.maximum(slots, 0)], -1)
    return terms.TopKAttention(out, out_ids, weights, api._with_row_const(lse, row_const), coverage)
