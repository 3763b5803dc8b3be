"""Sharded index folders: :meth:`softretrieval.Index.save_shards` writes
them, :func:`read_manifest` and :func:`load_shard` read them.

A sharded index is a saved object of :mod:`softretrieval.persist` (atomic,
checksummed) whose children are ordinary index folders::

    catalog/
      meta.json                 the manifest: format "softretrieval.ShardedIndex",
                                dim, metric, dtype, value_dim, ntotal, ids
                                ("given", or "rows": items known by row number),
                                shards (names in catalog order), and per shard
                                (under "folders"): its folder, ntotal,
                                row_offset, id_min, id_max and the checksum
                                of its own meta.json
      shard-00000.<gen>/        an Index folder (Index.load reads it)
      shard-00001.<gen>/ ...

Shard i holds the catalog's items ``row_offset_i`` to ``row_offset_i +
ntotal_i - 1`` in order, with their ids (row numbers for an index without
ids), bias, values and, for far-from-origin "l2" data, the catalog's
``center``. The manifest's checksum covers every shard's meta.json checksum,
which covers every array's SHA-256: a shard folder replaced, edited or
damaged is refused by name.
"""

import os
from typing import List, NamedTuple, Optional

import numpy as np

from . import persist, validate

FORMAT = "softretrieval.ShardedIndex"
FORMAT_VERSION = 1


class ShardInfo(NamedTuple):
    """One shard as the manifest lists it."""

    name: str
    path: str            # its index folder
    ntotal: int
    row_offset: int      # its first item's row in the whole catalog
    id_min: Optional[int]
    id_max: Optional[int]
    checksum: str        # of its meta.json


class Manifest(NamedTuple):
    """A sharded index folder's manifest (see the module docstring)."""

    path: str
    dim: int
    metric: str
    dtype: str
    value_dim: Optional[int]
    ntotal: int
    ids: str             # "given" or "rows"
    shards: List[ShardInfo]
    checksum: str        # of the manifest (meta.json)


def split_sizes(ntotal, n_shards, sizes):
    """Item counts per shard: ``sizes`` checked (non-negative ints summing
    to ``ntotal``), or ``n_shards`` counts as equal as can be."""
    if (n_shards is None) == (sizes is None):
        raise ValueError("give n_shards or sizes (not both)")
    if sizes is None:
        n = validate.positive_int(n_shards, "n_shards")
        return [ntotal // n + (i < ntotal % n) for i in range(n)]
    counts = np.asarray(sizes)
    if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
        raise TypeError(f"sizes must be a non-empty 1-D sequence of ints, got {sizes!r}")
    if (counts < 0).any() or counts.sum() != ntotal:
        raise ValueError(f"sizes must be >= 0 and sum to the index's {ntotal} items, got {sizes!r}")
    return [int(c) for c in counts]


def split(index, n_shards=None, sizes=None):
    """``index``'s live items as consecutive in-memory shards: a list of
    ``(row_offset, Index)`` sharing the index's arrays (views when nothing
    was removed), and whether the index has ids of its own (if not, the
    shards get the items' row numbers as ids). Call under the index's lock."""
    from .index import Index

    arrays = index._arrays()
    n = index.ntotal
    given = "ids" in arrays
    arrays["ids"] = arrays["ids"] if given else np.arange(n, dtype=np.int64)
    parts = []
    lo = 0
    for count in split_sizes(n, n_shards, sizes):
        part = Index(index.dim, metric=index.metric, value_dim=index.value_dim, dtype=index.dtype)
        part._hold(count, {name: a if name == "center" else a[lo:lo + count]
                           for name, a in arrays.items()})
        parts.append((lo, part))
        lo += count
    return parts, given


def save(index, path, n_shards=None, sizes=None):
    """Write ``index``'s live items as a sharded folder (module docstring);
    called by :meth:`Index.save_shards` under the index's lock."""
    from .index import FORMAT as INDEX_FORMAT, FORMAT_VERSION as INDEX_VERSION

    parts, given = split(index, n_shards, sizes)

    def writer(lo, part):
        def write(folder):
            part.save(folder)
            meta = persist.read_meta(folder, INDEX_FORMAT, INDEX_VERSION)
            ids = part.ids
            return {"ntotal": len(part), "row_offset": lo, "checksum": meta["checksum"],
                    "id_min": int(ids.min()) if len(ids) else None,
                    "id_max": int(ids.max()) if len(ids) else None}
        return write

    folders = {f"shard-{i:05d}": writer(lo, part) for i, (lo, part) in enumerate(parts)}
    fields = {"dim": index.dim, "metric": index.metric, "dtype": index.dtype,
              "value_dim": index.value_dim, "ntotal": index.ntotal,
              "ids": "given" if given else "rows", "shards": list(folders)}
    persist.save_folder(path, FORMAT, FORMAT_VERSION, {}, fields, folders=folders)


def read_manifest(path) -> Manifest:
    """The manifest of the sharded folder ``path``, checked: its checksum,
    its fields, and that the shards' counts and offsets tile the catalog.
    Raises ValueError naming the folder. Shard paths are absolute (workers
    may run in another directory)."""
    path = os.path.abspath(os.fspath(path))
    meta, _ = persist.load_folder(path, FORMAT, FORMAT_VERSION)
    field = lambda name, kind: persist.field(meta, path, name, kind)  # noqa: E731
    names = field("shards", list)
    folders = meta.get("folders", {})
    if not names or sorted(names) != sorted(folders):
        raise ValueError(f"{path}: the manifest's shard list does not match its folders")
    shards = []
    row = 0
    for name in names:
        info = folders[name]
        sub = lambda f, kind: persist.field(info, f"{path} ({name})", f, kind)  # noqa: E731
        shard = ShardInfo(name, os.path.join(path, persist.folder_of(meta, name)),
                          sub("ntotal", int), sub("row_offset", int), info.get("id_min"),
                          info.get("id_max"), sub("checksum", str))
        if shard.ntotal < 0:
            raise ValueError(f"{path}: shard {name} lists {shard.ntotal} items")
        if shard.row_offset != row:
            raise ValueError(f"{path}: shard {name} lists rows from {shard.row_offset}, expected {row}")
        row += shard.ntotal
        shards.append(shard)
    value_dim = meta.get("value_dim")
    manifest = Manifest(path, field("dim", int), field("metric", str), field("dtype", str),
                        None if value_dim is None else field("value_dim", int), field("ntotal", int),
                        field("ids", str), shards, meta["checksum"])
    if manifest.ids not in ("given", "rows"):
        raise ValueError(f"{path}: the manifest's ids field is {manifest.ids!r}, not 'given' or 'rows'")
    if row != manifest.ntotal:
        raise ValueError(f"{path}: the manifest's shards hold {row} items, it says {manifest.ntotal}")
    return manifest


def load_shard(manifest, i, *, mmap=True, verify=True):
    """Shard ``i`` of ``manifest`` as an :class:`softretrieval.Index`,
    checked against the manifest: its meta.json checksum, its arrays'
    checksums (``verify``), its size, dimension, metric, dtype, value_dim
    and id range, and for an index known by row numbers, that its ids are
    its rows in the catalog. Raises ValueError naming the shard."""
    from .index import FORMAT as INDEX_FORMAT, FORMAT_VERSION as INDEX_VERSION, Index

    shard = manifest.shards[i]
    where = f"shard {shard.name} of {manifest.path}"
    try:
        meta = persist.read_meta(shard.path, INDEX_FORMAT, INDEX_VERSION)
        if meta["checksum"] != shard.checksum:
            raise ValueError(f"{shard.path}: its meta.json is not the one the manifest lists "
                             "(the folder was replaced or edited)")
        index = Index.load(shard.path, mmap=mmap, verify=verify)
    except ValueError as exc:
        raise ValueError(f"{where} is refused: {exc}") from None
    ids = index.ids
    found = (len(index), index.dim, index.metric, index.dtype, index.value_dim,
             None if ids is None or not len(ids) else int(ids.min()),
             None if ids is None or not len(ids) else int(ids.max()))
    expected = (shard.ntotal, manifest.dim, manifest.metric, manifest.dtype, manifest.value_dim,
                shard.id_min, shard.id_max)
    if ids is None or found != expected:
        raise ValueError(f"{where} is refused: it holds (items, dim, metric, dtype, value_dim, "
                         f"id_min, id_max) = {found}, the manifest says {expected}")
    if manifest.ids == "rows" and not np.array_equal(ids, np.arange(shard.row_offset,
                                                                    shard.row_offset + len(ids))):
        raise ValueError(f"{where} is refused: its ids are not its rows {shard.row_offset} to "
                         f"{shard.row_offset + len(ids) - 1} in the catalog")
    return index
