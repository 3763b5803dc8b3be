"""Shapes of the public API, and how they become kernel problems.

Every public call is normalised to four axes, ``queries (batch, T, H, d)``,
``keys (batch, S, Hkv, d)``, ``values (batch, S, Hkv, dv)``, then cut into one
kernel problem per ``(batch element, KV head)``: the ``G = H / Hkv`` query
heads that share a KV head are stacked into one query block of ``T * G`` rows
(row ``t * G + j`` is position t, head ``g * G + j``), so each key tile is read
once per KV head (the grouped-query saving). Causal, sliding-window and
length limits become a key window ``[lo, hi)`` per row.

Accepted shapes (queries / keys / values):

* ``(B, d) / (N, d) / (N, dv)``: retrieval (``causal``: one sequence, T = B, S = N)
* ``(B, H, d) / (N, Hkv, d) / (N, Hkv, dv)``: multi-head (``causal``: a sequence)
* ``(batch, T, H, d) / (batch, S, Hkv, d) / (batch, S, Hkv, dv)``: batched sequences
"""

from typing import NamedTuple

import numpy as np

from . import validate


class Layout(NamedTuple):
    ndim: int     # 2, 3 or 4: the rank of the caller's queries
    batch: int
    T: int        # queries per batch element (B for retrieval)
    H: int
    S: int        # keys per batch element (N for retrieval)
    Hkv: int
    d: int
    dv: int

    @property
    def group(self):
        return self.H // self.Hkv

    def heads_out(self, a4):
        """A (batch, T, H, ...) array back in the caller's rank."""
        if self.ndim == 4:
            return a4
        if self.ndim == 3:
            return a4[0]
        return a4[0, :, 0]


def as_heads(queries, keys, values):
    """Validate and reshape the inputs to four axes (views, no copies of keys).

    Returns ``(q4, k4, v4, layout)``; float32 C-contiguous arrays (converted
    or copied as :func:`validate.float_matrix` documents).
    """
    queries = validate.as_array(queries, "queries")
    ndim = queries.ndim
    if ndim not in (2, 3, 4):
        raise ValueError(f"queries must have 2, 3 or 4 dimensions, got shape {queries.shape}")
    q = validate.float_matrix(queries, "queries", ndim=ndim)
    keys = validate.as_array(keys, "keys")
    values = None if values is None else validate.as_array(values, "values")
    for name, arr in (("keys", keys), ("values", values)):
        if arr is not None and arr.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions to match queries of shape "
                             f"{q.shape}, got shape {arr.shape}")
    k = validate.float_matrix(keys, "keys", ndim=ndim, packed_rows=True)
    v = k if values is None else validate.float_matrix(values, "values", ndim=ndim, packed_rows=True)
    lay = layout_of(q.shape, k.shape, v.shape)
    q4, k4, v4 = (a.reshape(lay_shape) for a, lay_shape in
                  ((q, (lay.batch, lay.T, lay.H, lay.d)), (k, (lay.batch, lay.S, lay.Hkv, lay.d)),
                   (v, (lay.batch, lay.S, lay.Hkv, lay.dv))))
    validate.all_finite(q4, "queries")
    return q4, k4, v4, lay


def layout_of(qshape, kshape, vshape):
    """The :class:`Layout` of queries, keys and values of these shapes (all
    of one rank, 2, 3 or 4); ValueError for shapes that do not fit."""
    ndim = len(qshape)
    lead = {2: lambda s: (1, s[0], 1), 3: lambda s: (1,) + tuple(s[:2]), 4: lambda s: tuple(s[:3])}
    batch, T, H = lead[ndim](qshape)
    kb, S, Hkv = lead[ndim](kshape)
    d, dk, dv = qshape[-1], kshape[-1], vshape[-1]
    if S == 0:
        raise ValueError("keys is empty: at least one key is needed")
    if dk != d:
        raise ValueError(f"queries have dimension {d} but keys have {dk}")
    if kb != batch:
        raise ValueError(f"queries have batch {batch} but keys have {kb}")
    if tuple(vshape[:-1]) != tuple(kshape[:-1]):
        what = "rows" if ndim == 2 else "leading shape"
        raise ValueError(f"values have {what} {tuple(vshape[:-1])} but keys have {tuple(kshape[:-1])}")
    if H % Hkv:
        raise ValueError(f"queries have {H} heads, not a multiple of the keys' {Hkv} heads")
    return Layout(ndim=ndim, batch=batch, T=T, H=H, S=S, Hkv=Hkv, d=d, dv=dv)


def head_bias(bias, layout):
    """Per-KV-head bias rows: a function g -> (S,) array or None.

    ``bias`` is None, (S,) shared by every head, or (Hkv, S).
    """
    if bias is None:
        return lambda g: None
    arr = validate.as_array(bias, "bias")
    if arr.ndim == 2:
        if arr.shape != (layout.Hkv, layout.S):
            raise ValueError(f"bias must have shape ({layout.S},) or ({layout.Hkv}, {layout.S}), "
                             f"got {arr.shape}")
        return lambda g: arr[g]
    return lambda g: arr


def sequence_lengths(seq_lens, layout):
    """(q_lens, k_lens) int64 (batch,) from ``seq_lens``, or None.

    ``seq_lens`` is a (batch,) integer array of lengths shared by queries and
    keys (requires T == S), or a tuple ``(q_lens, k_lens)``.
    """
    if seq_lens is None:
        return None
    if layout.ndim != 4:
        raise ValueError("seq_lens needs batched inputs: queries (batch, T, H, d)")
    if isinstance(seq_lens, tuple):
        if len(seq_lens) != 2:
            raise ValueError("seq_lens as a tuple must be (q_lens, k_lens)")
        q_lens, k_lens = seq_lens
    else:
        if layout.T != layout.S:
            raise ValueError("one seq_lens array needs T == S; pass (q_lens, k_lens) otherwise")
        q_lens = k_lens = seq_lens
    out = []
    for name, lens, top in (("q_lens", q_lens, layout.T), ("k_lens", k_lens, layout.S)):
        arr = validate.as_array(lens, "seq_lens")
        if arr.dtype.kind not in "iu" or arr.shape != (layout.batch,):
            raise ValueError(f"seq_lens {name} must be {layout.batch} integers, got {arr.dtype} {arr.shape}")
        if (arr < 0).any() or (arr > top).any():
            raise ValueError(f"seq_lens {name} out of range: each must lie in [0, {top}]")
        out.append(arr.astype(np.int64))
    return out[0], out[1]


def row_windows(layout, causal, window, lens, b):
    """Key window ``(lo, hi)`` int64 (T * G,) of each stacked row of batch
    element b, or None when every row sees every key.

    Causal: position t sees keys ``j <= t + (S - T)`` (bottom-right aligned,
    so a prefix of S - T keys is visible to every query); with ``window = w``
    only ``j > t + (S - T) - w``. With lengths, S and T are the element's
    own lengths; positions past q_len see no key.
    """
    if not causal and lens is None:
        return None
    T, S = layout.T, layout.S
    q_len, k_len = (T, S) if lens is None else (int(lens[0][b]), int(lens[1][b]))
    t = np.arange(T, dtype=np.int64)
    if causal:
        hi = np.clip(t + (k_len - q_len) + 1, 0, k_len)
    else:
        hi = np.full(T, k_len, np.int64)
    lo = np.zeros(T, np.int64) if window is None else np.clip(hi - window, 0, None)
    hi[t >= q_len] = 0
    lo = np.minimum(lo, hi)
    return np.repeat(lo, layout.group), np.repeat(hi, layout.group)


def check_window(causal, window):
    """Validate the causal flag and the sliding-window width."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {type(causal).__name__}")
    if window is None:
        return None
    if not causal:
        raise ValueError("window needs causal=True")
    # a window wider than any sequence changes nothing: clamp (int64 rows)
    return min(validate.positive_int(window, "window"), np.iinfo(np.int64).max // 4)


def stacked_exclude(excl, layout):
    """Exclusion CSR of the T queries, repeated for each of the G stacked heads."""
    if excl is None or layout.group == 1:
        return excl
    offsets, ids = excl
    counts = np.repeat(np.diff(offsets), layout.group)
    starts = np.repeat(offsets[:-1], layout.group)
    new_off = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=new_off[1:])
    take = np.arange(new_off[-1]) - np.repeat(new_off[:-1] - starts, counts)
    return new_off, ids[take]
