"""The retrieval engine: :class:`Index`, an item store with a FAISS-like face.

An index holds N item keys (in a storage format of :mod:`softretrieval.storage`),
optional values, optional int64 external ids and an optional per-item bias,
and serves every mode of the kernels over them: exact top-k
(:meth:`Index.search`), soft retrieval (:meth:`Index.retrieve`), top-k
attention (:meth:`Index.retrieve_topk`) and the full-catalog log-partition
(:meth:`Index.logsumexp`). Its arrays are read by the kernels in place.

On-disk format (:meth:`Index.save`, :meth:`Index.load`; see
:mod:`softretrieval.persist`), a folder of one ``.npy`` file per array
(named ``<array>.<generation>.npy``):

* ``keys``: (N, dim) in the storage dtype (float32, float16, uint16 bit
  patterns for bfloat16, int8);
* ``scales``: (N,) float32 row scales (int8 only);
* ``values``: (N, value_dim) float32 (when the index has values);
* ``ids``: (N,) int64 external ids (when given);
* ``bias``: (N,) float64 per-item bias (when set);
* ``center``: (dim,) float32, the point l2 keys are stored relative to (when
  set, see :class:`Index`);
* ``meta.json``: format ``"softretrieval.Index"``, version, ``dim``,
  ``metric``, ``dtype``, ``value_dim``, ``ntotal``, ``next_id`` (only for an
  index that numbers its items itself, see :meth:`Index.remove`), each file's
  name, dtype, shape and SHA-256, and the checksum of meta.json itself.

A save writes the live items only (removed rows are dropped).
"""

import os
import threading
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import api, devices, interop, layout, persist, ranges, storage, terms, validate
from .api import Exclude
from .constants import LOG2E

#: A call's bias: None (the stored one), an (N,) array, or False (none).
Bias = Union[None, bool, ArrayLike]

FORMAT = "softretrieval.Index"
FORMAT_VERSION = 2
#: Older versions :meth:`Index.load` still reads (no meta.json checksum).
LEGACY_VERSIONS = (1,)


class Index:
    """An item catalog served by the streaming kernels.

    Parameters
    ----------
    dim : int >= 1, the key dimension.
    metric : "ip" (default), "cosine" or "l2", as in :func:`softretrieval.topk`.
    value_dim : int >= 1 to store a value vector per item (returned, softmax
        weighted, by :meth:`retrieve`); None (default): the keys serve as
        values, so :meth:`retrieve` returns a softmax-weighted mean of keys.
    dtype : key storage, "float32" (default), "float16", "bfloat16" or "int8"
        (per-row scale). Keys are decoded to float32 inside the kernels' tile
        loop and all sums are float32; values are stored as float32.

    Retrieval logits are ``scale * sim(q, k) + bias`` with ``scale = 1`` by
    default (a two-tower model's logit is the dot product; ``temperature`` is
    ``1 / scale``), unlike :func:`softretrieval.attention`'s ``1/sqrt(d)``.

    ``bias`` arguments: None (default) uses the index's stored per-item bias
    (if any); an (N,) array replaces it for the call; ``False`` uses none.
    ``exclude`` lists hold external ids when the index has them (ids not in
    the index are ignored), else row numbers in ``[0, N)``.

    ``metric="l2"`` on data far from the origin: squared distances are
    computed as ``|q|^2 - 2 q.k + |k|^2`` in float32 (the BLAS path), which
    cancels when the data share a large offset. So when the first add's
    keys lie far from the origin compared with their spread, the index keeps
    their mean as ``center`` and stores and searches ``keys - center`` and
    ``queries - center`` (distances are unchanged by the shift); ``keys()``
    and keys returned as values add it back.

    Searches may run while another thread adds: each sees the items present
    when it started (ids, exclusions and stored arrays of one snapshot).
    An index pickles (its arrays are copied into the pickle; GPU copies are
    not), e.g. to send it to worker processes. Every query method takes ``device="cpu" | "cuda" |
    "auto"`` (see :func:`softretrieval.attention`). On the GPU the stored
    arrays are copied to device memory on the first call and kept there
    (their memory is freed when the index changes, or by
    :meth:`release_device`), so later calls move only the queries.
    """

    def __init__(self, dim: int, *, metric: str = "ip", value_dim: Optional[int] = None,
                 dtype: str = "float32") -> None:
        self.dim = validate.positive_int(dim, "dim")
        self.metric = terms.check_metric(metric)
        self.value_dim = None if value_dim is None else validate.positive_int(value_dim, "value_dim")
        self.dtype = storage.check_dtype(dtype)
        self._n = 0
        self._data = np.empty((0, self.dim), storage.FORMATS[self.dtype][0])
        self._scales = np.empty(0, np.float32)   # int8 row scales (grown for int8 only)
        self._values = None if self.value_dim is None else np.empty((0, self.value_dim), np.float32)
        self._ids = None
        self._auto_ids = False    # ids numbered by the index (an index without ids, once changed)
        self._next_id = 0         # the next such id
        self._dead = None         # (capacity,) bool tombstones of removed rows, or None
        self._n_dead = 0
        self._bias = None
        self._center = None       # (dim,) float32 for l2 data far from the origin
        self._version = 0         # bumped by every change; keys the caches
        self._cache = {}          # what is derived from one version (call biases)
        self._lookup_cache = None  # external id -> row lookups: see _lookup
        self._resident = {}       # GPU copies of the stored arrays (device="cuda")
        self._lock = threading.RLock()

    def __getstate__(self):
        with self._lock:
            state = dict(self.__dict__)
            n = self._n
            for name in ("_data", "_scales", "_values", "_ids", "_bias", "_dead"):
                a = state[name]
                if a is not None and (name != "_scales" or self.dtype == "int8"):
                    state[name] = np.array(a[:n])
        del state["_lock"]
        state.update(_cache={}, _resident={}, _lookup_cache=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
    # ------------------------------------------------------------------ contents

    @property
    def ntotal(self) -> int:
        """Number of live items (removed ones are not counted)."""
        with self._lock:
            return self._n - self._n_dead

    def __len__(self):
        return self.ntotal

    def __repr__(self):
        return (f"Index(dim={self.dim}, metric={self.metric!r}, value_dim={self.value_dim}, "
                f"dtype={self.dtype!r}, ntotal={self.ntotal})")

    def _live(self, a):
        """The live items' rows of a stored array (its first n rows without
        the removed ones), in row order: what the public views show."""
        a = a[: self._n]
        return a if self._n_dead == 0 else a[~self._dead[: self._n]]

    @property
    def ids(self) -> Optional[np.ndarray]:
        """(N,) int64 external ids of the live items, or None when items are
        known by row number (an index without ids that has never had an
        item removed or updated; after that its items keep the numbers they
        had, see :meth:`remove`)."""
        with self._lock:
            return None if self._ids is None else self._live(self._ids)

    @property
    def bias(self) -> Optional[np.ndarray]:
        """(N,) float64 stored per-item bias of the live items, or None.
        Assign an (N,) array (``-inf`` hides an item) or None."""
        with self._lock:
            return None if self._bias is None else self._live(self._bias)

    @bias.setter
    def bias(self, value: Optional[ArrayLike]) -> None:
        with self._lock:
            b = validate.bias_vector(value, self.ntotal)
            if b is None:
                self._bias = None
            else:
                full = np.zeros(self._data.shape[0])
                full[: self._n][self._live_mask()] = b
                self._bias = full
            self._changed(keep_stored=True)

    def _live_mask(self):
        """(n,) bool: which rows hold live items."""
        if self._n_dead == 0:
            return np.ones(self._n, bool)
        return ~self._dead[: self._n]

    def _changed(self, keep_stored=False):
        """Note a change: a new version (the caches of the old one are
        dropped) and new GPU copies — only of the bias with ``keep_stored``
        (the stored rows did not change), so a removal does not recopy a
        catalog to the GPU."""
        self._version += 1
        self._cache = {}
        self._resident = ({name: a for name, a in self._resident.items()
                           if not name.startswith("bias")} if keep_stored else {})

    @property
    def center(self) -> Optional[np.ndarray]:
        """(dim,) float32 point the l2 keys are stored relative to, or None
        (see the class docstring)."""
        return self._center

    def keys(self) -> np.ndarray:
        """The stored keys decoded to float32 (N, dim), as the kernels see them
        (plus ``center`` when set)."""
        with self._lock:
            n = self._n
            rows = storage.decode_rows(self._data[:n], self.dtype, self._scales[:n])
            rows = rows if self._n_dead == 0 else rows[self._live_mask()]
        return rows if self._center is None else rows + self._center

    @interop.boundary
    def add(self, keys: ArrayLike, values: Optional[ArrayLike] = None,
            ids: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None) -> None:
        """Append items.

        keys (n, dim) float array (any float dtype; read in chunks of
        ``storage.ENCODE_CHUNK`` rows and encoded straight into storage, so a
        float64 or memory-mapped input is never copied whole); values
        (n, value_dim) when the index has values; ids (n,) non-negative
        integers, unique in the index, given on every add or on none; bias
        (n,) per-item bias (items added without one get 0 once any is set).
        Nothing is added when an argument is refused; an add of 0 rows
        changes nothing (it does not decide whether the index has ids).
        """
        K = self._check_keys(keys)
        n = K.shape[0]
        V = self._check_values(values, n)
        new_ids = self._check_ids(ids, n)
        b = None if bias is None else validate.bias_vector(bias, n)
        if n == 0:
            return
        with self._lock:
            if self._n == 0 and not self._auto_ids:
                self._ids = None                 # an empty index decides again
            if self._auto_ids and new_ids is not None:
                raise ValueError("this index numbers its items itself (it had no ids when items "
                                 "were first removed or updated): add without ids")
            if (new_ids is None) != (self._ids is None) and self._n > 0 and not self._auto_ids:
                raise ValueError("ids must be given on every add or on none "
                                 f"(this index has {'ids' if self._ids is not None else 'no ids'})")
            if new_ids is not None and self.ntotal and np.isin(new_ids, self.ids).any():
                raise ValueError("ids already in the index")
            if new_ids is None and self._auto_ids:
                new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            self._append(K, V, new_ids, b)
            if self._auto_ids:
                self._next_id += n

    def _append(self, K, V, new_ids, b, keep_bias=None):
        """Encode and append n rows (under the lock); they become visible
        when ``_n`` moves, after every array holds them. ``keep_bias``: the
        rows whose stored bias the new rows take (an update)."""
        n = K.shape[0]
        center = self._center
        if self._n == 0 and self.metric == "l2":
            center = terms.far_center(K[: storage.ENCODE_CHUNK])
        self._reserve(self._n + n)
        lo, hi = self._n, self._n + n
        storage.encode_rows(K, self.dtype, self._data[lo:hi], self._scales[lo:hi], center)
        self._center = center
        if V is not None:
            self._values[lo:hi] = V
        if new_ids is not None:
            if self._ids is None:
                self._ids = np.empty(self._data.shape[0], np.int64)
            self._ids[lo:hi] = new_ids
        if b is not None and self._bias is None:
            self._bias = np.zeros(self._data.shape[0])
        if self._bias is not None:
            self._bias[lo:hi] = self._bias[keep_bias] if keep_bias is not None else (
                0.0 if b is None else b)
        if self._dead is not None:
            self._dead[lo:hi] = False
        self._changed()
        self._n = hi
        self._note_rows(lo, hi)

    def _check_keys(self, keys):
        """keys as an (n, dim) float array (any float dtype; not copied)."""
        K = validate.as_array(keys, "keys")
        if K.dtype.kind != "f":
            raise TypeError(f"keys must be a floating-point array, got dtype {K.dtype}")
        if K.ndim != 2 or K.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {K.shape}")
        return K

    def _check_values(self, values, n):
        if self.value_dim is None:
            if values is not None:
                raise ValueError("this index has no values (value_dim=None): pass values=None")
            return None
        if values is None:
            raise ValueError(f"values (n, {self.value_dim}) are required: the index has value_dim")
        V = validate.float_matrix(values, "values")
        if V.shape != (n, self.value_dim):
            raise ValueError(f"values must have shape ({n}, {self.value_dim}), got {V.shape}")
        validate.all_finite(V, "values")
        return V

    def _check_ids(self, ids, n):
        """ids as (n,) int64, checked on their own (against the index: in add)."""
        if ids is None:
            return None
        arr = validate.as_array(ids, "ids")
        if n == 0 and arr.shape == (0,):
            return arr.astype(np.int64)
        if arr.dtype.kind not in "iu" or arr.shape != (n,):
            raise TypeError(f"ids must be a ({n},) integer array, got {arr.dtype} {arr.shape}")
        arr = validate.int64_ids(arr, "ids")
        if n and arr.min() < 0:
            raise ValueError("ids must be >= 0 (-1 marks a missing result)")
        if np.unique(arr).size != n:
            raise ValueError("ids must be unique")
        return arr

    def _reserve(self, total):
        """Make room for ``total`` rows (by at least 1.5x), dropping removed
        rows on the way (the copy is paid anyway): row numbers may change,
        ids do not."""
        cap = self._data.shape[0]
        if total <= cap:
            return
        need = total - self._n_dead
        per_item = self.dim * self._data.itemsize + 4 * (self.value_dim or 0) + 25
        validate.fits_in_memory(need * per_item, f"an index of {need} items of dimension {self.dim}")
        self._rebuild(max(need, cap + cap // 2))

    def _rebuild(self, cap):
        """New arrays of ``cap`` rows holding the live rows, in order (the
        old arrays are left to the snapshots that still read them)."""
        live = None if self._n_dead == 0 else self._live_mask()

        def moved(a, shape):
            out = np.empty(shape, a.dtype)
            rows = a[: self._n] if live is None else a[: self._n][live]
            out[: rows.shape[0]] = rows
            return out

        self._data = moved(self._data, (cap, self.dim))
        if self.dtype == "int8":
            self._scales = moved(self._scales, (cap,))
        if self._values is not None:
            self._values = moved(self._values, (cap, self.value_dim))
        if self._ids is not None:
            self._ids = moved(self._ids, (cap,))
        if self._bias is not None:
            self._bias = moved(self._bias, (cap,))
        self._n -= self._n_dead
        self._n_dead = 0
        self._dead = None
        self._changed()
        self._lookup_cache = None

    def compact(self) -> None:
        """Drop the rows of removed items now (saves and growth do it too),
        freeing their memory: one pass over the stored arrays. Results do not
        change; a search running meanwhile reads the old arrays."""
        with self._lock:
            self._rebuild(self.ntotal)

    # ------------------------------------------------------------------ changes

    def _number_items(self):
        """An index without ids gets ids equal to its row numbers, so its
        items keep their numbers when rows are dropped or moved."""
        if self._ids is None:
            self._ids = np.arange(self._data.shape[0], dtype=np.int64)
            self._auto_ids = True
            self._next_id = self._n

    def _rows_of(self, ids):
        """Rows of the live items with external ids ``ids`` (int64 (m,)):
        (m,) int64, -1 for ids not in the index (the caller holds the lock)."""
        return _find(self._lookup(), None if self._n_dead == 0 else self._dead, ids)

    def _lookup(self):
        """External id -> row lookups ``((ids, rows), (ids, rows))``, each
        sorted by id (the caller holds the lock): the first built by one
        sort over the items live then, the second holding the rows appended
        since (kept sorted as they come, so adds and updates stay
        O(number added)); rebuilt as one when the second outgrows
        ``max(4096, n / 8)`` rows. Rows removed since are checked against the
        tombstones when looked up, so a removal never rebuilds it. Without
        ids the rows are the ids."""
        if self._lookup_cache is None:
            live = np.flatnonzero(self._live_mask()) if self._n_dead else np.arange(self._n)
            ext = live if self._ids is None else self._ids[live]
            order = np.argsort(ext, kind="stable")
            none = np.zeros(0, np.int64)
            self._lookup_cache = ((ext[order], live[order]), (none, none))
        return self._lookup_cache

    def _note_rows(self, lo, hi):
        """Add rows ``lo:hi`` (just appended) to the lookup of recent rows."""
        if self._lookup_cache is None:
            return
        main, (recent_ids, recent_rows) = self._lookup_cache
        ids = np.concatenate([recent_ids, np.arange(lo, hi) if self._ids is None
                              else self._ids[lo:hi]])
        if ids.shape[0] > max(4096, main[0].shape[0] // 8):
            self._lookup_cache = None
            return
        rows = np.concatenate([recent_rows, np.arange(lo, hi)])
        order = np.argsort(ids, kind="stable")
        self._lookup_cache = (main, (ids[order], rows[order]))

    @interop.boundary
    def remove(self, ids: ArrayLike) -> int:
        """Remove the items with these ids (external ids, or row numbers for
        an index without ids); ids not in the index are ignored, as FAISS's
        ``remove_ids`` does. Returns the number removed.

        O(number removed): the rows are marked removed (the kernels see them
        as excluded keys, like a ``-inf`` bias) and dropped on :meth:`save`,
        :meth:`compact` or the next growth of the arrays. Removed ids never
        come back from any method, and may be added again. An index without
        ids keeps numbering its items as before: its item ``i`` keeps id
        ``i`` (``ids`` is no longer None), and later adds continue the count.
        A search running meanwhile sees the index before the removal.
        """
        arr = validate.as_array(ids, "ids").reshape(-1)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        arr = validate.int64_ids(arr.astype(np.int64) if arr.size == 0 else arr, "ids")
        with self._lock:
            rows = self._rows_of(np.unique(arr))
            rows = rows[rows >= 0]
            if rows.size == 0:
                return 0
            self._number_items()
            self._kill(rows)
            return int(rows.size)

    def _kill(self, rows):
        """Mark live ``rows`` removed (under the lock): tombstones, a new
        version, and only the bias's GPU copies dropped."""
        if self._dead is None:
            self._dead = np.zeros(self._data.shape[0], bool)
        self._dead[rows] = True
        self._n_dead += rows.size
        self._changed(keep_stored=True)

    @interop.boundary
    def update(self, ids: ArrayLike, keys: ArrayLike, values: Optional[ArrayLike] = None) -> None:
        """Replace the keys (and values) of existing items, keeping their ids
        and stored bias.

        ids (n,) unique ids of live items (external ids, or row numbers for
        an index without ids, which then numbers its items as after
        :meth:`remove`); keys (n, dim) float; values (n, value_dim) for an
        index with values, or None to keep the items' values. All or
        nothing: an unknown id, a duplicate, or a bad key or value refuses
        the whole update. The new rows are appended and the old ones marked
        removed (O(n)), so a search running meanwhile sees every item before
        the update or every item after it. Ties between equal scores are
        broken by row order, which an update changes for its items.
        """
        K = self._check_keys(keys)
        n = K.shape[0]
        new_ids = self._check_ids(ids, n)
        if new_ids is None:
            raise ValueError("ids are required: the items to update")
        V = None if values is None and self.value_dim is not None else self._check_values(values, n)
        validate.all_finite(K, "keys")
        if n == 0:
            return
        with self._lock:
            missing = new_ids[self._rows_of(new_ids) < 0]
            if missing.size:
                raise ValueError(f"ids not in the index: {missing[:5].tolist()}")
            numbering = (self._ids, self._auto_ids, self._next_id, self._lookup_cache)
            try:
                self._reserve(self._n + n)
                rows = self._rows_of(new_ids)
                self._number_items()
                if V is None and self._values is not None:
                    V = self._values[rows]
                self._append(K, V, self._ids[rows], None, keep_bias=rows)
            except BaseException:
                if numbering[0] is None:         # (no removed rows: none moved)
                    self._ids, self._auto_ids, self._next_id, self._lookup_cache = numbering
                raise
            self._kill(rows)

    # ------------------------------------------------------------------ queries

    @interop.boundary
    def search(self, queries: ArrayLike, k: int, *, exclude: Exclude = None,
               include: Exclude = None, bias: Bias = None,
               device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
        """Exact top-k: ``(scores (B, k) float32, ids (B, k) int64)``, with
        the conventions of :func:`softretrieval.topk` (ids are external ids
        when the index has them; -1 pads)."""
        k = validate.positive_int(k, "k")
        snap, lay, problems = self._problems(queries, softmax=False, scale=None, bias=bias,
                                             exclude=exclude, include=include, device=device)
        scores, rows = api.solve_topk(lay, problems, k, self.metric, device)
        return scores, snap.external(rows)

    @interop.boundary
    def range_search(self, queries: ArrayLike, threshold: float, *, exclude: Exclude = None,
                     include: Exclude = None, bias: Bias = None,
                     device: str = "cpu") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every item with a score at or above ``threshold`` ("ip", "cosine")
        or a squared distance at or below it ("l2"): ``(lims (B + 1,) int64,
        scores float32, ids int64)`` as :func:`softretrieval.range_search`
        (best first; ids are external ids when the index has them). Runs on
        the CPU ("cuda" raises ValueError)."""
        threshold = ranges.check_threshold(threshold)
        ranges.cpu_kernels(device)
        snap, lay, problems = self._problems(queries, softmax=False, scale=None, bias=bias,
                                             exclude=exclude, include=include, device="cpu")
        lims, scores, rows = ranges.solve_range(lay, problems, threshold, self.metric)
        return lims, scores, snap.external(rows)

    @interop.boundary
    def retrieve(self, queries: ArrayLike, *, scale: Optional[float] = None,
                 temperature: Optional[float] = None, bias: Bias = None, exclude: Exclude = None,
                 include: Exclude = None, return_lse: bool = False,
                 device: str = "cpu") -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Soft retrieval over the whole catalog.

        Returns ``out`` (B, value_dim or dim) float32 — the softmax-weighted
        sum of values (of keys without values) — and, with ``return_lse``,
        ``lse`` (B,) float32, as :func:`softretrieval.attention`.
        """
        snap, lay, problems = self._problems(queries, softmax=True,
                                             scale=validate.logit_scale(scale, temperature), bias=bias,
                                             exclude=exclude, include=include, device=device)
        out, lse = api.solve_attention(lay, problems, True, device)
        out = snap.uncenter(out, np.isfinite(lse))
        return (out, lse) if return_lse else out

    @interop.boundary
    def retrieve_topk(self, queries: ArrayLike, k: int, *, scale: Optional[float] = None,
                      temperature: Optional[float] = None, bias: Bias = None,
                      exclude: Exclude = None, include: Exclude = None,
                      device: str = "cpu") -> terms.TopKAttention:
        """Top-k attention in one pass: a :class:`softretrieval.TopKAttention`
        (out, ids, weights, full-catalog lse, coverage); ids as in :meth:`search`."""
        k = validate.positive_int(k, "k")
        snap, lay, problems = self._problems(queries, softmax=True,
                                             scale=validate.logit_scale(scale, temperature), bias=bias,
                                             exclude=exclude, include=include, device=device,
                                             values_on_host=True)
        res = api.solve_topk_attention(lay, problems, k, device)
        return res._replace(ids=snap.external(res.ids), out=snap.uncenter(res.out, res.ids[:, 0] >= 0))

    @interop.boundary
    def logsumexp(self, queries: ArrayLike, *, scale: Optional[float] = None,
                  temperature: Optional[float] = None, bias: Bias = None, exclude: Exclude = None,
                  include: Exclude = None, device: str = "cpu") -> np.ndarray:
        """``log sum_n exp(logit(q, k_n) + bias_n)`` over the whole catalog,
        (B,) float32: the normalizer of an exact full-softmax loss."""
        _, lay, problems = self._problems(queries, softmax=True,
                                          scale=validate.logit_scale(scale, temperature),
                                          bias=bias, exclude=exclude, include=include,
                                          device=device)
        return api.solve_logsumexp(lay, problems, device)

    def release_device(self) -> None:
        """Free the GPU copies of the stored arrays now (the next call with
        ``device="cuda"`` copies them again). Changing the index frees them too."""
        with self._lock:
            self._resident = {}

    def _snapshot(self):
        """What one query call sees, taken under the lock: a :class:`_Snapshot`."""
        with self._lock:
            n = self._n
            if self.ntotal == 0:
                raise ValueError("the index is empty: add items before searching")
            return _Snapshot(
                n, storage.stored(self._data[:n], self.dtype, self._scales[:n]),
                None if self._values is None else self._values[:n],
                None if self._ids is None else self._ids[:n], self._lookup(), self._center,
                self.value_dim is None, self._resident, self._version, None,
                None if self._bias is None else self._bias[:n],
                None if self._n_dead == 0 else self._dead[:n].copy(), self.ntotal)

    def _problems(self, queries, *, softmax, scale, bias, exclude, include, device,
                  values_on_host=False):
        """The call as one kernel problem on a snapshot of the stored arrays
        (on the GPU, their resident copies; the values stay on the host with
        ``values_on_host``, where top-k attention gathers them). Returns
        ``(snapshot, layout, problems)``; with short allow-lists the problem
        reads gathered rows, and the snapshot's ``row_map`` maps them back."""
        kernels = devices.kernels(device)
        snap = self._snapshot()
        n, keys, values = snap.n, snap.keys, snap.values
        Q = validate.float_matrix(queries, "queries")
        if Q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {Q.shape[1]} but the index has {self.dim}")
        validate.all_finite(Q, "queries")
        if snap.center is not None:
            Q = (Q - snap.center).astype(np.float32)
        B = Q.shape[0]
        call_bias, stored_bias = self._call_bias(snap, bias, softmax)
        excl = snap.rows(exclude, B, "exclude")
        window = None
        allow = include is not None
        if allow:
            excl = _without(snap.rows(include, B, "include"), excl)
            gathered = _rows_to_gather(excl, B, n, keys, values, self.value_dim or self.dim)
            if gathered is not None:
                snap = snap._replace(row_map=gathered)
                keys = storage.stored(_gather(keys.data, gathered), self.dtype,
                                      keys.scale[gathered] if keys.scale.shape[0] else keys.scale)
                values = None if values is None else _gather(values, gathered)
                call_bias = call_bias[gathered] if call_bias.shape[0] else call_bias
                window = (excl[0][:-1].copy(), excl[0][1:].copy())
                excl, allow, stored_bias, n = None, False, None, gathered.shape[0]
        dv = self.dim if values is None else self.value_dim
        lay = layout.Layout(ndim=2, batch=1, T=B, H=1, S=n, Hkv=1, d=self.dim, dv=dv)
        key_rows = devices.Rows(keys.data, keys.scale, 0, self.dim)
        value_rows = key_rows._replace(width=dv) if values is None else devices.Rows(values, width=dv)
        p = api.problem_terms(Q, key_rows, value_rows, values is not None, metric=self.metric,
                              scale=scale, bias=None, exclude=None, window=None, softmax=softmax)
        p = p._replace(logits=p.logits._replace(bias=call_bias),
                       masks=devices.masks(excl, window, allow))
        if devices.is_gpu(kernels) and snap.row_map is None:
            p = _resident_problem(p, kernels, snap.resident, values is None, stored_bias,
                                  values_on_host)
        return snap, lay, [((0, 0), p)]

    def _call_bias(self, snap, bias, softmax):
        """The kernels' bias for a call — the stored bias, the call's (N,)
        bias over the live items, or none (``False``) — with removed rows at
        ``-inf``; and the name of its GPU copy when it is derived from the
        index alone (cached per version), else None."""
        unit = LOG2E if softmax else 1.0
        if bias is not None and bias is not False:
            b = validate.bias_vector(bias, snap.n_live)
            return terms.prepare_bias(snap.spread(b), snap.n, unit), None
        kind = "none" if bias is False or snap.bias is None else "stored"
        if kind == "none" and snap.dead is None:
            return np.zeros(0, np.float32), None
        key = (snap.version, "bias", kind, unit)
        cached = self._cache.get(key)
        if cached is None:
            if kind == "none":                   # removed rows only: no arithmetic to check
                cached = np.zeros(snap.n, np.float32)
                cached[snap.dead] = -np.inf
            else:
                base = snap.bias if snap.dead is None else np.where(snap.dead, -np.inf, snap.bias)
                cached = terms.prepare_bias(base, snap.n, unit)
            with self._lock:
                if self._version == snap.version:
                    self._cache[key] = cached
        return cached, f"bias {kind} {unit} {snap.version}"

    # ------------------------------------------------------------------ files

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the index to the folder ``path`` atomically (module docstring)."""
        with self._lock:
            arrays = self._arrays()
            fields = {"dim": self.dim, "metric": self.metric, "dtype": self.dtype,
                      "value_dim": self.value_dim, "ntotal": self.ntotal}
            if self._auto_ids:
                fields["next_id"] = self._next_id
            persist.save_folder(path, FORMAT, FORMAT_VERSION, arrays, fields,
                                legacy=LEGACY_VERSIONS)

    @classmethod
    def load(cls, path: "os.PathLike[str] | str", mmap: bool = False,
             verify: bool = True) -> "Index":
        """Read an index written by :meth:`save`.

        ``mmap=True`` memory-maps the arrays, so a catalog larger than RAM
        streams from disk through the same kernels (the files must not change
        while mapped: see docs/guarantees.md). ``verify`` checks every file's
        SHA-256 (one read of the files; meta.json's own checksum is always
        checked). A damaged, truncated, edited or inconsistent index raises
        ValueError.
        """
        path = os.fspath(path)
        meta, arrays = persist.load_folder(path, FORMAT, FORMAT_VERSION, mmap=mmap, verify=verify,
                                           legacy=LEGACY_VERSIONS)
        value_dim = meta.get("value_dim")
        try:
            index = cls(persist.field(meta, path, "dim", int),
                        metric=persist.field(meta, path, "metric", str),
                        value_dim=None if value_dim is None else persist.field(meta, path, "value_dim", int),
                        dtype=persist.field(meta, path, "dtype", str))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: meta.json describes no valid index: {exc}") from None
        n = persist.field(meta, path, "ntotal", int)
        expect = {"keys": ((n, index.dim), storage.FORMATS[index.dtype][0])}
        if index.dtype == "int8":
            expect["scales"] = ((n,), np.dtype(np.float32))
        if value_dim is not None:
            expect["values"] = ((n, value_dim), np.dtype(np.float32))
        optional = {"ids": ((n,), np.dtype(np.int64)), "bias": ((n,), np.dtype(np.float64)),
                    "center": ((index.dim,), np.dtype(np.float32))}
        for name, arr in arrays.items():
            if name not in expect and name not in optional:
                raise ValueError(f"{path}: unexpected array {name!r}")
        for name, (shape, dtype) in {**expect, **optional}.items():
            arr = arrays.get(name)
            if arr is None:
                if name in expect:
                    raise ValueError(f"{path}: array {name!r} is missing")
                continue
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"{path}: {name} holds {arr.dtype} {arr.shape}, "
                                 f"expected {dtype} {shape}")
        index._hold(n, arrays)
        if "next_id" in meta:
            if "ids" not in arrays:
                raise ValueError(f"{path}: meta.json has next_id but the index has no ids")
            index._auto_ids = True
            index._next_id = persist.field(meta, path, "next_id", int)
        index._n = n
        return index

    def _hold(self, n, arrays):
        """Take ``arrays`` (the checked arrays of :meth:`save`'s layout, of
        ``n`` rows) as the index's contents, without copying them."""
        self._data = np.asarray(arrays["keys"])
        if "scales" in arrays:
            self._scales = np.asarray(arrays["scales"])
        if "values" in arrays:
            self._values = np.asarray(arrays["values"])
        if "ids" in arrays:
            self._ids = np.asarray(arrays["ids"])
        if "bias" in arrays:
            self._bias = validate.bias_vector(np.asarray(arrays["bias"]), n)
        if "center" in arrays:
            self._center = np.array(arrays["center"])
        self._n = n

    def _arrays(self):
        """The live items' arrays in :meth:`save`'s layout (name -> array;
        views when nothing was removed). Call under the lock."""
        live = self._live
        arrays = {"keys": live(self._data)}
        if self.dtype == "int8":
            arrays["scales"] = live(self._scales)
        if self._values is not None:
            arrays["values"] = live(self._values)
        if self._ids is not None:
            arrays["ids"] = live(self._ids)
        if self._bias is not None:
            arrays["bias"] = live(self._bias)
        if self._center is not None:
            arrays["center"] = self._center
        return arrays

    def save_shards(self, path: "os.PathLike[str] | str", n_shards: Optional[int] = None, *,
                    sizes: Optional[ArrayLike] = None) -> None:
        """Write the live items as a sharded index folder, atomically like
        :meth:`save`: ``n_shards`` ordinary index folders of consecutive
        items (sizes as equal as can be, or the item counts ``sizes``; an
        empty shard is allowed) and a manifest. Items keep their ids (an
        index without ids gives each item its row number as id), so each
        shard is a loadable :class:`Index` on its own, and
        :class:`softretrieval.distributed.ShardedIndex` serves them all as
        one catalog. Layout: :mod:`softretrieval.shards`."""
        from . import shards

        with self._lock:
            shards.save(self, path, n_shards, sizes)


class _Snapshot(NamedTuple):
    """The index as one query call sees it (arrays are views of the first n rows)."""

    n: int
    keys: storage.Stored
    values: Optional[np.ndarray]
    ids: Optional[np.ndarray]        # (n,) int64 external ids, or None
    lookup: tuple                    # external id -> row lookups (Index._lookup)
    center: Optional[np.ndarray]     # (dim,) float32, or None
    keys_as_values: bool
    resident: dict                   # GPU copies that belong to these contents
    version: int
    row_map: Optional[np.ndarray]    # rows of a gathered problem's keys (allow-lists), or None
    bias: Optional[np.ndarray]       # (n,) float64 stored bias, or None
    dead: Optional[np.ndarray]       # (n,) bool removed rows, or None
    n_live: int                      # rows not removed

    def rows(self, lists, B, name):
        """Per-query id lists (external ids, or row numbers without ids) as
        sorted CSR ``(offsets, rows)`` of live items; external ids not in
        the snapshot (or removed) are ignored, row numbers out of range
        refused. None for None."""
        if lists is None:
            return None
        offsets, ext = validate.exclusion_lists(lists, B, self.n if self.ids is None else None,
                                                name)
        if self.ids is None:                     # row numbers: already sorted rows
            rows, found = ext, None
        else:
            rows = _find(self.lookup, self.dead, ext)
            found = rows >= 0
        counts = np.diff(offsets)
        if found is not None and not found.all():
            counts = np.bincount(np.repeat(np.arange(B), counts)[found], minlength=B)
            rows = rows[found]
        new_off = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=new_off[1:])
        return validate.unique_lists(new_off, rows)   # (a duplicate would count twice)

    def spread(self, live_bias):
        """An (N,) bias over the live items as (n,) over the rows, removed
        rows at ``-inf``."""
        if self.dead is None:
            return live_bias
        out = np.full(self.n, -np.inf)
        out[~self.dead] = live_bias
        return out

    def stored_rows(self, rows):
        """The kernels' row numbers (-1 for none) as rows of the stored
        arrays (through ``row_map`` when the call gathered its keys)."""
        if self.row_map is None:
            return rows
        return np.where(rows >= 0, self.row_map[np.maximum(rows, 0)], -1)

    def external(self, rows):
        """The kernels' row numbers (-1 for none) as external ids."""
        rows = self.stored_rows(rows)
        if self.ids is None:
            return rows
        return np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)

    def uncenter(self, out, valid):
        """Keys returned as values (no values stored) with ``center`` added
        back, on the (B,) rows that are ``valid`` (others stay 0)."""
        if self.center is None or not self.keys_as_values:
            return out
        return np.where(valid[:, None], out + self.center, out).astype(np.float32)


def _find(lookup, dead, ids):
    """Rows of ``ids`` by the lookups of :meth:`Index._lookup`, -1 where an
    id is in neither or its row is marked in ``dead`` ((n,) bool, or None).
    A recent row wins over the older lookup, and among recent rows of one
    id (an item updated twice) the last: older rows of an id are removed."""
    (old_ids, old_rows), (new_ids, new_rows) = lookup
    found = np.full(ids.shape, -1, np.int64)
    if old_ids.shape[0]:
        pos = np.minimum(np.searchsorted(old_ids, ids), old_ids.shape[0] - 1)
        found = np.where(old_ids[pos] == ids, old_rows[pos], -1)
    if new_ids.shape[0]:
        pos = np.searchsorted(new_ids, ids, side="right") - 1
        hit = (pos >= 0) & (new_ids[np.maximum(pos, 0)] == ids)
        found = np.where(hit, new_rows[np.maximum(pos, 0)], found)
    if dead is not None:
        found = np.where((found >= 0) & dead[np.maximum(found, 0)], -1, found)
    return found


def _gather(a, rows):
    """Rows ``rows`` of the (N, W) stored array ``a``, gathered in parallel
    (float16 through its bit patterns: Numba has no float16)."""
    from . import cpu, runtime

    src = a.view(np.uint16) if a.dtype == np.float16 else a
    out = np.empty((rows.shape[0], a.shape[1]), src.dtype)
    runtime.parallel_call(cpu.gather_rows, src, rows, out, blas=False)
    return out.view(a.dtype)


def _without(allowed, excluded):
    """CSR allow-lists minus CSR exclusions (same queries, sorted rows)."""
    if excluded is None:
        return allowed
    (a_off, a_rows), (e_off, e_rows) = allowed, excluded
    B = a_off.shape[0] - 1
    span = np.int64(max(a_rows.max(initial=0), e_rows.max(initial=0)) + 1)
    a_key = np.repeat(np.arange(B), np.diff(a_off)) * span + a_rows
    e_key = np.repeat(np.arange(B), np.diff(e_off)) * span + e_rows
    keep = ~np.isin(a_key, e_key)
    off = np.zeros(B + 1, np.int64)
    np.cumsum(np.bincount(np.repeat(np.arange(B), np.diff(a_off))[keep], minlength=B), out=off[1:])
    return off, a_rows[keep]


def _rows_to_gather(allowed, B, n, keys, values, dv):
    """The rows to gather for allow-lists ``allowed`` (CSR of rows), or None
    to mask a scan of every key instead.

    Gathering scores each query against its own rows only (cost
    O(sum of list lengths x d)); a scan costs O(B x n x d). Gather when the
    lists hold at most ``config.INCLUDE_GATHER_SHARE`` of ``B x n`` pairs
    and their rows fit ``config.INCLUDE_GATHER_BYTES``. The lists are laid
    end to end (query b's rows are ``[offsets[b], offsets[b+1])`` of the
    gathered keys, its key window); an empty total gathers one row that no
    window covers.
    """
    from . import config

    offsets, rows = allowed
    total = rows.shape[0]
    row_bytes = keys.data.shape[1] * keys.data.itemsize + (4 * dv if values is not None else 0)
    if total > config.INCLUDE_GATHER_SHARE * B * n or total * row_bytes > config.INCLUDE_GATHER_BYTES:
        return None
    return rows if total else np.zeros(1, np.int64)


def _resident_problem(p, kernels, resident, keys_as_values, stored_bias, values_on_host):
    """``p`` with the index's stored arrays replaced by GPU copies kept in
    ``resident`` (made on first use; the dict is dropped when the index
    changes, so a copy never outlives the contents it was made from). With
    ``values_on_host`` the values stay host arrays (top-k attention gathers
    them on the host; the kernel does not read them)."""

    def keep(name, a):
        if name not in resident:
            resident[name] = kernels.device_view(a)
        return resident[name]

    keys = p.keys._replace(data=keep("keys", p.keys.data), scale=keep("scales", p.keys.scale))
    p = p._replace(keys=keys)
    if not values_on_host:
        p = p._replace(values=keys._replace(width=p.values.width) if keys_as_values
                       else p.values._replace(data=keep("values", p.values.data)))
    if stored_bias is not None:
        p = p._replace(logits=p.logits._replace(bias=keep(stored_bias, p.logits.bias)))
    return p
