"""Helpers shared by the benchmark scripts: timing, statistics, probes."""

import json
import subprocess
import sys
import time

import numpy as np
from numba import njit, prange


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def stats(times):
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
            "max_s": float(np.max(times)), "runs": len(times)}


def interleaved(methods, reps):
    """Warm each method up, then time them in turn ``reps`` times.

    methods: {name: callable}. Returns {name: [seconds, ...]}.
    """
    for fn in methods.values():
        fn()
    times = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            times[name] += timed(fn, 1)
    return times


@njit(parallel=True, fastmath=True, cache=True)
def _read_once(K, V=None):
    """Touch every element of K (and V) once: a memory-bandwidth probe."""
    parts = 64
    N = K.shape[0]
    total = np.zeros(parts, np.float32)
    for p in prange(parts):
        s = np.float32(0.0)
        for i in range(p * N // parts, (p + 1) * N // parts):
            k = K[i]
            for c in range(k.shape[0]):
                s += k[c]
            if V is not None:
                v = V[i]
                for c in range(v.shape[0]):
                    s += v[c]
        total[p] = s
    return total.sum()


def read_once(K, V=None):
    """Read K (and V) once on all threads, under softretrieval's runtime (so
    the probe runs on the same Numba threading layer as the kernels)."""
    from softretrieval import runtime

    return runtime.parallel_call(_read_once, K, V)


def subprocess_json(code):
    """Run Python ``code`` in a fresh process; parse its last stdout line as JSON."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_rows(res, ours="softretrieval"):
    """Print ``name: median (min-max) ms  ratio`` rows and add the ratios to ``res``."""
    base = res[ours]["median_s"]
    for name, r in res.items():
        r["ratio_to_" + ours.replace(" ", "_")] = r["median_s"] / base
        print(f"  {name:34s} {1e3 * r['median_s']:10.1f} ({1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f})"
              f"   time / {ours} = {r['median_s'] / base:.2f}")
