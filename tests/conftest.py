import json
import os

import numpy as np
import pytest

from softretrieval import config, datasets

# The CUDA simulator tests need NUMBA_ENABLE_CUDASIM=1 from process start:
# tests/test_cuda.py runs them in a subprocess so set.
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else ["cudasim"]

DATA = datasets.ROOT


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink every tile and split so tiny inputs cross tile and split edges."""
    monkeypatch.setattr(config, "QUERY_BLOCK", 8)
    monkeypatch.setattr(config, "KEY_TILE", 16)
    monkeypatch.setattr(config, "KEY_TILE_FEW", 8)
    monkeypatch.setattr(config, "FEW_TILE_SCORES", 0)
    monkeypatch.setattr(config, "FEW_QUERIES", 2)
    monkeypatch.setattr(config, "MIN_QUERIES_PER_THREAD", 4)
    monkeypatch.setattr(config, "MIN_KEYS_PER_SPLIT", 8)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def refuses_bad_meta():
    """``check(load, path)``: ``load`` (Index.load, KNNMemory.load) refuses the
    saved folder ``path`` when its meta.json names another format version or
    is not JSON, and refuses a folder that does not exist."""

    def check(load, path):
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps(dict(meta, version=99)))
        with pytest.raises(ValueError, match="version"):
            load(path)
        (path / "meta.json").write_text("{not json")
        with pytest.raises(ValueError, match="damaged"):
            load(path)
        with pytest.raises(ValueError, match="no meta.json"):
            load(path.parent / "missing")

    return check


def switched_off(flag, fn, *args, **kw):
    """``fn(*args, **kw)`` with the boolean ``config.<flag>`` set to False
    (e.g. ``BF16_FILTER``, ``MICRO_KERNELS``: the path a CPU without them
    takes), restored afterwards."""
    saved = getattr(config, flag)
    setattr(config, flag, False)
    try:
        return fn(*args, **kw)
    finally:
        setattr(config, flag, saved)


def saved_file(path, name):
    """The file of array ``name`` in the saved folder ``path`` (from its meta.json)."""
    meta = json.loads((path / "meta.json").read_text())
    return path / meta["files"][name]["file"]


def rewrite_meta(path, **fields):
    """Change fields of a saved folder's meta.json and re-sign it, as a buggy
    writer would: only the cross-checks of the arrays can catch it."""
    from softretrieval.persist import meta_checksum

    meta = dict(json.loads((path / "meta.json").read_text()), **fields)
    meta["checksum"] = meta_checksum(meta)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def minilm():
    """The shipped real MiniLM embeddings: base (7942, 384), queries (1000, 384), gt ids."""
    from softretrieval.io import read_fvecs, read_ivecs

    root = os.path.join(DATA, "minilm-pystdlib-384d")
    return {
        "base": read_fvecs(os.path.join(root, "base.fvecs")),
        "query": read_fvecs(os.path.join(root, "query.fvecs")),
        "gt": read_ivecs(os.path.join(root, "groundtruth.ivecs")),
        "gt_ip": read_fvecs(os.path.join(root, "groundtruth_ip_scores.fvecs")),
    }
