"""Exact top-k speed against FAISS, side by side in one process.

    python scripts/bench_topk.py [--n 1000000] [--d 128] [--batches 1 16 1024] [--ks 10 100 1000]

For each (B, k), interleaved in each repetition: softretrieval.topk; FAISS
``IndexFlatIP.search`` with 2 threads and with 1 thread; the limits measured
in the same run (B = 1: reading K once; B > 1: the bare sgemm Q.K^T in key
chunks of 4096, numpy BLAS on all threads); and at B >= 1024, k <= 100,
softretrieval.topk_attention (which also computes the full lse and the
coverage). Checks that softretrieval and FAISS return the same ids. Prints
medians with min-max and ratios; writes JSON (``--out``).
"""

import argparse
import json
import os

import faiss
import numpy as np
from _bench import cpu_info, interleaved, print_rows, read_once, stats

import softretrieval as sr


def bare_sgemm_qk(Q, K, chunk=4096):
    for s in range(0, K.shape[0], chunk):
        Q @ K[s:s + chunk].T


def faiss_search(index, Q, k, threads):
    faiss.omp_set_num_threads(threads)
    return index.search(Q, k)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 1024])
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench_topk.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    N, d = args.n, args.d
    K = rng.standard_normal((N, d), dtype=np.float32)
    Qall = rng.standard_normal((max(args.batches), d), dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(K)
    sr.topk(Qall[:2], K[:5000], 10)
    report = {"cpu": cpu_info(), "N": N, "d": d, "reps": args.reps, "cpu_count": os.cpu_count(),
              "faiss": faiss.__version__, "results": {}}
    print(f"N={N:,} d={d} float32, {args.reps} interleaved runs; medians (min-max) in ms")
    for B in args.batches:
        Q = Qall[:B]
        for k in args.ks:
            methods = {
                "softretrieval": lambda: sr.topk(Q, K, k),
                "FAISS IndexFlatIP, 2 threads": lambda: faiss_search(index, Q, k, 2),
                "FAISS IndexFlatIP, 1 thread": lambda: faiss_search(index, Q, k, 1),
            }
            if B >= 1024 and k <= 100:
                methods["softretrieval topk_attention"] = lambda: sr.topk_attention(Q, K, k=k)
            if B == 1:
                methods["limit: read K once"] = lambda: read_once(K)
            else:
                methods["limit: bare sgemm QK^T"] = lambda: bare_sgemm_qk(Q, K)
            scores, ids = sr.topk(Q, K, k)
            D, I = faiss_search(index, Q, k, 2)
            times = interleaved(methods, args.reps)
            res = {name: stats(t) for name, t in times.items()}
            res["same_ids_as_faiss"] = float((ids == I).mean())
            res["max_score_diff"] = float(np.abs(scores - D).max())
            print(f"\nB = {B}, k = {k}   (ids equal to FAISS: {100 * res['same_ids_as_faiss']:.3f}%, "
                  f"max score difference {res['max_score_diff']:.2e})")
            print_rows({n: r for n, r in res.items() if isinstance(r, dict)})
            report["results"][f"B={B},k={k}"] = res
    faiss.omp_set_num_threads(os.cpu_count())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
