"""Datasets: the real data shipped inside the package (``softretrieval/data/``,
so an installed wheel has it too), and seeded synthetic catalogs for
million-key benchmarks.

Shipped (see ``softretrieval/data/README.md`` for provenance and licences):

* ``minilm``: 7,942 base and 1,000 query MiniLM-L6 sentence embeddings
  (384-d, unit norm) with exact top-100 ground truth by inner product.
"""

import os

import numpy as np

from . import io

#: The shipped data folder, inside the package.
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_MINILM = "minilm-pystdlib-384d"


def minilm_paths(root=None, root_name="root"):
    """Paths of the shipped MiniLM files: a dict with ``base``, ``query``,
    ``groundtruth`` (ids, .ivecs) and ``groundtruth_ip_scores`` (.fvecs).
    ``root``: a folder holding ``minilm-pystdlib-384d/`` instead of the
    package's; ``root_name`` names that option in the error message."""
    folder = os.path.join(root or ROOT, _MINILM)
    paths = {"base": "base.fvecs", "query": "query.fvecs", "groundtruth": "groundtruth.ivecs",
             "groundtruth_ip_scores": "groundtruth_ip_scores.fvecs"}
    paths = {name: os.path.join(folder, file) for name, file in paths.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        where = "the folder given" if root else "the installed package (a damaged install?)"
        raise ValueError(f"shipped dataset not found: {missing[0]} is missing from {where}; "
                         f"{root_name} names a folder that holds {_MINILM}/")
    return paths


def load_minilm(root=None):
    """The shipped MiniLM data: ``base`` (7942, 384) float32, ``query``
    (1000, 384) float32, ``groundtruth`` (1000, 100) int32 ids by inner
    product (best first) and ``groundtruth_ip_scores`` (1000, 100) float32."""
    return {name: io.read_vectors(path) for name, path in minilm_paths(root).items()}


def clustered(n, dim, *, clusters=256, spread=0.5, unit=True, seed=0, centers_seed=None):
    """``n`` seeded vectors (n, dim) float32 from a Gaussian mixture.

    Each vector is a random one of ``clusters`` centers (unit vectors drawn
    with ``centers_seed``, default ``seed``) plus isotropic noise of total
    norm about ``spread``; ``unit`` normalizes the rows (as embedding models
    do). Real catalogs are clustered, so softmax mass concentrates on a few
    keys as it does on real data, unlike i.i.d. Gaussian keys. Generated in
    chunks, so a million rows need no more than the output's memory.
    """
    rs = np.random.default_rng(seed if centers_seed is None else centers_seed)
    centers = rs.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1])
    out = np.empty((n, dim), np.float32)
    noise = np.float32(spread / np.sqrt(dim))
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        rows = centers[rng.integers(0, clusters, hi - lo)]
        rows += noise * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        if unit:
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[lo:hi] = rows
    return out


def catalog(n_items, n_queries, dim, *, clusters=256, spread=0.5, seed=0):
    """A synthetic two-tower catalog: ``(items (n_items, dim), queries
    (n_queries, dim))`` float32 unit vectors from the same mixture centers
    (so queries have near neighbours), with independent noise."""
    items = clustered(n_items, dim, clusters=clusters, spread=spread, seed=seed)
    queries = clustered(n_queries, dim, clusters=clusters, spread=spread, seed=seed + 1,
                        centers_seed=seed)
    return items, queries
