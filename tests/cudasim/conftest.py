"""Tests of the CUDA kernels under numba-cuda's simulator.

They run only with ``NUMBA_ENABLE_CUDASIM=1`` (``tests/test_cuda.py`` runs
them in a subprocess so set), with every CUDA tunable shrunk so tiny inputs
cross block, tile and split edges. ``rng`` and the ``reference`` module come
from ``tests/`` (its conftest is loaded first).
"""

import pytest

from softretrieval import config


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_QUERY_BLOCK", 4)
    monkeypatch.setattr(config, "CUDA_DECODE_ROWS", 4)
    monkeypatch.setattr(config, "CUDA_DECODE_THREADS", 8)
    monkeypatch.setattr(config, "CUDA_TILE_ROWS", 8)
    monkeypatch.setattr(config, "CUDA_TILE_THREADS", 16)
    monkeypatch.setattr(config, "CUDA_MICRO", 2)
    monkeypatch.setattr(config, "CUDA_CHUNK", 4)
    monkeypatch.setattr(config, "CUDA_MIN_BLOCKS", 6)
    monkeypatch.setattr(config, "CUDA_MIN_KEYS_PER_SPLIT", 8)
    monkeypatch.setattr(config, "CUDA_BACKWARD_KEYS", 4)
    monkeypatch.setattr(config, "CUDA_BACKWARD_ROWS", 3)
