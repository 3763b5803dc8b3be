"""A single query against the time to read the stored bytes once, per storage dtype.

    python scripts/bench_single_query.py [--n 1000000] [--d 128] [--reps 9] [--out bench_single_query.json]

At B = 1 the kernels are bound by memory: the target is the time a plain
parallel Numba sum takes to read the same bytes (``_bench.read_once``), in
the same run. For each key storage dtype (float32, float16, bfloat16, int8),
interleaved: ``Index.search`` top-10 against one read of the stored keys, and
``Index.retrieve`` (values float32, dv = d) against one read of keys and
values. Prints medians (min-max) and the ratios; writes JSON.
"""

import argparse
import json

import numpy as np
from _bench import cpu_info, interleaved, print_rows, read_once, stats

import softretrieval as sr
from softretrieval import datasets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="bench_single_query.json")
    args = ap.parse_args()
    info = cpu_info()
    K, Q = datasets.catalog(args.n, 8, args.d, seed=3)
    V = np.random.default_rng(0).standard_normal((args.n, args.d)).astype(np.float32)
    q = Q[:1]
    result = {"cpu": info, "n": args.n, "d": args.d, "dtypes": {}}
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        keys = sr.Index(args.d, dtype=dtype)
        keys.add(K)
        both = sr.Index(args.d, dtype=dtype, value_dim=args.d)
        both.add(K, V)
        stored, stored_both, values = keys._arrays()["keys"], both._arrays()["keys"], both._values
        times = interleaved({"search top-10": lambda: keys.search(q, 10),
                             "read keys once": lambda: read_once(stored),
                             "retrieve": lambda: both.retrieve(q),
                             "read keys + values once": lambda: read_once(stored_both, values)},
                            args.reps)
        res = {name: stats(t) for name, t in times.items()}
        search = res["search top-10"]["median_s"] / res["read keys once"]["median_s"]
        soft = res["retrieve"]["median_s"] / res["read keys + values once"]["median_s"]
        print(f"{dtype}: search / read = {search:.2f}, retrieve / read = {soft:.2f}")
        print_rows(res, "read keys once")
        result["dtypes"][dtype] = dict(res, search_over_read=search, retrieve_over_read=soft)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
