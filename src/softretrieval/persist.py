"""Atomic, checksummed folders of ``.npy`` arrays (the on-disk format of
:class:`softretrieval.Index` and :class:`softretrieval.KNNMemory`).

A saved object is a folder holding one ``.npy`` file per array and
``meta.json``: ``{"format": ..., "version": ..., "files": {name: {"sha256",
"dtype", "shape"}}, ...the object's own fields}``. Saving writes a sibling
folder, fsyncs it, and renames it into place, so an interrupted save never
leaves a folder that loads. Loading checks the format name and version, that
every listed file exists with the recorded dtype and shape, and its SHA-256,
and raises ``ValueError`` naming the folder and the problem otherwise.
"""

import hashlib
import json
import os
import shutil
import uuid

import numpy as np


def save_folder(path, fmt, version, arrays, fields):
    """Write ``arrays`` (name -> array, saved as ``name.npy``) and ``fields``
    (JSON-serializable) to the folder ``path`` atomically, replacing it."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    try:
        files = {}
        for name, arr in arrays.items():
            file = os.path.join(tmp, f"{name}.npy")
            with open(file, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            files[name] = {"sha256": sha256(file), "dtype": np.dtype(arr.dtype).str,
                           "shape": list(arr.shape)}
        meta = dict(fields, format=fmt, version=version, files=files)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_folder(path, fmt, version, *, mmap=False, verify=True):
    """Read a folder written by :func:`save_folder`.

    Returns ``(meta, arrays)``. With ``mmap`` the arrays are memory-mapped
    copy-on-write (never written back to the file). ``verify=False`` skips
    the checksums (shapes and dtypes are still checked); the cost of
    ``verify`` is one read of every file.
    """
    path = os.fspath(path)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{path}: not a saved {fmt} (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: meta.json is damaged: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("version") != version:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else meta
        raise ValueError(f"{path}: unsupported format {got!r} (expected {fmt!r} version {version})")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: meta.json has no 'files' table")
    arrays = {}
    for name, info in files.items():
        file = os.path.join(path, f"{name}.npy")
        if not os.path.exists(file):
            raise ValueError(f"{path}: {name}.npy is missing")
        try:
            expected = info["sha256"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: meta.json has a bad entry for {name}: {exc}") from None
        if verify and sha256(file) != expected:
            raise ValueError(f"{path}: {name}.npy is damaged or truncated (checksum mismatch)")
        try:
            arr = np.load(file, mmap_mode="c" if mmap else None, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: {name}.npy cannot be read (truncated?): {exc}") from None
        if arr.dtype.str != info.get("dtype") or list(arr.shape) != info.get("shape"):
            raise ValueError(f"{path}: {name}.npy holds {arr.dtype.str} {list(arr.shape)}, "
                             f"meta.json says {info.get('dtype')} {info.get('shape')}")
        arrays[name] = arr
    return meta, arrays


def field(meta, path, name, kind):
    """``meta[name]`` checked to be of ``kind`` (a type or tuple of types)."""
    value = meta.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{path}: meta.json field {name!r} is missing or invalid ({value!r})")
    return value


def sha256(file):
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
