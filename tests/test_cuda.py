"""The CUDA target without a GPU: the simulator suite, PTX for real GPUs, and
the errors of device="cuda" where no GPU is."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import devices

numba_cuda = pytest.importorskip("numba_cuda", reason="the cuda extra (numba-cuda) is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_simulator_suite():
    """tests/cudasim: every mode on the CUDA kernels against the float64
    references, run by numba-cuda's simulator (a fresh process: the simulator
    is chosen when numba starts)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(HERE, "cudasim")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def _signature(kdtype, vdtype):
    from numba import types as t

    def arr(dt, nd, layout="C"):
        return t.Array(dt, nd, layout)

    f32, i64 = t.float32, t.int64
    return (arr(f32, 4, "A"), f32, t.boolean, f32, arr(kdtype, 4, "A"), arr(f32, 1),
            arr(vdtype, 4, "A"), arr(f32, 1), i64, i64, arr(f32, 2), f32, i64, f32, arr(i64, 1),
            arr(i64, 1), t.boolean, arr(i64, 2), arr(i64, 2), t.boolean, i64, arr(f32, 3), arr(f32, 3),
            arr(f32, 4), arr(f32, 4), arr(i64, 4), arr(i64, 3), arr(i64, 1))


@pytest.fixture
def fake_device(monkeypatch):
    """compile_ptx of a kernel calling device functions asks the current
    device for its compute capability; stand in for the missing GPU."""
    import numba.cuda.dispatcher as dispatcher

    def use(cc):
        monkeypatch.setattr(dispatcher, "get_current_device",
                            lambda: SimpleNamespace(compute_capability=cc))
    return use


@pytest.mark.parametrize("cc,dtypes", [((9, 0), ("float32", "uint16", "int16", "int8")),
                                       ((8, 0), ("float32",))])
def test_kernels_compile_to_ptx(fake_device, cc, dtypes):
    """Every kernel lowers to PTX for compute capabilities 8.0 and 9.0 (each
    storage dtype on 9.0), on this GPU-less machine."""
    from numba import cuda
    from numba import types as t

    from softretrieval import config
    from softretrieval import cuda as gpu

    fake_device(cc)
    target = f".target sm_{cc[0]}{cc[1]}"
    for dtype in dtypes:
        for rows in (1, config.CUDA_DECODE_ROWS, config.CUDA_DECODE_ROWS + 1):
            kernel = gpu.stream_kernel(np.dtype(dtype), np.dtype(dtype), gpu.layout_for(rows), 128)
            nbt = getattr(t, dtype)
            ptx, _ = cuda.compile_ptx(kernel.py_func, _signature(nbt, nbt), cc=cc)
            assert target in ptx and shared_bytes(ptx) <= 48 * 1024
    arr = lambda dt, nd: t.Array(dt, nd, "C")  # noqa: E731
    f32, i64 = t.float32, t.int64
    ptx, _ = cuda.compile_ptx(gpu.merge_states_kernel.py_func,
                              (arr(f32, 3), arr(f32, 3), arr(f32, 4), arr(f32, 2), arr(t.float64, 1)),
                              cc=cc)
    assert target in ptx
    ptx, _ = cuda.compile_ptx(gpu.merge_topk_kernel.py_func,
                              (arr(f32, 4), arr(i64, 4), arr(i64, 3), i64, arr(f32, 2), arr(i64, 2),
                               arr(f32, 2), arr(i64, 2), arr(i64, 1)), cc=cc)
    assert target in ptx
    ptx, _ = cuda.compile_ptx(gpu.finish_topk_kernel.py_func,
                              (arr(f32, 2), arr(i64, 2), arr(i64, 1), f32, t.boolean, f32,
                               arr(f32, 2), arr(i64, 2)), cc=cc)
    assert target in ptx
    for dtype in dtypes:
        ptx, _ = cuda.compile_ptx(gpu.finish_topk_attention_kernel(np.dtype(dtype)).py_func,
                                  (arr(f32, 2), arr(i64, 2), arr(i64, 1), arr(f32, 1),
                                   t.Array(getattr(t, dtype), 4, "A"), arr(f32, 1), i64, i64,
                                   arr(f32, 2), arr(f32, 2), arr(i64, 2), arr(f32, 1)), cc=cc)
        assert target in ptx
    ptx, _ = cuda.compile_ptx(gpu.scatter_heads_kernel.py_func,
                              (t.Array(f32, 2, "A"), t.Array(f32, 4, "A"), i64), cc=cc)
    assert target in ptx
    from softretrieval import cuda_backward

    assert cuda_backward.key_tile(64, 1300) is None        # too wide: the CPU's backward runs
    widths = [(128, 128, dtypes[0])] + [(d, dv, "float32") for d, dv in ((808, 0), (680, 128),
                                                                         (744, 64), (64, 1200))]
    for d, dv, dtype in widths + [(128, 128, dt) for dt in dtypes[1:]]:
        nbt = getattr(t, dtype)
        kernel = cuda_backward.backward_kernel(np.dtype(dtype), np.dtype(dtype), d, dv,
                                               cuda_backward.key_tile(d, dv))
        ptx, _ = cuda.compile_ptx(kernel.py_func, (
            arr(f32, 2), arr(nbt, 2), arr(f32, 1), i64, arr(nbt, 2), arr(f32, 1), i64, arr(f32, 1),
            i64, f32, arr(i64, 1), arr(i64, 1), t.boolean, arr(i64, 1), arr(i64, 1), arr(f32, 1),
            arr(f32, 1),
            arr(f32, 1), arr(f32, 2), arr(f32, 2), arr(f32, 1), arr(f32, 2), arr(f32, 2),
            arr(f32, 1)), cc=cc)
        assert target in ptx and shared_bytes(ptx) <= 48 * 1024


def test_device_argument_errors():
    Q, K = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="device must be one of"):
        sr.attention(Q, K, device="gpu")
    from softretrieval import cuda as gpu

    if gpu.available():
        pytest.skip("a GPU is present: device='cuda' works here")
    for call in (lambda: sr.attention(Q, K, device="cuda"), lambda: sr.topk(Q, K, 1, device="cuda"),
                 lambda: sr.topk_attention(Q, K, k=1, device="cuda")):
        with pytest.raises(ValueError, match=r"softretrieval\[cuda\]"):
            call()
    assert devices.kernels("auto").__name__ == "softretrieval.cpu"
    np.testing.assert_allclose(sr.attention(Q, K, device="auto"), sr.attention(Q, K))


def shared_bytes(ptx):
    """Static shared memory a PTX kernel declares, in bytes."""
    return sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", ptx))


def test_layouts(monkeypatch):
    """Decode layout (rows rounded up to a power of two, a key per thread)
    up to CUDA_DECODE_ROWS rows, the tiled layout above; tunables that do
    not fit together raise ValueError."""
    from softretrieval import config
    from softretrieval import cuda as gpu

    assert gpu.layout_for(1) == gpu.Layout(1, 128, 1, 1, 32) and gpu.layout_for(1).key_tile == 128
    assert gpu.layout_for(3) == gpu.Layout(4, 128, 4, 1, 32)
    lay = gpu.layout_for(16)
    assert lay == gpu.Layout(16, 128, 4, 4, 32) and lay.key_tile == 128 and lay.segment == 16
    lay = gpu.layout_for(17)
    assert lay == gpu.Layout(64, 256, 4, 4, 32, 128) and lay.key_tile == 64 and lay.segment == 16
    assert gpu.stream_kernel(np.dtype("f4"), np.dtype("f4"), lay, 8).targetoptions["max_registers"] == 128
    assert "max_registers" not in gpu.stream_kernel(np.dtype("f4"), np.dtype("f4"), gpu.layout_for(1),
                                                    8).targetoptions
    assert gpu._value_split(gpu.layout_for(1), 128) == (128, 1, 1)
    assert gpu._value_split(gpu.layout_for(1), 32) == (32, 1, 1)
    assert gpu._value_split(gpu.layout_for(16), 128) == (32, 4, 4)
    assert gpu._value_split(gpu.layout_for(100), 128) == (32, 8, 4)
    assert gpu._value_split(gpu.layout_for(100), 40) == (32, 8, 2)
    monkeypatch.setattr(config, "CUDA_TILE_THREADS", 100)
    with pytest.raises(ValueError, match="inconsistent CUDA tunables"):
        gpu.layout_for(100)
