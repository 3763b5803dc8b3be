"""runtime: the serial twins of the per-row finishing kernels, and when they run."""

import numpy as np
import pytest
from numba.core.caching import FunctionCache

import softretrieval as sr
from softretrieval import config, cpu, runtime

from reference import attention_ref, topk_ref

TWINS = (cpu.merge_topk, cpu.finish_topk, cpu.finish_topk_attention, cpu.finish_range)


class Spy:
    """A stand-in kernel with a serial twin, recording which one ran."""

    def __init__(self):
        self.calls = []
        self.serial = lambda *args: self.calls.append("serial")

    def __call__(self, *args):
        self.calls.append("parallel")


@pytest.mark.parametrize("work,ran", [(None, "parallel"), (0, "serial"), (4095, "serial"),
                                      (4096, "parallel"), (10**9, "parallel")])
def test_parallel_call_runs_the_twin_only_below_serial_work(monkeypatch, work, ran):
    monkeypatch.setattr(config, "SERIAL_WORK", 4096)
    spy = Spy()
    runtime.parallel_call(spy, 1, 2, work=work, blas=False)
    assert spy.calls == [ran]


def test_a_kernel_without_twin_runs_itself():
    seen = []
    runtime.parallel_call(lambda x: seen.append(x), 7, work=0, blas=False)
    assert seen == [7]


@pytest.mark.parametrize("kernel", TWINS, ids=lambda k: k.py_func.__name__)
def test_twins_are_the_same_function_compiled_serially(kernel):
    twin = kernel.serial
    assert twin.py_func.__code__ is kernel.py_func.__code__
    assert kernel.targetoptions.get("parallel") and not twin.targetoptions.get("parallel")
    assert twin.targetoptions.get("nogil")
    # Cached like the kernel, in files of its own (Numba names them by the qualified name).
    assert isinstance(twin._cache, FunctionCache) and isinstance(kernel._cache, FunctionCache)
    assert twin.py_func.__qualname__ == kernel.py_func.__qualname__ + "_serial"
    assert twin._cache._cache_path == kernel._cache._cache_path
    assert twin._cache._impl.filename_base != kernel._cache._impl.filename_base


def _all_modes(rng, B):
    Q = rng.standard_normal((B, 12)).astype(np.float32)
    K = rng.standard_normal((3000, 12)).astype(np.float32)
    V = rng.standard_normal((3000, 5)).astype(np.float32)
    scores, ids = sr.topk(Q, K, 7)
    att = sr.topk_attention(Q, K, V, k=7)
    lims, dist, found = sr.range_search(Q, K, 4.0)
    return (Q, K, V), (scores, ids, att.out, att.ids, att.weights, att.lse, att.coverage, lims,
                       dist, found)


@pytest.mark.parametrize("B", [1, 37, 300])
def test_serial_and_parallel_finishes_give_identical_results(monkeypatch, B):
    """The same bits whichever of the two runs (and both right)."""
    monkeypatch.setattr(config, "SERIAL_WORK", 0)
    (Q, K, V), parallel = _all_modes(np.random.default_rng(B), B)
    monkeypatch.setattr(config, "SERIAL_WORK", 10**12)
    _, serial = _all_modes(np.random.default_rng(B), B)
    for a, b in zip(parallel, serial):
        np.testing.assert_array_equal(a, b)
    ref_scores, ref_ids = topk_ref(Q, K, 7)
    np.testing.assert_allclose(serial[0], ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(serial[1], ref_ids)
    _, ref_lse = attention_ref(Q, K, V)
    assert (serial[6] > 0).all() and (serial[6] <= 1).all()
    np.testing.assert_allclose(serial[5], ref_lse, rtol=1e-5, atol=1e-5)


def test_query_blocks_end_on_whole_register_tiles():
    """cpu.plan: blocks of many queries (uniform, and the runs of folded
    windows) are cut at multiples of the micro-kernels' rows (12, or 6 for
    the AVX2 register tile), so only a
    problem's last block ends in a partial register tile; the blocks still
    cover every row once, and those of one run stay within a register tile
    of equal size."""
    from softretrieval import cpu_micro

    rows = cpu_micro.ROWS
    lo = np.repeat(np.array([0, 5000], np.int64), [1500, 1100])
    hi = lo + 3000
    for qstarts in (cpu.plan(8192, 10**5, 2)[0], cpu.plan(1000, 10**5, 2)[0]):
        sizes = np.diff(qstarts)
        assert qstarts[0] == 0 and (sizes > 0).all()
        assert sizes.max() - sizes.min() <= rows
    np.testing.assert_array_equal(cpu.plan(8192, 10**5, 2)[0] % rows, [0] * 16 + [8192 % rows])
    folded = cpu.plan(2600, 9000, 2, lo, hi)[0]

    def nearest(x):
        return (x + rows // 2) // rows * rows

    # Runs of 1500 and 1100 rows, three blocks each (with 12 rows: 0, 504, 996, 1500, 1872, 2232, 2600).
    expect = [0, nearest(500), nearest(1000), 1500, 1500 + nearest(366), 1500 + nearest(733), 2600]
    np.testing.assert_array_equal(folded, expect)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scaled_queries_have_numpys_bits(rng, dtype):
    """cpu.scaled_rows: every product rounded once to float32, the bits of
    numpy's (Q * mult).astype(float32), for strided rows and in place; an
    overflow reported, never hidden."""
    Q = rng.standard_normal((37, 3, 13)).astype(dtype)[:, 1]
    mult = np.float64(0.125 * 1.4426950408889634)
    out = np.empty(Q.shape, np.float32)
    assert cpu.scaled_rows(Q, mult, out)
    np.testing.assert_array_equal(out.view(np.int32), (Q * mult).astype(np.float32).view(np.int32))
    if dtype == np.float32:
        inplace = Q.copy()
        assert cpu.scaled_rows(inplace, mult, inplace)
        np.testing.assert_array_equal(inplace, out)
    Q[5, 2] = 3e38
    assert not cpu.scaled_rows(Q, np.float64(10.0), out)
    if dtype == np.float64:
        Q[5, 2] = 1e39
        assert not cpu.scaled_rows(Q, np.float64(1.0), out)
