"""KNNMemory read latency against the common pipeline, write throughput,
batched reads against separate memories, and compact storage dtypes.

    python scripts/bench_memory.py [--n 1000000] [--reps 5] [--seq-n 100000]
                                   [--write-n 200000] [--parts faiss,write,batch,dtype]

* faiss: memory of n entries, key_dim = value_dim = 64, heads in {1, 8}, B in
  {1, 64}, k = 32, against one FAISS IndexFlatIP per head, ``search``, then
  a numpy gather of the values, softmax over the k scores and weighted sum.
* write: entries/s of ``write`` with 8 heads, 64-d keys and values, batches
  of 50,000, per storage dtype: the first fill of a fresh ring (it pays the
  page faults of the new allocation) and later fills (the ring wrapped).
* batch: one ``KNNMemory(batch=8)`` of seq-n entries per sequence read with
  queries (8, T=1, H=8, 64), k = 32, against 8 separate memories read one
  after the other, for memory heads 8 and 1 (the 8 query heads grouped).
* dtype: B = 1 read latency (8 heads, n entries, k = 32) per storage dtype.

Medians with min-max; writes JSON.
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


DTYPES = ("float32", "float16", "bfloat16", "int8")


def fill(mem, rng, n, chunk=50_000):
    """Write n random entries to every sequence of ``mem``; returns the seconds spent in ``write``."""
    lead = () if mem.batch is None else (mem.batch,)
    spent = 0.0
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        K = rng.standard_normal(lead + (m, mem.heads, mem.key_dim), dtype=np.float32)
        V = rng.standard_normal(lead + (m, mem.heads, mem.value_dim), dtype=np.float32)
        t = time.perf_counter()
        mem.write(K, V)
        spent += time.perf_counter() - t
    return spent


def bench_write(args, rng, report):
    """Write throughput, 8 heads, 64-d, per dtype: first fill and refills."""
    n = args.write_n
    print(f"\nwrite throughput, heads = 8, dim = 64, {n:,} entries per fill (batches of 50,000)")
    for dtype in DTYPES:
        mem = sr.KNNMemory(64, 64, capacity=n, heads=8, dtype=dtype)
        first = n / fill(mem, rng, n)
        again = [n / fill(mem, rng, n) for _ in range(args.reps)]
        report["results"][f"write,{dtype}"] = {"first_fill_entries_per_s": first,
                                                "refill_entries_per_s": stats(again)}
        print(f"  {dtype:9s} first fill {first / 1e6:.2f} M/s; refills {np.median(again) / 1e6:.2f} "
              f"M/s ({min(again) / 1e6:.2f}-{max(again) / 1e6:.2f})")


def bench_batch(args, rng, report):
    """A batch of 8 memories read in one call against 8 separate memories."""
    B, n, d, k = 8, args.seq_n, 64, 32
    for heads in (8, 1):
        batched = sr.KNNMemory(d, d, capacity=n, heads=heads, batch=B)
        separate = [sr.KNNMemory(d, d, capacity=n, heads=heads) for _ in range(B)]
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            K = rng.standard_normal((B, m, heads, d), dtype=np.float32)
            V = rng.standard_normal((B, m, heads, d), dtype=np.float32)
            batched.write(K, V)
            for b in range(B):
                separate[b].write(K[b], V[b])
        q = rng.standard_normal((B, 1, 8, d), dtype=np.float32)
        methods = {"KNNMemory(batch=8).read": lambda: batched.read(q, k=k),
                   "8 separate KNNMemory.read": lambda: [m.read(q[b], k=k)
                                                          for b, m in enumerate(separate)]}
        times = interleaved(methods, args.reps)
        res = {name: stats(t) for name, t in times.items()}
        got = batched.read(q, k=k).out
        diff = max(float(np.abs(got[b] - m.read(q[b], k=k).out).max()) for b, m in enumerate(separate))
        print(f"\nbatched read: {B} sequences x {n:,} entries, memory heads = {heads}, T = 1, H = 8, "
              f"k = {k} (max |difference| {diff:.1e})")
        print_rows(res, ours="KNNMemory(batch=8).read")
        report["results"][f"batch,heads={heads}"] = res


def bench_dtype(args, rng, report):
    """B = 1 read latency per storage dtype, 8 heads, n entries."""
    n, d, k = args.n, 64, 32
    q = rng.standard_normal((1, 8, d), dtype=np.float32)
    mems = {}
    for dtype in DTYPES:
        mems[dtype] = sr.KNNMemory(d, d, capacity=n, heads=8, dtype=dtype)
        fill(mems[dtype], np.random.default_rng(1), n)
    methods = {f"read {dtype}": (lambda m=m: m.read(q, k=k)) for dtype, m in mems.items()}
    times = interleaved(methods, args.reps)
    res = {name: stats(t) for name, t in times.items()}
    print(f"\nB = 1 read latency per storage dtype, heads = 8, {n:,} entries, k = {k}")
    print_rows(res, ours="read float32")
    report["results"]["dtype_read"] = res


def bench_faiss(args, rng, report):
    """Read latency against FAISS + numpy, and the write throughput of that fill."""
    n, d, k, scale = args.n, 64, 32, 0.125
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seq-n", type=int, default=100_000)
    ap.add_argument("--write-n", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--parts", default="faiss,write,batch,dtype")
    ap.add_argument("--out", default="bench_memory.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = {"cpu": cpu_info(), "n": args.n, "seq_n": args.seq_n, "dim": 64, "k": 32,
              "results": {}}
    parts = {"faiss": bench_faiss, "write": bench_write, "batch": bench_batch, "dtype": bench_dtype}
    for name in args.parts.split(","):
        parts[name](args, rng, report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
