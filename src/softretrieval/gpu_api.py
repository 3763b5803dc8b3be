"""The public functions on arrays that live on the GPU (numba device arrays,
or any object with ``__cuda_array_interface__``: CuPy, torch CUDA tensors).

:func:`softretrieval.attention`, :func:`~softretrieval.topk` and
:func:`~softretrieval.topk_attention` come here when their inputs are on the
device. The inputs are read in place (no host round trip): the query scale,
cosine normalization and l2 terms are applied inside the kernel, and the
outputs are returned as numba device arrays (wrap them with
``cupy.asarray`` / ``torch.as_tensor``, both zero-copy). Shapes are the
retrieval ones, ``(B, d) / (N, d) / (N, dv)``; arrays must be float32 (any
strides). ``bias`` may be a host or device (N,) array, ``exclude`` host
lists. Device inputs are not scanned for NaN/inf (that would cost a pass);
logits that come out non-finite still raise ``ValueError``.
"""

import numpy as np

from . import validate
from .constants import KEYS_PLAIN, KEYS_SQNORM, KEYS_UNIT, LOG2E


def on_device(*arrays):
    """Whether any of ``arrays`` lives on the GPU."""
    return any(hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")
               for a in arrays if a is not None)


def check_call(device, seq):
    """Device inputs run on CUDA, retrieval shapes only; ValueError otherwise."""
    if device not in ("cuda", "auto"):
        raise ValueError(f"inputs are on the GPU: pass device='cuda' (or 'auto'), got device={device!r}")
    if seq:
        raise ValueError("device arrays take the retrieval shapes (B, d) / (N, d) without causal, "
                         "window or seq_lens: copy them to the host for the sequence modes")


def _matrix(a, name):
    from . import cuda as gpu

    if a is None:
        return None
    arr = gpu._device(a if on_device(a) else np.ascontiguousarray(a, np.float32))
    if np.dtype(arr.dtype) != np.float32:
        raise TypeError(f"{name} on the device must be float32, got {arr.dtype}")
    if len(arr.shape) != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} on the device must have shape (rows, dim) with dim >= 1, "
                         f"got {arr.shape}")
    return arr


def _prepare(queries, keys, values, *, metric, scale, bias, exclude, softmax):
    """Validated device arrays and the kernel's terms for one call."""
    from . import api

    if metric not in api.METRICS:
        raise ValueError(f"metric must be one of {api.METRICS}, got {metric!r}")
    Q, K, V = _matrix(queries, "queries"), _matrix(keys, "keys"), _matrix(values, "values")
    B, d = Q.shape
    N = K.shape[0]
    if N == 0:
        raise ValueError("keys is empty: at least one key is needed")
    if K.shape[1] != d:
        raise ValueError(f"queries have dimension {d} but keys have {K.shape[1]}")
    if V is not None and V.shape[0] != N:
        raise ValueError(f"values have {V.shape[0]} rows but keys have {N}")
    unit = LOG2E if softmax else 1.0
    mult = validate.scale_value(scale, d) * unit if softmax else 1.0
    terms = dict(qmult=mult, key_mode=KEYS_PLAIN)
    if metric == "cosine":
        terms.update(qunit=True, key_mode=KEYS_UNIT)
    elif metric == "l2":
        terms.update(qmult=2 * mult, qsq_coef=-mult, key_mode=KEYS_SQNORM, key_coef=-mult)
    if bias is None:
        b = np.zeros(0, np.float32)
    elif on_device(bias):
        b = _matrix(bias.reshape(1, -1) if hasattr(bias, "reshape") else bias, "bias")[0]
        if b.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {b.shape}")
        terms["bias_mult"] = unit
    else:
        b = api._prepare_bias(bias, N, unit)
    terms["exclude"] = validate.exclusion_lists(exclude, B, N)
    return Q, K, V, b, terms


def _launch(Q, K, V, b, terms, **mode):
    from . import cuda as gpu

    res = gpu.launch(Q, K, K if V is None else V, b, lse_dtype=np.float32, **terms, **mode)
    if res["bad"]:
        raise ValueError("non-finite result: the logits (scale * q.k + bias) overflow float32 "
                         "or the device inputs hold NaN/inf")
    return res


def attention(queries, keys, values, *, scale, bias, metric, exclude, return_lse):
    """:func:`softretrieval.attention` on device arrays."""
    Q, K, V, b, terms = _prepare(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                 exclude=exclude, softmax=True)
    res = _launch(Q, K, V, b, terms, want_soft=True, want_acc=True)
    return (res["out"], res["lse"]) if return_lse else res["out"]


def topk(queries, keys, k, *, metric, bias, exclude):
    """:func:`softretrieval.topk` on device arrays."""
    from numba import cuda

    from . import config
    from . import cuda as gpu

    Q, K, _, b, terms = _prepare(queries, keys, None, metric=metric, scale=None, bias=bias,
                                 exclude=exclude, softmax=False)
    res = _launch(Q, K, None, b, terms, want_soft=False, want_acc=False, k=min(k, K.shape[0]))
    B = Q.shape[0]
    scores = cuda.device_array((B, k), np.float32)
    ids = cuda.device_array((B, k), np.int64)
    l2 = metric == "l2"
    threads = config.CUDA_QUERY_BLOCK
    gpu.finish_topk_kernel[-(-B // threads), threads](
        res["topk_logits"], res["topk_ids"], res["topk_count"], np.float32(-1.0 if l2 else 1.0),
        l2 and bias is None, np.float32(np.inf if l2 else -np.inf), scores, ids)
    return scores, ids


def topk_attention(queries, keys, values, k, *, scale, bias, metric, exclude):
    """:func:`softretrieval.topk_attention` on device arrays; returns a
    :class:`softretrieval.TopKAttention` of device arrays."""
    from numba import cuda

    from . import config
    from . import cuda as gpu
    from .api import TopKAttention

    Q, K, V, b, terms = _prepare(queries, keys, values, metric=metric, scale=scale, bias=bias,
                                 exclude=exclude, softmax=True)
    res = _launch(Q, K, V, b, terms, want_soft=True, want_acc=False, k=min(k, K.shape[0]))
    B = Q.shape[0]
    V = K if V is None else V
    out = cuda.device_array((B, V.shape[1]), np.float32)
    ids = cuda.device_array((B, k), np.int64)
    weights = cuda.device_array((B, k), np.float32)
    coverage = cuda.device_array(B, np.float32)
    threads = config.CUDA_QUERY_BLOCK
    gpu.finish_topk_attention_kernel[-(-B // threads), threads](
        res["topk_logits"], res["topk_ids"], res["topk_count"], res["lse"], V, out, ids, weights,
        coverage)
    return TopKAttention(out, ids, weights, res["lse"], coverage)

