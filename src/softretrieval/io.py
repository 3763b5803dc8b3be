"""Readers for vector files: TEXMEX ``.fvecs`` / ``.ivecs`` and ``.npy``.

A TEXMEX file is a sequence of records ``int32 dim`` then ``dim`` values
(float32 for fvecs, int32 for ivecs), little-endian, every record with the
same ``dim``. The readers check the header and the file size and refuse a
truncated or inconsistent file with a ``ValueError`` naming it.
"""

import os

import numpy as np


def _read_vecs(path, dtype):
    size = os.path.getsize(path)
    if size < 4:
        raise ValueError(f"{path}: too short for a vector file ({size} bytes)")
    raw = np.fromfile(path, dtype="<i4")
    dim = int(raw[0])
    if dim <= 0:
        raise ValueError(f"{path}: bad dimension {dim} in the first record header")
    record = 4 * (dim + 1)
    if size % record:
        raise ValueError(f"{path}: size {size} is not a multiple of the record size "
                         f"{record} (dimension {dim}): truncated or not a vector file")
    rows = raw.reshape(-1, dim + 1)
    if (rows[:, 0] != dim).any():
        bad = int(np.flatnonzero(rows[:, 0] != dim)[0])
        raise ValueError(f"{path}: record {bad} has dimension {rows[bad, 0]}, expected {dim}")
    return np.ascontiguousarray(rows[:, 1:]).view(dtype)


def read_fvecs(path):
    """Read a ``.fvecs`` file as a (n, dim) float32 array."""
    return _read_vecs(path, np.float32)


def read_ivecs(path):
    """Read a ``.ivecs`` file as a (n, dim) int32 array."""
    return _read_vecs(path, np.int32)


def read_vectors(path):
    """Read ``.fvecs``, ``.ivecs`` or ``.npy`` by the file's extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".fvecs":
        return read_fvecs(path)
    if ext == ".ivecs":
        return read_ivecs(path)
    if ext == ".npy":
        return np.load(path, mmap_mode="r")
    raise ValueError(f"{path}: unknown vector file extension {ext!r} (use .fvecs, .ivecs or .npy)")
