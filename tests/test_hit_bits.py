"""The 16-key hit masks of the top-k and range scans (rules.hit_bits, its
vector compare on the CPU, cpu_micro.hit_mask) and the lowest-set-bit rule
they are read with (core.next_hit), against plain comparisons."""

import numpy as np
import pytest
from numba import njit

from softretrieval import core, cpu, rules


@njit
def _masks_compiled(row, threshold, out):
    n = row.shape[0]
    for c0 in range(n):
        out[c0] = cpu.shared.hit_bits(row, c0, min(n - c0, rules.HIT_LANES), threshold)


@njit
def _positions_compiled(bits, out):
    n = 0
    while bits != 0:
        out[n], bits = cpu.shared.core.next_hit(bits)
        n += 1
    return n


def _want(row, c0, threshold):
    width = min(len(row) - c0, 16)
    return sum(1 << b for b in range(width) if row[c0 + b] >= threshold)


def _rows(rng):
    """Rows with logits equal to the threshold, NaN, +-inf, the masked logit
    and -0.0 among them, of lengths around one and two masks."""
    for n in (1, 5, 16, 17, 31, 32, 40):
        row = rng.integers(-2, 3, n).astype(np.float32)
        special = [np.nan, np.inf, -np.inf, -1e36, -0.0, 0.0]
        for j in rng.choice(n, min(n, 4), replace=False):
            row[j] = special[int(rng.integers(len(special)))]
        yield row


@pytest.mark.parametrize("threshold", [0.0, -0.0, 1.0, -np.inf, np.inf, -1e30])
def test_hit_masks_match_the_comparisons(rng, threshold):
    for row in _rows(rng):
        got = np.zeros(len(row), np.int64)
        _masks_compiled(row, np.float32(threshold), got)
        for c0 in range(len(row)):
            want = _want(row, c0, np.float32(threshold))
            assert got[c0] == want, (row, c0)
            plain = rules.hit_bits(row, c0, min(len(row) - c0, 16), np.float32(threshold))
            assert int(plain) == want


def test_next_hit_visits_every_set_bit_lowest_first(rng):
    out = np.zeros(32, np.int64)
    for bits in list(range(1, 300)) + [0xFFFF, 0x8000, 0x7FFFFFFF, 1 << 30] + list(
            rng.integers(1, 1 << 16, 200)):
        want = [b for b in range(31) if bits >> b & 1]
        n = _positions_compiled(np.int32(bits), out)
        assert out[:n].tolist() == want
        plain, rest = [], np.int32(bits)
        while rest != 0:
            b, rest = core.next_hit(rest)
            plain.append(int(b))
        assert plain == want


def test_a_float64_threshold_is_rounded_alike_in_every_block():
    """Whole masks (the CPU's vector compare) and the last, shorter one (the
    rule) round a float64 threshold to float32 alike (found by review: the
    rule compared in float64, the vector compare in float32)."""
    threshold = 1.0 + 2.0**-30
    row = np.ones(31, np.float32)
    got = np.zeros(31, np.int64)
    _masks_compiled(row, threshold, got)
    assert got[0] == 0xFFFF and got[16] == (1 << 15) - 1
    assert int(rules.hit_bits(row, 16, 15, threshold)) == (1 << 15) - 1
