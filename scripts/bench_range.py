"""Range search speed against FAISS, side by side in one process.

    python scripts/bench_range.py [--n 1000000] [--d 128] [--batches 1024 1] [--per-query 100]

For each B, the threshold is the median over the queries of the midpoint
between their ``--per-query``-th and next best inner products (about that
many results per query, and no score exactly at it),
then, interleaved in each repetition: softretrieval.range_search; FAISS
``IndexFlatIP.range_search`` with 2 threads and with 1 thread; and
softretrieval.topk with k = ``--per-query`` (the same scan with a top-k
buffer, for scale). Checks that softretrieval and FAISS return the same ids
(FAISS's threshold is strict, ours inclusive: a key exactly at the threshold
counts only for us). Prints medians with min-max and ratios; writes JSON
(``--out``).
"""

import argparse
import json
import os

import faiss
import numpy as np
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr


def faiss_range(index, Q, threshold, threads):
    faiss.omp_set_num_threads(threads)
    return index.range_search(Q, threshold)


def same_sets(ours, theirs):
    """Share of queries whose result ids are the same set in both."""
    lims, _, ids = ours
    L, _, I = theirs
    same = [np.array_equal(np.sort(ids[lims[b]:lims[b + 1]]), np.sort(I[L[b]:L[b + 1]]))
            for b in range(lims.shape[0] - 1)]
    return float(np.mean(same))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 1])
    ap.add_argument("--per-query", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench_range.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    N, d, k = args.n, args.d, args.per_query
    K = rng.standard_normal((N, d), dtype=np.float32)
    Qall = rng.standard_normal((max(args.batches), d), dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(K)
    sr.range_search(Qall[:2], K[:5000], 0.0)
    report = {"cpu": cpu_info(), "N": N, "d": d, "per_query": k, "reps": args.reps,
              "cpu_count": os.cpu_count(), "faiss": faiss.__version__, "results": {}}
    print(f"N={N:,} d={d} float32, {args.reps} interleaved runs; medians (min-max) in ms")
    for B in args.batches:
        Q = Qall[:B]
        top = sr.topk(Q, K, k + 1)[0]
        threshold = float(np.median((top[:, k - 1] + top[:, k]) / 2))
        methods = {
            "softretrieval range_search": lambda: sr.range_search(Q, K, threshold),
            "FAISS IndexFlatIP.range_search, 2 threads": lambda: faiss_range(index, Q, threshold, 2),
            "FAISS IndexFlatIP.range_search, 1 thread": lambda: faiss_range(index, Q, threshold, 1),
            f"softretrieval topk, k={k}": lambda: sr.topk(Q, K, k),
        }
        ours = sr.range_search(Q, K, threshold)
        res = {"threshold": threshold, "results_per_query": float(ours[0][-1] / B),
               "same_ids_as_faiss": same_sets(ours, faiss_range(index, Q, threshold, 2))}
        res.update({name: stats(t) for name, t in interleaved(methods, args.reps).items()})
        print(f"\nB = {B}, threshold {threshold:.3f}: {res['results_per_query']:.1f} results per "
              f"query; queries with the same ids as FAISS: {100 * res['same_ids_as_faiss']:.1f}%")
        print_rows({n: r for n, r in res.items() if isinstance(r, dict)},
                   ours="softretrieval range_search")
        report["results"][f"B={B}"] = res
    faiss.omp_set_num_threads(os.cpu_count())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
