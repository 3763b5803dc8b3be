"""kNN memory for memory-augmented networks (Memorizing Transformers, kNN-LM).

:class:`KNNMemory` is a ring buffer of (key, value) pairs per head, read by
exact soft lookup or by top-k attention on the same kernels as
:func:`softretrieval.attention`. :func:`memory_attention` is one step of a
memorizing-transformer layer: local causal attention plus attention over the
memory's top-k, combined as one exact softmax (through the merge of their
online-softmax states) or as the gated mix Memorizing Transformers use.

Storage is one contiguous ``(capacity, dim)`` block per head, so each head
is read by the kernels in place. On-disk format (``save``/``load``, see
:mod:`softretrieval.persist`): a folder holding the arrays ``keys`` and
``values`` (the ring, ``(heads, capacity, dim)`` float32) and ``meta.json``
(format version, shapes, ring position, the SHA-256 of each ``.npy`` and the
checksum of meta.json itself). Saving is atomic and never replaces anything
but a saved memory; loading checks the version, shapes, dtypes and checksums
and refuses anything else.
"""

import os
import threading

from typing import Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from . import api, devices, interop, persist, terms, validate
from .terms import MemoryRead

FORMAT = "softretrieval.KNNMemory"
FORMAT_VERSION = 3
#: Older versions :meth:`KNNMemory.load` still reads (no meta.json checksum).
LEGACY_VERSIONS = (2,)


class KNNMemory:
    """An external memory of ``capacity`` (key, value) pairs per head.

    Parameters
    ----------
    key_dim, value_dim, capacity : int >= 1
    heads : int >= 1. Keys are stored per head; queries may have a multiple
        of ``heads`` heads (grouped-query reads).
    dtype : "float32" (compact storage dtypes belong to the retrieval
        engine's storage, not yet built).
    metric : "ip", "cosine" or "l2", as in :func:`softretrieval.attention`.

    On the GPU (``read(..., device="cuda")``) the memory keeps a device copy
    of its ring, made on the first such read and updated by every later
    ``write`` (only the rows written move), so reads move only the queries
    and results; :meth:`release_device` frees it.

    Thread safety: ``write``, ``read``, ``clear`` and ``save`` hold one lock,
    so a read sees the memory either before or after a concurrent write,
    never half of it; writes wait for a running read. A memory pickles (its
    ring is copied; the GPU copy is not).
    """

    def __init__(self, key_dim: int, value_dim: int, capacity: int, *, heads: int = 1,
                 dtype: str = "float32", metric: str = "ip") -> None:
        self.key_dim = validate.positive_int(key_dim, "key_dim")
        self.value_dim = validate.positive_int(value_dim, "value_dim")
        self.capacity = validate.positive_int(capacity, "capacity")
        self.heads = validate.positive_int(heads, "heads")
        if dtype not in ("float32", np.float32):
            raise ValueError(f"dtype must be 'float32', got {dtype!r}")
        self.metric = terms.check_metric(metric)
        validate.fits_in_memory(4 * self.heads * self.capacity * (self.key_dim + self.value_dim),
                                f"a memory of capacity {self.capacity}")
        self._keys = np.zeros((self.heads, self.capacity, self.key_dim), np.float32)
        self._values = np.zeros((self.heads, self.capacity, self.value_dim), np.float32)
        self._size = 0
        self._next = 0
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
        return self._size

    def __repr__(self):
        return (f"KNNMemory(key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"capacity={self.capacity}, heads={self.heads}, metric={self.metric!r}, len={len(self)})")

    def _rows(self, a, name, dim):
        """``a`` as (n, heads, dim) float32 (a 2-D (n, dim) is allowed when heads == 1)."""
        arr = validate.as_array(a, name)
        if arr.ndim == 2 and self.heads == 1:
            arr = arr[:, None, :]
        arr = validate.float_matrix(arr, name, ndim=3)
        if arr.shape[1:] != (self.heads, dim):
            raise ValueError(f"{name} must have shape (n, {self.heads}, {dim})"
                             + (f" or (n, {dim})" if self.heads == 1 else "") + f", got {np.shape(a)}")
        validate.all_finite(arr, name)
        return arr

    @interop.boundary
    def write(self, keys: ArrayLike, values: ArrayLike) -> np.ndarray:
        """Append pairs; when full, the oldest entries are evicted first.

        keys (n, heads, key_dim), values (n, heads, value_dim) (or without the
        heads axis when heads == 1). Writing more than ``capacity`` rows in
        one call keeps the newest ``capacity``. Returns the slots written
        (n,) int64, -1 for rows dropped that way.
        """
        K = self._rows(keys, "keys", self.key_dim)
        V = self._rows(values, "values", self.value_dim)
        if K.shape[0] != V.shape[0]:
            raise ValueError(f"keys have {K.shape[0]} rows but values have {V.shape[0]}")
        n = K.shape[0]
        slots = np.full(n, -1, np.int64)
        keep = min(n, self.capacity)
        with self._lock:
            pos = (self._next + np.arange(keep)) % self.capacity
            first = min(keep, self.capacity - self._next)   # up to the end of the ring, then from 0
            parts = ((n - keep, self._next, first), (n - keep + first, 0, keep - first))
            for src, dst, width in parts:
                self._keys[:, dst:dst + width] = K[src:src + width].transpose(1, 0, 2)
                self._values[:, dst:dst + width] = V[src:src + width].transpose(1, 0, 2)
            slots[n - keep:] = pos
            self._next = int((self._next + keep) % self.capacity)
            self._size = min(self.capacity, self._size + keep)
            if self._device is not None:
                self._write_device(parts, K, V)
        return slots

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

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._size = 0
            self._next = 0

    def _queries(self, queries):
        q = validate.as_array(queries, "queries")
        squeeze = q.ndim == 2
        if squeeze:
            if self.heads != 1:
                raise ValueError(f"queries must have shape (B, H, {self.key_dim}) with H a multiple of "
                                 f"{self.heads} heads, got {q.shape}")
            q = q[:, None, :]
        if q.ndim != 3 or q.shape[2] != self.key_dim or q.shape[1] % self.heads:
            raise ValueError(f"queries must have shape (B, H, {self.key_dim}) with H a multiple of "
                             f"{self.heads} heads, got {np.shape(queries)}")
        return q, squeeze

    @interop.boundary
    def read(self, queries: ArrayLike, *, k: Optional[int] = None, scale: Optional[float] = None,
             device: str = "cpu") -> MemoryRead:
        """Look up the memory.

        queries (B, H, key_dim), H a multiple of ``heads`` (or (B, key_dim)
        for a one-head memory). ``k=None``: exact soft lookup over every live
        entry; an integer k (<= capacity): top-k attention over the memory.
        An empty memory gives zeros, ``lse = -inf`` (ids -1, coverage 0).
        ``device``: "cpu", "cuda" or "auto". Returns a :class:`MemoryRead`.
        """
        q, squeeze = self._queries(queries)
        q = validate.float_matrix(q, "queries", ndim=3)   # checked even when the memory is empty
        validate.all_finite(q, "queries")
        validate.scale_value(scale, self.key_dim)
        if k is not None:
            k = validate.positive_int(k, "k")
            if k > self.capacity:
                raise ValueError(f"k = {k} is larger than the memory's capacity {self.capacity}")
        B, H = q.shape[:2]
        kernels = devices.kernels(device)
        with self._lock:
            n = self._size
            if n == 0:
                res = self._empty(B, H, k)
            elif devices.is_gpu(kernels):
                res = self._read_on_gpu(kernels, q, n, k, scale)
            elif k is None:
                out, lse = api.attention(q, *self._live(n), scale=scale, metric=self.metric,
                                         return_lse=True)
                res = MemoryRead(out, lse)
            else:
                r = api.topk_attention(q, *self._live(n), k=k, scale=scale, metric=self.metric)
                res = MemoryRead(r.out, r.lse, r.ids, r.coverage)
        if squeeze:
            res = MemoryRead(*(None if a is None else a[:, 0] for a in res))
        return res

    def _read_on_gpu(self, kernels, q, n, k, scale):
        """:meth:`read` on the device copy of the ring (made on first use);
        host queries in, host results out."""
        if self._device is None:
            self._device = tuple(kernels.device_view(np.ascontiguousarray(a.transpose(1, 0, 2)))
                                 for a in (self._keys, self._values))
        dk, dv = (a[:n] for a in self._device)
        q = validate.float_matrix(q, "queries", ndim=3)
        validate.all_finite(q, "queries")
        dq = kernels.device_view(np.ascontiguousarray(q, np.float32))
        if k is None:
            res = api.attention(dq, dk, dv, scale=scale, metric=self.metric, return_lse=True,
                                device="cuda")
        else:
            r = api.topk_attention(dq, dk, dv, k=k, scale=scale, metric=self.metric, device="cuda")
            res = (r.out, r.lse, r.ids, r.coverage)
        return MemoryRead(*(a.copy_to_host() for a in res))

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
        change in between). Returns a :class:`softretrieval.AttentionGrads`
        ``(queries, keys, values, None)`` (keys and values None without
        ``memory_grad``)."""
        from . import grad

        q, squeeze = self._queries(queries)
        if k is not None:
            k = validate.positive_int(k, "k")
            if k > self.capacity:
                raise ValueError(f"k = {k} is larger than the memory's capacity {self.capacity}")
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

    def snapshot(self) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of the live entries, ``(keys (n, heads, key_dim), values
        (n, heads, value_dim))`` float32, in slot order (the ids of
        :meth:`read` index them), taken under the lock: a concurrent write is
        wholly in or out."""
        with self._lock:
            keys, values = self._live(self._size)
            return np.ascontiguousarray(keys), np.ascontiguousarray(values)

    def release_device(self) -> None:
        """Free the device copy of the ring (the next GPU read makes it again)."""
        with self._lock:
            self._device = None

    def _live(self, n):
        """Keys and values of the n live slots as (n, heads, dim) views."""
        return self._keys[:, :n].transpose(1, 0, 2), self._values[:, :n].transpose(1, 0, 2)

    def _empty(self, B, H, k):
        out = np.zeros((B, H, self.value_dim), np.float32)
        lse = np.full((B, H), -np.inf, np.float32)
        if k is None:
            return MemoryRead(out, lse)
        return MemoryRead(out, lse, np.full((B, H, k), -1, np.int64), np.zeros((B, H), np.float32))

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the memory to the folder ``path`` atomically (see the module docstring)."""
        with self._lock:
            fields = {"key_dim": self.key_dim, "value_dim": self.value_dim,
                      "capacity": self.capacity, "heads": self.heads, "metric": self.metric,
                      "size": self._size, "next": self._next}
            persist.save_folder(path, FORMAT, FORMAT_VERSION,
                                {"keys": self._keys, "values": self._values}, fields,
                                legacy=LEGACY_VERSIONS)

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "KNNMemory":
        """Read a memory written by :meth:`save`; a damaged one raises ValueError."""
        path = os.fspath(path)
        meta, arrays = persist.load_folder(path, FORMAT, FORMAT_VERSION, legacy=LEGACY_VERSIONS)
        try:
            mem = cls(*(persist.field(meta, path, n, int)
                        for n in ("key_dim", "value_dim", "capacity")),
                      heads=persist.field(meta, path, "heads", int),
                      metric=persist.field(meta, path, "metric", str))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: meta.json describes no valid memory: {exc}") from None
        size, nxt = persist.field(meta, path, "size", int), persist.field(meta, path, "next", int)
        if not (0 <= size <= mem.capacity and 0 <= nxt < mem.capacity):
            raise ValueError(f"{path}: ring position out of range (size {size}, next {nxt})")
        for name, dest in (("keys", mem._keys), ("values", mem._values)):
            arr = arrays.get(name)
            if arr is None or arr.dtype != np.float32 or arr.shape != dest.shape:
                got = None if arr is None else (arr.dtype, arr.shape)
                raise ValueError(f"{path}: {name} holds {got}, expected float32 {dest.shape}")
            dest[:] = arr
        mem._size, mem._next = size, nxt
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
