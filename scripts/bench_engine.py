"""The retrieval engine: storage dtypes, memory mapping, and the score command.

    python scripts/bench_engine.py [--n 1000000] [--d 128] [--batches 1 1024]
                                   [--score-queries 100000] [--score-runs 2] [--reps 5]

On a seeded clustered catalog (unit vectors, ``softretrieval.datasets.catalog``):

1. For B in ``--batches``, interleaved: ``Index.search`` top-10 with keys
   stored as float32, float16, bfloat16 and int8, each in memory and
   memory-mapped from a saved index (page cache warm), next to FAISS
   ``IndexFlatIP`` and ``IndexScalarQuantizer`` (fp16), 2 threads; at B = 1
   also ``Index.retrieve`` (soft) per dtype.
2. Accuracy of each dtype against float32: recall@10 and the largest soft
   retrieval output error, on this catalog and on the shipped MiniLM data.
3. ``softretrieval score`` (a subprocess, as a user runs it) on
   ``--score-queries`` queries top-10 against the saved float32 index, next
   to the same batches through the Python API in this process.

Prints medians (min-max) and ratios; writes JSON (``--out``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr
from softretrieval import cli, datasets

DTYPES = ("float32", "float16", "bfloat16", "int8")


def recall(ids, ref):
    return float(np.mean([np.intersect1d(a, b).size / ref.shape[1] for a, b in zip(ids, ref)]))


def accuracy(base, queries, temperature):
    """recall@10 and max soft-output error of each dtype against float32."""
    ref = sr.Index(base.shape[1])
    ref.add(base)
    _, ref_ids = ref.search(queries, 10)
    ref_out = ref.retrieve(queries, temperature=temperature)
    res = {}
    for dtype in DTYPES[1:]:
        index = sr.Index(base.shape[1], dtype=dtype)
        index.add(base)
        out = index.retrieve(queries, temperature=temperature)
        res[dtype] = {"recall@10": recall(index.search(queries, 10)[1], ref_ids),
                      "soft_max_abs_err": float(np.abs(out - ref_out).max()),
                      "soft_rel_err": float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--score-queries", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--score-runs", type=int, default=2)
    ap.add_argument("--out", default="bench_engine.json")
    args = ap.parse_args()
    N, d = args.n, args.d
    items, queries = datasets.catalog(N, max(max(args.batches), args.score_queries), d, seed=0)
    report = {"cpu": cpu_info(), "N": N, "d": d, "reps": args.reps, "cpu_count": os.cpu_count(),
              "faiss": faiss.__version__, "results": {}}
    tmp = tempfile.mkdtemp(prefix="bench_engine_")
    indexes = {}
    for dtype in DTYPES:
        index = sr.Index(d, dtype=dtype)
        index.add(items)
        path = os.path.join(tmp, dtype)
        index.save(path)
        mapped = sr.Index.load(path, mmap=True)
        indexes[dtype] = (index, mapped)
    flat = faiss.IndexFlatIP(d)
    flat.add(items)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(items[:1000])
    sq.add(items)
    faiss.omp_set_num_threads(os.cpu_count())
    print(f"N={N:,} d={d} clustered unit vectors, {args.reps} interleaved runs; ms median (min-max)")
    for B in args.batches:
        Q = queries[:B]
        methods = {}
        for dtype, (index, mapped) in indexes.items():
            methods[f"search {dtype}"] = lambda index=index: index.search(Q, 10)
            methods[f"search {dtype} mmap"] = lambda mapped=mapped: mapped.search(Q, 10)
            if B == 1:
                methods[f"retrieve {dtype}"] = lambda index=index: index.retrieve(Q)
        methods["FAISS IndexFlatIP"] = lambda: flat.search(Q, 10)
        methods["FAISS IndexScalarQuantizer fp16"] = lambda: sq.search(Q, 10)
        res = {name: stats(t) for name, t in interleaved(methods, args.reps).items()}
        print(f"\nB = {B}, top-10")
        print_rows(res, ours="search float32")
        speedup = {dtype: res["search float32"]["median_s"] / res[f"search {dtype}"]["median_s"]
                   for dtype in DTYPES[1:]}
        mmap_ratio = {dtype: res[f"search {dtype} mmap"]["median_s"] / res[f"search {dtype}"]["median_s"]
                      for dtype in DTYPES}
        print("  speed-up over float32 storage: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
        print("  memory-mapped / in memory: " + ", ".join(f"{k} {v:.2f}" for k, v in mmap_ratio.items()))
        report["results"][f"B={B}"] = {"times": res, "speedup_vs_float32": speedup,
                                       "mmap_over_memory": mmap_ratio}

    acc = {"synthetic": accuracy(items, queries[:1000], temperature=0.05)}
    minilm = datasets.load_minilm()
    acc["minilm"] = accuracy(minilm["base"], minilm["query"], temperature=0.05)
    print("\naccuracy against float32 storage (recall@10; soft output max abs / relative error):")
    for data, rows in acc.items():
        for dtype, r in rows.items():
            print(f"  {data:9s} {dtype:8s} recall@10 {r['recall@10']:.4f}   "
                  f"soft {r['soft_max_abs_err']:.2e} / {r['soft_rel_err']:.2e}")
    report["accuracy"] = acc

    nq = args.score_queries
    qfile = os.path.join(tmp, "queries.npy")
    np.save(qfile, queries[:nq])
    index32 = os.path.join(tmp, "float32")
    script = os.path.join(os.path.dirname(sys.executable), "softretrieval")
    cmd = [script if os.path.exists(script) else "softretrieval", "score", "--index", index32,
           "--queries", qfile, "--mode", "topk", "-k", "10", "--quiet",
           "--out", os.path.join(tmp, "out.npz")]
    loaded = sr.Index.load(index32)
    timings = {"softretrieval score (subprocess)": [], "Python API, same batches": []}
    for _ in range(args.score_runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        timings["softretrieval score (subprocess)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cli.score_batches(loaded, np.load(qfile, mmap_mode="r"), "topk", 10, progress=False)
        timings["Python API, same batches"].append(time.perf_counter() - t)
    res = {name: stats(t) for name, t in timings.items()}
    print(f"\nscore: {nq:,} queries x {N:,} items, top-10 ({args.score_runs} runs each)")
    print_rows(res, ours="Python API, same batches")
    report["score"] = {"queries": nq, "times": res}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
