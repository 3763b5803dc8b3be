"""Train a two-tower model with the exact full-catalog softmax and with the
usual in-batch sampled softmax, on a synthetic catalog with a planted
preference model; compare held-out recall@10, time per step and peak memory.

    python scripts/train_two_tower.py [--items 1000000] [--users 50000] [--steps 300]
                                      [--batch 1024] [--dim 32] [--out train_two_tower.json]

The data are synthetic (seeded), drawn from a hidden softmax model: items
fall into clusters; each user has a hidden taste vector; an interaction
picks a cluster with probability softmax(taste . cluster_centre / 0.5) and
then an item of that cluster with probability proportional to its
popularity (Zipf within the cluster) — a flat softmax over the catalog
whose logits are the cluster term plus the item's log-popularity. Each user
has 8 training interactions and 1 held out.

Both models are the same two towers (a user embedding table and an item
embedding table, d = --dim, Adam, same steps, batch and temperature):

* full softmax: ``softretrieval.torch.full_softmax_loss`` over the whole
  catalog (exact; every item gets a gradient every step);
* in-batch sampled softmax: the batch's own positives as the negatives
  (``F.cross_entropy`` on the (B, B) logits), the usual shortcut, which
  samples negatives by popularity.

Recall@10: the share of held-out interactions among a user's 10 best items
by ``softretrieval.topk`` over the whole catalog (items the user trained on
excluded). Prints the CPU model and a table; writes JSON. Needs torch.
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from _bench import cpu_info, peak_memory_MB, reset_peak_memory, resident_memory_MB

import softretrieval as sr
import softretrieval.torch as st

F = torch.nn.functional


def planted(items, users, clusters, per_user, seed=0, hidden=8):
    """Interactions (users, per_user + 1) from the hidden model; the last
    column is held out."""
    rng = np.random.default_rng(seed)
    cluster_of = rng.integers(0, clusters, items)
    centres = rng.standard_normal((clusters, hidden))
    taste = rng.standard_normal((users, hidden))
    members = [np.flatnonzero(cluster_of == c) for c in range(clusters)]
    cum = [np.cumsum(1.0 / np.arange(1, len(m) + 1) ** 1.1) for m in members]   # Zipf in a cluster
    logits = taste @ centres.T / 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cs = np.stack([rng.choice(clusters, per_user + 1, p=p) for p in probs])
    out = np.empty(cs.shape, np.int64)
    for c in range(clusters):
        at = cs == c
        draws = np.searchsorted(cum[c], rng.random(at.sum()) * cum[c][-1])
        out[at] = members[c][np.minimum(draws, len(members[c]) - 1)]
    return out


def train(kind, data, items, dim, steps, batch, temperature, lr, seed=0):
    torch.manual_seed(seed)
    users = data.shape[0]
    U = torch.nn.Parameter(0.1 * torch.randn(users, dim))
    V = torch.nn.Parameter(0.1 * torch.randn(items, dim))
    opt = torch.optim.Adam([U, V], lr=lr)
    pairs = np.stack([np.repeat(np.arange(users), data.shape[1] - 1),
                      data[:, :-1].ravel()], 1)
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(steps):
        pick = pairs[rng.integers(0, len(pairs), batch)]
        u = torch.from_numpy(pick[:, 0])
        t = torch.from_numpy(pick[:, 1])
        start = time.perf_counter()
        opt.zero_grad()
        if kind == "full":
            loss = st.full_softmax_loss(U[u], V, t, temperature=temperature)
        else:
            logits = U[u] @ V[t].T / temperature
            loss = F.cross_entropy(logits, torch.arange(batch))
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return U.detach().numpy(), V.detach().numpy(), times


def recall_at_10(U, V, data):
    train_items = data[:, :-1]
    exclude = [np.unique(row) for row in train_items]
    _, ids = sr.topk(U, V, 10, exclude=exclude)
    return float(np.mean([data[i, -1] in ids[i] for i in range(len(data))]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="train_two_tower.json")
    ap.add_argument("--only", choices=("full", "in-batch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:                    # one model in this (fresh) process: its own peak memory
        data = planted(args.items, args.users, args.clusters, per_user=8)
        base = resident_memory_MB()
        reset_peak_memory()
        U, V, times = train(args.only, data, args.items, args.dim, args.steps, args.batch,
                            args.temperature, args.lr)
        peak = peak_memory_MB() - base
        print(json.dumps({"recall_at_10": recall_at_10(U, V, data),
                          "median_step_s": float(np.median(times)), "peak_rss_growth_MB": peak}))
        return
    report = {"cpu": cpu_info(), "args": vars(args)}
    for kind in ("full", "in-batch"):
        cmd = [sys.executable, __file__, "--only", kind] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("only", "out")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        report[kind] = json.loads(res.stdout.strip().splitlines()[-1])
        r = report[kind]
        print(f"{kind:9s} softmax: held-out recall@10 {r['recall_at_10']:.4f}, "
              f"{1e3 * r['median_step_s']:.0f} ms per step, peak memory above the data "
              f"{r['peak_rss_growth_MB']:.0f} MB (model, optimizer state and the steps' work)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
