"""A sharded index on Dask workers against the in-process Index, and a
projection to 1B items.

    python scripts/bench_distributed.py [--n 1000000] [--d 128] [--reps 7] [--out bench_distributed.json]

On a seeded clustered catalog (``softretrieval.datasets.catalog``), float32:

1. The scheduler's latency floor: the round trip of a task that does
   nothing, and of one no-op task per shard gathered together (what a call
   costs before any work).
2. Top-10 search and soft retrieval at B = 1 and B = 1024: ``ShardedIndex``
   with 2 shards on a ``LocalCluster`` of 2 single-thread worker processes
   against the in-process ``Index`` on 2 threads, interleaved.
3. The parts of a sharded call: one shard's partial on a worker alone (its
   kernel time on 1 thread, measured on the worker) and the client's merge
   of the partials, so that a projection can add them up.
4. The projection to 1B items over 16 and 64 workers (written to the JSON
   and printed; the assumptions are in docs/performance.md).

Prints medians (min-max) and ratios; writes JSON (``--out``).
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr
from softretrieval import datasets, merging


def _noop():
    return None


def _on_worker(shard, method, queries, k, reps):
    """Task: time one shard's partial on its worker (seconds per call)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        merging.shard_partial(shard.index, shard.row_offset, method, queries, k)
        times.append(time.perf_counter() - t)
    return times


def main():
    import distributed

    from softretrieval.distributed import ShardedIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench_distributed.json")
    args = ap.parse_args()
    info = cpu_info()
    K, Q = datasets.catalog(args.n, 1024, args.d, seed=3)
    index = sr.Index(args.d)
    index.add(K)
    result = {"cpu": info, "n": args.n, "d": args.d, "dask": distributed.__version__}
    folder = os.path.join(tempfile.mkdtemp(), "catalog")
    index.save_shards(folder, 2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client, ShardedIndex(folder, client) as sh:
        floor = interleaved({
            "one no-op task": lambda: client.submit(_noop, pure=False).result(),
            "2 no-op tasks, gathered": lambda: client.gather(
                [client.submit(_noop, pure=False) for _ in range(2)])}, 50)
        result["floor"] = {name: stats(t) for name, t in floor.items()}
        print("scheduler latency floor:")
        print_rows(result["floor"], "one no-op task")

        result["calls"] = {}
        for method in ("search", "retrieve"):
            for B in (1, 1024):
                def call(target, q=Q[:B], method=method):
                    return target.search(q, 10) if method == "search" else target.retrieve(q)

                times = interleaved({"ShardedIndex 2x1 thread": lambda: call(sh),
                                     "Index 2 threads": lambda: call(index)}, args.reps)
                res = {name: stats(t) for name, t in times.items()}
                ratio = res["ShardedIndex 2x1 thread"]["median_s"] / res["Index 2 threads"]["median_s"]
                print(f"{method} B={B}: ShardedIndex / Index = {ratio:.2f}x")
                print_rows(res, "Index 2 threads")
                result["calls"][f"{method} B={B}"] = dict(res, ratio=ratio)

        result["parts"] = {}
        for B in (1, 1024):
            q = Q[:B]
            shard_times = client.submit(_on_worker, sh._futures[0], "search", q, 10, args.reps,
                                        pure=False).result()
            partials = client.gather(sh.submit("search", q, 10))
            merge_times = interleaved({"merge": lambda: merging.combine("search", partials, 10, "ip")},
                                      args.reps)["merge"]
            result["parts"][f"B={B}"] = {"shard of n/2 on 1 thread": stats(shard_times),
                                         "merge of 2 partials": stats(merge_times)}
            print(f"search B={B}: one shard ({args.n // 2} items, 1 thread) "
                  f"{1e3 * np.median(shard_times):.1f} ms; merge of 2 partials "
                  f"{1e3 * np.median(merge_times):.2f} ms")
    result["projection"] = project(result, args.n)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


def project(result, n):
    """B = 1 latency and B = 1024 throughput of top-10 search over 1B items,
    from the measured per-shard times (which scale with the items per
    shard: the scan is bandwidth-bound at B = 1 and compute-bound at
    B = 1024), the measured merge (scaled with the number of partials) and
    the measured latency floor of a gathered call."""
    floor = result["floor"]["2 no-op tasks, gathered"]["median_s"]
    out = {}
    for workers in (16, 64):
        per_worker = 1e9 / workers
        row = {"items per worker": per_worker}
        for B in (1, 1024):
            part = result["parts"][f"B={B}"]
            shard = part["shard of n/2 on 1 thread"]["median_s"] * per_worker / (n / 2)
            merge = part["merge of 2 partials"]["median_s"] * workers / 2
            total = shard + merge + floor
            row[f"B={B} seconds per call (1 thread per worker)"] = total
            row[f"B={B} queries/s"] = B / total
        out[f"{workers} workers"] = row
        print(f"1B items on {workers} single-thread workers: B=1 "
              f"{1e3 * row['B=1 seconds per call (1 thread per worker)']:.0f} ms per query, B=1024 "
              f"{row['B=1024 queries/s']:.0f} queries/s")
    return out


if __name__ == "__main__":
    main()
