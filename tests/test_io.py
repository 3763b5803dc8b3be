"""Vector file readers: round trips and damaged files."""

import numpy as np
import pytest

from softretrieval.io import read_fvecs, read_ivecs, read_vectors


def write_vecs(path, arr):
    arr = np.asarray(arr)
    rows = np.empty((arr.shape[0], arr.shape[1] + 1), np.int32)
    rows[:, 0] = arr.shape[1]
    rows[:, 1:] = arr.view(np.int32)
    rows.tofile(path)


def test_fvecs_round_trip(tmp_path, rng):
    x = rng.standard_normal((7, 5)).astype(np.float32)
    write_vecs(tmp_path / "a.fvecs", x)
    np.testing.assert_array_equal(read_fvecs(str(tmp_path / "a.fvecs")), x)
    np.testing.assert_array_equal(read_vectors(str(tmp_path / "a.fvecs")), x)


def test_ivecs_round_trip(tmp_path):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    write_vecs(tmp_path / "a.ivecs", x)
    np.testing.assert_array_equal(read_ivecs(str(tmp_path / "a.ivecs")), x)


def test_truncated_file_is_refused(tmp_path, rng):
    path = tmp_path / "t.fvecs"
    write_vecs(path, rng.standard_normal((4, 6)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_fvecs(str(path))
    path.write_bytes(data[:2])
    with pytest.raises(ValueError, match="too short"):
        read_fvecs(str(path))


def test_inconsistent_dimension_is_refused(tmp_path):
    path = tmp_path / "bad.fvecs"
    rows = np.zeros((2, 5), np.int32)
    rows[:, 0] = 4
    rows[1, 0] = 3
    rows.tofile(path)
    with pytest.raises(ValueError, match="record 1"):
        read_fvecs(str(path))
    np.array([0, 1, 2], np.int32).tofile(path)
    with pytest.raises(ValueError, match="dimension"):
        read_fvecs(str(path))


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        read_vectors(str(tmp_path / "x.bin"))


def test_shipped_minilm_files(minilm):
    assert minilm["base"].shape == (7942, 384) and minilm["query"].shape == (1000, 384)
    assert minilm["gt"].shape == (1000, 100)
    np.testing.assert_allclose(np.linalg.norm(minilm["base"], axis=1), 1, atol=1e-6)


def test_validate_faiss_script_runs_on_shipped_data(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import validate_faiss

    assert validate_faiss.main(["-k", "10"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[:3] == ["10", "1.00000", "1.00000"]
