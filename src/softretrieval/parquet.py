"""Parquet query tables and result files (needs the optional pyarrow:
``pip install "softretrieval[parquet]"``; imported only when called).

A query table holds one embedding per row in a list or fixed-size-list
column of float16, float32 or float64 values, every row the same length and
none null, and optionally an id column of any type. A query set is one
``.parquet`` file, a folder (its ``*.parquet`` files, sorted) or a glob
pattern (its matches, sorted). :func:`read_queries` reads one file (a
distributed driver gives each worker its own), :func:`read_all` them all;
:func:`write_results` writes the results as a table.
"""

import glob
import os

import numpy as np

from . import io

# values (rows x width) per written batch: list offsets stay within int32, temporaries small
_CHUNK_VALUES = 1 << 24


def require_pyarrow():
    """``(pyarrow, pyarrow.parquet)``; ValueError naming the extra when missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError('Parquet needs pyarrow: pip install "softretrieval[parquet]"') from None
    return pyarrow, pyarrow.parquet


def query_files(spec):
    """The Parquet files of ``spec`` as a list of paths: ``[spec]`` for a
    file, a folder's ``*.parquet`` files sorted, or a glob pattern's matching
    files sorted (``**`` matches folders recursively). ValueError naming
    ``spec`` when there are none."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return [spec]
    pattern = os.path.join(glob.escape(spec), "*.parquet") if os.path.isdir(spec) else spec
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise ValueError(f"{spec}: no Parquet files found (give a .parquet file, a folder of them "
                         "or a glob pattern)")
    return files


def num_rows(path):
    """The number of rows of a Parquet file, from its footer (no data is
    read). ValueError naming the file when it is not readable Parquet."""
    pa, pq = require_pyarrow()
    try:
        return pq.ParquetFile(os.fspath(path)).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None


def _first(mask):
    return int(np.flatnonzero(mask)[0])


def _embeddings(path, col, column):
    """A list or fixed-size-list Arrow array of floats as (n, d) float32."""
    pa = require_pyarrow()[0]
    what = f"{path}: column {column!r}"
    kind = col.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise ValueError(f"{what} must be a list of float16, float32 or float64 values, got {kind}")
    n = len(col)
    if col.null_count:
        raise ValueError(f"{what}: row {_first(col.is_null().to_numpy(zero_copy_only=False))} is null")
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
    else:
        lengths = np.diff(col.offsets.to_numpy())
        d = int(lengths[0]) if n else 0
        if (lengths != d).any():
            bad = _first(lengths != d)
            raise ValueError(f"{what}: row {bad} has {lengths[bad]} values where row 0 has {d}")
    if n and d == 0:
        raise ValueError(f"{what}: the embeddings are empty lists")
    flat = col.flatten()
    if flat.null_count:
        raise ValueError(f"{what}: row {_first(flat.is_null().to_numpy(zero_copy_only=False)) // d} "
                         "holds a null value")
    values = flat.to_numpy(zero_copy_only=False).reshape(n, d)
    with np.errstate(over="ignore"):
        Q = np.ascontiguousarray(values, dtype=np.float32)
    overflow = np.isinf(Q) & np.isfinite(values)
    if overflow.any():
        raise ValueError(f"{what}: row {_first(overflow.any(axis=1))} holds values beyond the float32 "
                         "range")
    return Q


def read_queries(path, column, id_column=None, id_start=0):
    """One Parquet file's queries: ``(ids, Q)``.

    ``Q`` (n, d) float32, C-contiguous, from the list or fixed-size-list
    float column ``column`` (read-only where it is Arrow's own float32
    buffer, as a memory-mapped ``.npy`` is). ``ids`` a pyarrow Array of n: the values of
    ``id_column`` as they are (any type, no nulls), or without it the int64
    row numbers ``id_start + arange(n)``. ValueError naming the file and
    the column for a missing column, a non-float column, a null row or
    value, or rows of different lengths.
    """
    pa, pq = require_pyarrow()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if id_column is not None and id_column == column:
        raise ValueError(f"{path}: the id column {id_column!r} is the embedding column")
    try:
        names = pq.read_schema(path).names
        for name in (column, id_column):
            if name is not None and name not in names:
                raise ValueError(f"{path}: no column {name!r} (it has {names})")
        table = pq.read_table(path, columns=[column] + ([id_column] if id_column is not None else []))
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None
    Q = _embeddings(path, table.column(column).combine_chunks(), column)
    if id_column is None:
        return pa.array(np.arange(id_start, id_start + len(Q), dtype=np.int64)), Q
    ids = table.column(id_column).combine_chunks()
    if ids.null_count:
        raise ValueError(f"{path}: id column {id_column!r}: row "
                         f"{_first(ids.is_null().to_numpy(zero_copy_only=False))} is null")
    return ids, Q


def read_all(spec, column, id_column=None):
    """``(ids, Q)`` of every file of :func:`query_files` (``spec``) in
    order, as :func:`read_queries` reads them; the row numbers standing in
    for ids continue across files. ValueError naming the files whose
    embeddings or ids differ in dimension or type."""
    pa = require_pyarrow()[0]
    parts = []
    start = 0
    for path in query_files(spec):
        ids, Q = read_queries(path, column, id_column, id_start=start)
        start += len(Q)
        if len(Q):
            parts.append((path, ids, Q))
    if not parts:
        return pa.array([], pa.int64()), np.empty((0, 0), np.float32)
    first, ids0, Q0 = parts[0]
    for path, ids, Q in parts[1:]:
        if Q.shape[1] != Q0.shape[1]:
            raise ValueError(f"{path}: column {column!r} has dimension {Q.shape[1]} where {first} "
                             f"has {Q0.shape[1]}")
        if ids.type != ids0.type:
            raise ValueError(f"{path}: id column {id_column!r} is {ids.type} where {first} has {ids0.type}")
    if len(parts) == 1:
        return ids0, Q0
    return pa.concat_arrays([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _present(ids):
    """The (rows, k) mask of slots holding an item, and its offsets per row (int32)."""
    keep = ids != -1
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    return keep, offsets


def _batch(pa, mode, result, query_ids, lo, hi):
    """The result rows of queries ``lo:hi`` as a RecordBatch in ``mode``'s layout."""
    part = {name: arr[lo:hi] for name, arr in result.items()}
    qids = query_ids.slice(lo, hi - lo)

    def vectors(arr):
        arr = np.ascontiguousarray(arr, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])

    def floats(arr):
        return pa.array(np.asarray(arr, np.float32))

    if mode == "topk":
        keep, _ = _present(part["ids"])
        rows, ranks = np.nonzero(keep)      # row-major: by query, then rank
        cols = {"query_id": qids.take(pa.array(rows)), "rank": pa.array(ranks.astype(np.int32)),
                "item_id": pa.array(part["ids"][keep].astype(np.int64)),
                "score": floats(part["scores"][keep])}
    elif mode == "soft":
        cols = {"query_id": qids, "out": vectors(part["out"]), "lse": floats(part["lse"])}
    else:
        keep, offsets = _present(part["ids"])
        offsets = pa.array(offsets)
        cols = {"query_id": qids,
                "item_ids": pa.ListArray.from_arrays(offsets, pa.array(part["ids"][keep].astype(np.int64))),
                "weights": pa.ListArray.from_arrays(offsets, floats(part["weights"][keep])),
                "out": vectors(part["out"]), "lse": floats(part["lse"]),
                "coverage": floats(part["coverage"])}
    return pa.RecordBatch.from_pydict(cols)


def write_results(path, mode, result, query_ids):
    """Write :func:`softretrieval.cli.score_batches`'s ``result`` (a dict of
    (B, ...) arrays) for ``mode`` to the Parquet file ``path``, atomically
    (a hidden temporary sibling, fsynced and renamed: a failure leaves
    ``path`` as it was). ``query_ids``: B ids, a pyarrow Array (any type)
    or anything ``pyarrow.array`` takes. Returns the path written.

    Layouts, by mode (slots without an item, id -1, are left out):

    * ``topk``: one row per (query, rank): ``query_id``, ``rank`` int32
      (0-based), ``item_id`` int64, ``score`` float32.
    * ``soft``: one row per query: ``query_id``, ``out``
      fixed_size_list<float32>, ``lse`` float32.
    * ``topk-attention``: one row per query: ``query_id``, ``item_ids``
      list<int64> and ``weights`` list<float32> (best first, the same
      length), ``out``, ``lse``, ``coverage`` float32.
    """
    pa, pq = require_pyarrow()
    path = os.fspath(path)
    if mode not in ("soft", "topk", "topk-attention"):
        raise ValueError(f"{path}: unknown mode {mode!r} (use soft, topk or topk-attention)")
    B = len(next(iter(result.values())))
    qids = query_ids if isinstance(query_ids, pa.Array) else pa.array(np.asarray(query_ids))
    if len(qids) != B:
        raise ValueError(f"{path}: {len(qids)} query ids for {B} result rows")
    width = max(arr[:1].size for arr in result.values())
    step = max(1, _CHUNK_VALUES // max(width, 1))

    def fill(f):
        batches = (_batch(pa, mode, result, qids, lo, min(B, lo + step)) for lo in range(0, max(B, 1), step))
        first = next(batches)
        with pq.ParquetWriter(f, first.schema) as writer:
            writer.write_batch(first)
            for batch in batches:
                writer.write_batch(batch)

    io.write_aside(path, fill)
    return path
