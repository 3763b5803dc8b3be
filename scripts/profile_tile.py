"""Where the time of one soft-retrieval tile goes, on one thread.

    python scripts/profile_tile.py [--d 128 64] [--reps 20] [--out profile_tile.json]

Times each step of a 516 x 512 tile of the stream kernel alone, on hot data
(packing the key tile, the Q.K^T products, the row maxima, the exp2 pass,
the P.V accumulation), then the kernel's own sequence over 100 key tiles
streamed from memory, and ``sr.attention`` itself per tile. The difference
between the sum of the pieces and the sequence is what the steps cost each
other (cache). Best of 5 runs of ``--reps`` calls; writes JSON.
"""

import argparse
import json
import time

import numba
import numpy as np
from _bench import cpu_info
from numba import njit

import softretrieval as sr
from softretrieval import config, cpu, cpu_micro

#: A query block as the kernel cuts them (cpu._cuts): whole register tiles of
#: 12 or 6 rows, about 512; and a key tile.
ROWS, COLS = 516, 512
TILES = 100
shared = cpu.shared


@njit(fastmath=cpu._FAST)
def pack(K, kf, reps):
    for _ in range(reps):
        cpu_micro.pack_columns(K, kf)


@njit(fastmath=cpu._FAST)
def products(qf, kf, S, edge, width, reps):
    for _ in range(reps):
        cpu_micro.tile_products(qf, kf, S, edge, False, width)


@njit(fastmath=cpu._FAST)
def row_maxima(S, reps):
    bits = S.view(np.int32)
    total = 0.0
    for _ in range(reps):
        for i in range(S.shape[0]):
            total += shared.row_max_finite(bits[i], S.shape[1])[0]
    return total


@njit(fastmath=cpu._FAST)
def softmax(S, reps):
    total = 0.0
    for _ in range(reps):
        for i in range(S.shape[0]):
            total += shared.softmax_row(S[i], S.shape[1], np.float32(5.0), np.float32(5.0), True)[2]
    return total


@njit(fastmath=cpu._FAST)
def accumulate(S, V, acc, corr, width, pv, reps):
    for _ in range(reps):
        cpu._accumulate(S, V, acc, corr, False, True, width, pv)


@njit(fastmath=cpu._FAST)
def sequence(qf, K, V, kf, S, edge, width, acc, corr, m, l, pv):
    """The stream kernel's steps for one query block, tile after tile."""
    bits = S.view(np.int32)
    for t0 in range(0, K.shape[0], COLS):
        cpu_micro.pack_columns(K[t0:t0 + COLS], kf)
        cpu_micro.tile_products(qf, kf, S, edge, False, width)
        for i in range(S.shape[0]):
            mx = shared.row_max_finite(bits[i], S.shape[1])[0]
            m[i], corr[i], total = shared.softmax_row(S[i], S.shape[1], m[i], mx, True)
            l[i] = l[i] * corr[i] + total
        cpu._accumulate(S, V[t0:t0 + COLS], acc, corr, False, True, width, pv)


def best_us(fn, args, reps, per=1):
    fn(*args, 1) if reps else fn(*args)
    best = np.inf
    for _ in range(5):
        t = time.perf_counter()
        fn(*args, reps) if reps else fn(*args)
        best = min(best, time.perf_counter() - t)
    return best / max(reps, 1) / per * 1e6


def profile(d, reps):
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((ROWS, d), dtype=np.float32) * np.float32(0.1)
    K = rng.standard_normal((COLS * TILES, d), dtype=np.float32)
    # Value rows on 64 bytes, as the AVX2 tile reads them (cpu_micro.aligned_rows).
    V = cpu_micro.aligned_empty(COLS * TILES * d, np.float32).reshape((COLS * TILES, d))
    V[:] = rng.standard_normal((COLS * TILES, d), dtype=np.float32)
    qf = cpu_micro.aligned_empty(ROWS * d, np.float32).reshape((ROWS, d))
    cpu_micro.pad_rows(Q, qf)
    kf = cpu_micro.aligned_empty(COLS * d, np.float32).reshape((COLS // cpu_micro.COLS, d, cpu_micro.COLS))
    S = cpu_micro.aligned_empty(ROWS * COLS, np.float32).reshape((ROWS, COLS))
    edge = cpu_micro.aligned_empty(cpu_micro.ROWS * cpu_micro.COLS, np.float32).reshape(
        (cpu_micro.ROWS, cpu_micro.COLS))
    acc = np.zeros((ROWS, d), np.float32)
    corr = np.ones(ROWS, np.float32)
    m = np.full(ROWS, -1e30, np.float32)
    l = np.zeros(ROWS, np.float32)
    width = np.empty(0, np.int64)
    pv = np.empty((ROWS, d), np.float32)
    Kt, Vt = K[:COLS], V[:COLS]
    pieces = {
        "pack the key tile": best_us(pack, (Kt, kf), reps),
        "Q.K^T products": best_us(products, (qf, kf, S, edge, width), reps),
        "row maxima": best_us(row_maxima, (S,), reps),
        "exp2 pass": best_us(softmax, (S,), reps),
        "P.V accumulation": best_us(accumulate, (S, Vt, acc, corr, width, pv), reps),
    }
    res = {"pieces_us": pieces, "sum_of_pieces_us": sum(pieces.values()),
           "products_gflops": 2 * ROWS * COLS * d / pieces["Q.K^T products"] / 1e3}
    res["sequence_us"] = best_us(sequence, (qf, K, V, kf, S, edge, width, acc, corr, m, l, pv), 0,
                                 TILES)
    config.NUM_THREADS = 1
    try:
        sr.attention(Q, K[:1000], V[:1000])
        res["attention_us"] = best_us(lambda: sr.attention(Q, K, V), (), 0, TILES)
    finally:
        config.NUM_THREADS = None
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="profile_tile.json")
    args = ap.parse_args()
    info = cpu_info()
    if not cpu_micro.has_fma_tiles():
        raise SystemExit("the micro-kernels need AVX-512F or AVX2; this CPU takes the BLAS path")
    numba.set_num_threads(1)
    result = {"cpu": info, "tile": [ROWS, COLS], "d": {}}
    for d in args.d:
        res = profile(d, args.reps)
        result["d"][d] = res
        print(f"d = {d}, one {ROWS} x {COLS} tile, one thread (us):")
        for name, us in res["pieces_us"].items():
            print(f"  {name:24s} {us:8.1f}")
        print(f"  {'sum of the pieces':24s} {res['sum_of_pieces_us']:8.1f}")
        print(f"  {'the kernel sequence':24s} {res['sequence_us']:8.1f}")
        print(f"  {'sr.attention':24s} {res['attention_us']:8.1f}")
        print(f"  products at {res['products_gflops']:.0f} GFLOP/s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
