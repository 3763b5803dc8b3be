"""Soft retrieval speed, side by side in one process, with the hardware limits.

    python scripts/bench_attention.py [--n 1000000] [--d 128] [--batches 1 1024] [--reps 5]

Runs, interleaved in each repetition: softretrieval.attention; torch
``scaled_dot_product_attention`` on the CPU (when torch is installed: the
``bench`` extra); a numpy tiled online-softmax baseline; and the limits
measured in the same run: for B > 1 the two bare sgemm products (Q.K^T and
P.V, numpy BLAS on all threads, key chunks of 4096), for B = 1 the time to read
K and V once (Numba prange over all threads). Prints medians with min-max and
ratios, and writes JSON (``--out``). Then, in fresh processes: peak memory of
a B = 1024 call above its inputs, import time, and the first call with a warm
Numba cache; and in this process: torch SDPA before vs after softretrieval
ran (the good-neighbour check) and concurrent calls from several threads.
"""

import argparse
import json
import os
import platform
import threading

import numpy as np
from _bench import cpu_info, interleaved, print_rows, read_once, stats, subprocess_json, timed

import softretrieval as sr

try:
    import torch
except ImportError:
    torch = None


def bare_sgemm(Q, K, V, chunk=4096):
    """The two products of attention without the softmax, tile by tile."""
    for s in range(0, K.shape[0], chunk):
        P = Q @ K[s:s + chunk].T
        P @ V[s:s + chunk]


def numpy_online_softmax(Q, K, V, scale, chunk=16384):
    """A plain numpy streaming softmax, the baseline a user would write."""
    B = Q.shape[0]
    m = np.full((B, 1), -np.inf, np.float32)
    l = np.zeros((B, 1), np.float32)
    acc = np.zeros((B, V.shape[1]), np.float32)
    for s in range(0, K.shape[0], chunk):
        S = (Q @ K[s:s + chunk].T) * np.float32(scale)
        m_new = np.maximum(m, S.max(axis=1, keepdims=True))
        c = np.exp(m - m_new)
        P = np.exp(S - m_new)
        l = l * c + P.sum(axis=1, keepdims=True)
        acc = acc * c + P @ V[s:s + chunk]
        m = m_new
    return acc / l


def torch_sdpa(Qt, Kt, Vt):
    with torch.no_grad():
        return torch.nn.functional.scaled_dot_product_attention(Qt, Kt, Vt)


PEAK_MEMORY = r"""
import json, os, threading, time, numpy as np, softretrieval as sr
N, d, B = {n}, {d}, {b}
rng = np.random.default_rng(0)
K = rng.standard_normal((N, d), dtype=np.float32)
V = rng.standard_normal((N, d), dtype=np.float32)
Q = rng.standard_normal((B, d), dtype=np.float32)
sr.attention(Q[:2], K[:5000], V[:5000]); sr.attention(Q[:1], K[:5000], V[:5000])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return page * int(f.read().split()[1])
before, peak, done = rss(), [0], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=poll); t.start()
out, lse = sr.attention(Q, K, V, return_lse=True)
done.set(); t.join()
print(json.dumps({{"extra_peak_mb": max(0, peak[0] - before) / 2**20,
                   "inputs_mb": (K.nbytes + V.nbytes + Q.nbytes) / 2**20}}))
"""

STARTUP = r"""
import json, time
t = time.perf_counter(); import softretrieval as sr; t_import = time.perf_counter() - t
import numpy as np
Q = np.ones((1024, 128), np.float32); K = np.ones((4096, 128), np.float32)
t = time.perf_counter(); sr.attention(Q, K, return_lse=True); sr.attention(Q[:1], K); t_first = time.perf_counter() - t
print(json.dumps({"import_s": t_import, "first_call_s": t_first}))
"""


def concurrent_calls(Q, K, V, threads=4):
    """Results of calls from several Python threads at once equal a lone call."""
    expected = sr.attention(Q, K, V)
    results = [None] * threads

    def work(i):
        results[i] = sr.attention(Q, K, V)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return all(r is not None and np.array_equal(r, expected) for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench_attention.json")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    use_torch = torch is not None and not args.no_torch

    rng = np.random.default_rng(0)
    N, d = args.n, args.d
    K = rng.standard_normal((N, d), dtype=np.float32)
    V = rng.standard_normal((N, d), dtype=np.float32)
    Qall = rng.standard_normal((max(args.batches), d), dtype=np.float32)
    scale = 1 / np.sqrt(d)
    report = {"machine": {"cpu": cpu_info(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "torch": torch.__version__ if torch else None},
              "N": N, "d": d, "reps": args.reps, "results": {}}

    torch_before = {}
    if use_torch:
        # (batch, heads, length, dim): the layout that takes torch's flash CPU kernel
        Kt, Vt = torch.from_numpy(K)[None, None], torch.from_numpy(V)[None, None]
        for B in args.batches:  # before any softretrieval call: the clean torch figure
            Qt = torch.from_numpy(Qall[:B])[None, None]
            torch_sdpa(Qt, Kt, Vt)
            torch_before[B] = timed(lambda: torch_sdpa(Qt, Kt, Vt), args.reps)

    print(f"N={N:,} d=dv={d} float32, {args.reps} interleaved runs; medians (min-max) in ms")
    for B in args.batches:
        Q = Qall[:B]
        methods = {"softretrieval": lambda: sr.attention(Q, K, V, return_lse=True),
                   "numpy online softmax": lambda: numpy_online_softmax(Q, K, V, scale)}
        if use_torch:
            Qt = torch.from_numpy(Q)[None, None]
            methods["torch SDPA (after)"] = lambda: torch_sdpa(Qt, Kt, Vt)
        if B == 1:
            methods["limit: read K+V once"] = lambda: read_once(K, V)
        else:
            methods["limit: bare sgemm QK^T, PV"] = lambda: bare_sgemm(Q, K, V)
        times = interleaved(methods, args.reps)
        if use_torch:
            times["torch SDPA (before)"] = torch_before[B]
        res = {name: stats(t) for name, t in times.items()}
        report["results"][f"B={B}"] = res
        print(f"\nB = {B}")
        print_rows(res)
        if use_torch:
            after, before = res["torch SDPA (after)"]["median_s"], res["torch SDPA (before)"]["median_s"]
            res["torch_after_over_before"] = after / before
            print(f"  good neighbour: torch SDPA after / before softretrieval = {after / before:.2f}")

    nq = min(64, Qall.shape[0])
    report["concurrent_threads_ok"] = concurrent_calls(Qall[:nq], K[:100_000], V[:100_000])
    print(f"\nconcurrent calls from 4 threads give the lone-call result: {report['concurrent_threads_ok']}")
    report["startup"] = subprocess_json(STARTUP)
    print(f"import softretrieval: {report['startup']['import_s']:.2f} s; first calls with a warm cache: "
          f"{report['startup']['first_call_s']:.2f} s")
    report["memory"] = subprocess_json(PEAK_MEMORY.format(n=N, d=d, b=max(args.batches)))
    print(f"peak RSS during a B={max(args.batches)} call above the RSS before it (inputs {report['memory']['inputs_mb']:.0f} MB): "
          f"{report['memory']['extra_peak_mb']:.1f} MB")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
