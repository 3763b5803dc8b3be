"""Atomic, checksummed folders of ``.npy`` arrays (the on-disk format of
:class:`softretrieval.Index` and :class:`softretrieval.KNNMemory`).

A saved object is a folder holding one ``.npy`` file per array and
``meta.json``::

    {"format": ..., "version": ..., ...the object's own fields,
     "files": {name: {"file": "name.<generation>.npy", "sha256", "dtype", "shape"}},
     "checksum": SHA-256 of everything above}

Every byte that decides what a load returns is covered by a checksum: the
arrays by their SHA-256 (``verify=False`` skips these, the cost is one read of
every file) and meta.json by its own (always checked), so an edited field or
a damaged file is refused, never read as something else.

Saving never destroys what is not ours and never leaves neither version:

* A new folder is written as a hidden sibling and renamed into place.
* An existing folder is replaced only if it is empty or is a saved object of
  the same format; anything else (a file, a folder of the user's) is refused
  with ``ValueError`` and left untouched. The new arrays are written beside
  the old ones under fresh generation names, then ``meta.json`` is replaced
  in one atomic rename, and only then are the old generation's files
  removed. A crash at any point leaves the old or the new object loadable;
  files of a crashed save are removed by the next save. Files in the folder
  that are not ours are never touched, and an object memory-mapped from the
  old files keeps working (their files are unlinked, not truncated).

Loading checks the format name and version, the meta checksum, that every
listed file exists with the recorded dtype and shape, and (``verify``) its
SHA-256, and raises ``ValueError`` naming the folder and the problem.
"""

import hashlib
import json
import os
import re
import uuid

import numpy as np

META = "meta.json"
#: Our own files in a saved folder: arrays of a generation, meta.json being written.
_OURS = re.compile(r"^(?:[a-z_]+\.[0-9a-f]{16}\.npy|meta\.json\.tmp-[0-9a-f]{16})$")


def save_folder(path, fmt, version, arrays, fields):
    """Write ``arrays`` (name -> array) and ``fields`` (JSON-serializable) as
    the saved object ``path`` (see the module docstring).

    Raises ValueError, changing nothing, when ``path`` exists and is neither
    an empty folder nor a saved ``fmt``.
    """
    path = os.fspath(path)
    old = _existing(path, fmt)
    if old is None:
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:16]}")
        os.makedirs(tmp)
        try:
            _write(tmp, fmt, version, arrays, fields)
            os.rename(tmp, path)
        except BaseException:
            _remove_tree(tmp)
            raise
        _sync_dir(os.path.dirname(os.path.abspath(path)))
        return
    written = []
    try:
        _write(path, fmt, version, arrays, fields, written)
    except BaseException:
        for file in written:
            _unlink(os.path.join(path, file))
        raise
    keep = set(written) | {META}
    for file in os.listdir(path):
        if file not in keep and (file in old or _OURS.match(file)):
            _unlink(os.path.join(path, file))


def _existing(path, fmt):
    """The files of the saved ``fmt`` at ``path`` (a set), None when ``path``
    does not exist; an empty folder gives an empty set. Anything else raises."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder: refusing to replace it with a "
                         f"saved {fmt} (nothing was changed)")
    names = os.listdir(path)
    if not names:
        return set()
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        if meta.get("format") == fmt:
            files = meta.get("files", {})
            return {info.get("file", f"{name}.npy") for name, info in files.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    raise ValueError(f"{path} exists and is not a saved {fmt}: refusing to write into it "
                     "(nothing was changed; choose a new path or an empty folder)")


def _write(folder, fmt, version, arrays, fields, written=None):
    """Write a new generation of files into ``folder``, then its meta.json
    (atomically replacing any old one). ``written`` collects the array
    files as they are created."""
    gen = uuid.uuid4().hex[:16]
    written = [] if written is None else written
    files = {}
    for name, arr in arrays.items():
        file = f"{name}.{gen}.npy"
        written.append(file)
        with open(os.path.join(folder, file), "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        files[name] = {"file": file, "sha256": sha256(os.path.join(folder, file)),
                       "dtype": np.dtype(arr.dtype).str, "shape": list(arr.shape)}
    meta = dict(fields, format=fmt, version=version, files=files)
    meta["checksum"] = meta_checksum(meta)
    tmp = os.path.join(folder, f"{META}.tmp-{gen}")
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, META))
    except BaseException:
        _unlink(tmp)
        raise
    _sync_dir(folder)


def load_folder(path, fmt, version, *, mmap=False, verify=True, legacy=()):
    """Read a folder written by :func:`save_folder`.

    Returns ``(meta, arrays)``. With ``mmap`` the arrays are memory-mapped
    copy-on-write: writes to them stay in memory, but changes that another
    program makes to the files show through (docs/guarantees.md). ``verify=False`` skips the files' checksums
    (meta.json's own, shapes and dtypes are still checked). ``legacy`` lists
    older versions that are still read: they name their files ``name.npy``
    and their meta.json carries no checksum.
    """
    path = os.fspath(path)
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{path}: not a saved {fmt} (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: meta.json is damaged: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or (
            meta.get("version") != version and meta.get("version") not in legacy):
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else meta
        raise ValueError(f"{path}: unsupported format {got!r} (expected {fmt!r} version {version})")
    if meta["version"] == version and meta.get("checksum") != meta_checksum(meta):
        raise ValueError(f"{path}: meta.json is damaged or was edited (its checksum does not match)")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: meta.json has no 'files' table")
    arrays = {}
    for name, info in files.items():
        try:
            file = os.path.join(path, info.get("file", f"{name}.npy"))
            expected = info["sha256"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: meta.json has a bad entry for {name}: {exc!r}") from None
        base = os.path.basename(file)
        if not os.path.isfile(file):
            raise ValueError(f"{path}: {base} is missing")
        if verify and sha256(file) != expected:
            raise ValueError(f"{path}: {base} is damaged or truncated (checksum mismatch)")
        try:
            arr = np.load(file, mmap_mode="c" if mmap else None, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: {base} cannot be read (truncated?): {exc}") from None
        if arr.dtype.str != info.get("dtype") or list(arr.shape) != info.get("shape"):
            raise ValueError(f"{path}: {base} holds {arr.dtype.str} {list(arr.shape)}, "
                             f"meta.json says {info.get('dtype')} {info.get('shape')}")
        arrays[name] = arr
    return meta, arrays


def meta_checksum(meta):
    """SHA-256 of meta.json's fields other than ``checksum``, as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _sync_dir(folder):
    """fsync a folder, so the renames in it survive a power loss (where the
    platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(file):
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass


def _remove_tree(folder):
    """Remove a temporary folder this module created (only our files in it)."""
    if not os.path.isdir(folder):
        return
    for file in os.listdir(folder):
        _unlink(os.path.join(folder, file))
    os.rmdir(folder)
