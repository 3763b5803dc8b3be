"""Atomic, checksummed folders of ``.npy`` arrays (the on-disk format of
:class:`softretrieval.Index` and :class:`softretrieval.KNNMemory`).

A saved object is a folder holding one ``.npy`` file per array, optionally
child saved objects in subfolders (the shards of a sharded index), and
``meta.json``::

    {"format": ..., "version": ..., ...the object's own fields,
     "files": {name: {"file": "name.<generation>.npy", "sha256", "dtype", "shape"}},
     "folders": {name: {"folder": "name.<generation>", ...what its writer returned}},
     "checksum": SHA-256 of everything above}

A child folder is written like the arrays (under a fresh generation name,
before meta.json is replaced) and removed like them; what it records (e.g.
its own meta.json checksum) is covered by the parent's checksum.

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
  what a crashed save made (listed in its journal ``meta.json.pending``, or
  a hidden sibling folder whose lock is free) is removed by the next save to
  that path. Files in the folder that are not ours are never touched, and
  an object memory-mapped from the old files keeps working (their files are
  unlinked, not truncated). Saves to one path are serialized by an advisory
  lock on the folder.

Loading checks the format name and version, the meta checksum, that every
listed file exists with the recorded dtype and shape, and (``verify``) its
SHA-256, and raises ``ValueError`` naming the folder and the problem.
"""

import contextlib
import hashlib
import json
import os
import time
import uuid

import numpy as np

META = "meta.json"
#: Journal of an in-place save: the files it is about to create and those it
#: replaces (if it crashes, the next save removes those that meta.json does
#: not list).
PENDING = "meta.json.pending"


def save_folder(path, fmt, version, arrays, fields, legacy=(), checked=(), folders=None):
    """Write ``arrays`` (name -> array) and ``fields`` (JSON-serializable) as
    the saved object ``path`` (see the module docstring). ``folders`` (name
    -> writer) adds child folders: ``writer(folder_path)`` writes a saved
    object at the new path ``folder_path`` and returns a JSON-serializable
    dict recorded under ``meta["folders"][name]``.

    Raises ValueError, changing nothing, when ``path`` exists and is neither
    an empty folder nor an intact saved ``fmt`` (of ``version`` or one of
    the ``legacy`` or ``checked`` versions). Saves to one path are serialized by a lock on
    the folder (and on a new folder while it is written).
    """
    path = _path(path)
    parent = os.path.dirname(os.path.abspath(path))
    _remove_stale_temporaries(parent, os.path.basename(path))
    folders = folders or {}
    if not os.path.lexists(path):
        _save_new(path, parent, fmt, version, arrays, fields, folders)
        return
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder: refusing to replace it with a "
                         f"saved {fmt} (nothing was changed)")
    with _locked(path):
        old = _existing(path, fmt, version, legacy, checked)
        pending = os.path.join(path, PENDING)
        if os.path.lexists(pending):
            # A save that crashed: of the files it made and the files it was
            # to replace, remove those the current meta.json does not list.
            for file in _read_pending(pending) - old:
                _discard(path, file)
            _unlink(pending)
        gen = uuid.uuid4().hex[:16]
        new = ({f"{name}.{gen}.npy" for name in arrays} | {f"{name}.{gen}" for name in folders}
               | {f"{META}.tmp-{gen}"})
        _write_json(pending, sorted(new | old))
        try:
            _write(path, fmt, version, arrays, fields, gen, folders)
        except BaseException:
            for file in new:
                _discard(path, file)
            _unlink(pending)
            raise
        for file in old - new:
            _discard(path, file)
        _unlink(pending)


def _path(path):
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not path:
        raise ValueError("path must not be empty")
    return path


def _save_new(path, parent, fmt, version, arrays, fields, folders):
    """A new folder: written as a locked hidden sibling, then renamed into place.

    The sibling is made under a name no cleaner looks at, locked, and only
    then given its ``.tmp-`` name (the lock follows the folder), so another
    save's :func:`_remove_stale_temporaries` never takes it for a dead one.
    """
    hexid = uuid.uuid4().hex[:16]
    fresh = os.path.join(parent, f".{os.path.basename(path)}.new-{hexid}")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{hexid}")
    os.makedirs(fresh)
    try:
        with _locked(fresh):
            os.rename(fresh, tmp)
            _write(tmp, fmt, version, arrays, fields, uuid.uuid4().hex[:16], folders)
            try:
                os.rename(tmp, path)
            except OSError:
                if os.path.lexists(path):
                    raise ValueError(f"{path} was created by someone else during this save: "
                                     "nothing was changed") from None
                raise
    except BaseException:
        _remove_tree(fresh)
        _remove_tree(tmp)
        raise
    _sync_dir(parent)


def _discard(folder, name):
    """Remove the file or child folder ``name`` of ``folder`` that a save of
    ours made (a child folder as :func:`_remove_saved` does, with the hidden
    siblings of its own save)."""
    target = os.path.join(folder, name)
    if os.path.isdir(target) and not os.path.islink(target):
        _remove_saved(target)
    elif os.path.isfile(target):
        _unlink(target)
    _remove_stale_temporaries(folder, name, dead=True)


def _remove_saved(folder):
    """Remove a child saved object: the files its meta.json lists, its own
    child folders likewise, its meta.json (last), and the folder if nothing
    else is left in it. Files of yours inside it survive (and keep the
    folder); a folder whose meta.json fails its checksum is left as it is,
    and one without meta.json (a removal cut short after it) is removed only
    if empty."""
    listed = _listed(folder)
    if listed is None:
        return
    files, children = listed
    for file in files:
        _unlink(os.path.join(folder, file))
    for child in children:
        _discard(folder, child)
    _unlink(os.path.join(folder, PENDING))
    _unlink(os.path.join(folder, META))
    try:
        os.rmdir(folder)
    except OSError:
        pass


def _listed(folder):
    """``(files, child folders)`` that the meta.json of ``folder`` lists,
    checked by its checksum; ``([], [])`` without a meta.json; None when it
    cannot be trusted."""
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError, RecursionError):
        return None
    try:
        if (meta.get("checksum") != meta_checksum(meta) or not isinstance(meta.get("files"), dict)
                or not isinstance(meta.get("folders", {}), dict)):
            return None
        return ([_file_of(name, info) for name, info in meta["files"].items()],
                [folder_of(meta, name) for name in meta.get("folders", {})])
    except (ValueError, TypeError, AttributeError):
        return None


def _remove_stale_temporaries(parent, name, dead=False):
    """Remove the hidden folders of saves to ``parent/name`` that died before
    their rename: ``.tmp-`` folders whose lock is free (a save in progress
    holds its lock), and empty ``.new-`` folders older than a minute (a live
    one is renamed microseconds after it is made). ``dead``: every such
    folder (a child of a save that ended, removed under its parent's lock)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        folder = os.path.join(parent, entry)
        kind = entry[len(name) + 2:len(name) + 6]
        if not (entry.startswith(f".{name}.") and kind in ("tmp-", "new-")
                and len(entry) == len(name) + 22 and os.path.isdir(folder)
                and not os.path.islink(folder)):
            continue
        try:
            if dead:
                _remove_tree(folder)
                continue
            if kind == "new-":
                if time.time() - os.stat(folder).st_mtime > 60 and not os.listdir(folder):
                    os.rmdir(folder)
                continue
            with _locked(folder, wait=False):
                _remove_tree(folder)
        except OSError:       # (BlockingIOError included: a save in progress)
            continue


@contextlib.contextmanager
def _locked(folder, wait=True):
    """An exclusive advisory lock on ``folder`` (``fcntl.flock`` on the
    folder itself: no lock file). ``wait=False`` raises BlockingIOError when
    another process holds it. No-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def _existing(path, fmt, version, legacy, checked=()):
    """The files of the intact saved ``fmt`` at the folder ``path`` (a set);
    an empty folder gives an empty set. Anything else raises ValueError."""
    names = os.listdir(path)
    if not names:
        return set()
    try:
        meta = _read_meta(path, fmt, version, legacy, checked)
    except ValueError as exc:
        raise ValueError(f"{path} exists and is not an intact saved {fmt}: refusing to write into "
                         f"it (nothing was changed; choose a new path or an empty folder): "
                         f"{exc}") from None
    return ({_file_of(name, info) for name, info in meta["files"].items()}
            | {folder_of(meta, name) for name in meta.get("folders", {})})


def _file_of(name, info):
    """The file name of array ``name`` (legacy folders: ``name.npy``)."""
    file = info.get("file", f"{name}.npy")
    if not isinstance(file, str) or os.path.basename(file) != file or not file.endswith(".npy"):
        raise ValueError(f"meta.json has a bad file name for {name}: {file!r}")
    return file


def folder_of(meta, name):
    """The subfolder name of child ``name`` in a checked ``meta``."""
    folder = meta["folders"][name].get("folder")
    if (not isinstance(folder, str) or os.path.basename(folder) != folder or folder in ("", ".", "..")
            or not folder.startswith(f"{name}.")):
        raise ValueError(f"meta.json has a bad folder name for {name}: {folder!r}")
    return folder


def _read_pending(pending):
    try:
        with open(pending) as f:
            files = json.load(f)
        return {f for f in files if isinstance(f, str) and os.path.basename(f) == f
                and f not in (META, PENDING)}
    except (OSError, ValueError, TypeError, RecursionError):
        return set()


def _write_json(file, obj):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _write(folder, fmt, version, arrays, fields, gen, folders):
    """Write generation ``gen`` of the array files and child folders into
    ``folder``, then its meta.json (atomically replacing any old one)."""
    files = {}
    for name, arr in arrays.items():
        file = f"{name}.{gen}.npy"
        with open(os.path.join(folder, file), "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        files[name] = {"file": file, "sha256": sha256(os.path.join(folder, file)),
                       "dtype": np.dtype(arr.dtype).str, "shape": list(arr.shape)}
    meta = dict(fields, format=fmt, version=version, files=files)
    if folders:
        meta["folders"] = {}
        for name, writer in folders.items():
            child = f"{name}.{gen}"
            meta["folders"][name] = dict(writer(os.path.join(folder, child)), folder=child)
    meta["checksum"] = meta_checksum(meta)
    tmp = os.path.join(folder, f"{META}.tmp-{gen}")
    try:
        _write_json(tmp, meta)
        os.replace(tmp, os.path.join(folder, META))
    except BaseException:
        _unlink(tmp)
        raise
    _sync_dir(folder)


def load_folder(path, fmt, version, *, mmap=False, verify=True, legacy=(), checked=()):
    """Read a folder written by :func:`save_folder`.

    Returns ``(meta, arrays)``. With ``mmap`` the arrays are memory-mapped
    copy-on-write: writes to them stay in memory, but changes that another
    program makes to the files show through (docs/guarantees.md).
    ``verify=False`` skips the files' checksums (meta.json's own, shapes and
    dtypes are still checked). ``legacy`` lists older versions that are
    still read: they name their files ``name.npy`` and their meta.json
    carries no checksum; ``checked`` lists older versions in today's layout
    (checksummed files and meta.json), read as the current one. A load that races a save replacing the folder
    reads the new generation (it retries when meta.json changed under it).
    """
    path = _path(path)
    for attempt in range(_RETRIES):
        meta = _read_meta(path, fmt, version, legacy, checked)
        try:
            return meta, _load_arrays(path, meta, mmap, verify)
        except ValueError:
            try:
                changed = _read_meta(path, fmt, version, legacy, checked) != meta
            except ValueError:
                changed = True
            if not changed or attempt == _RETRIES - 1:
                raise


_RETRIES = 5


def read_meta(path, fmt, version, legacy=(), checked=()):
    """meta.json of the saved ``fmt`` at ``path``, checked as a load checks
    it (format, version, its checksum); the arrays are not read."""
    return _read_meta(_path(path), fmt, version, legacy, checked)


def _read_meta(path, fmt, version, legacy, checked=()):
    """meta.json of the folder ``path``, checked: format, version (or a legacy
    one: no checksum, files named ``name.npy``), its checksum, a files table."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{path}: not a saved {fmt} (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: meta.json is damaged: {str(exc)[:200]}") from None
    except OSError as exc:
        raise ValueError(f"{path}: meta.json cannot be read: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or (
            meta.get("version") not in (version,) + tuple(checked) + tuple(legacy)):
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta)
        raise ValueError(f"{path}: unsupported format {got!r} (expected {fmt!r} version {version})")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(i, dict) for i in files.values()):
        raise ValueError(f"{path}: meta.json has no valid 'files' table")
    folders = meta.get("folders", {})
    if not isinstance(folders, dict) or not all(isinstance(i, dict) for i in folders.values()):
        raise ValueError(f"{path}: meta.json has no valid 'folders' table")
    if meta["version"] == version or meta["version"] in checked:
        if meta.get("checksum") != meta_checksum(meta):
            raise ValueError(f"{path}: meta.json is damaged or was edited (its checksum does not "
                             "match)")
    elif "checksum" in meta or "folders" in meta or any("file" in info for info in files.values()):
        raise ValueError(f"{path}: meta.json is damaged or was edited (version {meta['version']} "
                         "with the fields of a later one)")
    return meta


def _load_arrays(path, meta, mmap, verify):
    arrays = {}
    for name, info in meta["files"].items():
        try:
            base = _file_of(name, info)
            expected = info["sha256"]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: meta.json has a bad entry for {name}: {exc}") from None
        file = os.path.join(path, base)
        try:
            if verify and sha256(file) != expected:
                raise ValueError(f"{path}: {base} is damaged or truncated (checksum mismatch)")
            if not os.path.isfile(file):
                raise FileNotFoundError(file)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # (also when a racing save removes it after meta.json was read: the caller retries)
            raise ValueError(f"{path}: {base} is missing") from None
        except OSError as exc:
            raise ValueError(f"{path}: {base} cannot be read: {exc}") from None
        try:
            arr = np.load(file, mmap_mode="c" if mmap else None, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: {base} cannot be read (truncated?): {exc}") from None
        if arr.dtype.str != info.get("dtype") or list(arr.shape) != info.get("shape"):
            raise ValueError(f"{path}: {base} holds {arr.dtype.str} {list(arr.shape)}, "
                             f"meta.json says {info.get('dtype')} {info.get('shape')}")
        arrays[name] = arr
    for name in meta.get("folders", {}):
        if not os.path.isdir(os.path.join(path, folder_of(meta, name))):
            raise ValueError(f"{path}: the folder {folder_of(meta, name)} of {name} is missing")
    return arrays


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
    """Remove a temporary folder this module created (a save's hidden folder,
    its child folders included): everything in it is ours."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return
    for name in os.listdir(folder):
        entry = os.path.join(folder, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            _remove_tree(entry)
        else:
            _unlink(entry)
    os.rmdir(folder)
