"""The shared scalar core: the vectorizable exp2 and the state merge; the
shared functions every target compiles; the linter."""

import os
import shutil
import subprocess

import numpy as np
import pytest
from numba import njit

from softretrieval import core, cpu
from softretrieval.constants import MASKED, NEG_INIT

exp2_cpu = core.cpu.exp2


def _exp2_loop(x):
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = exp2_cpu(x[i])
    return y


_exp2_array = njit(_exp2_loop)
#: The same loop as the kernels compile it, with fast-math reassociation.
_exp2_array_fast = njit(fastmath=cpu._FAST)(_exp2_loop)


def test_exp2_relative_error():
    x = np.concatenate([np.linspace(-126, 127, 200001), np.linspace(-1, 1, 20001)]).astype(np.float32)
    y = _exp2_array(x)
    ref = np.exp2(x.astype(np.float64))
    rel = np.abs(y - ref) / ref
    assert rel.max() < 3e-7


def test_exp2_relative_error_under_the_kernels_fast_math():
    """Where exp2 runs: inlined into kernels compiled with reassociation
    allowed. The range reduction must stay exact there (computing
    (x + 127) - n instead of x - (n - 127) cost 2.8e-6 relative error)."""
    x = np.concatenate([np.linspace(-126, 127, 2000001), np.linspace(-1, 1, 200001)]).astype(np.float32)
    rel = np.abs(_exp2_array_fast(x) - np.exp2(x.astype(np.float64))) / np.exp2(x.astype(np.float64))
    assert rel.max() < 3e-7


def test_exp2_is_exactly_zero_below_range():
    x = np.array([-126.51, -127, -200, -1e20, NEG_INIT, MASKED, MASKED - NEG_INIT], np.float32)
    assert (_exp2_array(x) == 0).all()


def test_exp2_python_and_compiled_agree():
    x = np.linspace(-130, 20, 1001).astype(np.float32)
    py = np.array([core.exp2(v) for v in x], np.float64)
    np.testing.assert_allclose(_exp2_array(x), py, rtol=1e-6, atol=0)


def test_merge_pair_with_empty_state():
    m, l, c1, c2 = core.merge_pair(NEG_INIT, np.float32(0), np.float32(3.0), np.float32(2.0))
    assert m == 3.0 and l == 2.0 and c1 == 0.0 and c2 == 1.0
    m, l, c1, c2 = core.merge_pair(NEG_INIT, np.float32(0), NEG_INIT, np.float32(0))
    assert l == 0.0
    inv_l, lse = core.finalize(m, l)
    assert inv_l == 0.0 and np.isneginf(lse)


def test_finalize_natural_log():
    inv_l, lse = core.finalize(np.float32(3.0), np.float32(4.0))
    assert inv_l == 0.25
    np.testing.assert_allclose(lse, (3.0 + 2.0) * np.log(2.0), rtol=1e-7)


def test_import_does_not_load_numba_or_compile():
    import subprocess
    import sys

    code = "import sys, softretrieval; print('numba' in sys.modules, 'softretrieval.cpu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


half_core = core.cpu.half_to_float
bf16_core = core.cpu.bfloat16_to_float
half_f16c = cpu.f16c_to_float


@njit
def _decode_all(bits):
    """Every decoder on every 16-bit pattern: the portable core ones and the CPU's F16C one."""
    out = np.empty((3, bits.shape[0]), np.float32)
    for i in range(bits.shape[0]):
        out[0, i] = half_core(bits[i])
        out[1, i] = bf16_core(bits[i])
        out[2, i] = half_f16c(bits[i])
    return out


def test_16_bit_decoders_on_every_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    got = _decode_all(bits)
    want_half = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got[0][finite], want_half[finite])     # subnormals included
    np.testing.assert_array_equal(got[2][finite], want_half[finite])
    want_bf16 = (bits.astype(np.uint32) << 16).view(np.float32)
    same = np.isfinite(want_bf16)
    np.testing.assert_array_equal(got[1][same], want_bf16[same])
    assert core.half_to_float(np.uint16(0x0001)) == np.float32(2.0**-24)   # plain Python too


def test_every_target_compiles_the_same_shared_functions():
    """The per-row rules, the core and the top-k buffer exist once
    (rules.py, core.py, topk_buffer.py) and every target compiles all of
    them (`python scripts/shared_functions.py` prints the table)."""
    from softretrieval import cpu, devices, rules, topk_buffer

    targets = [cpu]
    try:
        from softretrieval import cuda as gpu
        targets.append(gpu)
    except ImportError:
        pass
    want = {"rules": {f.__name__ for f in rules.FUNCTIONS},
            "core": {f.__name__ for f in core.FUNCTIONS},
            "topk_buffer": {f.__name__ for f in topk_buffer.FUNCTIONS}}
    for target in targets:
        assert isinstance(target.NAME, str) and isinstance(target.IS_GPU, bool)
        for member in ("available", "run", "device_view"):
            assert callable(getattr(target, member)), (target.NAME, member)
        got = {"rules": {n for n in want["rules"] if hasattr(target.shared, n)},
               "core": {n for n in want["core"] if hasattr(target.shared.core, n)},
               "topk_buffer": {n for n in want["topk_buffer"] if hasattr(target.shared.topk_buffer, n)}}
        assert got == want, target.NAME
        assert devices.is_gpu(target) == target.IS_GPU
    # no target keeps a twin of a shared rule under the same name
    names = set().union(*want.values())
    for target in targets:
        twins = {n for n, v in vars(target).items() if n in names and callable(v)
                 and getattr(v, "__module__", "") == target.__name__}
        assert not twins, (target.NAME, twins)


def test_the_linter_passes():
    """ruff, configured in pyproject.toml, over src, tests and scripts."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (the test extra has it)")
    res = subprocess.run([ruff, "check", "src", "tests", "scripts"], cwd=root, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
