"""Tests of the CUDA kernels under numba-cuda's simulator.

They run only with ``NUMBA_ENABLE_CUDASIM=1`` (``tests/test_cuda.py`` runs
them in a subprocess so set), with every CUDA tunable shrunk so tiny inputs
cross block, tile and split edges.
"""

import os
import sys

import numpy as np
import pytest

from softretrieval import config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_QUERY_BLOCK", 4)
    monkeypatch.setattr(config, "CUDA_KEY_TILE", 8)
    monkeypatch.setattr(config, "CUDA_MIN_BLOCKS", 6)
    monkeypatch.setattr(config, "CUDA_MIN_KEYS_PER_SPLIT", 8)


@pytest.fixture
def rng():
    return np.random.default_rng(7)
