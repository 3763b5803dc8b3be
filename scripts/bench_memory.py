"""KNNMemory read latency against the common pipeline, and write throughput.

    python scripts/bench_memory.py [--n 1000000] [--reps 5]

Memory of n entries, key_dim = value_dim = 64, heads in {1, 8}, B in {1, 64},
k = 32. The pipeline: one FAISS IndexFlatIP per head, ``search``, then a numpy
gather of the values, softmax over the k scores and weighted sum. Medians
with min-max; writes JSON.
"""

import argparse
import json
import time

import faiss
import numpy as np
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr


def pipeline(indexes, values, q, k, scale):
    """FAISS search per head, then gather + softmax + weighted sum in numpy."""
    B, H, _ = q.shape
    out = np.empty((B, H, values.shape[2]), np.float32)
    for h, index in enumerate(indexes):
        D, I = index.search(q[:, h], k)
        w = np.exp(scale * (D - D[:, :1]))
        w /= w.sum(axis=1, keepdims=True)
        out[:, h] = np.einsum("bk,bkd->bd", w, values[I, h])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench_memory.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d, k, scale = args.n, 64, 32, 0.125
    report = {"cpu": cpu_info(), "n": n, "dim": d, "k": k, "results": {}}
    for heads in (1, 8):
        keys = rng.standard_normal((n, heads, d), dtype=np.float32)
        values = rng.standard_normal((n, heads, d), dtype=np.float32)
        mem = sr.KNNMemory(d, d, capacity=n, heads=heads)
        t = time.perf_counter()
        for s in range(0, n, 100_000):
            mem.write(keys[s:s + 100_000], values[s:s + 100_000])
        rate = n / (time.perf_counter() - t)
        indexes = []
        for h in range(heads):
            index = faiss.IndexFlatIP(d)
            index.add(np.ascontiguousarray(keys[:, h]))
            indexes.append(index)
        for B in (1, 64):
            q = rng.standard_normal((B, heads, d), dtype=np.float32)
            methods = {"softretrieval KNNMemory.read": lambda: mem.read(q, k=k, scale=scale),
                       "FAISS search + numpy softmax": lambda: pipeline(indexes, values, q, k, scale)}
            times = interleaved(methods, args.reps)
            res = {name: stats(t) for name, t in times.items()}
            diff = float(np.abs(mem.read(q, k=k, scale=scale).out - pipeline(indexes, values, q, k, scale)).max())
            print(f"\nheads = {heads}, B = {B}, k = {k} (max |difference| of outputs {diff:.1e})")
            print_rows(res, ours="softretrieval KNNMemory.read")
            res["write_entries_per_s"] = rate
            report["results"][f"heads={heads},B={B}"] = res
        print(f"write throughput, heads = {heads}: {rate / 1e6:.2f} M entries/s")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
