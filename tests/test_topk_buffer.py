"""The top-k buffer update shared by the CPU and CUDA kernels
(softretrieval.topk_buffer), as plain Python and compiled for the CPU, against
a plain sort by (higher logit, lower id)."""

import numpy as np
import pytest
from numba import njit

from softretrieval import cpu, topk_buffer
from softretrieval.constants import NEG_INIT


def best_k_reference(scores, ids, k):
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), int(ids[j])))
    return [int(ids[j]) for j in order[:k]], [float(scores[j]) for j in order[:k]]


def offer_all(offer, finish, scores, ids, k):
    cap = topk_buffer.capacity(k)
    bs = np.empty(cap, np.float32)
    bi = np.empty(cap, np.int64)
    count, ts, ti = 0, NEG_INIT, -1
    for s, i in zip(scores, ids):
        count, ts, ti = offer(bs, bi, count, k, ts, ti, s, i)
        assert count <= cap
    n = finish(bs, bi, count, k)
    return bi[:n].tolist(), bs[:n].tolist()


@njit
def _offer_all_compiled(scores, ids, k):
    cap = cpu.topk_capacity(k)
    bs = np.empty(cap, np.float32)
    bi = np.empty(cap, np.int64)
    count = 0
    ts = NEG_INIT
    ti = -1
    for j in range(scores.shape[0]):
        count, ts, ti = cpu.topk_offer(bs, bi, count, k, ts, ti, scores[j], ids[j])
    n = cpu.topk_finish(bs, bi, count, k)
    return bs[:n].copy(), bi[:n].copy()


def sequences(rng):
    """(name, scores, ids): orders that stress a selection (rising and
    falling scores, heavy ties, shuffled ids), plus random ones."""
    for n in (1, 2, 7, 64, 301):
        yield "rising", np.arange(n, dtype=np.float32), np.arange(n)
        yield "falling", -np.arange(n, dtype=np.float32), np.arange(n)
        yield "ties", rng.integers(0, 3, n).astype(np.float32), np.arange(n)
        yield "ties, shuffled ids", rng.integers(0, 3, n).astype(np.float32), rng.permutation(n)
        yield "all equal", np.zeros(n, np.float32), rng.permutation(n) * 7
        yield "random", rng.standard_normal(n).astype(np.float32), rng.permutation(n)


@pytest.mark.parametrize("k", [1, 2, 5, 32, 400])
def test_offer_and_finish_match_a_sort(rng, k):
    for name, scores, ids in sequences(rng):
        want_ids, want_scores = best_k_reference(scores, ids, k)
        got_ids, got_scores = offer_all(topk_buffer.offer, topk_buffer.finish, scores, ids, k)
        assert got_ids == want_ids, (name, len(scores))
        assert got_scores == want_scores, (name, len(scores))
        cs, ci = _offer_all_compiled(scores, ids.astype(np.int64), k)
        assert ci.tolist() == want_ids, (name, len(scores))
        assert cs.tolist() == want_scores, (name, len(scores))


def test_candidates_at_or_below_the_initial_threshold_never_enter():
    scores = np.array([NEG_INIT, NEG_INIT * 2, -np.inf, 1.0], np.float32)
    assert offer_all(topk_buffer.offer, topk_buffer.finish, scores, np.arange(4), 3)[0] == [3]


def test_select_puts_the_kth_best_at_k_minus_1(rng):
    for _ in range(200):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(1, n + 1))
        bs = rng.integers(0, 5, n).astype(np.float32)
        bi = rng.permutation(n).astype(np.int64)
        want_ids, _ = best_k_reference(bs, bi, k)
        topk_buffer.select(bs, bi, n, k)
        assert sorted(bi[:k].tolist()) == sorted(want_ids)
        assert int(bi[k - 1]) == want_ids[-1]


@njit
def _partition_compiled(bs, bi, lo, hi, ps, pi):
    return cpu.shared.topk_buffer.partition(bs, bi, lo, hi, ps, pi)


@pytest.mark.parametrize("compiled", [False, True])
def test_partition_puts_the_better_entries_first(rng, compiled):
    """The bit-mask partition, on ranges that end inside, on and past its
    16-entry blocks, with heavy ties (the pivot's logit held by other ids)."""
    partition = _partition_compiled if compiled else topk_buffer.partition
    for n in (0, 1, 15, 16, 17, 31, 32, 33, 47, 64, 100, 257):
        for lo in (0, 3):
            bs = np.full(n + lo + 2, 7.0, np.float32)
            bi = np.full(n + lo + 2, -5, np.int64)
            bs[lo:lo + n] = rng.integers(0, 4, n).astype(np.float32)
            bi[lo:lo + n] = rng.permutation(n)
            ps, pi = np.float32(rng.integers(0, 4)), int(rng.integers(-1, n + 1))
            before = sorted(zip(bs[lo:lo + n].tolist(), bi[lo:lo + n].tolist()))
            store = partition(bs, bi, lo, lo + n, ps, pi)
            assert sorted(zip(bs[lo:lo + n].tolist(), bi[lo:lo + n].tolist())) == before
            above = [bool(topk_buffer.better(s, i, ps, pi)) for s, i in zip(bs[lo:lo + n], bi[lo:lo + n])]
            assert above == [True] * (store - lo) + [False] * (lo + n - store), (n, lo)
            assert (bs[:lo] == 7.0).all() and (bs[lo + n:] == 7.0).all()
            assert (bi[:lo] == -5).all() and (bi[lo + n:] == -5).all()


def test_select_on_buffers_past_one_block(rng):
    """select() through the block partition (counts of 2k, as a full buffer
    has), compiled and plain, against a sort."""
    for n, k in ((32, 16), (200, 100), (2000, 1000), (801, 400)):
        for scores in (rng.standard_normal(n), rng.integers(0, 3, n)):
            ids = rng.permutation(n).astype(np.int64)
            want_ids, _ = best_k_reference(scores.astype(np.float32), ids, k)
            bs = scores.astype(np.float32)
            bi = ids.copy()
            topk_buffer.select(bs, bi, n, k)
            assert sorted(bi[:k].tolist()) == sorted(want_ids)
            assert int(bi[k - 1]) == want_ids[-1]
            cs, ci = _offer_all_compiled(scores.astype(np.float32), ids, k)
            assert ci.tolist() == want_ids


def test_the_cpu_buffer_counts_no_references():
    """The CPU compiles the buffer without reference counting (cpu.shared):
    inlined by Numba instead, every offer made atomic NRT calls on the two
    buffer arrays, about 20 ns each time, more than the offer itself."""
    bs = np.zeros(4, np.float32)
    bi = np.zeros(4, np.int64)
    offer = cpu.shared.topk_buffer.offer
    assert offer(bs, bi, 0, 2, NEG_INIT, -1, np.float32(1.0), 7) == (1, NEG_INIT, -1)
    for name in ("offer", "select", "finish"):
        dispatcher = getattr(cpu.shared.topk_buffer, name)
        if not dispatcher.signatures:
            _offer_all_compiled(np.arange(5, dtype=np.float32), np.arange(5), 2)
        for sig in dispatcher.signatures:
            assert "NRT_" not in dispatcher.inspect_asm(sig), name
