"""softretrieval.topk against FAISS, side by side, on your own vector files.

    python scripts/validate_faiss.py --base B.fvecs --queries Q.fvecs [--groundtruth GT.ivecs] [-k 10 100]
                                     [--metric ip|l2]

With no arguments it runs on the shipped MiniLM embeddings. Prints, for each k:
recall@k of softretrieval and of FAISS against the ground truth (when given),
the share of ids on which the two agree, and the largest score difference.
Files: .fvecs / .ivecs / .npy.
"""

import argparse
import os
import sys

import faiss
import numpy as np

import softretrieval as sr
from softretrieval import datasets
from softretrieval.io import read_vectors

ROOT = os.path.join(datasets.ROOT, "minilm-pystdlib-384d")


def recall(ids, gt, k):
    """Mean over queries of |top-k ids  ∩  top-k ground truth| / k."""
    return float(np.mean([len(set(a[:k]) & set(g[:k])) / k for a, g in zip(ids, gt)]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=os.path.join(ROOT, "base.fvecs"))
    ap.add_argument("--queries", default=os.path.join(ROOT, "query.fvecs"))
    ap.add_argument("--groundtruth", default=None)
    ap.add_argument("-k", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--metric", choices=["ip", "l2"], default="ip")
    args = ap.parse_args(argv)
    if args.groundtruth is None and args.base == os.path.join(ROOT, "base.fvecs"):
        args.groundtruth = os.path.join(ROOT, "groundtruth.ivecs")

    base = np.ascontiguousarray(read_vectors(args.base), dtype=np.float32)
    queries = np.ascontiguousarray(read_vectors(args.queries), dtype=np.float32)
    gt = read_vectors(args.groundtruth) if args.groundtruth else None
    print(f"base {base.shape}, queries {queries.shape}, metric {args.metric}"
          + (f", ground truth {gt.shape}" if gt is not None else ""))
    index = faiss.IndexFlatIP(base.shape[1]) if args.metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    print(f"{'k':>5} {'recall sr':>10} {'recall faiss':>13} {'same ids':>10} {'max |score diff|':>17}")
    for k in args.k:
        scores, ids = sr.topk(queries, base, k, metric=args.metric)
        D, I = index.search(queries, k)
        same = float((ids == I).mean())
        diff = float(np.abs(scores - D).max())
        if gt is not None and k <= gt.shape[1]:
            r_sr, r_faiss = f"{recall(ids, gt, k):.5f}", f"{recall(I, gt, k):.5f}"
        else:
            r_sr = r_faiss = "-"
        print(f"{k:>5} {r_sr:>10} {r_faiss:>13} {same:>10.5f} {diff:>17.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
