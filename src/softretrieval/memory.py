"""kNN memory for memory-augmented networks (Memorizing Transformers, kNN-LM).

:class:`KNNMemory` is a ring buffer of (key, value) pairs per head (and, with
``batch=B``, per sequence of a batch: B independent rings), read by exact
soft lookup or by top-k attention on the same kernels as
:func:`softretrieval.attention`. :func:`memory_attention` is one step of a
memorizing-transformer layer: local causal attention plus attention over the
memory's top-k, combined as one exact softmax (through the merge of their
online-softmax states) or as the gated mix Memorizing Transformers use.

Storage is one ``(heads, batch, capacity, dim)`` block per array, in a
storage format of :mod:`softretrieval.storage` (float32, or float16,
bfloat16, int8 with per-row scales: the kernels decode them tile by tile), so
each (head, sequence) ring is a contiguous run of rows. A read is ONE kernel
problem over the flattened rows: the query rows of head h of sequence b get
the key window of that ring's live slots (``masks.row_lo``/``row_hi``), and
the CPU driver cuts its query blocks where the windows change
(:func:`softretrieval.cpu.plan`), so every ring is streamed once, by its own
queries only, in one parallel call for all heads and sequences.

On-disk format (``save``/``load``, see :mod:`softretrieval.persist`),
version 4: a folder holding the arrays ``keys`` and ``values`` (the rings,
``(heads, batch, capacity, dim)`` in the storage dtype; batch 1 for a memory
without batch), ``key_scales`` and ``value_scales`` (int8 only,
``(heads, batch, capacity)`` float32), ``size`` and ``next`` (``(batch,)``
int64 ring positions) and ``meta.json`` (format version, shapes, dtype, the
SHA-256 of each ``.npy`` and the checksum of meta.json itself). Versions 3
(float32 ``(heads, capacity, dim)`` rings, positions in meta.json) and 2 (no
meta.json checksum) still load. Saving is atomic and never replaces anything
but a saved memory; loading checks the version, shapes, dtypes and checksums
and refuses anything else.
"""

import os
import threading

from typing import Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import api, devices, interop, layout, persist, storage, terms, validate
from .terms import MemoryRead

FORMAT = "softretrieval.KNNMemory"
FORMAT_VERSION = 4
#: Older checksummed versions :meth:`KNNMemory.load` still reads (3: no batch, float32).
CHECKED_VERSIONS = (3,)
#: Older versions :meth:`KNNMemory.load` still reads (no meta.json checksum).
LEGACY_VERSIONS = (2,)


class KNNMemory:
    """An external memory of ``capacity`` (key, value) pairs per head (and per sequence).

    Parameters
    ----------
    key_dim, value_dim, capacity : int >= 1
    heads : int >= 1. Keys are stored per head; queries may have a multiple
        of ``heads`` heads (grouped-query reads).
    batch : None (default: one memory) or int >= 1: B independent memories,
        one per sequence of a batch, written and read in one call each
        (``write`` takes ``(B, n, heads, dim)``, ``read`` ``(B, T, H,
        key_dim)`` and reads sequence b's queries against memory b only).
    dtype : storage of keys and values: "float32" (default), "float16",
        "bfloat16" or "int8" (per-row scales), as in
        :class:`softretrieval.Index`; read by the same kernels, which decode
        tile by tile. Writes encode (rounding to nearest; values out of the
        format's range raise ValueError, see :mod:`softretrieval.storage`).
    metric : "ip", "cosine" or "l2", as in :func:`softretrieval.attention`
        ("l2" reads without the re-centring of far keys the public functions do).

    On the GPU (``read(..., device="cuda")``, float32 memories without
    batch) the memory keeps a device copy of its ring, made on the first
    such read and updated by every later ``write`` (only the rows written
    move), so reads move only the queries and results; :meth:`release_device`
    frees it.

    Thread safety: ``write``, ``read``, ``clear`` and ``save`` hold one lock,
    so a read sees the memory either before or after a concurrent write,
    never half of it; writes wait for a running read. A memory pickles (its
    rings are copied; the GPU copy is not).
    """

    def __init__(self, key_dim: int, value_dim: int, capacity: int, *, heads: int = 1,
                 batch: Optional[int] = None, dtype: str = "float32", metric: str = "ip") -> None:
        self.key_dim = validate.positive_int(key_dim, "key_dim")
        self.value_dim = validate.positive_int(value_dim, "value_dim")
        self.capacity = validate.positive_int(capacity, "capacity")
        self.heads = validate.positive_int(heads, "heads")
        self.batch = None if batch is None else validate.positive_int(batch, "batch")
        self.dtype = storage.check_dtype(dtype)
        self.metric = terms.check_metric(metric)
        nb = self.batch or 1
        stored = storage.FORMATS[self.dtype][0]
        scaled = self.dtype == "int8"
        rows = self.heads * nb * self.capacity
        validate.fits_in_memory(rows * (stored.itemsize * (self.key_dim + self.value_dim)
                                        + 8 * scaled), f"a memory of capacity {self.capacity}")
        self._keys = np.zeros((self.heads, nb, self.capacity, self.key_dim), stored)
        self._values = np.zeros((self.heads, nb, self.capacity, self.value_dim), stored)
        self._key_scales = np.zeros((self.heads, nb, self.capacity if scaled else 0), np.float32)
        self._value_scales = np.zeros_like(self._key_scales)
        self._size = np.zeros(nb, np.int64)     # live entries of each sequence's rings
        self._next = np.zeros(nb, np.int64)     # the slot each sequence writes next
        self._device = None      # (keys, values) (capacity, heads, dim) device arrays, or None
        self._lock = threading.RLock()

    def __getstate__(self):
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        state["_device"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self):
        """Live entries (a batched memory: summed over its sequences, see :attr:`sizes`)."""
        return int(self._size.sum())

    @property
    def sizes(self) -> np.ndarray:
        """Live entries of each sequence, (batch,) int64 ((1,) without batch)."""
        return self._size.copy()

    def __repr__(self):
        batch = "" if self.batch is None else f"batch={self.batch}, "
        return (f"KNNMemory(key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"capacity={self.capacity}, heads={self.heads}, {batch}dtype={self.dtype!r}, "
                f"metric={self.metric!r}, len={len(self)})")

    def _selection(self, batch_index):
        """The sequences ``batch_index`` names, as int64 (m,); None: all."""
        if batch_index is None:
            return np.arange(self.batch or 1)
        if self.batch is None:
            raise ValueError("batch_index needs a memory made with batch=B, got batch_index="
                             f"{batch_index!r} for a memory without batch")
        idx = validate.as_array(batch_index, "batch_index")
        if idx.size == 0 and idx.ndim == 1:
            idx = idx.astype(np.int64)               # ([] is a float array to numpy)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise TypeError(f"batch_index must be an integer or a 1-D integer array, got "
                            f"{idx.dtype} of shape {idx.shape}")
        idx = idx.reshape(-1).astype(np.int64)
        if ((idx < 0) | (idx >= self.batch)).any():
            raise ValueError(f"batch_index must lie in [0, {self.batch}), got {batch_index!r}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"batch_index names a sequence twice: {batch_index!r}")
        return idx

    def _entries(self, a, name, dim, m, one):
        """``a`` as (m, n, heads, dim) float32: ``(n, heads, dim)`` (or
        ``(n, dim)`` with one head) for a memory without batch or one
        sequence (``one``), else ``(m, n, heads, dim)``."""
        arr = validate.as_array(a, name)
        if one:
            if arr.ndim == 2 and self.heads == 1:
                arr = arr[:, None, :]
            want = f"(n, {self.heads}, {dim})" + (f" or (n, {dim})" if self.heads == 1 else "")
            arr = validate.float_matrix(arr, name, ndim=3)[None]
        else:
            want = f"({m}, n, {self.heads}, {dim}) (one row of entries per sequence written)"
            arr = validate.float_matrix(arr, name, ndim=4)
        if arr.shape[0] != m or arr.shape[2:] != (self.heads, dim):
            raise ValueError(f"{name} must have shape {want}, got {np.shape(a)}")
        return arr

    def _encode(self, X, name):
        """Entries (m, n, heads, dim) float32 in the storage dtype: ``(data
        (m, n, heads, dim), scales (m, n, heads) or None)``; ValueError naming
        ``name`` for NaN, inf or values the format cannot hold."""
        if self.dtype == "float32":
            from . import cpu_ring, runtime

            rows = X.reshape(-1, X.shape[3])
            if runtime.parallel_call(cpu_ring.count_non_finite, rows.view(np.uint32), blas=False):
                raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
            return X, None
        data = np.empty(X.shape, storage.FORMATS[self.dtype][0])
        scales = np.empty(X.shape[:3], np.float32)
        storage.encode_rows(X.reshape(-1, X.shape[3]), self.dtype, data.reshape(-1, X.shape[3]),
                            scales.reshape(-1), name=name)
        return data, (scales if self.dtype == "int8" else None)

    @interop.boundary
    def write(self, keys: ArrayLike, values: ArrayLike, *, batch_index=None) -> np.ndarray:
        """Append pairs; when full, the oldest entries are evicted first.

        Without batch: keys (n, heads, key_dim), values (n, heads,
        value_dim) (or without the heads axis when heads == 1). With
        ``batch=B``: every sequence written appends n entries, keys (m, n,
        heads, key_dim), values (m, n, heads, value_dim): m = B, or with
        ``batch_index`` (an array of m distinct sequences) those sequences
        only; an integer ``batch_index`` writes one sequence, its entries
        without the batch axis. Writing more than ``capacity`` rows in one
        call keeps the newest ``capacity``. The entries are validated (and
        encoded) before anything changes. Returns the slots written, (n,)
        int64 (with batch and no integer ``batch_index``: (m, n)), -1 for
        rows dropped that way.
        """
        sel = self._selection(batch_index)
        one = self.batch is None or np.ndim(batch_index) == 0 and batch_index is not None
        K = self._entries(keys, "keys", self.key_dim, sel.size, one)
        V = self._entries(values, "values", self.value_dim, sel.size, one)
        if K.shape[1] != V.shape[1]:
            raise ValueError(f"keys have {K.shape[1]} rows but values have {V.shape[1]}")
        n = K.shape[1]
        keep = min(n, self.capacity)
        K, V = K[:, n - keep:], V[:, n - keep:]
        (kd, ks), (vd, vs) = self._encode(K, "keys"), self._encode(V, "values")
        from . import cpu_ring, runtime

        slots = np.full((sel.size, n), -1, np.int64)
        bits = storage.FORMATS[self.dtype][1]      # as the kernels see it (numba has no float16)
        pairs = [(kd.view(bits), self._keys.view(bits)), (vd.view(bits), self._values.view(bits))]
        if ks is not None:
            pairs += [(ks[..., None], self._key_scales[..., None]),
                      (vs[..., None], self._value_scales[..., None])]
        with self._lock:
            starts = self._next[sel]
            for src, ring in pairs:
                runtime.parallel_call(cpu_ring.scatter, src, ring, sel, starts, blas=False)
            slots[:, n - keep:] = (starts[:, None] + np.arange(keep)) % self.capacity
            if self._device is not None:
                start = int(starts[0])
                first = min(keep, self.capacity - start)    # up to the end of the ring, then from 0
                self._write_device(((0, start, first), (first, 0, keep - first)), K[0], V[0])
            self._next[sel] = (starts + keep) % self.capacity
            self._size[sel] = np.minimum(self.capacity, self._size[sel] + keep)
        return slots[0] if one else slots

    def _write_device(self, parts, K, V):
        """Copy the rows just written to the GPU copy of the ring. It is a
        cache of the host ring: if the copy fails it is dropped (the next GPU
        read makes it again), so a write never fails halfway."""
        try:
            for src, dst, width in parts:
                if width == 0:
                    continue
                for dev, host in zip(self._device, (K, V)):
                    dev[dst:dst + width].copy_to_device(
                        np.ascontiguousarray(host[src:src + width], np.float32))
        except Exception:
            self._device = None

    def clear(self, batch_index=None) -> None:
        """Forget every entry (``batch_index``: of those sequences only, an
        integer or an array; the others are left as they are)."""
        sel = self._selection(batch_index)
        with self._lock:
            self._size[sel] = 0
            self._next[sel] = 0

    def _queries(self, queries):
        """``queries`` as (batch, T, H, key_dim) float32 and a function that
        gives a (batch, T, H, ...) result the caller's shape."""
        q = validate.as_array(queries, "queries")
        if self.batch is not None:
            if q.ndim != 4 or q.shape[0] != self.batch or q.shape[3] != self.key_dim or \
                    q.shape[2] % self.heads:
                raise ValueError(f"queries must have shape ({self.batch}, T, H, {self.key_dim}) "
                                 f"(the memory's batch first) with H a multiple of {self.heads} "
                                 f"heads, got {q.shape}")
            shaped = q
        elif q.ndim == 2 and self.heads == 1:
            shaped = q[None, :, None, :]
        elif q.ndim == 3:
            shaped = q[None]
        else:
            shaped = None
        if shaped is None or shaped.shape[3] != self.key_dim or shaped.shape[2] % self.heads:
            raise ValueError(f"queries must have shape (B, H, {self.key_dim}) with H a multiple of "
                             f"{self.heads} heads, got {np.shape(queries)}")
        q4 = validate.float_matrix(shaped, "queries", ndim=4)
        validate.all_finite(q4, "queries")
        if self.batch is not None:
            return q4, lambda a: a
        if q.ndim == 2:
            return q4, lambda a: a[0, :, 0]
        return q4, lambda a: a[0]

    def _check_k(self, k):
        if k is not None:
            k = validate.positive_int(k, "k")
            if k > self.capacity:
                raise ValueError(f"k = {k} is larger than the memory's capacity {self.capacity}")
        return k

    @interop.boundary
    def read(self, queries: ArrayLike, *, k: Optional[int] = None, scale: Optional[float] = None,
             device: str = "cpu") -> MemoryRead:
        """Look up the memory.

        queries (B, H, key_dim), H a multiple of ``heads`` (or (B, key_dim)
        for a one-head memory); with ``batch``: (batch, T, H, key_dim),
        sequence b's queries reading memory b only, all in one kernel call.
        ``k=None``: exact soft lookup over every live entry; an integer k
        (<= capacity): top-k attention over the memory (ids are slots of the
        query's own ring). An empty memory (sequence) gives zeros,
        ``lse = -inf`` (ids -1, coverage 0). ``device``: "cpu", "cuda" or
        "auto" ("cuda" needs a float32 memory without batch). Returns a
        :class:`MemoryRead` whose fields have the queries' leading axes.
        """
        q4, shape = self._queries(queries)
        validate.scale_value(scale, self.key_dim)
        k = self._check_k(k)
        kernels = devices.kernels(device)
        gpu = devices.is_gpu(kernels)
        if gpu and (self.batch is not None or self.dtype != "float32"):
            raise ValueError("device='cuda' reads a float32 memory without batch; this one has "
                             f"batch={self.batch}, dtype={self.dtype!r}: read it on the CPU")
        with self._lock:
            if not self._size.any():
                res = self._empty(q4.shape[:3], k)
            elif gpu:
                res = self._read_on_gpu(kernels, q4[0], int(self._size[0]), k, scale)
            else:
                res = self._read_folded(q4, k, scale)
        return MemoryRead(*(None if a is None else shape(a) for a in res))

    def _rows(self, data, scales, width):
        """A (heads, batch, capacity, width) block as :class:`devices.Rows` of
        its flattened rows, as the kernels read them."""
        flat = storage.stored(data.reshape(-1, width), self.dtype, scales.reshape(-1))
        return devices.Rows(flat.data, flat.scale, 0, width)

    def _read_folded(self, q4, k, scale):
        """Every head and sequence as one problem: rows (head, sequence,
        position, grouped head), each with the key window of its ring's live
        slots in the flattened rings. Returns (batch, T, H, ...) fields."""
        nb, T, H, d = q4.shape
        G = H // self.heads
        Q = np.ascontiguousarray(q4.reshape(nb, T, self.heads, G, d).transpose(2, 0, 1, 3, 4))
        ring = (np.arange(self.heads)[:, None] * nb + np.arange(nb)) * self.capacity
        lo = np.repeat(ring.reshape(-1), T * G)
        hi = lo + np.repeat(np.tile(self._size, self.heads), T * G)
        keys = self._rows(self._keys, self._key_scales, self.key_dim)
        values = self._rows(self._values, self._value_scales, self.value_dim)
        p = api.problem_terms(Q.reshape(-1, d), keys, values, True, metric=self.metric,
                              scale=scale, bias=None, exclude=None, window=(lo, hi), softmax=True)
        lay = layout.Layout(ndim=4, batch=1, T=lo.size, H=1, S=keys.data.shape[0], Hkv=1, d=d,
                            dv=self.value_dim)
        if k is None:
            res = api.solve_attention(lay, [((0, 0), p)], True)
        else:
            r = api.solve_topk_attention(lay, [((0, 0), p)], k)
            ids = r.ids[0, :, 0]
            ids = np.where(ids >= 0, ids - lo[:, None], -1)[None, :, None]
            res = (r.out, r.lse, ids, r.coverage)

        def unfold(a):   # (1, rows, 1, ...) in (head, sequence, t, j) order -> (nb, T, H, ...)
            a = a.reshape((self.heads, nb, T, G) + a.shape[3:])
            return np.ascontiguousarray(np.moveaxis(a, 0, 2)).reshape((nb, T, H) + a.shape[4:])

        return tuple(unfold(a) for a in res)

    def _read_on_gpu(self, kernels, q, n, k, scale):
        """:meth:`read` on the device copy of the ring (made on first use);
        host queries (B, H, d) in, host (1, B, H, ...) results out."""
        if self._device is None:
            self._device = tuple(kernels.device_view(np.ascontiguousarray(a[:, 0].transpose(1, 0, 2)))
                                 for a in (self._keys, self._values))
        dk, dv = (a[:n] for a in self._device)
        dq = kernels.device_view(np.ascontiguousarray(q, np.float32))
        if k is None:
            res = api.attention(dq, dk, dv, scale=scale, metric=self.metric, return_lse=True,
                                device="cuda")
        else:
            r = api.topk_attention(dq, dk, dv, k=k, scale=scale, metric=self.metric, device="cuda")
            res = (r.out, r.lse, r.ids, r.coverage)
        return tuple(a.copy_to_host()[None] for a in res)

    @interop.boundary
    def read_backward(self, queries: ArrayLike, grad_out: ArrayLike,
                      grad_lse: Optional[ArrayLike] = None, *, k: Optional[int] = None,
                      scale: Optional[float] = None, memory_grad: bool = False,
                      device: str = "cpu"):
        """Gradients of :meth:`read` (same ``queries``, ``k``, ``scale``;
        ``grad_out`` and ``grad_lse`` the loss's gradients with respect to its
        ``out`` and ``lse``) for the queries; the entries are constants unless
        ``memory_grad=True`` also asks for theirs (in :meth:`snapshot`
        order). The read is recomputed on the live entries (they must not
        change in between; a compact memory's decoded entries). Memories
        without batch only (ValueError otherwise). Returns a
        :class:`softretrieval.AttentionGrads` ``(queries, keys, values,
        None)`` (keys and values None without ``memory_grad``)."""
        from . import grad

        if self.batch is not None:
            raise ValueError(f"read_backward takes a memory without batch (this one has batch="
                             f"{self.batch})")
        q4, _ = self._queries(queries)
        q = q4[0]
        squeeze = validate.as_array(queries, "queries").ndim == 2
        k = self._check_k(k)
        keys, values = self.snapshot()
        dO = validate.as_array(grad_out, "grad_out")
        if dO.shape != q.shape[:2] + (self.value_dim,) and dO.shape != (q.shape[0], self.value_dim):
            raise ValueError(f"grad_out must have the shape of read's out, got {dO.shape}")
        dO = dO[:, None] if squeeze and dO.ndim == 2 else dO
        dlse = None if grad_lse is None else validate.as_array(grad_lse, "grad_lse")
        dlse = dlse[:, None] if squeeze and dlse is not None and dlse.ndim == 1 else dlse
        if len(keys) == 0:
            g = grad.AttentionGrads(np.zeros(q.shape, np.float32), keys, values, None)
        elif k is None:
            out, lse = api.attention(q, keys, values, scale=scale, metric=self.metric,
                                     return_lse=True)
            g = grad.attention_backward(q, keys, values, out, lse, dO, dlse, scale=scale,
                                        metric=self.metric, device=device)
        else:
            res = api.topk_attention(q, keys, values, k=k, scale=scale, metric=self.metric)
            g = grad.topk_attention_backward(q, keys, values, res, dO, dlse, scale=scale,
                                             metric=self.metric, device=device)
        dq = g.queries[:, 0] if squeeze else g.queries
        return grad.AttentionGrads(dq, g.keys if memory_grad else None,
                                   g.values if memory_grad else None, None)

    def snapshot(self, batch_index: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of the live entries, ``(keys (n, heads, key_dim), values
        (n, heads, value_dim))`` float32 (a compact memory's decoded), in
        slot order (the ids of :meth:`read` index them), taken under the
        lock: a concurrent write is wholly in or out. A batched memory
        needs ``batch_index`` (an integer: that sequence's entries);
        ValueError otherwise, also from :func:`memory_attention` and the
        backward passes, which take memories without batch."""
        if self.batch is not None and (batch_index is None or np.ndim(batch_index) != 0):
            raise ValueError(f"this memory holds batch={self.batch} sequences: snapshot needs an "
                             "integer batch_index (memory_attention and the backward passes take "
                             "memories without batch)")
        b = int(self._selection(batch_index)[0]) if batch_index is not None else 0
        with self._lock:
            n = int(self._size[b])
            return (self._decoded(self._keys, self._key_scales, b, n),
                    self._decoded(self._values, self._value_scales, b, n))

    def _decoded(self, data, scales, b, n):
        """Sequence b's first n slots of a (heads, batch, capacity, dim)
        block as float32 (n, heads, dim)."""
        dim = data.shape[3]
        rows = storage.decode_rows(data[:, b, :n].reshape(-1, dim), self.dtype,
                                   scales[:, b, :n].reshape(-1))
        return np.ascontiguousarray(rows.reshape(self.heads, n, dim).transpose(1, 0, 2),
                                    dtype=np.float32)

    def release_device(self) -> None:
        """Free the device copy of the ring (the next GPU read makes it again)."""
        with self._lock:
            self._device = None

    def _empty(self, lead, k):
        out = np.zeros(lead + (self.value_dim,), np.float32)
        lse = np.full(lead, -np.inf, np.float32)
        if k is None:
            return out, lse
        return out, lse, np.full(lead + (k,), -1, np.int64), np.zeros(lead, np.float32)

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the memory to the folder ``path`` atomically (see the module docstring)."""
        with self._lock:
            fields = {"key_dim": self.key_dim, "value_dim": self.value_dim,
                      "capacity": self.capacity, "heads": self.heads, "metric": self.metric,
                      "batch": self.batch, "dtype": self.dtype}
            arrays = {"keys": self._keys, "values": self._values, "size": self._size,
                      "next": self._next}
            if self.dtype == "int8":
                arrays.update(key_scales=self._key_scales, value_scales=self._value_scales)
            persist.save_folder(path, FORMAT, FORMAT_VERSION, arrays, fields,
                                legacy=LEGACY_VERSIONS, checked=CHECKED_VERSIONS)

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "KNNMemory":
        """Read a memory written by :meth:`save` (this version or an older
        one, see the module docstring); a damaged one raises ValueError."""
        path = os.fspath(path)
        meta, arrays = persist.load_folder(path, FORMAT, FORMAT_VERSION, legacy=LEGACY_VERSIONS,
                                           checked=CHECKED_VERSIONS)
        old = meta["version"] != FORMAT_VERSION
        try:
            mem = cls(*(persist.field(meta, path, n, int)
                        for n in ("key_dim", "value_dim", "capacity")),
                      heads=persist.field(meta, path, "heads", int),
                      metric=persist.field(meta, path, "metric", str),
                      batch=None if old else persist.field(meta, path, "batch", (int, type(None))),
                      dtype="float32" if old else persist.field(meta, path, "dtype", str))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: meta.json describes no valid memory: {exc}") from None
        if old:      # one float32 ring per head, positions in meta.json
            arrays = {name: a[:, None] if a.ndim == 3 else a for name, a in arrays.items()}
            arrays.update(size=np.array([persist.field(meta, path, "size", int)]),
                          next=np.array([persist.field(meta, path, "next", int)]))
        expect = {"keys": mem._keys, "values": mem._values, "size": mem._size, "next": mem._next}
        if mem.dtype == "int8":
            expect.update(key_scales=mem._key_scales, value_scales=mem._value_scales)
        for name, dest in expect.items():
            arr = arrays.get(name)
            if arr is None or arr.dtype != dest.dtype or arr.shape != dest.shape:
                got = None if arr is None else (arr.dtype, arr.shape)
                raise ValueError(f"{path}: {name} holds {got}, expected {dest.dtype} {dest.shape}")
            dest[:] = arr
        size, nxt = mem._size, mem._next
        if ((size < 0) | (size > mem.capacity) | (nxt < 0) | (nxt >= mem.capacity)).any():
            raise ValueError(f"{path}: ring position out of range (size {size}, next {nxt})")
        return mem


@interop.boundary
def memory_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, memory: KNNMemory, *,
                     topk: int = 32, causal: bool = True, gate: Optional[ArrayLike] = None,
                     scale: Optional[float] = None,
                     device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """One step of a memorizing-transformer layer.

    q (T, H, d), k (S, Hkv, d), v (S, Hkv, dv): the sequence's own queries,
    keys and values; ``memory`` a :class:`KNNMemory` with ``key_dim = d``,
    ``value_dim = dv`` and ``heads = Hkv``. Local attention (causal,
    bottom-right aligned) over the sequence's keys and top-k attention over
    the memory are combined:

    * ``gate=None``: as ONE exact softmax over [memory top-k entries ; local
      keys], by merging the two online-softmax states (``merge``).
    * ``gate`` (H,) in [0, 1]: ``gate * memory_out + (1 - gate) * local_out``
      per head, the Memorizing Transformers mix.

    Returns ``(out (T, H, dv) float32, coverage (T, H) float32)``: coverage is
    the share of the memory's full softmax mass held by its top-k entries.
    ``device``: "cpu", "cuda" or "auto" for both attentions.
    """
    q = validate.as_array(q, "q")
    if memory.batch is not None:
        raise ValueError(f"memory_attention takes a memory without batch (this one has batch="
                         f"{memory.batch})")
    if q.ndim != 3:
        raise ValueError(f"q must have shape (T, H, d), got {q.shape}")
    if gate is not None:
        g = _gate(gate, q.shape[1])
    local, lse_local = api.attention(q, k, v, scale=scale, causal=causal, return_lse=True,
                                     device=device)
    mem = memory.read(q, k=topk, scale=scale, device=device)
    if gate is None:
        with np.errstate(divide="ignore"):
            lse_top = mem.lse + np.log(mem.coverage)     # log-partition of the top-k entries
        out, _ = api.merge([local, mem.out], [lse_local, lse_top.astype(np.float32)])
        return out, mem.coverage
    g = g[None, :, None]
    return (g * mem.out + (1 - g) * local).astype(np.float32), mem.coverage


def _gate(gate, H):
    """``gate`` as (H,) float64 values in [0, 1]; TypeError or ValueError
    naming it otherwise."""
    g = validate.as_array(gate, "gate")
    if g.dtype.kind not in "fiu":
        raise TypeError(f"gate must be {H} real numbers in [0, 1] (one per head), got {g.dtype}")
    g = g.astype(np.float64)
    if g.shape != (H,) or not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
        raise ValueError(f"gate must be {H} values in [0, 1] (one per head), got {g}")
    return g
