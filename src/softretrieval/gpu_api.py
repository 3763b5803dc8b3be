"""The public functions on arrays that live on the GPU (numba device arrays,
or any object with ``__cuda_array_interface__``: CuPy, torch CUDA tensors).

:func:`softretrieval.attention`, :func:`~softretrieval.topk` and
:func:`~softretrieval.topk_attention` come here when their inputs are on the
device. The inputs are read in place (no host round trip): the query scale,
cosine normalization and l2 terms are applied inside the kernel; the query
heads sharing a KV head are gathered into one block on the device; each KV
head of keys and values is read as a strided view. Outputs are numba device
arrays with the queries' leading axes (wrap them with ``cupy.asarray`` or
``torch.as_tensor``, both zero-copy). Every shape and mode of the host API
works; arrays must be float32 (any strides). ``bias`` may be a host array,
or a device (N,) array for 2-D inputs; ``exclude`` and ``seq_lens`` are host
arrays. Device inputs are not scanned for NaN/inf (that would cost a pass);
logits that come out non-finite still raise ``ValueError``.
"""

import numpy as np

from . import interop, layout, validate
from .devices import Logits, Masks, Mode, Problem, QueryTerms, Rows
from .terms import TopKAttention, check_metric, logit_terms, prepare_bias


def on_device(*arrays):
    """Whether any of ``arrays`` lives on the GPU."""
    return any(interop.on_gpu(a) for a in arrays if a is not None)


def check_device(device):
    """Device inputs run on CUDA; ValueError for ``device="cpu"``."""
    if device not in ("cuda", "auto"):
        raise ValueError(f"inputs are on the GPU: pass device='cuda' (or 'auto'), got device={device!r}")


def _array(a, name, ndim):
    from . import cuda as gpu

    arr = gpu.device_view(a if on_device(a) else np.ascontiguousarray(a, np.float32))
    if np.dtype(arr.dtype) != np.float32:
        raise TypeError(f"{name} on the device must be float32, got {arr.dtype}")
    shape = tuple(arr.shape)
    if len(shape) != ndim or shape[-1] == 0:
        raise ValueError(f"{name} must have {ndim} dimensions (and a last axis >= 1) to match the "
                         f"queries, got shape {shape}")
    return arr


def _four(a, ndim):
    """A (batch, rows, heads, dim) view of a 2-, 3- or 4-D device array."""
    from . import cuda as gpu

    return {2: lambda: gpu.unit_axes(a, (0, 2)), 3: lambda: gpu.unit_axes(a, (0,)),
            4: lambda: a}[ndim]()


def _unit_row(a):
    """A (1, n) view of the (n,) device array ``a``."""
    from . import cuda as gpu

    return gpu.unit_axes(a, (0,))


def _problem(queries, keys, values, *, metric, scale, bias, exclude, causal, window, seq_lens,
             softmax):
    """Validate device inputs; return ``(layout, devices.Problem,
    devices.QueryTerms)``: every (batch element, KV head) of the call as
    one problem of :func:`cuda.launch` (4-D device views, no copies; the
    kernel applies the query terms)."""
    check_metric(metric)
    ndim = len(getattr(queries, "shape", ()))
    if ndim not in (2, 3, 4):
        raise ValueError("queries must have 2, 3 or 4 dimensions, got shape "
                         f"{getattr(queries, 'shape', None)}")
    Q = _array(queries, "queries", ndim)
    K = _array(keys, "keys", ndim)
    V = K if values is None else _array(values, "values", ndim)
    lay = layout.layout_of(tuple(Q.shape), tuple(K.shape), tuple(V.shape))
    window = layout.check_window(causal, window)
    lens = layout.sequence_lengths(seq_lens, lay)
    if exclude is not None and (causal or lay.ndim == 4):
        raise ValueError("exclude applies to retrieval (2-D or 3-D queries without causal)")
    excl = validate.exclusion_lists(exclude, lay.T, lay.S)
    t = logit_terms(metric, scale, lay.d, softmax)
    query = QueryTerms(t.qmult, t.qunit, t.qsq_coef, 1.0)
    if on_device(bias):
        dbias = _array(bias, "bias", 1)
        if tuple(dbias.shape) != (lay.S,):
            raise ValueError(f"bias on the device must have shape ({lay.S},), got {dbias.shape}")
        query = query._replace(bias_mult=t.unit)
        bias2 = _unit_row(dbias)
    else:
        rows = layout.head_bias(bias, lay)
        heads = lay.Hkv if bias is not None and np.ndim(bias) == 2 else 1
        bias2 = np.stack([prepare_bias(rows(g), lay.S, t.unit) for g in range(heads)])
    windows = [layout.row_windows(lay, causal, window, lens, b) for b in range(lay.batch)]
    if windows[0] is None:
        lo = hi = np.zeros((1, 0), np.int64)
    else:
        lo, hi = (np.stack([w[i][::lay.group] for w in windows]) for i in (0, 1))
    masks = Masks(*(excl if excl is not None else (_NONE, _NONE)), lo, hi)
    problem = Problem(_four(Q, ndim), Rows(_four(K, ndim), width=lay.d),
                      Rows(_four(V, ndim), width=lay.dv), values is not None,
                      Logits(bias2, t.key_mode, np.float32(t.key_coef)), masks, None)
    return lay, problem, query


_NONE = np.zeros(0, np.int64)


def _launch(problem, query, mode):
    from . import cuda as gpu

    res = gpu.launch(problem, mode, query, lse_dtype=np.float32)
    if res["bad"]:
        raise ValueError("non-finite result: the logits (scale * q.k + bias) overflow float32 "
                         "or the device inputs hold NaN/inf")
    return res


def _blocks(n):
    from . import config

    threads = config.CUDA_QUERY_BLOCK
    return -(-n // threads), threads


def _heads_out(lay, stacked, dtype):
    """The stacked (P * R, ...) rows of :func:`cuda.launch` as an output
    with the queries' leading axes (one scatter kernel; none for 2-D)."""
    from numba import cuda

    from . import cuda as gpu

    tail = tuple(stacked.shape[1:])
    if lay.ndim == 2:
        return stacked
    dest = cuda.device_array((lay.batch, lay.T, lay.H) + tail, dtype)
    width = tail[0] if tail else 1
    if stacked.shape[0] and width:
        gpu.scatter_heads_kernel[_blocks(stacked.shape[0] * width)](
            stacked.reshape(stacked.shape[0], width), dest.reshape(dest.shape[:3] + (width,)),
            lay.Hkv)
    return dest if lay.ndim == 4 else dest[0]


def attention(queries, keys, values, *, scale, bias, metric, exclude, return_lse, causal, window,
              seq_lens):
    """:func:`softretrieval.attention` on device arrays."""
    lay, problem, query = _problem(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                   exclude=exclude, causal=causal, window=window,
                                   seq_lens=seq_lens, softmax=True)
    res = _launch(problem, query, Mode(want_soft=True, want_acc=True))
    out = _heads_out(lay, res["out"], np.float32)
    lse = _heads_out(lay, res["lse"], np.float32)
    return (out, lse) if return_lse else out


def logsumexp(queries, keys, *, scale, bias, metric, exclude, causal, window, seq_lens):
    """:func:`softretrieval.logsumexp` on device arrays."""
    lay, problem, query = _problem(queries, keys, None, metric=metric, scale=scale, bias=bias,
                                   exclude=exclude, causal=causal, window=window,
                                   seq_lens=seq_lens, softmax=True)
    res = _launch(problem, query, Mode(want_soft=True, want_acc=False))
    return _heads_out(lay, res["lse"], np.float32)


def topk(queries, keys, k, *, metric, bias, exclude, causal, window, seq_lens):
    """:func:`softretrieval.topk` on device arrays."""
    from numba import cuda

    from . import cuda as gpu

    lay, problem, query = _problem(queries, keys, None, metric=metric, scale=None, bias=bias,
                                   exclude=exclude, causal=causal, window=window,
                                   seq_lens=seq_lens, softmax=False)
    res = _launch(problem, query, Mode(want_soft=False, want_acc=False, k=min(k, lay.S)))
    rows = res["topk_count"].shape[0]
    scores = cuda.device_array((rows, k), np.float32)
    ids = cuda.device_array((rows, k), np.int64)
    l2 = metric == "l2"
    if rows:
        gpu.finish_topk_kernel[_blocks(rows)](
            res["topk_logits"], res["topk_ids"], res["topk_count"],
            np.float32(-1.0 if l2 else 1.0), l2 and bias is None,
            np.float32(np.inf if l2 else -np.inf), scores, ids)
    return _heads_out(lay, scores, np.float32), _heads_out(lay, ids, np.int64)


def topk_attention(queries, keys, values, k, *, scale, bias, metric, exclude, causal, window,
                   seq_lens):
    """:func:`softretrieval.topk_attention` on device arrays; returns a
    :class:`softretrieval.TopKAttention` of device arrays."""
    from numba import cuda

    from . import cuda as gpu

    lay, problem, query = _problem(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                   exclude=exclude, causal=causal, window=window,
                                   seq_lens=seq_lens, softmax=True)
    res = _launch(problem, query, Mode(want_soft=True, want_acc=False, k=min(k, lay.S)))
    rows = res["lse"].shape[0]
    out = cuda.device_array((rows, lay.dv), np.float32)
    ids = cuda.device_array((rows, k), np.int64)
    weights = cuda.device_array((rows, k), np.float32)
    coverage = cuda.device_array(rows, np.float32)
    if rows:
        V4 = problem.values.data
        gpu.finish_topk_attention_kernel(np.dtype(V4.dtype))[_blocks(rows)](
            res["topk_logits"], res["topk_ids"], res["topk_count"], res["lse"], V4,
            gpu.device_view(np.zeros(0, np.float32)), 0, lay.T * lay.group, out, weights, ids,
            coverage)
    return TopKAttention(*(_heads_out(lay, a, a.dtype) for a in
                           (out, ids, weights, res["lse"], coverage)))
