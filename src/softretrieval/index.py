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
  ``metric``, ``dtype``, ``value_dim``, ``ntotal``, each file's name, dtype,
  shape and SHA-256, and the checksum of meta.json itself.
"""

import os
import threading
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import api, devices, interop, layout, persist, storage, terms, validate
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
        self._id_order = None
        self._bias = None
        self._center = None       # (dim,) float32 for l2 data far from the origin
        self._bias_cache = {}
        self._resident = {}       # GPU copies of the stored arrays (device="cuda")
        self._lock = threading.RLock()

    def __getstate__(self):
        with self._lock:
            state = dict(self.__dict__)
            n = self._n
            for name in ("_data", "_scales", "_values", "_ids", "_bias"):
                a = state[name]
                if a is not None and (name != "_scales" or self.dtype == "int8"):
                    state[name] = np.array(a[:n])
        del state["_lock"]
        state.update(_bias_cache={}, _resident={}, _id_order=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
    # ------------------------------------------------------------------ contents

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self._n

    def __len__(self):
        return self._n

    def __repr__(self):
        return (f"Index(dim={self.dim}, metric={self.metric!r}, value_dim={self.value_dim}, "
                f"dtype={self.dtype!r}, ntotal={self._n})")

    @property
    def ids(self) -> Optional[np.ndarray]:
        """(N,) int64 external ids, or None when items are known by row number."""
        return None if self._ids is None else self._ids[: self._n]

    @property
    def bias(self) -> Optional[np.ndarray]:
        """(N,) float64 stored per-item bias, or None. Assign an (N,) array
        (``-inf`` hides an item) or None."""
        return None if self._bias is None else self._bias[: self._n]

    @bias.setter
    def bias(self, value: Optional[ArrayLike]) -> None:
        with self._lock:
            b = validate.bias_vector(value, self._n)
            if b is None:
                self._bias = None
            else:
                self._bias = np.zeros(self._data.shape[0])
                self._bias[: self._n] = b
            self._bias_cache = {}
            self._resident = {}

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
        K = validate.as_array(keys, "keys")
        if K.dtype.kind != "f":
            raise TypeError(f"keys must be a floating-point array, got dtype {K.dtype}")
        if K.ndim != 2 or K.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {K.shape}")
        n = K.shape[0]
        V = self._check_values(values, n)
        new_ids = self._check_ids(ids, n)
        b = None if bias is None else validate.bias_vector(bias, n)
        if n == 0:
            return
        with self._lock:
            if (new_ids is None) != (self._ids is None) and self._n > 0:
                raise ValueError("ids must be given on every add or on none "
                                 f"(this index has {'ids' if self._ids is not None else 'no ids'})")
            if new_ids is not None and self._n and np.isin(new_ids, self.ids).any():
                raise ValueError("ids already in the index")
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
                self._id_order = None
            if b is not None and self._bias is None:
                self._bias = np.zeros(self._data.shape[0])
            if self._bias is not None:
                self._bias[lo:hi] = 0.0 if b is None else b
            self._bias_cache = {}
            self._resident = {}
            self._n = hi

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
        """Grow the arrays to hold ``total`` items (by at least 1.5x)."""
        cap = self._data.shape[0]
        if total <= cap:
            return
        cap = max(total, cap + cap // 2)
        n = self._n
        per_item = self.dim * self._data.itemsize + 4 * (self.value_dim or 0) + 24
        validate.fits_in_memory(total * per_item, f"an index of {total} items of dimension {self.dim}")

        def grown(a, shape):
            out = np.empty(shape, a.dtype)
            out[:n] = a[:n]
            return out

        self._data = grown(self._data, (cap, self.dim))
        if self.dtype == "int8":
            self._scales = grown(self._scales, (cap,))
        if self._values is not None:
            self._values = grown(self._values, (cap, self.value_dim))
        if self._ids is not None:
            self._ids = grown(self._ids, (cap,))
        if self._bias is not None:
            self._bias = grown(self._bias, (cap,))

    # ------------------------------------------------------------------ queries

    @interop.boundary
    def search(self, queries: ArrayLike, k: int, *, exclude: Exclude = None, bias: Bias = None,
               device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
        """Exact top-k: ``(scores (B, k) float32, ids (B, k) int64)``, with
        the conventions of :func:`softretrieval.topk` (ids are external ids
        when the index has them; -1 pads)."""
        k = validate.positive_int(k, "k")
        snap, lay, problems = self._problems(queries, softmax=False, scale=None, bias=bias,
                                             exclude=exclude, device=device)
        scores, rows = api.solve_topk(lay, problems, k, self.metric, device)
        return scores, snap.external(rows)

    @interop.boundary
    def retrieve(self, queries: ArrayLike, *, scale: Optional[float] = None,
                 temperature: Optional[float] = None, bias: Bias = None, exclude: Exclude = None,
                 return_lse: bool = False,
                 device: str = "cpu") -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Soft retrieval over the whole catalog.

        Returns ``out`` (B, value_dim or dim) float32 — the softmax-weighted
        sum of values (of keys without values) — and, with ``return_lse``,
        ``lse`` (B,) float32, as :func:`softretrieval.attention`.
        """
        snap, lay, problems = self._problems(queries, softmax=True,
                                             scale=validate.logit_scale(scale, temperature), bias=bias,
                                             exclude=exclude, device=device)
        out, lse = api.solve_attention(lay, problems, True, device)
        out = snap.uncenter(out, np.isfinite(lse))
        return (out, lse) if return_lse else out

    @interop.boundary
    def retrieve_topk(self, queries: ArrayLike, k: int, *, scale: Optional[float] = None,
                      temperature: Optional[float] = None, bias: Bias = None,
                      exclude: Exclude = None, device: str = "cpu") -> terms.TopKAttention:
        """Top-k attention in one pass: a :class:`softretrieval.TopKAttention`
        (out, ids, weights, full-catalog lse, coverage); ids as in :meth:`search`."""
        k = validate.positive_int(k, "k")
        snap, lay, problems = self._problems(queries, softmax=True,
                                             scale=validate.logit_scale(scale, temperature), bias=bias,
                                             exclude=exclude, device=device, values_on_host=True)
        res = api.solve_topk_attention(lay, problems, k, device)
        return res._replace(ids=snap.external(res.ids), out=snap.uncenter(res.out, res.ids[:, 0] >= 0))

    @interop.boundary
    def logsumexp(self, queries: ArrayLike, *, scale: Optional[float] = None,
                  temperature: Optional[float] = None, bias: Bias = None, exclude: Exclude = None,
                  device: str = "cpu") -> np.ndarray:
        """``log sum_n exp(logit(q, k_n) + bias_n)`` over the whole catalog,
        (B,) float32: the normalizer of an exact full-softmax loss."""
        _, lay, problems = self._problems(queries, softmax=True,
                                          scale=validate.logit_scale(scale, temperature),
                                          bias=bias, exclude=exclude, device=device)
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
            if n == 0:
                raise ValueError("the index is empty: add items before searching")
            if self._ids is not None and (self._id_order is None or self._id_order.shape[0] != n):
                self._id_order = np.argsort(self._ids[:n], kind="stable")
            return _Snapshot(
                n, storage.stored(self._data[:n], self.dtype, self._scales[:n]),
                None if self._values is None else self._values[:n],
                None if self._ids is None else self._ids[:n],
                None if self._ids is None else self._id_order, self._center,
                self.value_dim is None, self._resident)

    def _problems(self, queries, *, softmax, scale, bias, exclude, device, values_on_host=False):
        """The call as one kernel problem on a snapshot of the stored arrays
        (on the GPU, their resident copies; the values stay on the host with
        ``values_on_host``, where top-k attention gathers them). Returns
        ``(snapshot, layout, problems)``."""
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
        dv = self.dim if values is None else self.value_dim
        lay = layout.Layout(ndim=2, batch=1, T=B, H=1, S=n, Hkv=1, d=self.dim, dv=dv)
        key_rows = devices.Rows(keys.data, keys.scale, 0, self.dim)
        value_rows = key_rows._replace(width=dv) if values is None else devices.Rows(values, width=dv)
        p = api.problem_terms(Q, key_rows, value_rows, values is not None, metric=self.metric,
                              scale=scale, bias=None, exclude=snap.exclusions(exclude, B),
                              window=None, softmax=softmax)
        call_bias, stored_bias = self._call_bias(bias, n, softmax)
        p = p._replace(logits=p.logits._replace(bias=call_bias))
        if devices.is_gpu(kernels):
            p = _resident_problem(p, kernels, snap.resident, values is None, stored_bias,
                                  values_on_host)
        return snap, lay, [((0, 0), p)]

    def _call_bias(self, bias, n, softmax):
        """The kernels' bias for a call (cached for the stored bias), and the
        name of its GPU copy when it is the stored bias (else None)."""
        unit = LOG2E if softmax else 1.0
        if bias is False:
            return np.zeros(0, np.float32), None
        if bias is not None:
            return terms.prepare_bias(bias, n, unit), None
        with self._lock:
            if self._bias is None:
                return np.zeros(0, np.float32), None
            key = (n, unit)
            if key not in self._bias_cache:
                self._bias_cache[key] = terms.prepare_bias(self._bias[:n], n, unit)
            return self._bias_cache[key], f"bias {unit}"

    # ------------------------------------------------------------------ files

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the index to the folder ``path`` atomically (module docstring)."""
        with self._lock:
            n = self._n
            arrays = {"keys": self._data[:n]}
            if self.dtype == "int8":
                arrays["scales"] = self._scales[:n]
            if self._values is not None:
                arrays["values"] = self._values[:n]
            if self._ids is not None:
                arrays["ids"] = self._ids[:n]
            if self._bias is not None:
                arrays["bias"] = self._bias[:n]
            if self._center is not None:
                arrays["center"] = self._center
            fields = {"dim": self.dim, "metric": self.metric, "dtype": self.dtype,
                      "value_dim": self.value_dim, "ntotal": n}
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
        index._data = np.asarray(arrays["keys"])
        if "scales" in arrays:
            index._scales = np.asarray(arrays["scales"])
        if "values" in arrays:
            index._values = np.asarray(arrays["values"])
        if "ids" in arrays:
            index._ids = np.asarray(arrays["ids"])
        if "bias" in arrays:
            index._bias = validate.bias_vector(np.asarray(arrays["bias"]), n)
        if "center" in arrays:
            index._center = np.array(arrays["center"])
        index._n = n
        return index


class _Snapshot(NamedTuple):
    """The index as one query call sees it (arrays are views of the first n rows)."""

    n: int
    keys: storage.Stored
    values: Optional[np.ndarray]
    ids: Optional[np.ndarray]        # (n,) int64 external ids, or None
    id_order: Optional[np.ndarray]   # argsort of ids
    center: Optional[np.ndarray]     # (dim,) float32, or None
    keys_as_values: bool
    resident: dict                   # GPU copies that belong to these contents

    def exclusions(self, exclude, B):
        """Exclusion lists (external ids, or row numbers without ids) as
        sorted CSR row numbers; ids not in the snapshot are ignored."""
        if exclude is None:
            return None
        if self.ids is None:
            return validate.exclusion_lists(exclude, B, self.n)
        offsets, ext = validate.exclusion_lists(exclude, B, None)
        sorted_ids = self.ids[self.id_order]
        pos = np.minimum(np.searchsorted(sorted_ids, ext), self.n - 1)
        found = sorted_ids[pos] == ext
        row_of = np.repeat(np.arange(B), np.diff(offsets))[found]
        rows = self.id_order[pos[found]]
        keep = np.lexsort((rows, row_of))
        new_off = np.zeros(B + 1, np.int64)
        np.cumsum(np.bincount(row_of, minlength=B), out=new_off[1:])
        return new_off, rows[keep].astype(np.int64)

    def external(self, rows):
        """Row numbers (-1 for none) as external ids."""
        if self.ids is None:
            return rows
        return np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)

    def uncenter(self, out, valid):
        """Keys returned as values (no values stored) with ``center`` added
        back, on the (B,) rows that are ``valid`` (others stay 0)."""
        if self.center is None or not self.keys_as_values:
            return out
        return np.where(valid[:, None], out + self.center, out).astype(np.float32)


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
