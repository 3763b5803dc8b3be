"""Vector files: readers for ``.npy``, TEXMEX ``.fvecs`` / ``.ivecs`` /
``.bvecs`` and ann-benchmarks ``.h5`` / ``.hdf5``; writers for ``.npy``,
``.npz``, ``.fvecs`` and ``.ivecs``.

A TEXMEX file is a sequence of records ``int32 dim`` then ``dim`` values
(float32 for fvecs, int32 for ivecs, uint8 for bvecs), little-endian, every
record with the same ``dim``. The readers check the header and the file size
and refuse a truncated or inconsistent file with a ``ValueError`` naming it.
An HDF5 file in the ann-benchmarks layout holds the datasets ``train`` (the
base vectors), ``test`` (the queries) and ``neighbors`` (ground-truth ids);
name one as ``FILE.hdf5:train`` (reading needs the optional ``h5py``:
``pip install "softretrieval[hdf5]"``). Writers write aside and rename, so an
interrupted write never leaves a half-written output.
"""

import os
import uuid

import numpy as np

_VECS = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
INT32_MAX = np.iinfo(np.int32).max
_HDF5 = (".h5", ".hdf5")


def _read_vecs(path, dtype):
    size = os.path.getsize(path)
    if size < 4:
        raise ValueError(f"{path}: too short for a vector file ({size} bytes)")
    dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if dim <= 0:
        raise ValueError(f"{path}: bad dimension {dim} in the first record header")
    record = 4 + dim * dtype.itemsize
    if size % record:
        raise ValueError(f"{path}: size {size} is not a multiple of the record size "
                         f"{record} (dimension {dim}): truncated or not a vector file")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    heads = raw[:, :4].copy().view("<i4")[:, 0]
    if (heads != dim).any():
        bad = int(np.flatnonzero(heads != dim)[0])
        raise ValueError(f"{path}: record {bad} has dimension {heads[bad]}, expected {dim}")
    return np.ascontiguousarray(raw[:, 4:]).view(dtype).astype(dtype.newbyteorder("="))


def read_fvecs(path):
    """Read a ``.fvecs`` file as a (n, dim) float32 array."""
    return _read_vecs(path, _VECS[".fvecs"])


def read_ivecs(path):
    """Read a ``.ivecs`` file as a (n, dim) int32 array."""
    return _read_vecs(path, _VECS[".ivecs"])


def read_bvecs(path):
    """Read a ``.bvecs`` file as a (n, dim) uint8 array."""
    return _read_vecs(path, _VECS[".bvecs"])


def split_dataset(spec, default=None):
    """``"FILE.hdf5:name"`` -> ``("FILE.hdf5", "name")``; other paths get ``default``."""
    spec = os.fspath(spec)
    base, sep, name = spec.rpartition(":")
    if sep and os.path.splitext(base)[1].lower() in _HDF5:
        return base, name
    return spec, default


def read_hdf5(path, name):
    """Dataset ``name`` of an HDF5 file as a numpy array (needs h5py)."""
    try:
        import h5py
    except ImportError:
        raise ValueError(f"{path}: reading HDF5 needs h5py: pip install \"softretrieval[hdf5]\"") from None
    try:
        with h5py.File(path, "r") as f:
            if name not in f:
                raise ValueError(f"{path}: no dataset {name!r} (it has {sorted(f.keys())})")
            return f[name][()]
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file: {exc}") from None


def read_npy(path):
    """A ``.npy`` file memory-mapped read-only; ValueError naming the file for
    anything else (truncated, an ``.npz`` archive, pickled objects)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy file (truncated?): {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: not a .npy array file (an .npz archive?)")
    return arr


def read_vectors(spec, dataset=None):
    """Read a (n, dim) array by the file's extension.

    ``.npy`` is memory-mapped (read-only); ``.fvecs`` / ``.ivecs`` /
    ``.bvecs`` are read whole; ``.h5`` / ``.hdf5`` read the dataset named by
    ``FILE.hdf5:name`` or else ``dataset``. Raises ValueError for a missing,
    unknown, truncated or inconsistent file, naming it.
    """
    path, name = split_dataset(spec, dataset)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in _VECS:
        arr = _read_vecs(path, _VECS[ext])
    elif ext == ".npy":
        arr = read_npy(path)
    elif ext in _HDF5:
        if name is None:
            raise ValueError(f"{path}: name the HDF5 dataset as {path}:train (or :test, :neighbors)")
        arr = read_hdf5(path, name)
    else:
        raise ValueError(f"{path}: unknown vector file extension {ext!r} "
                         "(use .npy, .fvecs, .ivecs, .bvecs, .h5 or .hdf5)")
    if arr.ndim != 2:
        raise ValueError(f"{spec}: expected a 2-D array of vectors, got shape {arr.shape}")
    return arr


def write_aside(path, fill):
    """Write ``path`` atomically: ``fill(f)`` writes into a hidden temporary
    sibling opened ``"wb"``, which is flushed, fsynced and renamed over
    ``path``. On any failure (an interrupt included) the temporary file is
    removed and ``path`` is left as it was."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_output(path, arrays):
    """Write named arrays to ``path`` by its extension, atomically.

    ``.npz``: every array; ``.npy``, ``.fvecs``, ``.ivecs``: the first
    (2-D; fvecs stores float32, ivecs int32). Returns the path written.
    Raises ValueError, writing nothing, when the array does not fit the
    format (``.ivecs``: anything but integers within int32; ``.fvecs``:
    values beyond float32).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".npz", ".fvecs", ".ivecs"):
        raise ValueError(f"{path}: unknown output extension {ext!r} (use .npy, .npz, .fvecs or .ivecs)")
    first = np.asarray(next(iter(arrays.values())))
    if ext == ".ivecs" and first.size and (first.dtype.kind not in "iu" or (
            first.min() < np.iinfo(np.int32).min or first.max() > INT32_MAX)):
        raise ValueError(f"{path}: .ivecs holds 32-bit integers; these values ({first.dtype}, up to "
                         f"{first.max() if first.size else 0}) do not fit: write .npy or .npz")
    with np.errstate(over="ignore"):
        overflows = first.size and np.isfinite(first).all() and not np.isfinite(
            first.astype(np.float32)).all()
    if ext == ".fvecs" and overflows:
        raise ValueError(f"{path}: values beyond the float32 range of .fvecs: write .npy or .npz")
    def fill(f):
        if ext == ".npz":
            np.savez(f, **arrays)
        elif ext == ".npy":
            np.save(f, first)
        else:
            dtype = _VECS[ext]
            rows = np.asarray(first).reshape(len(first), -1)
            rec = np.empty((rows.shape[0], rows.shape[1] + 1), dtype)
            width = np.array(rows.shape[1], np.int32)
            rec[:, 0] = width.view(dtype) if ext == ".fvecs" else width
            rec[:, 1:] = rows
            rec.tofile(f)

    write_aside(path, fill)
    return path
