"""Plots for docs/performance.md from the benchmarks' JSON results.

    python scripts/bench_attention.py --batches 1 16 256 1024 --out results/attention.json
    python scripts/bench_topk.py --batches 1 16 256 1024 --ks 10 --out results/topk.json
    python scripts/bench_attention.py --n 100000 --batches 1 --no-torch --out results/attention_n100k.json
    ... (one file per N)
    python scripts/plots.py --attention results/attention.json --topk results/topk.json \\
        --attention-n results/attention_n*.json --out docs/img

Draws, with matplotlib (``pip install matplotlib``; not a dependency of the
package): time against batch size B for soft retrieval and for top-k, each
peer beside us and the hardware limit of the same run as a dashed line; and
time against catalog size N at B = 1. The CPU model named in the JSON goes
into every title.
"""

import argparse
import json
import os


def load(path):
    with open(path) as f:
        return json.load(f)


def cpu_of(report):
    cpu = report.get("cpu") or report.get("machine", {}).get("cpu") or {}
    return f"{cpu.get('model', 'CPU')} ({', '.join(cpu.get('vector', [])) or 'no AVX'})"


def series(report, key_filter=lambda key: True):
    """{method: [(B, median_s, min_s, max_s)]} from a report's "results"."""
    out = {}
    for key, methods in report["results"].items():
        if not key.startswith("B=") or not key_filter(key):
            continue
        B = int(key.split("=")[1].split()[0].split(",")[0])
        for name, st in methods.items():
            if isinstance(st, dict) and "median_s" in st:
                out.setdefault(name, []).append((B, st["median_s"], st["min_s"], st["max_s"]))
    return {name: sorted(points) for name, points in out.items()}


def draw(ax, data, xlabel):
    import numpy as np

    for name, points in sorted(data.items()):
        x, med, lo, hi = (np.array(v) for v in zip(*points))
        style = dict(linestyle="--", color="black") if name.startswith("limit") else dict(marker="o")
        ax.errorbar(x, med * 1e3, yerr=[(med - lo) * 1e3, (hi - med) * 1e3], label=name,
                    capsize=3, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time per call (ms), median, min-max")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", help="bench_attention.py JSON with several batch sizes")
    ap.add_argument("--topk", help="bench_topk.py JSON with several batch sizes")
    ap.add_argument("--attention-n", nargs="*", default=[],
                    help="bench_attention.py JSONs at B = 1, one per N")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    written = []
    if args.attention:
        rep = load(args.attention)
        data = series(rep)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, {k: v for k, v in data.items() if "before" not in k}, "batch size B (queries)")
        ax.set_title(f"soft retrieval, N = {rep['N']:,}, d = dv = {rep['d']}\n{cpu_of(rep)}",
                     fontsize=9)
        written.append(os.path.join(args.out, "attention_vs_B.png"))
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
    if args.topk:
        rep = load(args.topk)
        k = min(int(key.split("k=")[1]) for key in rep["results"] if "k=" in key)
        data = series(rep, lambda key: key.endswith(f"k={k}"))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, data, "batch size B (queries)")
        ax.set_title(f"exact top-{k}, N = {rep['N']:,}, d = {rep['d']}\n{cpu_of(rep)}", fontsize=9)
        written.append(os.path.join(args.out, "topk_vs_B.png"))
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
    if args.attention_n:
        points = {}
        cpu = ""
        for path in args.attention_n:
            rep = load(path)
            cpu = cpu_of(rep)
            for name, st in rep["results"].get("B=1", {}).items():
                if isinstance(st, dict) and "median_s" in st and "before" not in name:
                    points.setdefault(name, []).append((rep["N"], st["median_s"], st["min_s"],
                                                        st["max_s"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, {k: sorted(v) for k, v in points.items()}, "catalog size N (keys)")
        ax.set_title(f"soft retrieval, B = 1, d = dv = 128\n{cpu}", fontsize=9)
        written.append(os.path.join(args.out, "attention_vs_N.png"))
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
