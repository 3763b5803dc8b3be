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

from . import layout, validate
from .devices import Logits, Mode, Problem, QueryTerms, Rows, masks
from .terms import TopKAttention, check_metric, logit_terms, prepare_bias


def on_device(*arrays):
    """Whether any of ``arrays`` lives on the GPU."""
    return any(hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")
               for a in arrays if a is not None)


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


def _heads(a, lay, b, g, width, squeeze=True):
    """The view of a (.., S or T, H, ...) device array for batch b, heads
    ``g*width:(g+1)*width``; one head loses its head axis with ``squeeze``."""
    if lay.ndim == 2:
        return a
    view = a if lay.ndim == 3 else a[b]
    return view[:, g] if width == 1 and squeeze else view[:, g * width:(g + 1) * width]


def _problems(queries, keys, values, *, metric, scale, bias, exclude, causal, window, seq_lens,
              softmax):
    """Validate device inputs; return ``(layout, problems)`` where problems
    yields ``((b, g), (devices.Problem, devices.QueryTerms))`` with the
    arrays on the device (row_const None: the kernel adds the query terms)."""
    from numba import cuda

    from . import cuda as gpu

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
    excl = layout.stacked_exclude(validate.exclusion_lists(exclude, lay.T, lay.S), lay)
    t = logit_terms(metric, scale, lay.d, softmax)
    unit = t.unit
    query = QueryTerms(t.qmult, t.qunit, t.qsq_coef, 1.0)
    if on_device(bias):
        dbias = _array(bias, "bias", 1)
        if tuple(dbias.shape) != (lay.S,):
            raise ValueError(f"bias on the device must have shape ({lay.S},), got {dbias.shape}")
        query = query._replace(bias_mult=unit)
        bias_of = lambda g: dbias  # noqa: E731
    else:
        rows = layout.head_bias(bias, lay)
        bias_of = lambda g: prepare_bias(rows(g), lay.S, unit)  # noqa: E731

    values_given = values is not None

    def each():
        G = lay.group
        for b in range(lay.batch):
            rows = layout.row_windows(lay, causal, window, lens, b)
            for g in range(lay.Hkv):
                q = _heads(Q, lay, b, g, G)
                if G > 1:
                    stacked = cuda.device_array((lay.T * G, lay.d), np.float32)
                    if stacked.shape[0]:
                        gpu.gather_rows_kernel[_blocks(stacked.shape[0])](q, stacked)
                    q = stacked
                krows = Rows(_heads(K, lay, b, g, 1), width=lay.d)
                vrows = Rows(_heads(V, lay, b, g, 1), width=lay.dv)
                logits = Logits(bias_of(g), t.key_mode, np.float32(t.key_coef))
                problem = Problem(q, krows, vrows, values_given, logits, masks(excl, rows), None)
                yield (b, g), (problem, query)

    return lay, each()


def _blocks(rows):
    from . import config

    threads = config.CUDA_QUERY_BLOCK
    return -(-rows // threads), threads


def _launch(problem_and_query, mode):
    from . import cuda as gpu

    problem, query = problem_and_query
    res = gpu.launch(problem, mode, query, lse_dtype=np.float32)
    if res["bad"]:
        raise ValueError("non-finite result: the logits (scale * q.k + bias) overflow float32 "
                         "or the device inputs hold NaN/inf")
    return res


class _Outputs:
    """Device outputs with the queries' leading axes, filled per problem."""

    def __init__(self, lay, tails, dtypes):
        from numba import cuda

        self.lay = lay
        lead = {2: (lay.T,), 3: (lay.T, lay.H), 4: (lay.batch, lay.T, lay.H)}[lay.ndim]
        self.arrays = [cuda.device_array(lead + tail, dt) for tail, dt in zip(tails, dtypes)]

    def fill(self, b, g, rows):
        """Write a problem's (T * G, ...) device results into their heads."""
        from . import cuda as gpu

        if self.lay.ndim == 2:       # one problem: its results are the outputs
            self.arrays = list(rows)
            return
        for dest, src in zip(self.arrays, rows):
            if src.shape[0] == 0:
                continue
            view = _heads(dest, self.lay, b, g, self.lay.group, squeeze=False)
            if len(src.shape) == 1:
                gpu.scatter_values_kernel[_blocks(src.shape[0])](src, view)
            else:
                gpu.scatter_rows_kernel[_blocks(src.shape[0])](src, view)


def attention(queries, keys, values, *, scale, bias, metric, exclude, return_lse, causal, window,
              seq_lens):
    """:func:`softretrieval.attention` on device arrays."""
    lay, problems = _problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=True)
    outs = _Outputs(lay, ((lay.dv,), ()), (np.float32, np.float32))
    for (b, g), p in problems:
        res = _launch(p, Mode(want_soft=True, want_acc=True))
        outs.fill(b, g, (res["out"], res["lse"]))
    out, lse = outs.arrays
    return (out, lse) if return_lse else out


def topk(queries, keys, k, *, metric, bias, exclude, causal, window, seq_lens):
    """:func:`softretrieval.topk` on device arrays."""
    from numba import cuda

    from . import cuda as gpu

    lay, problems = _problems(queries, keys, None, metric=metric, scale=None, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=False)
    outs = _Outputs(lay, ((k,), (k,)), (np.float32, np.int64))
    l2 = metric == "l2"
    for (b, g), p in problems:
        res = _launch(p, Mode(want_soft=False, want_acc=False, k=min(k, lay.S)))
        R = p[0].Q.shape[0]
        scores = cuda.device_array((R, k), np.float32)
        ids = cuda.device_array((R, k), np.int64)
        if R:
            gpu.finish_topk_kernel[_blocks(R)](
                res["topk_logits"], res["topk_ids"], res["topk_count"],
                np.float32(-1.0 if l2 else 1.0), l2 and bias is None,
                np.float32(np.inf if l2 else -np.inf), scores, ids)
        outs.fill(b, g, (scores, ids))
    return tuple(outs.arrays)


def topk_attention(queries, keys, values, k, *, scale, bias, metric, exclude, causal, window,
                   seq_lens):
    """:func:`softretrieval.topk_attention` on device arrays; returns a
    :class:`softretrieval.TopKAttention` of device arrays."""
    from numba import cuda

    from . import cuda as gpu

    lay, problems = _problems(queries, keys, values, metric=metric, scale=scale, bias=bias,
                              exclude=exclude, causal=causal, window=window, seq_lens=seq_lens,
                              softmax=True)
    outs = _Outputs(lay, ((lay.dv,), (k,), (k,), (), ()),
                    (np.float32, np.int64, np.float32, np.float32, np.float32))
    for (b, g), p in problems:
        res = _launch(p, Mode(want_soft=True, want_acc=False, k=min(k, lay.S)))
        R = p[0].Q.shape[0]
        out = cuda.device_array((R, lay.dv), np.float32)
        ids = cuda.device_array((R, k), np.int64)
        weights = cuda.device_array((R, k), np.float32)
        coverage = cuda.device_array(R, np.float32)
        if R:
            V = p[0].values.data
            gpu.finish_topk_attention_kernel(np.dtype(V.dtype))[_blocks(R)](
                res["topk_logits"], res["topk_ids"], res["topk_count"], res["lse"], V,
                gpu.device_view(np.zeros(0, np.float32)), 0, out, weights, ids, coverage)
        outs.fill(b, g, (out, ids, weights, res["lse"], coverage))
    return TopKAttention(*outs.arrays)
