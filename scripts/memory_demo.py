"""Associative recall with a KNNMemory of 1,000,000 (key, value) pairs.

    python scripts/memory_demo.py [--n 1000000] [--dim 64]

Writes n random unit keys with random values, then reads back with noisy
keys (key + Gaussian noise of norm ~sigma, renormalized) and reports, for
each noise level and k: recall accuracy (the best slot is the written one),
the cosine between the read-out value and the stored value, and the
coverage (the share of the memory's softmax mass the top-k holds); then the
write throughput and the read latency.
"""

import argparse
import time

import numpy as np

import softretrieval as sr


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--scale", type=float, default=30.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.n, args.dim
    keys = unit(rng.standard_normal((n, d), dtype=np.float32))
    values = unit(rng.standard_normal((n, d), dtype=np.float32))
    mem = sr.KNNMemory(d, d, capacity=n)
    mem.write(keys[:1000], values[:1000])
    mem.clear()
    t = time.perf_counter()
    for s in range(0, n, 100_000):
        mem.write(keys[s:s + 100_000], values[s:s + 100_000])
    write_s = time.perf_counter() - t
    print(f"wrote {n:,} pairs (dim {d}) in {write_s:.2f} s: {n / write_s / 1e6:.1f} M entries/s")
    target = rng.integers(0, n, args.queries)
    print(f"\nrecall of {args.queries} noisy keys, scale {args.scale}")
    print(f"{'noise':>6} {'k':>5} {'accuracy':>9} {'value cosine':>13} {'coverage':>9}")
    for sigma in (0.0, 0.5, 1.0, 1.5):
        noise = rng.standard_normal((args.queries, d)).astype(np.float32) * sigma / np.sqrt(d)
        q = unit(keys[target] + noise)
        for k in (1, 8, 32, None):
            res = mem.read(q, k=k, scale=args.scale)
            if k is None:
                best = sr.topk(q, keys, 1)[1][:, 0]
                cov = 1.0
            else:
                best = res.ids[:, 0]
                cov = float(res.coverage.mean())
            acc = float((best == target).mean())
            cos = float(np.mean(np.sum(unit(res.out) * values[target], axis=1)))
            print(f"{sigma:>6.1f} {('all' if k is None else k):>5} {acc:>9.3f} {cos:>13.3f} {cov:>9.3f}")
    for B in (1, 64):
        q = unit(keys[target[:B]])
        mem.read(q, k=32, scale=args.scale)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            mem.read(q, k=32, scale=args.scale)
            times.append(time.perf_counter() - t)
        print(f"read latency, B = {B}, k = 32: {1e3 * np.median(times):.1f} ms (median of 5)")


if __name__ == "__main__":
    main()
