"""Grouped-query and causal attention speed, side by side with torch in one process.

    python scripts/bench_heads.py [--reps 3] [--out bench_heads.json]

GQA: H = 8 query heads over Hkv = 2 KV heads, N = 100,000 keys, B = 256
queries, d = dv = 128: softretrieval (query heads sharing a KV head stacked
into one block); torch SDPA with ``enable_gqa=True``; torch with the query
heads folded into the sequence axis (one KV head per group); and, as the
in-house reference, one single-head softretrieval call of B * H / Hkv queries
per KV head on contiguous keys.
Causal: T = S = 8192, H = 8, d = dv = 64: softretrieval causal and without
the mask, torch SDPA ``is_causal=True`` and without the mask.
Prints medians with min-max and ratios; writes JSON. Needs torch (``bench``).
"""

import argparse
import json

import numpy as np
import torch
from _bench import cpu_info, interleaved, print_rows, stats

import softretrieval as sr

F = torch.nn.functional


def sdpa(q, k, v, **kw):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, **kw)


def run(methods, reps):
    return {name: stats(t) for name, t in interleaved(methods, reps).items()}


def show(title, res, ours_name, ours, ref):
    """Record the largest difference from torch and print the timing rows."""
    res["max_abs_diff_vs_torch"] = float(np.abs(ours - ref).max())
    print(f"{title}; medians (min-max) in ms (max |ours - torch| = {res['max_abs_diff_vs_torch']:.1e})")
    print_rows({n: r for n, r in res.items() if isinstance(r, dict)}, ours=ours_name)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench_heads.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads()}

    B, H, Hkv, N, d = 256, 8, 2, 100_000, 128
    G = H // Hkv
    q = rng.standard_normal((B, H, d), dtype=np.float32)
    k = rng.standard_normal((N, Hkv, d), dtype=np.float32)
    v = rng.standard_normal((N, Hkv, d), dtype=np.float32)
    tq = torch.from_numpy(q).permute(1, 0, 2)[None]              # (1, H, B, d)
    tk = torch.from_numpy(k).permute(1, 0, 2)[None].contiguous()  # (1, Hkv, N, d)
    tv = torch.from_numpy(v).permute(1, 0, 2)[None].contiguous()
    tq_folded = tq.reshape(1, Hkv, G * B, d).contiguous()         # heads of a group in the sequence axis
    k_heads = [np.ascontiguousarray(k[:, g]) for g in range(Hkv)]
    v_heads = [np.ascontiguousarray(v[:, g]) for g in range(Hkv)]
    q_groups = [np.ascontiguousarray(q[:, g * G:(g + 1) * G].reshape(B * G, d)) for g in range(Hkv)]
    res = run({
        "softretrieval GQA": lambda: sr.attention(q, k, v),
        "softretrieval single-head calls": lambda: [sr.attention(q_groups[g], k_heads[g], v_heads[g])
                                                    for g in range(Hkv)],
        "torch SDPA enable_gqa": lambda: sdpa(tq, tk, tv, enable_gqa=True),
        "torch SDPA heads folded": lambda: sdpa(tq_folded, tk, tv),
    }, args.reps)
    report["gqa"] = show(f"GQA: B={B}, H={H}, Hkv={Hkv}, N={N:,}, d=dv={d}", res, "softretrieval GQA",
                         sr.attention(q, k, v),
                         sdpa(tq, tk, tv, enable_gqa=True)[0].permute(1, 0, 2).numpy())

    T, H, d = 8192, 8, 64
    q = rng.standard_normal((T, H, d), dtype=np.float32)
    k = rng.standard_normal((T, H, d), dtype=np.float32)
    v = rng.standard_normal((T, H, d), dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(a).permute(1, 0, 2)[None].contiguous() for a in (q, k, v))
    res = run({
        "softretrieval causal": lambda: sr.attention(q, k, v, causal=True),
        "softretrieval no mask": lambda: sr.attention(q, k, v),
        "torch SDPA is_causal": lambda: sdpa(tq, tk, tv, is_causal=True),
        "torch SDPA no mask": lambda: sdpa(tq, tk, tv),
    }, args.reps)
    report["causal"] = show(f"\nCausal: T=S={T}, H={H}, d=dv={d}", res, "softretrieval causal",
                            sr.attention(q, k, v, causal=True),
                            sdpa(tq, tk, tv, is_causal=True)[0].permute(1, 0, 2).numpy())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
