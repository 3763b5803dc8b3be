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


def scores_ref(Q, K, metric="ip"):
    """(B, N) float64 similarities ("ip", "cosine") or squared distances ("l2")."""
    Q = np.asarray(Q, np.float64)
    K = np.asarray(K, np.float64)
    if metric == "cosine":
        qn = np.linalg.norm(Q, axis=1, keepdims=True)
        kn = np.linalg.norm(K, axis=1, keepdims=True)
        Q = np.divide(Q, qn, out=np.zeros_like(Q), where=qn > 0)
        K = np.divide(K, kn, out=np.zeros_like(K), where=kn > 0)
    if metric == "l2":
        return ((Q[:, None, :] - K[None, :, :]) ** 2).sum(-1)
    return Q @ K.T


def exclusion_mask(B, N, exclude):
    """(B, N) bool, True where a key is excluded for a query (list-of-arrays form)."""
    mask = np.zeros((B, N), bool)
    if exclude is not None:
        for b, ids in enumerate(exclude):
            mask[b, np.asarray(ids, int)] = True
    return mask


def topk_ref(Q, K, k, metric="ip", bias=None, exclude=None):
    """Exact top-k in float64: sort by score (ties: lower id), pad with -1 and -inf/+inf."""
    S = scores_ref(Q, K, metric)
    B, N = S.shape
    sign = 1.0 if metric == "l2" else -1.0      # sort by sign * score, ascending
    if bias is not None:
        bias = np.asarray(bias, np.float64)[None, :]
        with np.errstate(invalid="ignore"):
            S = S - bias if metric == "l2" else S + bias
    valid = np.ones((B, N), bool) & ~exclusion_mask(B, N, exclude)
    if bias is not None:
        valid &= np.isfinite(bias)
    pad = np.inf if metric == "l2" else -np.inf
    scores = np.full((B, k), pad)
    ids = np.full((B, k), -1, np.int64)
    for b in range(B):
        cand = np.flatnonzero(valid[b])
        order = cand[np.lexsort((cand, sign * S[b, cand]))][:k]
        scores[b, : order.size] = S[b, order]
        ids[b, : order.size] = order
    return scores, ids


def topk_attention_ref(Q, K, V=None, k=32, scale=None, bias=None, exclude=None, metric="ip"):
    """Softmax over each query's top-k logits (ties: lower id) in float64.

    Returns ``(out, ids, weights, lse_full, coverage)``.
    """
    V = K if V is None else V
    V = np.asarray(V, np.float64)
    if scale is None:
        scale = 1.0 / np.sqrt(np.asarray(K).shape[1])
    S = scores_ref(Q, K, metric)
    logits = -scale * S if metric == "l2" else scale * S
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[None, :]
    logits[exclusion_mask(*logits.shape, exclude)] = -np.inf
    B, N = logits.shape
    out = np.zeros((B, V.shape[1]))
    ids = np.full((B, k), -1, np.int64)
    weights = np.zeros((B, k))
    lse = np.full(B, -np.inf)
    coverage = np.zeros(B)
    for b in range(B):
        cand = np.flatnonzero(np.isfinite(logits[b]))
        if cand.size == 0:
            continue
        order = cand[np.lexsort((cand, -logits[b, cand]))][:k]
        m = logits[b, cand].max()
        lse[b] = m + np.log(np.exp(logits[b, cand] - m).sum())
        w = np.exp(logits[b, order] - m)
        lse_top = m + np.log(w.sum())
        w /= w.sum()
        ids[b, : order.size] = order
        weights[b, : order.size] = w
        out[b] = w @ V[order]
        coverage[b] = np.exp(lse_top - lse[b])
    return out, ids, weights, lse, coverage


def sequence_mask(T, S, ql, kl, causal, window):
    """(T, S) bool, True where query t may not see key j: a batch element
    with lengths (ql, kl) lets query t see key j when ``j < kl`` and, if
    causal, ``j <= t + kl - ql`` and (with a window) ``j > t + kl - ql -
    window``; positions ``t >= ql`` see nothing."""
    t = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    visible = (j < kl) & (t < ql)
    if causal:
        visible &= j <= t + kl - ql
        if window is not None:
            visible &= j > t + kl - ql - window
    return ~visible


def sequence_attention_ref(q, k, v, scale=None, causal=False, window=None, q_lens=None,
                           k_lens=None, bias=None):
    """Multi-head / grouped-query attention with explicit masks, in float64.

    q (batch, T, H, d), k (batch, S, Hkv, d), v (batch, S, Hkv, dv); bias (S,)
    or (Hkv, S). Query t of a batch element with lengths (ql, kl) sees key j
    when ``j < kl`` and, if causal, ``j <= t + kl - ql`` and (with a window)
    ``j > t + kl - ql - window``; positions ``t >= ql`` give 0 and -inf.
    Returns ``(out (batch, T, H, dv), lse (batch, T, H))``.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, T, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((batch, T, H, v.shape[3]))
    lse = np.full((batch, T, H), -np.inf)
    for b in range(batch):
        ql = T if q_lens is None else int(q_lens[b])
        kl = S if k_lens is None else int(k_lens[b])
        visible_all = ~sequence_mask(T, S, ql, kl, causal, window)
        for h in range(H):
            g = h // G
            for t in range(ql):
                visible = visible_all[t]
                logits = scale * (k[b, :, g] @ q[b, t, h])
                if bias is not None:
                    bb = np.asarray(bias, np.float64)
                    logits = logits + (bb[g] if bb.ndim == 2 else bb)
                logits[~visible] = -np.inf
                if np.isneginf(logits).all():
                    continue
                m = logits.max()
                w = np.exp(logits - m)
                out[b, t, h] = (w @ v[b, :, g]) / w.sum()
                lse[b, t, h] = m + np.log(w.sum())
    return out, lse


def attention_grads_ref(Q, K, V, dO, dlse=None, scale=None, bias=None, metric="ip", mask=None):
    """Gradients of soft attention in float64 with the full (B, N) matrices.

    The logits ``z`` are ``scale * q.k`` ("ip"), ``scale * cos(q, k)``
    ("cosine") or ``-scale * |q - k|^2`` ("l2"), plus ``bias``; ``mask``
    (B, N) bool marks excluded pairs. With ``P = softmax(z)``, ``out = P V``
    and ``lse``, the loss's gradients ``dO`` (B, dv) and ``dlse`` (B,) give
    ``dZ = P * (dO V^T - rowsum(dO * out) + dlse)``, and then, written out per
    metric: dQ, dK, dV = P^T dO, dbias = colsum(dZ). Rows with no valid key
    get zero gradients. Returns ``(dQ, dK, dV, dbias)``.
    """
    Q, K, V, dO = (np.asarray(a, np.float64) for a in (Q, K, V, dO))
    B, d = Q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    dlse = np.zeros(B) if dlse is None else np.asarray(dlse, np.float64)
    qn = np.linalg.norm(Q, axis=1, keepdims=True)
    kn = np.linalg.norm(K, axis=1, keepdims=True)
    Qh = np.divide(Q, qn, out=np.zeros_like(Q), where=qn > 0)
    Kh = np.divide(K, kn, out=np.zeros_like(K), where=kn > 0)
    if metric == "ip":
        z = scale * Q @ K.T
    elif metric == "cosine":
        z = scale * Qh @ Kh.T
    else:
        z = -scale * ((Q * Q).sum(1)[:, None] - 2 * Q @ K.T + (K * K).sum(1)[None, :])
    if bias is not None:
        z = z + np.asarray(bias, np.float64)[None, :]
    if mask is not None:
        z = np.where(mask, -np.inf, z)
    P = np.zeros_like(z)
    for b in range(B):
        if np.isfinite(z[b]).any():
            w = np.exp(z[b] - z[b][np.isfinite(z[b])].max())
            P[b] = w / w.sum()
    out = P @ V
    dZ = P * (dO @ V.T - (dO * out).sum(1, keepdims=True) + dlse[:, None])
    dV = P.T @ dO
    if metric == "ip":
        dQ, dK = scale * dZ @ K, scale * dZ.T @ Q
    elif metric == "l2":
        dQ = 2 * scale * (dZ @ K - dZ.sum(1)[:, None] * Q)
        dK = 2 * scale * (dZ.T @ Q - dZ.sum(0)[:, None] * K)
    else:
        dQh, dKh = scale * dZ @ Kh, scale * dZ.T @ Qh
        dQ = np.divide(dQh - (dQh * Qh).sum(1, keepdims=True) * Qh, qn, out=np.zeros_like(Q),
                       where=qn > 0)
        dK = np.divide(dKh - (dKh * Kh).sum(1, keepdims=True) * Kh, kn, out=np.zeros_like(K),
                       where=kn > 0)
    return dQ, dK, dV, dZ.sum(0)


def sequence_grads_ref(q, k, v, dO, dlse, scale=None, causal=False, window=None, q_lens=None,
                       k_lens=None, bias=None):
    """Gradients of :func:`sequence_attention_ref` (ip), by
    :func:`attention_grads_ref` per (batch element, head) with
    :func:`sequence_mask`; grouped-query heads sum into their KV head.
    Returns ``(dq, dk, dv, dbias)`` shaped like q, k, v and bias."""
    batch, T, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    grads = [np.zeros(np.shape(a)) for a in (q, k, v)]
    dbias = None if bias is None else np.zeros(np.shape(bias))
    for b in range(batch):
        ql = T if q_lens is None else int(q_lens[b])
        kl = S if k_lens is None else int(k_lens[b])
        mask = sequence_mask(T, S, ql, kl, causal, window)
        for h in range(H):
            g = h // G
            hb = None if bias is None else (bias[g] if np.ndim(bias) == 2 else bias)
            dQ, dK, dV, db = attention_grads_ref(q[b, :, h], k[b, :, g], v[b, :, g], dO[b, :, h],
                                                 dlse[b, :, h], scale=scale, bias=hb, mask=mask)
            grads[0][b, :, h] += dQ
            grads[1][b, :, g] += dK
            grads[2][b, :, g] += dV
            if bias is not None:
                if np.ndim(bias) == 2:
                    dbias[g] += db
                else:
                    dbias += db
    return (*grads, dbias)
