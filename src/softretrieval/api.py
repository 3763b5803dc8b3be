"""Public functions on host arrays: validation, preparation and dispatch.

Each public function is wrapped by :func:`softretrieval.interop.boundary`:
torch CPU tensors and DLPack arrays arrive here as numpy views, and results
go back as torch tensors when the caller passed one.

Every mode goes through :func:`_prepare`, which validates the inputs and
turns ``metric``, ``scale`` and ``bias`` into what the kernels take (queries
pre-scaled, a per-key term, a per-query constant). The kernels
(:mod:`softretrieval.cpu`) are imported on the first call, not at
``import softretrieval``.
"""

from typing import Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import devices, gpu_api, interop, layout, validate
from .constants import LOG2E, NEG_INIT
from .devices import Logits, Mode, Problem, Rows
from .terms import FAR_SAMPLE, TopKAttention, check_metric, far_center, logit_terms, prepare_bias

#: Per-query exclusions: a list of B integer arrays, or CSR ``(offsets, ids)``.
Exclude = Union[None, list, Tuple[ArrayLike, ArrayLike]]
#: Sequence lengths: one (batch,) array, or ``(q_lens, k_lens)``.
SeqLens = Union[None, ArrayLike, Tuple[ArrayLike, ArrayLike]]


def problem_terms(Q, keys, values, values_given, *, metric, scale, bias, exclude, window,
                  softmax, scratch=False):
    """One problem's inputs as a :class:`devices.Problem` in the kernels' terms.

    Q (R, d) queries; keys, values: :class:`devices.Rows` (compact storage
    allowed, :mod:`softretrieval.storage`). With ``softmax`` the kernel
    logits are base 2 (``log2(e)`` folded into the scale and the bias);
    without, they are the raw similarity (``scale`` = 1). ``scratch``: Q is
    a copy of the caller's own, C-contiguous float32, which the scaled
    queries may overwrite (no new array per problem).
    """
    t = logit_terms(metric, scale, Q.shape[1], softmax)
    row_const = np.zeros(Q.shape[0])
    if t.qunit:
        norms = np.linalg.norm(Q.astype(np.float64), axis=1, keepdims=True)
        Q = np.divide(Q, norms, out=np.zeros(Q.shape), where=norms > 0)
    if t.qsq_coef:
        Q64 = Q.astype(np.float64)
        row_const = (t.qsq_coef / t.unit) * np.einsum("ij,ij->i", Q64, Q64)
    from . import cpu     # (numba: not at import time)

    Qs = Q if scratch and Q.dtype == np.float32 and Q.flags.c_contiguous else np.empty(Q.shape, np.float32)
    if not cpu.scaled_rows(Q, np.float64(t.qmult), Qs):
        raise ValueError("scale * queries overflows float32: scale is too large for these queries")
    logits = Logits(prepare_bias(bias, keys.data.shape[0], t.unit), t.key_mode,
                    np.float32(t.key_coef))
    return Problem(Qs, keys, values, values_given, logits, devices.masks(exclude, window),
                   row_const)


def _problems(queries, keys, values, *, metric, scale, bias, exclude, causal, window, seq_lens,
              softmax, heads=None):
    """Validate a call and cut it into kernel problems.

    Returns ``(layout, problems)``: problems yields ``((b, g), devices.Problem)``
    whose results fill rows ``[b, :, g*G:(g+1)*G]`` of the (batch, T, H, ...)
    outputs. ``heads``: the ``(q4, k4, v4, layout)`` of
    :func:`layout.as_heads` when the caller has them already.
    """
    q4, k4, v4, lay = heads or layout.as_heads(queries, keys, values)
    check_metric(metric)
    window = layout.check_window(causal, window)
    lens = layout.sequence_lengths(seq_lens, lay)
    bias_of = layout.head_bias(bias, lay)
    if exclude is not None and (causal or lay.ndim == 4):
        raise ValueError("exclude applies to retrieval (2-D or 3-D queries without causal)")
    excl = layout.stacked_exclude(validate.exclusion_lists(exclude, lay.T, lay.S), lay)
    return lay, _each_problem(q4, k4, v4, lay, values is not None, metric=metric, scale=scale,
                              bias_of=bias_of, exclude=excl, causal=causal, window=window,
                              lens=lens, softmax=softmax)


def _each_problem(q4, k4, v4, lay, values_given, *, metric, scale, bias_of, exclude, causal, window,
                  lens, softmax):
    """Yield the problems one at a time. A KV head of a multi-head array is
    read in place: either it is contiguous itself, or the kernels take the
    whole (S, Hkv * d) block and the head's column offset. For "l2", keys far
    from the origin are centred (:func:`far_center`) on a copy."""
    G = lay.group
    for b in range(lay.batch):
        rows = layout.row_windows(lay, causal, window, lens, b)
        # Each KV head's queries as contiguous rows, from one sequential copy
        # (a head's rows read in place are strided and cache-cold: ~4x slower),
        # always a copy: the problems scale it in place.
        qb = q4[b] if lay.Hkv == 1 else q4[b].reshape(lay.T, lay.Hkv, G, lay.d).transpose(
            1, 0, 2, 3).copy()
        for g in range(lay.Hkv):
            Q = qb.reshape(lay.T * G, lay.d) if lay.Hkv == 1 else qb[g].reshape(lay.T * G, lay.d)
            K, kcol = _head(k4, b, g)
            V, vcol = _head(v4, b, g) if values_given else (K, kcol)
            if metric == "l2":
                step = max(1, K.shape[0] // FAR_SAMPLE)
                center = far_center(K[::step, kcol:kcol + lay.d])
                if center is not None:
                    Q = (Q - center).astype(np.float32)
                    K, kcol = (K[:, kcol:kcol + lay.d] - center).astype(np.float32), 0
            yield (b, g), problem_terms(Q, Rows(K, col=kcol, width=lay.d),
                                        Rows(V, col=vcol, width=lay.dv), values_given,
                                        metric=metric, scale=scale, bias=bias_of(g),
                                        exclude=exclude, window=rows, softmax=softmax,
                                        scratch=lay.Hkv > 1)


def _head(a4, b, g):
    """Head g of batch element b of a (batch, S, H, dim) array, as
    ``(C-contiguous 2-D array, column offset)`` without copying when possible."""
    view = a4[b, :, g]
    if view.flags.c_contiguous:
        return view, 0
    block = a4[b]
    if block.flags.c_contiguous:
        return block.reshape(block.shape[0], -1), g * block.shape[2]
    return np.ascontiguousarray(view), 0


def _fill(dest, lay, b, g, rows):
    """Write a problem's (T * G, ...) result into dest (batch, T, H, ...)."""
    G = lay.group
    dest[b, :, g * G:(g + 1) * G] = rows.reshape((lay.T, G) + rows.shape[1:])


def _run(p, kernels, mode):
    """Run a target (:mod:`cpu` or :mod:`cuda`) on one problem; name the
    argument behind a NaN/inf."""
    res = kernels.run(p, mode)
    out = res.get("out")
    if res["bad"] or (out is not None and not np.isfinite(out).all()):
        _refuse_non_finite(p)
    return res


def _refuse_non_finite(p):
    """Raise the ValueError behind a non-finite result: NaN/inf in the keys
    or values (named), or else float32 overflow."""
    if isinstance(p.keys.data, np.ndarray):   # (an Index's GPU copies were checked when added)
        validate.all_finite(p.keys.data, "keys")
    if p.values_given and isinstance(p.values.data, np.ndarray):
        validate.all_finite(p.values.data, "values")
    raise ValueError(
        "non-finite result: the logits (scale * q.k + bias) or the weighted sum of "
        "values overflow float32; reduce scale or the norms of keys/values")


def _with_row_const(lse, row_const):
    return (lse + row_const).astype(np.float32)


_SHAPES = """
    Shapes (queries / keys / values; outputs get the queries' leading axes):

    * ``(B, d) / (N, d) / (N, dv)``: retrieval of B queries over N keys.
    * ``(B, H, d) / (N, Hkv, d) / (N, Hkv, dv)``: multi-head; ``H % Hkv == 0``
      (``Hkv == H`` multi-head, ``Hkv == 1`` multi-query, else grouped-query).
      The query heads sharing a KV head are stacked into one query block, so
      each key tile is read once per KV head.
    * ``(batch, T, H, d) / (batch, S, Hkv, d) / (batch, S, Hkv, dv)``: batched
      sequences.

    ``bias`` is (N,) or (Hkv, N). With ``causal=True`` the queries are
    positions of a sequence: query i sees keys ``j <= i + (S - T)``
    (bottom-right aligned like FlashAttention >= 2.1, so a prefix of S - T
    cached or memory keys is visible to every query; T = 1 sees all keys);
    ``window=w`` keeps only ``j > i + (S - T) - w``. ``seq_lens`` (batched
    inputs): a (batch,) array of lengths of queries and keys (T == S), or a
    tuple ``(q_lens, k_lens)``; padded positions neither attend nor are
    attended, and their outputs are 0 (``lse = -inf``). Key tiles outside
    every window of a query block are skipped; only tiles crossing a window
    edge are masked.
"""


def _with_shapes(f):
    """Append the shapes section to ``f``'s docstring (absent under ``python -OO``)."""
    if f.__doc__ is not None:
        f.__doc__ += _SHAPES


@interop.boundary
def attention(queries: ArrayLike, keys: ArrayLike, values: Optional[ArrayLike] = None, *,
              scale: Optional[float] = None, bias: Optional[ArrayLike] = None, metric: str = "ip",
              exclude: Exclude = None, return_lse: bool = False, causal: bool = False,
              window: Optional[int] = None, seq_lens: SeqLens = None,
              device: str = "cpu") -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Soft retrieval: softmax attention of every query over all keys.

    ``out[b] = sum_n softmax_n(logit(q_b, k_n) + bias_n) * v_n``, streamed
    over key tiles with an online softmax; the (B, N) score matrix never
    exists. ``logit`` is ``scale * q.k`` (``metric="ip"``),
    ``scale * cos(q, k)`` (``"cosine"``) or ``-scale * |q - k|^2`` (``"l2"``).

    Parameters
    ----------
    queries : (B, d) float array (or multi-head / sequence shapes, below)
    keys : (N, d) float array, N >= 1
    values : (N, dv) float array, or None to use the keys as values (soft
        nearest neighbour: a softmax-weighted average of the keys).
    scale : real, default ``1 / sqrt(d)``
    bias : (N,) real array, optional. Additive per-key logit bias (e.g.
        log-popularity, logQ correction); ``-inf`` excludes a key.
    metric : "ip" (default), "cosine" or "l2".
    exclude : per-query ids to skip: a tuple ``(offsets (B+1,), ids)`` (CSR)
        or a list of B integer arrays (retrieval shapes only).
    return_lse : bool
        Also return ``lse[b] = log sum_n exp(logit + bias_n)``.
    causal, window, seq_lens : sequence modes, below.
    device : "cpu" (default), "cuda" or "auto" (CUDA when a GPU is there).
        Inputs already on the GPU (numba device arrays, CuPy, torch CUDA
        tensors: ``__cuda_array_interface__``) are read in place with
        "cuda"/"auto", and the outputs stay on the GPU (see
        :mod:`softretrieval.gpu_api`).

    Returns
    -------
    out : (B, dv) float32
    lse : (B,) float32, only with ``return_lse``.

    A query whose keys are all excluded gets ``out = 0`` and ``lse = -inf``.
    Arithmetic is float32 (float16/float64 inputs are converted); logits
    below about -1e30 count as excluded. Non-contiguous inputs are copied.
    NaN or inf in any input raises ``ValueError`` naming it.
    """
    if gpu_api.on_device(queries, keys, values, bias):
        gpu_api.check_device(device)
        return gpu_api.attention(queries, keys, values, scale=scale, bias=bias, metric=metric,
                                 exclude=exclude, return_lse=return_lse, causal=causal,
                                 window=window, seq_lens=seq_lens)
    lay, problems = _problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=True)
    return solve_attention(lay, problems, return_lse, device)


_with_shapes(attention)


def solve_attention(lay, problems, return_lse, device="cpu"):
    """Soft retrieval of validated problems (see :func:`_problems`)."""
    kernels = devices.kernels(device)
    out = np.zeros((lay.batch, lay.T, lay.H, lay.dv), np.float32)
    lse = np.full((lay.batch, lay.T, lay.H), -np.inf, np.float32)
    for (b, g), p in problems:
        if p.Q.shape[0] == 0:
            continue
        res = _run(p, kernels, Mode(want_soft=True, want_acc=True))
        _fill(out, lay, b, g, res["out"])
        _fill(lse, lay, b, g, _with_row_const(res["lse"], p.row_const))
    out, lse = lay.heads_out(out), lay.heads_out(lse)
    return (out, lse) if return_lse else out


@interop.boundary
def logsumexp(queries: ArrayLike, keys: ArrayLike, *, scale: Optional[float] = None,
              bias: Optional[ArrayLike] = None, metric: str = "ip", exclude: Exclude = None,
              causal: bool = False, window: Optional[int] = None, seq_lens: SeqLens = None,
              device: str = "cpu") -> np.ndarray:
    """The exact log-partition of the full softmax, without a value pass:
    ``lse[b] = log sum_n exp(logit(q_b, k_n) + bias_n)`` over every key
    (the normalizer of a softmax over a whole catalog). Arguments, shapes
    and edge cases as :func:`attention` (a query whose keys are all
    excluded gets ``-inf``). Returns float32 with the queries' leading axes.
    """
    if gpu_api.on_device(queries, keys, bias):
        gpu_api.check_device(device)
        return gpu_api.logsumexp(queries, keys, scale=scale, bias=bias, metric=metric,
                                 exclude=exclude, causal=causal, window=window, seq_lens=seq_lens)
    lay, problems = _problems(queries, keys, None, metric=metric, scale=scale, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=True)
    return solve_logsumexp(lay, problems, device)


_with_shapes(logsumexp)


def solve_logsumexp(lay, problems, device="cpu"):
    """Log-partition (lse only, no values) of validated problems."""
    kernels = devices.kernels(device)
    lse = np.full((lay.batch, lay.T, lay.H), -np.inf, np.float32)
    for (b, g), p in problems:
        if p.Q.shape[0] == 0:
            continue
        res = _run(p, kernels, Mode(want_soft=True, want_acc=False))
        _fill(lse, lay, b, g, _with_row_const(res["lse"], p.row_const))
    return lay.heads_out(lse)


def _run_topk(p, kernels, k, want_soft):
    """Top-k of one problem: ``(res, logits, ids, count)``: the kernel's
    merged top-k, logits and ids (R, min(k, N)), count (R,) of slots that
    hold a key."""
    res = _run(p, kernels, Mode(want_soft=want_soft, want_acc=False,
                                k=min(k, p.keys.data.shape[0])))
    return res, res["topk_logits"], res["topk_ids"], res["topk_count"]


@interop.boundary
def topk(queries: ArrayLike, keys: ArrayLike, k: int, *, metric: str = "ip",
         bias: Optional[ArrayLike] = None, exclude: Exclude = None, causal: bool = False,
         window: Optional[int] = None, seq_lens: SeqLens = None,
         device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k retrieval, with FAISS's conventions.

    Parameters
    ----------
    queries : (B, d) float array (or multi-head / sequence shapes, below)
    keys : (N, d) float array, N >= 1
    k : int >= 1 (k > N is allowed: the tail is padded)
    metric : "ip" (inner product), "cosine" (inner product of the
        normalized vectors; the caller's arrays are not modified, a zero
        vector scores 0) or "l2" (squared Euclidean distance).
    bias : (N,) real array, optional: added to the similarity ("ip",
        "cosine") or subtracted from the distance ("l2"); ``-inf`` excludes.
    exclude : per-query ids to skip, as in :func:`attention`.
    device : "cpu" (default), "cuda" or "auto", as in :func:`attention`.

    Returns
    -------
    scores : (B, k) float32. Similarities in descending order ("ip",
        "cosine"), or squared distances in ascending order ("l2").
    ids : (B, k) int64. Ties are broken by the lower id. Where fewer than k
        keys are valid the tail holds id -1 and score -inf (+inf for "l2").
    With heads, both are (B, H, k) (sequences: (batch, T, H, k)).
    """
    k = validate.positive_int(k, "k")
    if gpu_api.on_device(queries, keys, bias):
        gpu_api.check_device(device)
        return gpu_api.topk(queries, keys, k, metric=metric, bias=bias, exclude=exclude,
                            causal=causal, window=window, seq_lens=seq_lens)
    lay, problems = _problems(queries, keys, None, metric=metric, scale=None, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=False)
    return solve_topk(lay, problems, k, metric, device)


_with_shapes(topk)


def solve_topk(lay, problems, k, metric, device="cpu"):
    """Top-k of validated problems (see :func:`_problems`)."""
    from . import cpu, runtime

    kernels = devices.kernels(device)
    validate.results_fit(lay.batch * lay.T * lay.H, k, 12, lay.S)
    pad = np.inf if metric == "l2" else -np.inf
    scores = np.full((lay.batch, lay.T, lay.H, k), pad, np.float32)
    ids = np.full((lay.batch, lay.T, lay.H, k), -1, np.int64)
    for (b, g), p in problems:
        if p.Q.shape[0] == 0:
            continue
        _, logits, top_ids, count = _run_topk(p, kernels, k, want_soft=False)
        l2 = metric == "l2"
        sc, row_ids = runtime.parallel_call(
            cpu.finish_topk, logits, top_ids, count, -1.0 if l2 else 1.0, p.row_const,
            l2 and p.logits.bias.shape[0] == 0, np.float32(pad), k, work=count.shape[0] * k,
            blas=False)
        _fill(scores, lay, b, g, sc)
        _fill(ids, lay, b, g, row_ids)
    return lay.heads_out(scores), lay.heads_out(ids)


@interop.boundary
def topk_attention(queries: ArrayLike, keys: ArrayLike, values: Optional[ArrayLike] = None,
                   k: int = 32, *, scale: Optional[float] = None, bias: Optional[ArrayLike] = None,
                   metric: str = "ip", exclude: Exclude = None, causal: bool = False,
                   window: Optional[int] = None, seq_lens: SeqLens = None,
                   device: str = "cpu") -> TopKAttention:
    """Top-k attention: softmax over each query's k best keys, in one pass.

    Arguments as :func:`attention` (``device`` too), plus ``k`` (int >= 1;
    k > N is allowed); the gather of the top-k values runs on the host.
    One pass over the keys finds the top-k by logit and the full-catalog
    log-partition, so ``coverage`` (the share of the full softmax mass that
    the top-k keys hold) costs nothing extra: it tells whether k was large
    enough. Returns a :class:`TopKAttention` whose fields have the queries'
    leading axes.
    """
    k = validate.positive_int(k, "k")
    if gpu_api.on_device(queries, keys, values, bias):
        gpu_api.check_device(device)
        return gpu_api.topk_attention(queries, keys, values, k, scale=scale, bias=bias,
                                      metric=metric, exclude=exclude, causal=causal,
                                      window=window, seq_lens=seq_lens)
    lay, problems = _problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=True)
    return solve_topk_attention(lay, problems, k, device)


_with_shapes(topk_attention)


def solve_topk_attention(lay, problems, k, device="cpu"):
    """Top-k attention of validated problems (see :func:`_problems`)."""
    from . import cpu, runtime

    kernels = devices.kernels(device)
    validate.results_fit(lay.batch * lay.T * lay.H, k, 12, lay.S)
    lead = (lay.batch, lay.T, lay.H)
    out = np.zeros(lead + (lay.dv,), np.float32)
    ids = np.full(lead + (k,), -1, np.int64)
    weights = np.zeros(lead + (k,), np.float32)
    lse = np.full(lead, -np.inf, np.float32)
    coverage = np.zeros(lead, np.float32)
    for (b, g), p in problems:
        if p.Q.shape[0] == 0:
            continue
        res, logits, top_ids, count = _run_topk(p, kernels, k, want_soft=True)
        # the finish runs on the host (where the values are, also for an Index on the GPU)
        v = p.values
        rows, row_ids, row_w, cov = runtime.parallel_call(
            cpu.finish_topk_attention, logits, top_ids, count, res["lse"], v.data, v.scale, v.col,
            v.width, k, work=count.shape[0] * k, blas=False)
        if not np.isfinite(rows).all():
            _refuse_non_finite(p)
        _fill(out, lay, b, g, rows)
        _fill(coverage, lay, b, g, cov)
        _fill(lse, lay, b, g, _with_row_const(res["lse"], p.row_const))
        _fill(ids, lay, b, g, row_ids)
        _fill(weights, lay, b, g, row_w)
    return TopKAttention(*(lay.heads_out(a) for a in (out, ids, weights, lse, coverage)))


@interop.boundary
def merge(outs: ArrayLike, lses: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Combine results over disjoint key sets into the result over their union.

    Parameters
    ----------
    outs : (P, ..., dv) float array, or a sequence of P arrays (..., dv):
        the ``out`` of each part (e.g. ``attention`` on each shard).
    lses : (P, ...) float array, or a sequence of P arrays (...): their
        ``lse``. A part with ``lse = -inf`` (no valid key) has no weight.

    Returns
    -------
    out : (..., dv) float32 and lse : (...) float32, equal (up to float32
    rounding) to one call over all the keys; a row with no valid key in any
    part gets ``out = 0`` and ``lse = -inf``.

    This is the associative merge of online-softmax states that the kernels
    use for key splits: ``lse = log sum_p exp(lse_p)``,
    ``out = sum_p exp(lse_p - lse) * out_p``.
    """
    outs = validate.as_array(outs, "outs")
    O = validate.float_matrix(outs, "outs", ndim=outs.ndim)
    L = validate.as_array(lses, "lses")
    if L.dtype.kind != "f":
        raise TypeError(f"lses must be a floating-point array, got dtype {L.dtype}")
    if O.ndim < 2 or O.shape[0] == 0:
        raise ValueError(f"outs must hold at least one part of shape (..., dv), got shape {O.shape}")
    if L.shape != O.shape[:-1]:
        raise ValueError(f"lses must have shape {O.shape[:-1]} to match outs, got {L.shape}")
    if np.isnan(L).any() or np.isposinf(L).any():
        raise ValueError("lses contains NaN or +inf")
    validate.all_finite(O, "outs")
    P = O.shape[0]
    rows = L[0].size
    valid = np.isfinite(L)
    # relative to each row's largest part (merging is shift-invariant), so
    # lses near the float32 limit do not overflow on the way to base 2
    top = np.where(valid.any(axis=0), np.max(np.where(valid, L, -np.inf), axis=0), 0.0)
    shifted = np.where(valid, (L.astype(np.float64) - top) * LOG2E, NEG_INIT)
    m = shifted.astype(np.float32).reshape(P, rows)
    l = valid.astype(np.float32).reshape(P, rows)
    acc = O.reshape(P, rows, O.shape[-1])
    from . import cpu

    out, lse = cpu.merge_states(m, l, acc)
    lse = lse.reshape(L.shape[1:]) + top
    return out.reshape(O.shape[1:]), lse.astype(np.float32)
