"""The backward pass, side by side with torch in one process.

    python scripts/bench_backward.py [--reps 3] [--quick] [--out bench_backward.json]

1. Soft attention, B = 1024, N = 1M, d = dv = 128: softretrieval's forward
   and its backward (``attention_backward``): the backward's time over the
   forward's.
2. Causal T = S = 8192, H = 8, d = 64 and grouped-query B = 256, H = 8,
   Hkv = 2, N = 100k, d = 128 (the shapes of ``bench_heads.py``): forward +
   backward, softretrieval (``softretrieval.torch.attention``) against torch
   CPU autograd through ``scaled_dot_product_attention``.
3. ``full_softmax_loss`` forward + backward, B = 4096, N = 1M, d = 64:
   softretrieval against torch computing the same loss densely in chunks of
   items (each chunk's logits recomputed in the backward by
   ``torch.utils.checkpoint``, so its memory stays one chunk; the best of
   several chunk sizes), each run in a fresh process that reports its peak
   resident memory during the timed runs above the inputs and the gradients
   it must return (the dense logits alone would be 16 GB); torch's
   dense runs take minutes each, so they get ``--dense-reps`` runs (1).

Prints medians with min-max and ratios, the CPU model and its vector
extensions; writes JSON. Needs torch (the ``bench`` extra). ``--quick``
shrinks every N and T by 16 (a smoke test, not figures).
"""

import argparse
import json
import os

import numpy as np
import torch
from _bench import cpu_info, interleaved, print_rows, stats, subprocess_json

import softretrieval as sr
import softretrieval.torch as st

F = torch.nn.functional


def run(methods, reps):
    return {name: stats(t) for name, t in interleaved(methods, reps).items()}


def soft(B, N, d, reps):
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal(s, dtype=np.float32) for s in ((B, d), (N, d), (N, d)))
    dO = rng.standard_normal((B, d), dtype=np.float32)
    out, lse = sr.attention(Q, K, V, return_lse=True)
    res = run({"softretrieval forward": lambda: sr.attention(Q, K, V, return_lse=True),
               "softretrieval backward": lambda: sr.attention_backward(Q, K, V, out, lse, dO)},
              reps)
    print(f"soft attention B={B} N={N} d=dv={d}; medians (min-max) in ms")
    print_rows(res, "softretrieval forward")
    return res


def heads(name, q, k, v, reps, **kw):
    """Forward + backward of ours and of torch SDPA (float32 CPU autograd)."""
    G = q.shape[2] // k.shape[2]
    w = torch.randn(q.shape[:-1] + v.shape[-1:])

    def ours():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        (st.attention(*leaves, **kw) * w).sum().backward()

    def torch_sdpa():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        qq, kk, vv = leaves[0], *(x.repeat_interleave(G, dim=2) for x in leaves[1:])
        out = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2),
                                             vv.transpose(1, 2), is_causal=kw.get("causal", False))
        (out.transpose(1, 2) * w).sum().backward()

    res = run({"softretrieval": ours, "torch SDPA autograd": torch_sdpa}, reps)
    print(f"{name} forward + backward; medians (min-max) in ms")
    print_rows(res)
    return res


LOSS_CODE = """
import json, sys, time, numpy as np, torch
sys.path.insert(0, {scripts!r})
from _bench import peak_memory_MB, reset_peak_memory, resident_memory_MB
torch.manual_seed(0)
B, N, d, chunk, method = {B}, {N}, {d}, {chunk}, {method!r}
q = torch.randn(B, d, requires_grad=True)
k = torch.randn(N, d, requires_grad=True)
t = torch.randint(0, N, (B,))


def dense_chunked():
    from torch.utils.checkpoint import checkpoint
    parts = [checkpoint(lambda kc: torch.logsumexp(q @ kc.T * 4.0, 1), k[i:i + chunk],
                        use_reentrant=False) for i in range(0, N, chunk)]
    lse = torch.logsumexp(torch.stack(parts, 1), 1)
    return (lse - 4.0 * (q * k[t]).sum(1)).mean()


def ours():
    import softretrieval.torch as st
    return st.full_softmax_loss(q, k, t, temperature=0.25)


f = ours if method == "ours" else dense_chunked
if method == "ours":
    f().backward()                               # warm-up (compiles the kernels)
q.grad = k.grad = None
base = resident_memory_MB()
reset_peak_memory()
times = []
for _ in range({reps}):
    q.grad = k.grad = None
    s = time.perf_counter()
    f().backward()
    times.append(time.perf_counter() - s)
grads = (q.numel() + k.numel()) * 4 / 2**20
print(json.dumps({{"times": times, "peak_extra_MB": peak_memory_MB() - base - grads}}))
"""


def loss(B, N, d, reps, chunks, dense_reps):
    """full_softmax_loss against torch dense-in-chunks, each in a fresh process
    (torch, which compiles nothing, gets no warm-up and ``dense_reps`` runs)."""
    res = {}
    for name, method, chunk in [("softretrieval full_softmax_loss", "ours", 0)] + [
            (f"torch dense, chunks of {c}", "dense", c) for c in chunks if dense_reps > 0]:
        out = subprocess_json(LOSS_CODE.format(scripts=os.path.dirname(os.path.abspath(__file__)),
                                               B=B, N=N, d=d, chunk=chunk, method=method,
                                               reps=reps if method == "ours" else dense_reps))
        res[name] = dict(stats(out["times"]), peak_extra_MB=out["peak_extra_MB"])
    print(f"full_softmax_loss forward + backward, B={B} N={N} d={d}; medians (min-max) in ms, "
          "peak memory above the inputs and the returned gradients")
    print_rows(res, "softretrieval full_softmax_loss")
    for name, r in res.items():
        print(f"  {name:34s} peak extra {r['peak_extra_MB']:8.0f} MB")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dense-reps", type=int, default=1,
                    help="runs of torch's dense loss (minutes each at N = 1M; 0: skip it)")
    ap.add_argument("--out", default="bench_backward.json")
    ap.add_argument("--sections", default="soft,causal,gqa,loss",
                    help="which of soft, causal, gqa, loss to run (comma-separated)")
    args = ap.parse_args()
    s = 16 if args.quick else 1
    report = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads()}
    sections = args.sections.split(",")
    if "soft" in sections:
        report["soft"] = soft(1024, 1_000_000 // s, 128, args.reps)
    g = torch.Generator().manual_seed(0)
    if "causal" in sections:
        T = 8192 // s
        q = torch.randn(1, T, 8, 64, generator=g)
        report["causal"] = heads(f"causal T=S={T} H=8 d=64", q, q.clone(), q.clone(), args.reps,
                                 causal=True)
    if "gqa" in sections:
        qg = torch.randn(256, 8, 128, generator=g)
        kg = torch.randn(100_000 // s, 2, 128, generator=g)
        report["gqa"] = heads(f"GQA B=256 H=8 Hkv=2 N={kg.shape[0]} d=128", qg[None], kg[None],
                              kg[None].clone(), args.reps)
    if "loss" in sections:
        report["full_softmax_loss"] = loss(4096, 1_000_000 // s, 64, args.reps,
                                           (4096, 65_536 // s), args.dense_reps)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
