"""Naive float64 references, written plainly: the standard the kernels are held to."""

import numpy as np


def attention_ref(Q, K, V=None, scale=None, bias=None):
    """Softmax attention in float64 with the full (B, N) score matrix.

    Returns ``(out (B, dv), lse (B,))``; rows whose keys are all excluded
    (bias -inf) get ``out = 0`` and ``lse = -inf``.
    """
    Q = np.asarray(Q, np.float64)
    K = np.asarray(K, np.float64)
    V = K if V is None else np.asarray(V, np.float64)
    if scale is None:
        scale = 1.0 / np.sqrt(K.shape[1])
    logits = (Q @ K.T) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[None, :]
    out = np.zeros((Q.shape[0], V.shape[1]))
    lse = np.full(Q.shape[0], -np.inf)
    for b in range(Q.shape[0]):
        row = logits[b]
        if np.isneginf(row).all():
            continue
        m = row.max()
        w = np.exp(row - m)
        out[b] = (w @ V) / w.sum()
        lse[b] = m + np.log(w.sum())
    return out, lse


def merge_ref(outs, lses):
    """Merge of partial (out, lse) results in float64."""
    outs = np.asarray(outs, np.float64)
    lses = np.asarray(lses, np.float64)
    m = lses.max(axis=0)
    finite = np.isfinite(m)
    safe_m = np.where(finite, m, 0.0)
    w = np.where(np.isfinite(lses), np.exp(lses - safe_m), 0.0)
    total = w.sum(axis=0)
    out = np.where(finite[..., None], (w[..., None] * outs).sum(axis=0) / np.where(finite, total, 1.0)[..., None], 0.0)
    lse = np.where(finite, safe_m + np.log(np.where(finite, total, 1.0)), -np.inf)
    return out, lse
