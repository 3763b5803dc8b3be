"""One command for a machine with an NVIDIA GPU: every mode on CUDA against the
CPU path, then speed against torch on the same GPU, with the GPU's limits.

    python scripts/gpu_check.py [--quick] [--sweep] [--no-speed] [--out gpu_check.json]

1. Correctness (moderate shapes): soft retrieval with lse, bias and
   exclusions; top-k (k = 10, 100, 1024) for ip/cosine/l2; top-k attention
   with coverage; grouped-query causal attention with a prefix, a window and
   uneven lengths; each storage dtype of an Index; a KNNMemory read after
   writes that wrap its ring; device arrays in place.
   Max errors against ``device="cpu"``.
2. Speed (medians of 5 after a warm-up; ``--quick`` shrinks N): soft
   retrieval (d = 128; B = 1 at N = 1M and 10M, B = 1024 at N = 1M) against
   torch SDPA in fp32; top-k (k = 10 and 100) against
   ``torch.topk(Q @ K.T)``; B = 1 over float16, bfloat16 and int8 keys;
   causal (T = 8192, H = 8, d = 64) against SDPA ``is_causal``. For B = 1
   the fraction of the memory bandwidth reached (bytes stored, read once,
   over time, against a measured device-to-device copy); otherwise the
   ratio to torch. ``--sweep`` also times the tunable settings of
   :data:`SWEEP`.
3. Resources: registers, shared memory and occupancy of every kernel compiled.

Needs numba-cuda (``pip install -e ".[cuda]"``) and torch with CUDA. Runs in
about 5 minutes on an H200, most of it compiling kernels. Writes JSON (``--out``).
"""

import argparse
import json
import time

import numpy as np

import softretrieval as sr
from softretrieval import cuda as gpu


def max_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    if not (np.isfinite(a) == fin).all():
        return float("inf")
    return float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0


#: Shapes of the correctness pass: moderate on a GPU; TINY runs under numba's
#: CUDA simulator (tests/cudasim), so a broken check shows before GPU time is spent.
MODERATE = dict(B=300, N=20000, d=64, dv=32, excl=50, topk_B=64, ks=(10, 100, 1024), k_att=32,
                seq=(2, 512, 640, 8, 2, 64), lens=((512, 300), (640, 400)), window=256)
TINY = dict(B=5, N=70, d=6, dv=3, excl=4, topk_B=3, ks=(1, 6, 70), k_att=4,
            seq=(2, 9, 12, 4, 2, 5), lens=((9, 5), (12, 7)), window=4)


def correctness(rng, size=MODERATE):
    """Every mode on the GPU against ``device="cpu"``: name -> max errors
    (and, for top-k, the share of ids equal to the CPU's)."""
    from numba import cuda

    B, N, d, dv = size["B"], size["N"], size["d"], size["dv"]
    res = {}
    Q, K, V = (rng.standard_normal(s).astype(np.float32) for s in ((B, d), (N, d), (N, dv)))
    bias = np.log(rng.random(N)).astype(np.float32)
    excl = [rng.choice(N, size["excl"], replace=False) for _ in range(B)]
    a = sr.attention(Q, K, V, bias=bias, exclude=excl, return_lse=True, device="cuda")
    b = sr.attention(Q, K, V, bias=bias, exclude=excl, return_lse=True)
    res["soft out / lse"] = (max_err(a[0], b[0]), max_err(a[1], b[1]))
    tb = size["topk_B"]
    for metric in ("ip", "cosine", "l2"):
        for k in size["ks"]:
            s1, i1 = sr.topk(Q[:tb], K, k, metric=metric, device="cuda")
            s2, i2 = sr.topk(Q[:tb], K, k, metric=metric)
            res[f"topk {metric} k={k}: score err / same ids"] = (max_err(s1, s2), float((i1 == i2).mean()))
    r1 = sr.topk_attention(Q, K, V, size["k_att"], device="cuda")
    r2 = sr.topk_attention(Q, K, V, size["k_att"])
    res["topk_attention out / coverage"] = (max_err(r1.out, r2.out), max_err(r1.coverage, r2.coverage))
    batch, T, S, H, Hkv, dh = size["seq"]
    q = rng.standard_normal((batch, T, H, dh)).astype(np.float32)
    kv = rng.standard_normal((batch, S, Hkv, dh)).astype(np.float32)
    lens = tuple(np.array(x) for x in size["lens"])
    a = sr.attention(q, kv, kv, causal=True, window=size["window"], seq_lens=lens, device="cuda")
    b = sr.attention(q, kv, kv, causal=True, window=size["window"], seq_lens=lens)
    res["GQA causal prefix window lengths"] = max_err(a, b)
    for dtype in ("float16", "bfloat16", "int8"):
        index = sr.Index(d, dtype=dtype)
        index.add(K)
        res[f"Index {dtype} retrieve / search same ids"] = (
            max_err(index.retrieve(Q, device="cuda"), index.retrieve(Q)),
            float((index.search(Q, 10, device="cuda")[1] == index.search(Q, 10)[1]).mean()))
    mem = sr.KNNMemory(dh, dh, capacity=S, heads=Hkv)
    mem.write(kv[0], kv[0])
    mem.read(q[0], k=size["k_att"], device="cuda")           # makes the device copy of the ring
    mem.write(kv[1, : S // 2], kv[1, : S // 2])              # wraps around the ring
    r1 = mem.read(q[0], k=size["k_att"], device="cuda")
    r2 = mem.read(q[0], k=size["k_att"])
    same = (r1.ids == r2.ids).all(axis=-1)        # a near tie at the k-th place changes out
    res["KNNMemory top-k read out / same ids"] = (max_err(r1.out[same], r2.out[same]),
                                                  float((r1.ids == r2.ids).mean()))
    dQ, dK, dV = cuda.to_device(Q), cuda.to_device(K), cuda.to_device(V)
    out, lse = sr.attention(dQ, dK, dV, return_lse=True, device="cuda")
    ref = sr.attention(Q, K, V, return_lse=True)
    res["device arrays in place out / lse"] = (max_err(out.copy_to_host(), ref[0]),
                                              max_err(lse.copy_to_host(), ref[1]))
    return res


def failures(res, max_error=1e-3, min_same_ids=0.99):
    """The names of checks whose errors or id agreement are out of bounds."""
    bad = []
    for name, value in res.items():
        values = value if isinstance(value, tuple) else (value,)
        errors = values[:-1] if "same ids" in name else values
        if any(not e <= max_error for e in errors) or ("same ids" in name and values[-1] < min_same_ids):
            bad.append(name)
    return bad


def timed(fn, sync, reps=5):
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def speed(n_values, quick):
    import torch
    import torch.nn.functional as F
    from numba import cuda

    sync = torch.cuda.synchronize
    props = torch.cuda.get_device_properties(0)
    buf = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    copy_s = timed(lambda: buf.clone(), sync)[0]
    bandwidth = 2 * buf.numel() * 4 / copy_s          # read + write bytes per second
    a = torch.randn(8192, 8192, device="cuda")
    mm_s = timed(lambda: a @ a, sync)[0]
    fp32_flops = 2 * 8192 ** 3 / mm_s
    report = {"gpu": props.name, "measured_bandwidth_GBps": bandwidth / 1e9,
              "measured_fp32_matmul_TFLOPs": fp32_flops / 1e12, "runs": {}}
    d = 128
    for N in n_values:
        K = torch.randn(N, d, device="cuda")
        V = torch.randn(N, d, device="cuda")
        dK, dV = cuda.as_cuda_array(K), cuda.as_cuda_array(V)
        for B in (1, 1024) if N <= 1_000_000 else (1,):
            Q = torch.randn(B, d, device="cuda")
            dQ = cuda.as_cuda_array(Q)
            ours = timed(lambda: sr.attention(dQ, dK, dV, device="cuda"), sync)
            sdpa = timed(lambda: F.scaled_dot_product_attention(Q[None, None], K[None, None],
                                                                V[None, None]), sync)
            row = {"ours_s": ours, "torch_sdpa_s": sdpa, "time_over_torch": ours[0] / sdpa[0]}
            if B == 1:
                row["bandwidth_fraction"] = 2 * N * d * 4 / ours[0] / bandwidth
            report["runs"][f"soft N={N} B={B}"] = row
            for k in (10, 100):
                ours = timed(lambda: sr.topk(dQ, dK, k, device="cuda"), sync)
                ref = timed(lambda: torch.topk(Q @ K.T, k, dim=1), sync)
                row = {"ours_s": ours, "torch_matmul_topk_s": ref, "time_over_torch": ours[0] / ref[0]}
                if B == 1:
                    row["bandwidth_fraction"] = N * d * 4 / ours[0] / bandwidth
                report["runs"][f"topk N={N} B={B} k={k}"] = row
    compact(report, n_values[-1], bandwidth, sync)
    T, H, dh = (2048 if quick else 8192), 8, 64
    tq = torch.randn(1, T, H, dh, device="cuda")
    dq = cuda.as_cuda_array(tq)
    ours = timed(lambda: sr.attention(dq, dq, dq, causal=True, device="cuda"), sync, reps=3)
    ref = timed(lambda: F.scaled_dot_product_attention(tq.transpose(1, 2), tq.transpose(1, 2),
                                                       tq.transpose(1, 2), is_causal=True), sync)
    report["runs"][f"causal T={T} H={H} d={dh}"] = {
        "ours_s": ours, "torch_sdpa_s": ref, "time_over_torch": ours[0] / ref[0]}
    return report


def compact(report, N, bandwidth, sync, d=128):
    """B = 1 soft retrieval (values = keys) and top-k-10 over keys stored as
    float16, bfloat16 and int8 (with row scales) on the device: the fraction
    of the bandwidth counting the stored bytes read once."""
    import torch
    from numba import cuda

    from softretrieval.constants import LOG2E
    from softretrieval.devices import Logits, Mode, Problem, QueryTerms, Rows, masks

    base = torch.randn(N, d, device="cuda")
    stored = {"float16": (cuda.as_cuda_array(base.half().view(torch.int16)).view(np.uint16), None),
              "bfloat16": (cuda.as_cuda_array(base.bfloat16().view(torch.int16)), None),
              "int8": (cuda.as_cuda_array(torch.randint(-127, 128, (N, d), device="cuda",
                                                        dtype=torch.int8)),
                       cuda.as_cuda_array(torch.rand(N, device="cuda") / 127))}
    del base
    q = cuda.as_cuda_array(torch.randn(1, d, device="cuda"))
    none = cuda.to_device(np.zeros(0, np.float32))
    for name, (data, scale) in stored.items():
        rows = Rows(data, none if scale is None else scale, 0, d)
        problem = Problem(q, rows, rows, False, Logits(none, 0, np.float32(0)), masks(), None)
        soft = QueryTerms(qmult=LOG2E / np.sqrt(d))
        nbytes = N * d * data.dtype.itemsize
        for label, mode, terms in (("soft", Mode(True, True, 0), soft),
                                   ("topk k=10", Mode(False, False, 10), QueryTerms())):
            ours = timed(lambda: gpu.launch(problem, mode, terms), sync)
            report["runs"][f"{label} {name} keys N={N} B=1"] = {
                "ours_s": ours, "bandwidth_fraction": nbytes / ours[0] / bandwidth}


#: Tunables tried by ``--sweep`` (each against the defaults, in one process):
#: (workload, {config name: value}).
SWEEP = [
    ("B=1", {}), ("B=1", {"CUDA_CHUNK": 64}), ("B=1", {"CUDA_MIN_BLOCKS": 2112}),
    ("B=1024", {}), ("B=1024", {"CUDA_TILE_ROWS": 32, "CUDA_TILE_THREADS": 128}),
    ("B=1024", {"CUDA_MIN_BLOCKS": 264}), ("B=16", {}),
]


def sweep(sync, N=4_000_000, d=128):
    """Soft retrieval and top-k-10 times under each tunable setting of
    :data:`SWEEP` (N keys, d = dv = 128, device arrays): name -> seconds."""
    import torch
    from numba import cuda

    from softretrieval import config

    K = cuda.as_cuda_array(torch.randn(N, d, device="cuda"))
    V = cuda.as_cuda_array(torch.randn(N, d, device="cuda"))
    res = {}
    for workload, tunables in SWEEP:
        B = int(workload[2:])
        n = N if B <= 16 else N // 4
        Q = cuda.as_cuda_array(torch.randn(B, d, device="cuda"))
        saved = {name: getattr(config, name) for name in tunables}
        try:
            for name, value in tunables.items():
                setattr(config, name, value)
            label = f"{workload} N={n} " + (" ".join(f"{a}={b}" for a, b in tunables.items())
                                            or "defaults")
            res[f"soft {label}"] = timed(lambda: sr.attention(Q, K[:n], V[:n], device="cuda"), sync,
                                         reps=3)
            res[f"topk10 {label}"] = timed(lambda: sr.topk(Q, K[:n], 10, device="cuda"), sync,
                                           reps=3)
        finally:
            for name, value in saved.items():
                setattr(config, name, value)
    return res


def resources():
    """Registers per thread, static shared memory per block and the resident
    blocks per SM they allow (on this GPU), for every kernel compiled so far."""
    from numba import cuda

    dev = cuda.get_current_device()
    sms_shared = dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    info = {}
    for name, (kernel, threads) in gpu.compiled_kernels().items():
        for sig, regs in kernel.get_regs_per_thread().items():
            smem = kernel.get_shared_mem_per_block(sig)
            warps = -(-threads // 32)
            reg_blocks = 65536 // (warps * 256 * -(-regs * 32 // 256))
            blocks = min(32, 2048 // threads, reg_blocks, sms_shared // (smem + 1024))
            info[f"{name} {sig}"[:160]] = {
                "threads": threads, "registers_per_thread": regs, "shared_bytes": smem,
                "local_bytes_per_thread": kernel.get_local_mem_per_thread(sig),
                "blocks_per_sm": blocks, "occupancy": blocks * threads / 2048}
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 100k and 1M, T = 2048")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--sweep", action="store_true", help="also time the tunable settings of SWEEP")
    ap.add_argument("--no-speed", action="store_true", help="skip the comparison with torch")
    args = ap.parse_args()
    if not gpu.available():
        raise SystemExit("no CUDA GPU found by numba-cuda")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    report = {"correctness_max_errors": correctness(rng)}
    report["correctness_failures"] = failures(report["correctness_max_errors"])
    for name, value in report["correctness_max_errors"].items():
        flag = "FAIL" if name in report["correctness_failures"] else "ok"
        print(f"{name:50s} {flag:4s} {value}")
    if not args.no_speed:
        report["speed"] = speed([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000],
                                args.quick)
        print(f"\n{report['speed']['gpu']}: copy bandwidth "
              f"{report['speed']['measured_bandwidth_GBps']:.0f} GB/s, fp32 matmul "
              f"{report['speed']['measured_fp32_matmul_TFLOPs']:.1f} TFLOP/s")
        for name, row in report["speed"]["runs"].items():
            extra = (f"  bandwidth {100 * row['bandwidth_fraction']:.0f}%"
                     if "bandwidth_fraction" in row else "")
            ratio = f"time / torch {row['time_over_torch']:.2f}" if "time_over_torch" in row else ""
            print(f"{name:40s} ours {1e3 * row['ours_s'][0]:9.2f} ms   {ratio}{extra}")
    if args.sweep:
        import torch

        report["sweep"] = sweep(torch.cuda.synchronize)
        for name, times in report["sweep"].items():
            print(f"sweep {name:70s} {1e3 * times[0]:9.2f} ms")
    report["resources"] = resources()
    for name, row in report["resources"].items():
        print(f"{name[:70]:70s} {row['threads']:4d} threads {row['registers_per_thread']:4d} regs "
              f"{row['shared_bytes']:6d} B shared -> {row['blocks_per_sm']} blocks/SM "
              f"({100 * row['occupancy']:.0f}% occupancy)")
    report["total_s"] = time.perf_counter() - t
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
