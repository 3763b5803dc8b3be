"""Gradients of soft attention: :func:`attention_backward`.

The backward pass runs on the forward's problems (:func:`api._problems`):
the same prepared queries, keys, logit terms, exclusions and windows; the
kernel (:mod:`softretrieval.cpu_backward`) recomputes each score tile and
returns the gradients with respect to the prepared queries and the stored
keys. The chain rule through the metric, the scale and the bias is applied
here, once per problem, in O((B + N) d):

* ``logit = scale q.k`` ("ip"): ``dq = scale * gq``, ``dk = scale * gk'``;
* ``logit = -scale |q - k|^2`` ("l2"): adds ``-2 scale q rowsum(dS)`` and
  ``-2 scale k colsum(dS)``;
* ``logit = scale cos(q, k)`` ("cosine"): the gradients with respect to the
  unit vectors, projected off the vector and divided by its norm (a zero
  vector gets a zero gradient);

where ``dS`` is the gradient of the natural-log logits. The bias gradient is
``colsum(dS)``. Grouped-query heads sum into their KV head's ``dK``, ``dV``;
with ``values=None`` (the keys serve as values) ``dV`` is added to ``dK``.
"""

from typing import NamedTuple, Optional

import numpy as np
from numpy.typing import ArrayLike

from . import api, layout, validate
from .constants import LN2, LOG2E
from .terms import logit_terms


class AttentionGrads(NamedTuple):
    """Gradients returned by :func:`attention_backward`, float32, each in the
    shape of its input: ``queries``, ``keys``, ``values`` (None when the
    forward had ``values=None``: that gradient is in ``keys``) and ``bias``
    (None without a bias)."""

    queries: np.ndarray
    keys: np.ndarray
    values: Optional[np.ndarray]
    bias: Optional[np.ndarray]


def attention_backward(queries: ArrayLike, keys: ArrayLike, values: Optional[ArrayLike],
                       out: ArrayLike, lse: ArrayLike, grad_out: ArrayLike,
                       grad_lse: Optional[ArrayLike] = None, *, scale: Optional[float] = None,
                       bias: Optional[ArrayLike] = None, metric: str = "ip",
                       exclude: api.Exclude = None, causal: bool = False,
                       window: Optional[int] = None, seq_lens: api.SeqLens = None,
                       device: str = "cpu") -> AttentionGrads:
    """Gradients of :func:`softretrieval.attention` with respect to its
    queries, keys, values and bias, by streaming over key tiles again (no
    B x N matrix: extra memory O((B + N) d)).

    Parameters
    ----------
    queries, keys, values, scale, bias, metric, exclude, causal, window,
    seq_lens : exactly as given to the forward call (every shape of
        :func:`softretrieval.attention`: retrieval, multi-head,
        grouped-query, batched causal sequences).
    out, lse : the forward's outputs (``return_lse=True``): out with the
        queries' leading axes and ``dv`` columns, lse with the leading axes.
    grad_out : the gradient of the loss with respect to ``out``, same shape.
    grad_lse : optional, the gradient with respect to ``lse``, same shape as
        ``lse``.
    device : "cpu" (the only target with a backward pass so far).

    Returns
    -------
    :class:`AttentionGrads` ``(queries, keys, values, bias)``, float32, each
    shaped like its input (bias ``(N,)`` or ``(Hkv, N)``).

    Computation is float32, like the forward. Queries with no valid key
    (every key excluded, or masked by their window) get zero gradients and
    pass none to any key; excluded keys and keys with a ``-inf`` bias get
    none either.
    """
    return _backward(queries, keys, values, out, lse, grad_out, grad_lse, scale=scale, bias=bias,
                     metric=metric, exclude=exclude, causal=causal, window=window,
                     seq_lens=seq_lens, device=device)


def logsumexp_backward(queries: ArrayLike, keys: ArrayLike, lse: ArrayLike, grad_lse: ArrayLike,
                       *, scale: Optional[float] = None, bias: Optional[ArrayLike] = None,
                       metric: str = "ip", exclude: api.Exclude = None, causal: bool = False,
                       window: Optional[int] = None, seq_lens: api.SeqLens = None,
                       device: str = "cpu") -> AttentionGrads:
    """Gradients of :func:`softretrieval.logsumexp` (``lse`` its output,
    ``grad_lse`` the loss's gradient with respect to it) for the queries,
    keys and bias: ``dq_b = sum_n P_bn dlse_b dlogit/dq`` and so on, with
    ``P`` the softmax over every key; one streaming pass, no value pass.
    Arguments as :func:`attention_backward`; returns
    :class:`AttentionGrads` with ``values=None``."""
    return _backward(queries, keys, None, None, lse, None, grad_lse, scale=scale, bias=bias,
                     metric=metric, exclude=exclude, causal=causal, window=window,
                     seq_lens=seq_lens, device=device)


def _backward(queries, keys, values, out, lse, grad_out, grad_lse, *, scale, bias, metric, exclude,
              causal, window, seq_lens, device):
    """Both backward passes; ``out is None``: the lse's alone."""
    if device != "cpu":
        raise ValueError(f"the backward pass runs on the CPU only so far, got device={device!r}")
    from . import cpu_backward

    q4, k4, v4, lay = layout.as_heads(queries, keys, values)
    lead = {2: (lay.T,), 3: (lay.T, lay.H), 4: (lay.batch, lay.T, lay.H)}[lay.ndim]
    lse_only = out is None
    dv = 0 if lse_only else lay.dv
    if lse_only:
        out4 = dout4 = np.zeros((lay.batch, lay.T, lay.H, 0), np.float32)
    else:
        out4 = _rows(out, "out", lead + (dv,), lay)
        dout4 = _rows(grad_out, "grad_out", lead + (dv,), lay)
    lse4 = _rows(lse, "lse", lead, lay)
    dlse4 = np.zeros_like(lse4) if grad_lse is None else _rows(grad_lse, "grad_lse", lead, lay)
    if np.isnan(lse4).any() or np.isposinf(lse4).any():
        raise ValueError("lse holds NaN or +inf: pass the forward's lse")
    if not np.isfinite(dlse4).all() or not np.isfinite(dout4).all():
        raise ValueError("grad_out and grad_lse must be finite")
    t = logit_terms(metric, scale, lay.d, True)
    _, problems = api._problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                                softmax=True)
    G = lay.group
    dq4 = np.zeros(q4.shape, np.float32)
    dk4 = np.zeros(k4.shape, np.float32)
    dv4 = np.zeros(v4.shape, np.float32)
    per_head_bias = bias is not None and np.ndim(bias) == 2
    dbias = np.zeros((lay.Hkv if per_head_bias else 1, lay.S), np.float32)
    R = lay.T * G
    for (b, g), p in problems:
        if R == 0:
            continue
        heads = slice(g * G, (g + 1) * G)
        dO = np.ascontiguousarray(dout4[b, :, heads].reshape(R, dv))
        D = np.einsum("ij,ij->i", dO.astype(np.float64),
                      out4[b, :, heads].reshape(R, dv).astype(np.float64)).astype(np.float32)
        with np.errstate(invalid="ignore"):
            lse2 = (LOG2E * (lse4[b, :, heads].reshape(R) - p.row_const)).astype(np.float32)
        dlse = np.ascontiguousarray(dlse4[b, :, heads].reshape(R))
        gq, gr, gk, gv, gb = cpu_backward.run(p, lse2, D, dlse, dO)
        dq4[b, :, heads] += _query_grad(t, p.Q, q4[b, :, heads].reshape(R, lay.d), gq,
                                        gr).reshape(lay.T, G, lay.d)
        dk4[b, :, g] += _key_grad(t, p.keys.data[:, p.keys.col:p.keys.col + lay.d], gk, gb)
        if not lse_only:
            dv4[b, :, g] += gv
        dbias[g if per_head_bias else 0] += gb
    if values is None and not lse_only:
        dk4 += dv4
    return AttentionGrads(lay.heads_out(dq4), lay.heads_out(dk4),
                          None if values is None else lay.heads_out(dv4),
                          None if bias is None else (dbias if per_head_bias else dbias[0]))


def _rows(a, name, shape, lay):
    """``a`` as a float32 (batch, T, H, ...) array, after checking it has
    ``shape`` (the queries' leading axes, then its own columns)."""
    arr = validate.as_array(a, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (the forward's), got {arr.shape}")
    cols = shape[lay.ndim - 1:]
    return arr.astype(np.float32, copy=False).reshape((lay.batch, lay.T, lay.H) + cols)


def _query_grad(t, Qs, q_raw, gq, gr):
    """dL/dq (R, d) from the kernel's gq, gr and the prepared queries Qs."""
    c = np.float64(t.qmult) * LN2                 # scale (2 scale for l2)
    g = gq.astype(np.float64) * c
    unit = Qs.astype(np.float64) / t.qmult       # q (l2: centred) or q / |q| (cosine)
    if t.qsq_coef:                               # l2: the -scale |q|^2 term
        g += 2.0 * (t.qsq_coef / t.unit) * unit * gr[:, None]
    if t.qunit:                                  # cosine: through q / |q|
        norms = np.linalg.norm(q_raw.astype(np.float64), axis=1, keepdims=True)
        g = (g - np.einsum("ij,ij->i", g, unit)[:, None] * unit)
        g = np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)
    return g.astype(np.float32)


def _key_grad(t, K, gk, gb):
    """dL/dk (N, d) from the kernel's gk (against the prepared queries), gb
    and the keys the kernel read."""
    g = gk.astype(np.float64) * LN2
    K64 = np.asarray(K, np.float64)
    if t.key_coef and not t.qunit:               # l2: the -scale |k|^2 term
        g += 2.0 * LN2 * t.key_coef * K64 * gb[:, None]
    if t.qunit:                                  # cosine: through k / |k|
        norms = np.linalg.norm(K64, axis=1, keepdims=True)
        unit = np.divide(K64, norms, out=np.zeros_like(K64), where=norms > 0)
        g = g - np.einsum("ij,ij->i", g, unit)[:, None] * unit
        g = np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)
    return g.astype(np.float32)
