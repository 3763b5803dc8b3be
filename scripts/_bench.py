"""Helpers shared by the benchmark scripts: timing, statistics, probes."""

import json
import os
import subprocess
import sys
import time

import numpy as np
from numba import njit, prange


VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


#: Environment variables that hold a library to narrower vector code paths
#: than the CPU has (scripts/avx2_paths.sh sets them all).
LIMITING_ENV = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY",
                "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FAISS_OPT_LEVEL")


def cpu_info():
    """The CPU model and its vector extensions (from /proc/cpuinfo), printed
    once: every figure is read against the machine that made it."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    info = {"model": model, "vector": [f for f in VECTOR_FLAGS if f in flags],
            "cores": os.cpu_count()}
    limits = {k: os.environ[k] for k in LIMITING_ENV if k in os.environ}
    if limits:
        info["code_paths_limited_by"] = limits
    print(f"CPU: {info['model']}, {info['cores']} cores; vector extensions: "
          f"{' '.join(info['vector']) or 'none of ' + ' '.join(VECTOR_FLAGS)}")
    if limits:
        print("code paths limited by: " + " ".join(f"{k}={v}" for k, v in limits.items()))
    return info


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


@njit(parallel=True, cache=True)
def _sum_words(W, X):
    """Sum the int32 words of W and X (1-D) on all threads: integer adds,
    which vectorize and never stall on what the bytes hold, so the probe
    measures memory bandwidth whatever the stored dtype."""
    parts = 64
    total = np.zeros(parts, np.int64)
    for p in prange(parts):
        s = 0
        w = W[p * W.shape[0] // parts:(p + 1) * W.shape[0] // parts]
        for i in range(w.shape[0]):       # from 0 over a slice: vectorizes
            s += w[i]
        x = X[p * X.shape[0] // parts:(p + 1) * X.shape[0] // parts]
        for i in range(x.shape[0]):
            s += x[i]
        total[p] = s
    return total.sum()


def _words(a):
    """The bytes of a C-contiguous array as int32 words (a trailing partial word is left out)."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return flat[: flat.size // 4 * 4].view(np.int32)


def read_once(K, V=None):
    """Read the bytes of K (and V) once on all threads — a plain parallel
    Numba sum of their int32 words, whatever their dtype — under
    softretrieval's runtime (the same Numba threading layer as the kernels)."""
    from softretrieval import runtime

    return runtime.parallel_call(_sum_words, _words(K), _words(V if V is not None else np.zeros(0, np.int32)))


def reset_peak_memory():
    """Reset this process's peak resident memory (Linux: ``/proc/self/clear_refs``),
    so that :func:`peak_memory_MB` reports the peak from here on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_MB():
    """Peak resident memory (``VmHWM``) since the last :func:`reset_peak_memory`, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def resident_memory_MB():
    """Resident memory now (``VmRSS``), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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
