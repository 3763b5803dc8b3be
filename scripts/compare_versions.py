"""Two versions of softretrieval side by side, on the workloads of every benchmark.

    git worktree add /tmp/before <commit>
    python scripts/compare_versions.py /tmp/before/src src --rounds 2

Each round runs each version in its own process, alternating, on reduced
sizes of the workloads of bench_attention, bench_topk, bench_heads,
bench_engine and bench_memory, and prints the medians (ms) per version; a
refactor states these figures with its change.
"""

import argparse
import json
import subprocess
import sys

WORKLOADS = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import numpy as np, softretrieval as sr
rng = np.random.default_rng(0)
N, n = 1_000_000, 250_000
K = rng.standard_normal((N, 128), dtype=np.float32); V = rng.standard_normal((N, 128), dtype=np.float32)
Q1 = rng.standard_normal((1, 128), dtype=np.float32); Qb = rng.standard_normal((1024, 128), dtype=np.float32)
def med(f, reps):
    f(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(float(np.median(ts)) * 1000, 1)
r = {}
r["attention B=1"] = med(lambda: sr.attention(Q1, K, V), 7)
r["topk B=1 k=10"] = med(lambda: sr.topk(Q1, K, 10), 7)
r["attention B=1024 N=250k"] = med(lambda: sr.attention(Qb, K[:n], V[:n]), 3)
r["topk B=1024 N=250k k=10"] = med(lambda: sr.topk(Qb, K[:n], 10), 3)
r["topk_attention B=1024 N=250k"] = med(lambda: sr.topk_attention(Qb, K[:n], V[:n], k=32), 3)
q = rng.standard_normal((256, 8, 64), dtype=np.float32); kk = rng.standard_normal((100_000, 2, 64), dtype=np.float32)
r["GQA B=256 H=8 Hkv=2 N=100k"] = med(lambda: sr.attention(q, kk, kk), 3)
x = rng.standard_normal((1, 4096, 8, 64), dtype=np.float32)
r["causal T=S=4096 H=8"] = med(lambda: sr.attention(x, x, x, causal=True), 3)
for dt in ("float16", "int8"):
    idx = sr.Index(128, dtype=dt); idx.add(K)
    r[f"Index {dt} search B=1"] = med(lambda: idx.search(Q1, 10), 7)
mem = sr.KNNMemory(64, 64, 100_000, heads=8)
mem.write(rng.standard_normal((100_000, 8, 64), dtype=np.float32), rng.standard_normal((100_000, 8, 64), dtype=np.float32))
qm = rng.standard_normal((1, 8, 64), dtype=np.float32)
r["KNNMemory read T=1 H=8 k=32"] = med(lambda: mem.read(qm, k=32), 7)
print(json.dumps(r))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="src folder of the first version")
    ap.add_argument("after", help="src folder of the second version")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from _bench import cpu_info

    cpu_info()
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label in ("before", "after"):
            out = subprocess.run([sys.executable, "-c", WORKLOADS, getattr(args, label)],
                                 capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| workload | before (ms, {args.rounds} runs) | after (ms) |")
    print("|---|---|---|")
    for name in runs["before"][0]:
        cells = [" / ".join(f"{r[name]:g}" for r in runs[label]) for label in ("before", "after")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
