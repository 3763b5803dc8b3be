"""Per-thread sgemm rates on the kernels' tile shapes, for every BLAS at hand.

    python scripts/bench_gemm.py [--mkl /path/to/libmkl_rt.so] [--reps 5] [--out bench_gemm.json]

The soft-retrieval kernels spend most of a B = 1024 call in two products per
(query block, key tile): ``S = Q_b K_t^T`` and ``acc += P V_t``, each thread
on its own tiles with BLAS on one thread. This measures, single-threaded,
both products on the tile shapes the kernels use, through:

* Numba's ``np.dot`` inside ``njit`` (SciPy's bundled OpenBLAS: what the
  kernels call today);
* numpy's ``np.dot`` (numpy's own OpenBLAS build);
* torch's ``mm`` with one thread (the MKL inside torch's CPU wheel: what
  ``scaled_dot_product_attention`` runs on);
* MKL's ``cblas_sgemm`` through ctypes with MKL's sequential threading
  layer, when ``--mkl`` names a ``libmkl_rt`` (e.g. from the ``mkl`` wheel).

It answers whether a faster GEMM inside the kernels would pay on this
machine. Prints GFLOP/s (medians of ``--reps`` runs of 20 calls); writes JSON.
"""

import argparse
import ctypes
import json
import time

import numpy as np
from _bench import cpu_info
from numba import njit
from threadpoolctl import threadpool_limits

SHAPES = [(512, 512, 128), (512, 1024, 128), (512, 1024, 64), (256, 2048, 128)]


@njit(fastmath=True)
def _numba_pair(Q, K, S, V, A):
    np.dot(Q, K.T, S)
    np.dot(S, V, A)


def _mkl(path):
    """MKL's cblas_sgemm (sequential) from ``libmkl_rt`` at ``path``, or None."""
    if path is None:
        return None
    rt = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    rt.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    rt.MKL_Set_Threading_Layer(1)                       # MKL_THREADING_SEQUENTIAL
    sgemm = rt.cblas_sgemm
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                           ctypes.c_void_p, ctypes.c_int]
    sgemm.restype = None

    def pair(Q, K, S, V, A):
        m, d = Q.shape
        n, dv = K.shape[0], V.shape[1]
        sgemm(101, 111, 112, m, n, d, 1.0, Q.ctypes.data, d, K.ctypes.data, d, 0.0, S.ctypes.data, n)
        sgemm(101, 111, 111, m, dv, n, 1.0, S.ctypes.data, n, V.ctypes.data, dv, 0.0, A.ctypes.data, dv)

    return pair


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mkl", help="path of libmkl_rt.so (optional)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench_gemm.json")
    args = ap.parse_args()
    info = cpu_info()
    import torch

    torch.set_num_threads(1)
    mkl = _mkl(args.mkl)
    rng = np.random.default_rng(0)
    tiny = np.ones((2, 2), np.float32)
    _numba_pair(tiny, tiny, tiny.copy(), tiny, tiny.copy())   # loads SciPy's OpenBLAS, so the limit reaches it
    result = {"cpu": info, "shapes": {}}
    for bq, tn, d in SHAPES:
        Q = rng.standard_normal((bq, d), np.float32)
        K = rng.standard_normal((tn, d), np.float32)
        V = rng.standard_normal((tn, d), np.float32)
        S = np.empty((bq, tn), np.float32)
        A = np.empty((bq, d), np.float32)
        tq, tk, tv, ts = (torch.from_numpy(x) for x in (Q, K, V, S))
        methods = {"numba np.dot (SciPy OpenBLAS)": lambda: _numba_pair(Q, K, S, V, A),
                   "numpy np.dot (numpy OpenBLAS)": lambda: (np.dot(Q, K.T, S), np.dot(S, V, A)),
                   "torch mm, 1 thread (MKL)": lambda: (torch.mm(tq, tk.T, out=ts), torch.mm(ts, tv))}
        if mkl is not None:
            methods["MKL cblas_sgemm, sequential"] = lambda: mkl(Q, K, S, V, A)
        flops = 2 * 2 * bq * tn * d
        rates = {}
        with threadpool_limits(1):
            for name, fn in methods.items():
                fn()
                runs = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    for _ in range(20):
                        fn()
                    runs.append((time.perf_counter() - t) / 20)
                rates[name] = flops / float(np.median(runs)) / 1e9
        key = f"S = Q({bq}x{d}) K({tn}x{d})^T, acc = P V"
        result["shapes"][key] = rates
        print(key + ": " + ", ".join(f"{n} {r:.0f} GFLOP/s" for n, r in rates.items()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
