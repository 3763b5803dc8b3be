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

from . import api, interop, layout, validate
from .constants import LN2, LOG2E
from .terms import TopKAttention, logit_terms


class AttentionGrads(NamedTuple):
    """Gradients returned by :func:`attention_backward`, float32, each in the
    shape of its input: ``queries``, ``keys``, ``values`` (None when the
    forward had ``values=None``: that gradient is in ``keys``) and ``bias``
    (None without a bias)."""

    queries: np.ndarray
    keys: np.ndarray
    values: Optional[np.ndarray]
    bias: Optional[np.ndarray]


@interop.boundary
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
    device : "cpu" (default), "cuda" or "auto", as for the forward: host
        arrays in, host arrays out (the CUDA backward is tested under
        numba-cuda's simulator and compiled to PTX; not yet measured on a GPU).

    Returns
    -------
    :class:`AttentionGrads` ``(queries, keys, values, bias)``, float32, each
    shaped like its input (bias ``(N,)`` or ``(Hkv, N)``).

    Computation is float32, like the forward. Queries with no valid key
    (every key excluded, or masked by their window) get zero gradients and
    pass none to any key; excluded keys and keys with a ``-inf`` bias get
    none either.
    """
    _given(out, "out")
    _given(grad_out, "grad_out")
    return _backward(queries, keys, values, out, lse, grad_out, grad_lse, scale=scale, bias=bias,
                     metric=metric, exclude=exclude, causal=causal, window=window,
                     seq_lens=seq_lens, device=device)


def _given(a, name):
    if a is None:
        raise ValueError(f"{name} is required (the forward's {name.replace('grad_', '')} or its "
                         "gradient), got None")


@interop.boundary
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


@interop.boundary
def topk_attention_backward(queries: ArrayLike, keys: ArrayLike, values: Optional[ArrayLike],
                            result, grad_out: ArrayLike, grad_lse: Optional[ArrayLike] = None,
                            grad_weights: Optional[ArrayLike] = None,
                            grad_coverage: Optional[ArrayLike] = None, *,
                            scale: Optional[float] = None, bias: Optional[ArrayLike] = None,
                            metric: str = "ip", exclude: api.Exclude = None, causal: bool = False,
                            window: Optional[int] = None, seq_lens: api.SeqLens = None,
                            device: str = "cpu") -> AttentionGrads:
    """Gradients of :func:`softretrieval.topk_attention`: ``result`` is its
    :class:`~softretrieval.TopKAttention`; ``grad_out``, ``grad_lse``,
    ``grad_weights`` and ``grad_coverage`` the loss's gradients with
    respect to its ``out``, ``lse``, ``weights`` and ``coverage`` (all but
    ``grad_out`` optional); the other arguments exactly as given to the
    forward.

    The selection of the k keys is piecewise constant, so the gradients of
    ``out`` and ``weights`` flow only to the selected keys and values
    (through the softmax over them: O(B k d)), while ``lse``'s flows to every
    key (one streaming pass, as :func:`logsumexp_backward`); ``coverage =
    exp(lse_topk - lse)`` sends its share both ways. Returns
    :class:`AttentionGrads`."""
    if not isinstance(result, TopKAttention):
        raise TypeError("result must be the TopKAttention returned by topk_attention")
    _given(result.out, "out")
    _given(grad_out, "grad_out")
    return _backward(queries, keys, values, result.out, result.lse, grad_out, grad_lse,
                     scale=scale, bias=bias, metric=metric, exclude=exclude, causal=causal,
                     window=window, seq_lens=seq_lens, device=device,
                     top=(result.ids, result.weights, result.coverage, grad_weights,
                          grad_coverage))


def _backward(queries, keys, values, out, lse, grad_out, grad_lse, *, scale, bias, metric, exclude,
              causal, window, seq_lens, device, top=None, sparse=None):
    """The backward passes: dense (``out`` given), the lse's alone (``out is
    None``), top-k attention (``top = (ids, weights, coverage, grad_weights,
    grad_coverage)``: out's part over the selected keys, the lse's part
    streamed); ``sparse = (ids, dS)`` (B, m) adds gradients of single logits
    (2-D queries only)."""
    from . import devices

    target = devices.kernels(device)
    if target.NAME == "cpu":
        from . import cpu_backward as backward
    else:
        from . import cuda_backward as backward

    heads4 = layout.as_heads(queries, keys, values)
    q4, k4, v4, lay = heads4
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
    if not np.isfinite(out4).all():
        raise ValueError("out holds NaN or inf: pass the forward's out")
    if top is not None:
        ids, weights, coverage, grad_w, grad_cov = top
        k = np.shape(ids)[-1] if np.ndim(ids) else 0
        ids4 = _rows(ids, "result.ids", lead + (k,), lay, np.int64)
        w4 = _rows(weights, "result.weights", lead + (k,), lay)
        if ((ids4 < -1) | (ids4 >= lay.S)).any():
            raise ValueError(f"result.ids must lie in -1..{lay.S - 1}")
        # weights = softmax of the selected logits; coverage = exp(lse_top - lse)
        gw4 = np.zeros_like(w4) if grad_w is None else _rows(grad_w, "grad_weights", lead + (k,), lay)
        extra4 = w4 * (gw4 - (w4 * gw4).sum(-1, keepdims=True))
        if grad_cov is not None:
            cov4 = _rows(coverage, "result.coverage", lead, lay)
            gc4 = cov4 * _rows(grad_cov, "grad_coverage", lead, lay)
            extra4 = extra4 + w4 * gc4[..., None]
            dlse4 = dlse4 - gc4
        if not np.isfinite(extra4).all():
            raise ValueError("grad_weights and grad_coverage must be finite")
    t = logit_terms(metric, scale, lay.d, True)
    _, problems = api._problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                                softmax=True, heads=heads4)
    G = lay.group
    dq4 = np.zeros(q4.shape, np.float32)
    single = lay.batch * lay.Hkv == 1          # one problem: its key gradients are the outputs
    dk4 = None if single else np.zeros(k4.shape, np.float32)
    dv4 = None if single else np.zeros(v4.shape, np.float32)
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
        keys_used = p.keys.data[:, p.keys.col:p.keys.col + lay.d]
        if top is None:
            gq, gr, gk, gv, gb = backward.run(p, lse2, D, dlse, dO)
        else:
            if dlse.any():                       # the lse's gradient, streamed over every key
                gq, gr, gk, _, gb = backward.run(p, lse2, np.zeros(R, np.float32), dlse,
                                                 np.zeros((R, 0), np.float32))
            else:                                # none: no streaming pass
                gq, gr = np.zeros((R, lay.d), np.float32), np.zeros(R, np.float32)
                gk, gb = np.zeros((lay.S, lay.d), np.float32), np.zeros(lay.S, np.float32)
            gv = np.zeros((lay.S, dv), np.float32)
            _selected(t, p, keys_used, ids4[b, :, heads].reshape(R, -1),   # out, over the top k
                      w4[b, :, heads].reshape(R, -1), extra4[b, :, heads].reshape(R, -1), dO, D,
                      gq, gr, gk, gv, gb)
        if sparse is not None:
            _sparse(t, p, keys_used, sparse[0], sparse[1], gq, gr, gk, gb)
        dq4[b, :, heads] += _query_grad(t, p.Q, q4[b, :, heads].reshape(R, lay.d), gq,
                                        gr).reshape(lay.T, G, lay.d)
        dk = _key_grad(t, keys_used, gk, gb)
        if single:
            dk4, dv4 = dk[None, :, None], gv[None, :, None]
        else:
            dk4[b, :, g] += dk
            if not lse_only:
                dv4[b, :, g] += gv
        dbias[g if per_head_bias else 0] += gb
    if single and R == 0:
        dk4, dv4 = np.zeros(k4.shape, np.float32), np.zeros(v4.shape, np.float32)
    if values is None and not lse_only:
        dk4 += dv4
    return AttentionGrads(lay.heads_out(dq4), lay.heads_out(dk4),
                          None if values is None else lay.heads_out(dv4),
                          None if bias is None else (dbias if per_head_bias else dbias[0]))


def _selected(t, p, K, ids, w, extra, dO, D, gq, gr, gk, gv, gb):
    """Add top-k attention's selected-key part to the kernel's sums: over
    each row's selected keys ``ids`` (R, k) with softmax weights ``w``,
    ``dS = w (dO . v - D) + extra`` (``extra``: the weights' and coverage's
    share) and ``gv[id] += w dO``; slots with id -1 hold nothing."""
    valid = ids >= 0
    sel = np.where(valid, ids, 0)
    V = p.values.data[:, p.values.col:p.values.col + dO.shape[1]]
    Vsel = V[sel].astype(np.float32)
    w = np.where(valid, w, 0).astype(np.float32)
    dS = w * (np.einsum("ic,ijc->ij", dO, Vsel) - D[:, None]) + extra
    np.add.at(gv, sel[valid], (w[:, :, None] * dO[:, None, :])[valid])
    _sparse(t, p, K, ids, dS, gq, gr, gk, gb)


def _sparse(t, p, K, ids, dS, gq, gr, gk, gb):
    """Add the gradients ``dS`` (R, m) of single logits, row i's at keys
    ``ids[i]`` (-1: none), to the kernel's sums, in its units (natural-log
    ``dS``, prepared queries): ``gq += dS f k``, ``gr += rowsum(dS)``,
    ``gk[id] += dS q``, ``gb[id] += dS``."""
    valid = ids >= 0
    sel = np.where(valid, ids, 0)
    dS = np.where(valid, dS, 0).astype(np.float32)
    Ksel = K[sel].astype(np.float32)
    dSf = dS
    if t.qunit:                                  # cosine: the keys' factor 1 / |k|
        norms = np.linalg.norm(Ksel, axis=2)
        dSf = dS * np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    gq += np.einsum("ij,ijc->ic", dSf, Ksel)
    gr += dS.sum(1)
    np.add.at(gk, sel[valid], (dS[:, :, None] * p.Q[:, None, :])[valid])
    np.add.at(gb, sel[valid], dS[valid])


def softmax_loss(queries, keys, targets, *, scale, bias, exclude, metric):
    """The forward of :func:`softretrieval.torch.full_softmax_loss` on
    validated arrays: ``(loss (B,), lse (B,))`` float32, ``loss_i = lse_i -
    logit(q_i, k_{t_i})``, the target's logit in float64 by the metric's
    definition (``scale q.k``, ``scale cos(q, k)``, ``-scale |q - k|^2``)."""
    lse = api.logsumexp(queries, keys, scale=scale, bias=bias, metric=metric, exclude=exclude)
    q = np.asarray(queries, np.float64)
    k = np.asarray(keys)[targets].astype(np.float64)      # the targets' rows only
    if metric == "ip":
        z = scale * np.einsum("ij,ij->i", q, k)
    elif metric == "cosine":
        norms = np.linalg.norm(q, axis=1) * np.linalg.norm(k, axis=1)
        z = scale * np.divide(np.einsum("ij,ij->i", q, k), norms, out=np.zeros(len(q)),
                              where=norms > 0)
    else:
        z = -scale * ((q - k) ** 2).sum(1)
    if bias is not None:
        z = z + np.asarray(bias)[targets].astype(np.float64)
    if not np.isfinite(z).all():
        raise ValueError("a target's logit is not finite (a -inf bias on a target?)")
    return (lse - z).astype(np.float32), lse


def softmax_loss_backward(queries, keys, targets, lse, grad_loss, *, scale, bias, exclude, metric,
                          device="cpu"):
    """Gradients of :func:`softmax_loss`'s ``loss`` (``grad_loss`` (B,)) for
    the queries, keys and bias: the lse's streaming pass with ``grad_lse =
    grad_loss``, and ``-grad_loss`` at each target's own logit, added into
    the same sums (so the keys' gradient is one (N, d) array, no second)."""
    targets = np.asarray(targets, np.int64)
    g = np.asarray(grad_loss, np.float32)
    return _backward(queries, keys, None, None, lse, None, g, scale=scale, bias=bias,
                     metric=metric, exclude=exclude, causal=False, window=None, seq_lens=None,
                     device=device, sparse=(targets[:, None], -g[:, None]))


def _rows(a, name, shape, lay, dtype=np.float32):
    """``a`` as a (batch, T, H, ...) array of ``dtype``, after checking it
    has ``shape`` (the queries' leading axes, then its own columns)."""
    arr = validate.as_array(a, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (the forward's), got {arr.shape}")
    cols = shape[lay.ndim - 1:]
    return arr.astype(dtype, copy=False).reshape((lay.batch, lay.T, lay.H) + cols)


def _query_grad(t, Qs, q_raw, gq, gr):
    """dL/dq (R, d) float32 from the kernel's gq, gr and the prepared
    queries Qs (gq is reused)."""
    g = gq
    g *= np.float32(t.qmult * LN2)                # scale (2 scale for l2)
    unit = Qs / np.float32(t.qmult)              # q (l2: centred) or q / |q| (cosine)
    if t.qsq_coef:                               # l2: the -scale |q|^2 term
        g += np.float32(2.0 * t.qsq_coef / t.unit) * unit * gr[:, None]
    if t.qunit:                                  # cosine: through q / |q|
        g = _project(g, unit, np.linalg.norm(q_raw.astype(np.float64), axis=1, keepdims=True))
    return g


def _key_grad(t, K, gk, gb):
    """dL/dk (N, d) float32 from the kernel's gk (against the prepared
    queries), gb and the keys the kernel read (gk is reused)."""
    g = gk
    g *= np.float32(LN2)
    if t.key_coef and not t.qunit:               # l2: the -scale |k|^2 term
        g += np.float32(2.0 * LN2 * t.key_coef) * K * gb[:, None]
    if t.qunit:                                  # cosine: through k / |k|
        norms = np.linalg.norm(K, axis=1, keepdims=True)
        unit = np.divide(K, norms, out=np.zeros(K.shape, np.float32), where=norms > 0)
        g = _project(g, unit, norms)
    return g


def _project(g, unit, norms):
    """The gradient with respect to a vector from the one with respect to its
    unit vector: ``(g - (g . u) u) / |v|``; 0 for a zero vector."""
    g = g - np.einsum("ij,ij->i", g, unit)[:, None] * unit
    return np.divide(g, norms, out=np.zeros(g.shape, np.float32), where=norms > 0).astype(
        np.float32, copy=False)


class MemoryGrads(NamedTuple):
    """Gradients returned by :func:`memory_attention_backward`, float32:
    ``q``, ``k``, ``v`` shaped like the inputs, ``gate`` (H,) (None without
    a gate), and the memory's ``memory_keys``, ``memory_values`` (n, heads,
    dim) in :meth:`KNNMemory.snapshot` order (None unless asked for)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    gate: Optional[np.ndarray]
    memory_keys: Optional[np.ndarray]
    memory_values: Optional[np.ndarray]


@interop.boundary
def memory_attention_backward(q: ArrayLike, k: ArrayLike, v: ArrayLike, memory, grad_out: ArrayLike,
                              *, topk: int = 32, causal: bool = True,
                              gate: Optional[ArrayLike] = None, scale: Optional[float] = None,
                              memory_grad: bool = False, device: str = "cpu") -> MemoryGrads:
    """Gradients of :func:`softretrieval.memory_attention` (same arguments,
    ``grad_out`` (T, H, dv) the loss's gradient with respect to its ``out``)
    for ``q``, ``k``, ``v`` and ``gate``. The memory's entries are constants,
    as in Memorizing Transformers; ``memory_grad=True`` also returns the
    gradients for the memory's keys and values (the top-k selection itself
    has none). The memory must not change between the forward and this call.

    Recomputes the forward's two parts: local attention (its backward:
    :func:`attention_backward`) and top-k attention over the memory
    (:func:`topk_attention_backward`), combined as the forward does: one
    softmax, ``out = a o_local + (1 - a) o_memory`` with
    ``a = sigmoid(lse_local - lse_topk)``, or the gate's mix."""
    from . import memory as memory_module

    q = validate.as_array(q, "q")
    if q.ndim != 3:
        raise ValueError(f"q must have shape (T, H, d), got {q.shape}")
    topk = validate.positive_int(topk, "topk")
    if topk > memory.capacity:
        raise ValueError(f"topk = {topk} is larger than the memory's capacity {memory.capacity}")
    local, lse_local = api.attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    dO = _rows(grad_out, "grad_out", local.shape, layout.as_heads(q, k, v)[3])[0]
    keys, values = memory.snapshot()
    g = None if gate is None else memory_module._gate(gate, q.shape[1])
    if len(keys) == 0:
        mem_out = np.zeros_like(local)
        res = None
    else:
        res = api.topk_attention(q, keys, values, k=topk, scale=scale, metric=memory.metric)
        mem_out = res.out
    if g is None:
        with np.errstate(divide="ignore"):
            lse_top = (res.lse + np.log(res.coverage)) if res is not None else np.full_like(
                lse_local, -np.inf)
        a = 1.0 / (1.0 + np.exp(np.clip(lse_top - lse_local, -80, 80)))   # sigmoid(l_l - l_t)
        a = np.where(np.isneginf(lse_top), 1.0, a).astype(np.float32)[..., None]
        d_local_out, d_mem_out = a * dO, (1 - a) * dO
        d_lse_local = (a * (1 - a) * (dO * (local - mem_out)).sum(-1, keepdims=True))[..., 0]
        d_lse_top = -d_lse_local
        dgate = None
    else:
        gg = g[None, :, None].astype(np.float32)
        d_local_out, d_mem_out = (1 - gg) * dO, gg * dO
        d_lse_local = d_lse_top = np.zeros(lse_local.shape, np.float32)
        dgate = (dO * (mem_out - local)).sum((0, 2)).astype(np.float32)
    gl = attention_backward(q, k, v, local, lse_local, d_local_out, d_lse_local, scale=scale,
                            causal=causal, device=device)
    dq = gl.queries
    mk = mv = None
    if res is not None:
        # lse_top = lse + log(coverage): its gradient reaches the top k's own softmax only (the
        # full lse's two shares cancel exactly, so no streaming pass over the memory runs)
        g_cov = np.divide(d_lse_top, res.coverage, out=np.zeros_like(d_lse_top),
                          where=res.coverage > 0).astype(np.float32)
        gm = topk_attention_backward(q, keys, values, res, d_mem_out, res.coverage * g_cov,
                                     grad_coverage=g_cov, scale=scale, metric=memory.metric,
                                     device=device)
        dq = dq + gm.queries
        if memory_grad:
            mk, mv = gm.keys, gm.values
    elif memory_grad:
        mk, mv = np.zeros_like(keys), np.zeros_like(values)
    return MemoryGrads(dq, gl.keys, gl.values, dgate, mk, mv)
