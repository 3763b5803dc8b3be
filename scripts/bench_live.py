"""Live catalogs: removal, searches after removal, and per-query allow-lists.

    python scripts/bench_live.py [--n 1000000] [--d 128] [--reps 5] [--out bench_live.json]

On a seeded clustered catalog (``softretrieval.datasets.catalog``), float32:

1. ``Index.remove`` of one id (median of 200 single removals), and a B = 1
   top-10 search right after a removal (which rebuilds the removal bias:
   O(N) once per change) against one without.
2. Top-10 search at B = 1 and B = 1024 on the full index and on the same
   index after removing a random 10%, interleaved: the cost of tombstones.
3. Allow-lists: B = 64 queries, each allowed 1,000 random ids, top-10:
   ``include=`` as chosen automatically (gathered rows), the same lists
   forced onto the masked full scan, a plain full scan with no list, and
   FAISS ``IndexIDMap2(IndexFlatIP)`` with an ``IDSelectorBatch`` per query
   (FAISS applies one selector to a whole call, so one call per query).

Prints medians (min-max) and ratios; writes JSON (``--out``).
"""

import argparse
import json
import time

import faiss
import numpy as np
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr
from softretrieval import config, datasets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--allowed", type=int, default=1000)
    ap.add_argument("--out", default="bench_live.json")
    args = ap.parse_args()
    info = cpu_info()
    faiss.omp_set_num_threads(2)
    K, Q = datasets.catalog(args.n, 1024, args.d, seed=3)
    rng = np.random.default_rng(0)
    result = {"cpu": info, "n": args.n, "d": args.d}

    index = sr.Index(args.d)
    index.add(K)
    index.search(Q[:1], 10)
    gone = rng.choice(args.n, 201, replace=False)
    removal = []
    for i in gone[:200]:
        t = time.perf_counter()
        index.remove([i])
        removal.append(time.perf_counter() - t)
    index.remove(gone[200:])
    searches = {"B=1 search": [], "remove + B=1 search": []}
    for i in rng.choice(args.n, 20, replace=False):
        t = time.perf_counter()
        index.search(Q[:1], 10)
        searches["B=1 search"].append(time.perf_counter() - t)
        t = time.perf_counter()
        index.remove([i])
        index.search(Q[:1], 10)
        searches["remove + B=1 search"].append(time.perf_counter() - t)
    result["remove_one"] = stats(removal)
    print(f"remove of 1 id on {args.n} items: {1e6 * np.median(removal):.1f} us median "
          f"({1e6 * min(removal):.1f}-{1e6 * max(removal):.1f})")
    res = {name: stats(t) for name, t in searches.items()}
    print_rows(res, "B=1 search")
    result["search_after_remove"] = res

    full = sr.Index(args.d)
    full.add(K)
    pruned = sr.Index(args.d)
    pruned.add(K)
    pruned.remove(rng.choice(args.n, args.n // 10, replace=False))
    for B in (1, 1024):
        q = Q[:B]
        times = interleaved({"softretrieval": lambda: full.search(q, 10),
                             "after removing 10%": lambda: pruned.search(q, 10)}, args.reps)
        res = {name: stats(t) for name, t in times.items()}
        print(f"top-10 search, B = {B}: full index vs 10% removed")
        print_rows(res)
        result[f"search_after_removal_B{B}"] = res

    B = 64
    q = Q[:B]
    include = [rng.choice(args.n, args.allowed, replace=False).astype(np.int64) for _ in range(B)]
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(args.d))
    ref.add_with_ids(K, np.arange(args.n, dtype=np.int64))
    selectors = [faiss.IDSelectorBatch(inc.size, faiss.swig_ptr(inc)) for inc in include]
    params = [faiss.SearchParameters(sel=sel) for sel in selectors]

    def masked():
        share = config.INCLUDE_GATHER_SHARE
        config.INCLUDE_GATHER_SHARE = 0.0
        try:
            return full.search(q, 10, include=include)
        finally:
            config.INCLUDE_GATHER_SHARE = share

    def faiss_selected():
        return [ref.search(q[b:b + 1], 10, params=params[b]) for b in range(B)]

    got, want = full.search(q, 10, include=include), faiss_selected()
    agree = all(np.array_equal(got[1][b], want[b][1][0]) for b in range(B))
    times = interleaved({"softretrieval": lambda: full.search(q, 10, include=include),
                         "softretrieval, masked full scan": masked,
                         "softretrieval, full scan, no list": lambda: full.search(q, 10),
                         "FAISS IDSelectorBatch per query": faiss_selected}, args.reps)
    res = {name: stats(t) for name, t in times.items()}
    print(f"allow-lists: B = {B}, {args.allowed} allowed ids per query, top-10 "
          f"(ids equal FAISS: {agree})")
    print_rows(res)
    result["include"] = dict(res, ids_equal_faiss=agree)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
