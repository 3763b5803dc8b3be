"""Autograd-aware softretrieval for PyTorch: :func:`attention`,
:func:`logsumexp`, :func:`topk_attention`, :func:`memory_attention` and
:func:`full_softmax_loss`.

Needs the ``torch`` extra (``import softretrieval`` never imports torch).
Each function is a torch custom operator (``torch.library``:
``softretrieval::attention``, ``softretrieval::logsumexp``,
``softretrieval::topk_attention`` and their backward operators) with a shape-only fake implementation, so
``torch.compile`` graphs can hold them, and an autograd formula that runs
:func:`softretrieval.attention_backward` /
:func:`softretrieval.logsumexp_backward`: the score matrix is never stored,
forward or backward.

Tensors: CPU float32 contiguous tensors are read without a copy; other CPU
dtypes and layouts are converted to contiguous float32 first (a copy). The
computation is float32; outputs are float32 and gradients come back in each
input's dtype. CUDA tensors run the forward on the CUDA kernels (read in
place through ``__cuda_array_interface__``, outputs returned as CUDA
tensors); their backward pass runs the CUDA backward kernel on host copies
(not yet measured on a GPU), and the gradients come back as CUDA tensors.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import api, grad, validate
from .memory import _gate
from .terms import TopKAttention

__all__ = ["attention", "logsumexp", "topk_attention", "memory_attention", "full_softmax_loss"]


def _np(t):
    """A tensor as a float32 numpy array (no copy for a contiguous float32 CPU
    tensor; a CUDA tensor is copied to the host)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens):
    """Keyword arguments of the numpy API from an operator's arguments."""
    exclude = None if excl_offsets is None else (_np_int(excl_offsets), _np_int(excl_ids))
    lens = None if q_lens is None else (_np_int(q_lens), _np_int(k_lens))
    return dict(scale=scale, bias=None if bias is None else _np(bias), metric=metric,
                exclude=exclude, causal=causal, window=None if window < 0 else window,
                seq_lens=lens)


def _np_int(t):
    return t.detach().cpu().to(torch.int64).numpy()


def _device_arg(t):
    """CUDA tensors go to the kernels in place; CPU tensors as numpy."""
    if t.is_cuda:
        return t.detach().to(torch.float32)
    return _np(t)


def _to_tensor(a, like):
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    return torch.as_tensor(a, device=like.device)        # numba device arrays (CUDA)


def _grads_out(g, like):
    """A backward result's arrays as tensors on ``like``'s device (the bias
    gradient empty when there is no bias)."""
    db = g.bias if g.bias is not None else np.zeros(0, np.float32)
    arrays = [g.queries, g.keys] + ([] if g.values is None else [g.values]) + [db]
    return [torch.from_numpy(np.ascontiguousarray(a)).to(like.device) for a in arrays]


def _backward_device(t):
    """CUDA tensors' backward runs the CUDA backward kernel (host copies in
    and out); CPU tensors the CPU's."""
    return "cuda" if t.is_cuda else "cpu"


# --- attention -------------------------------------------------------------------------------

@torch.library.custom_op("softretrieval::attention", mutates_args=())
def _attention_op(queries: Tensor, keys: Tensor, values: Tensor, scale: float,
                  bias: Optional[Tensor], metric: str, excl_offsets: Optional[Tensor],
                  excl_ids: Optional[Tensor], causal: bool, window: int, q_lens: Optional[Tensor],
                  k_lens: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    device = "cuda" if queries.is_cuda else "cpu"
    out, lse = api.attention(_device_arg(queries), _device_arg(keys), _device_arg(values),
                             return_lse=True, device=device, **kw)
    return _to_tensor(out, queries), _to_tensor(lse, queries)


@_attention_op.register_fake
def _(queries, keys, values, scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens,
      k_lens):
    lead = queries.shape[:-1]
    return (queries.new_empty(lead + values.shape[-1:], dtype=torch.float32),
            queries.new_empty(lead, dtype=torch.float32))


@torch.library.custom_op("softretrieval::attention_backward", mutates_args=())
def _attention_backward_op(queries: Tensor, keys: Tensor, values: Tensor, out: Tensor, lse: Tensor,
                           grad_out: Tensor, grad_lse: Tensor, scale: float,
                           bias: Optional[Tensor], metric: str, excl_offsets: Optional[Tensor],
                           excl_ids: Optional[Tensor], causal: bool, window: int,
                           q_lens: Optional[Tensor], k_lens: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    g = grad.attention_backward(_np(queries), _np(keys), _np(values), _np(out), _np(lse),
                                _np(grad_out), _np(grad_lse), device=_backward_device(queries),
                                **kw)
    return _grads_out(g, queries)


@_attention_backward_op.register_fake
def _(queries, keys, values, out, lse, grad_out, grad_lse, scale, bias, metric, excl_offsets,
      excl_ids, causal, window, q_lens, k_lens):
    return [torch.empty_like(queries, dtype=torch.float32),
            torch.empty_like(keys, dtype=torch.float32),
            torch.empty_like(values, dtype=torch.float32),
            queries.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)]


def _attention_setup(ctx, inputs, output):
    queries, keys, values, scale, bias, metric, eo, ei, causal, window, ql, kl = inputs
    ctx.save_for_backward(queries, keys, values, bias, output[0], output[1], eo, ei, ql, kl)
    ctx.args = (scale, metric, causal, window)


def _attention_grad(ctx, grad_out, grad_lse):
    queries, keys, values, bias, out, lse, eo, ei, ql, kl = ctx.saved_tensors
    scale, metric, causal, window = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv, db = _attention_backward_op(queries, keys, values, out, lse, grad_out, grad_lse,
                                            scale, bias, metric, eo, ei, causal, window, ql, kl)
    return (dq.to(queries.dtype), dk.to(keys.dtype), dv.to(values.dtype), None,
            None if bias is None else db.to(bias.dtype), None, None, None, None, None, None, None)


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


# --- logsumexp -------------------------------------------------------------------------------

@torch.library.custom_op("softretrieval::logsumexp", mutates_args=())
def _logsumexp_op(queries: Tensor, keys: Tensor, scale: float, bias: Optional[Tensor], metric: str,
                  excl_offsets: Optional[Tensor], excl_ids: Optional[Tensor], causal: bool,
                  window: int, q_lens: Optional[Tensor], k_lens: Optional[Tensor]) -> Tensor:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    device = "cuda" if queries.is_cuda else "cpu"
    return _to_tensor(api.logsumexp(_device_arg(queries), _device_arg(keys), device=device, **kw),
                      queries)


@_logsumexp_op.register_fake
def _(queries, keys, scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens):
    return queries.new_empty(queries.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("softretrieval::logsumexp_backward", mutates_args=())
def _logsumexp_backward_op(queries: Tensor, keys: Tensor, lse: Tensor, grad_lse: Tensor,
                           scale: float, bias: Optional[Tensor], metric: str,
                           excl_offsets: Optional[Tensor], excl_ids: Optional[Tensor],
                           causal: bool, window: int, q_lens: Optional[Tensor],
                           k_lens: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    g = grad.logsumexp_backward(_np(queries), _np(keys), _np(lse), _np(grad_lse),
                                device=_backward_device(queries), **kw)
    return _grads_out(g, queries)


@_logsumexp_backward_op.register_fake
def _(queries, keys, lse, grad_lse, scale, bias, metric, excl_offsets, excl_ids, causal, window,
      q_lens, k_lens):
    return [torch.empty_like(queries, dtype=torch.float32),
            torch.empty_like(keys, dtype=torch.float32),
            queries.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)]


def _logsumexp_setup(ctx, inputs, output):
    queries, keys, scale, bias, metric, eo, ei, causal, window, ql, kl = inputs
    ctx.save_for_backward(queries, keys, bias, output, eo, ei, ql, kl)
    ctx.args = (scale, metric, causal, window)


def _logsumexp_grad(ctx, grad_lse):
    queries, keys, bias, lse, eo, ei, ql, kl = ctx.saved_tensors
    scale, metric, causal, window = ctx.args
    dq, dk, db = _logsumexp_backward_op(queries, keys, lse, grad_lse, scale, bias, metric, eo, ei,
                                        causal, window, ql, kl)
    return (dq.to(queries.dtype), dk.to(keys.dtype), None,
            None if bias is None else db.to(bias.dtype), None, None, None, None, None, None, None)


_logsumexp_op.register_autograd(_logsumexp_grad, setup_context=_logsumexp_setup)


# --- top-k attention -------------------------------------------------------------------------

@torch.library.custom_op("softretrieval::topk_attention", mutates_args=())
def _topk_attention_op(queries: Tensor, keys: Tensor, values: Tensor, k: int, scale: float,
                       bias: Optional[Tensor], metric: str, excl_offsets: Optional[Tensor],
                       excl_ids: Optional[Tensor], causal: bool, window: int,
                       q_lens: Optional[Tensor], k_lens: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    device = "cuda" if queries.is_cuda else "cpu"
    res = api.topk_attention(_device_arg(queries), _device_arg(keys), _device_arg(values), k,
                             device=device, **kw)
    return [_to_tensor(a, queries) for a in res]


@_topk_attention_op.register_fake
def _(queries, keys, values, k, scale, bias, metric, excl_offsets, excl_ids, causal, window,
      q_lens, k_lens):
    lead = queries.shape[:-1]
    f32 = dict(dtype=torch.float32)
    return [queries.new_empty(lead + values.shape[-1:], **f32),
            queries.new_empty(lead + (k,), dtype=torch.int64), queries.new_empty(lead + (k,), **f32),
            queries.new_empty(lead, **f32), queries.new_empty(lead, **f32)]


@torch.library.custom_op("softretrieval::topk_attention_backward", mutates_args=())
def _topk_attention_backward_op(queries: Tensor, keys: Tensor, values: Tensor, out: Tensor,
                                ids: Tensor, weights: Tensor, lse: Tensor, coverage: Tensor,
                                grad_out: Tensor, grad_weights: Tensor, grad_lse: Tensor,
                                grad_coverage: Tensor, scale: float, bias: Optional[Tensor],
                                metric: str, excl_offsets: Optional[Tensor],
                                excl_ids: Optional[Tensor], causal: bool, window: int,
                                q_lens: Optional[Tensor], k_lens: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens)
    result = TopKAttention(_np(out), _np_int(ids), _np(weights), _np(lse), _np(coverage))
    g = grad.topk_attention_backward(_np(queries), _np(keys), _np(values), result, _np(grad_out),
                                     _np(grad_lse), _np(grad_weights), _np(grad_coverage),
                                     device=_backward_device(queries), **kw)
    return _grads_out(g, queries)


@_topk_attention_backward_op.register_fake
def _(queries, keys, values, out, ids, weights, lse, coverage, grad_out, grad_weights, grad_lse,
      grad_coverage, scale, bias, metric, excl_offsets, excl_ids, causal, window, q_lens, k_lens):
    return [torch.empty_like(queries, dtype=torch.float32),
            torch.empty_like(keys, dtype=torch.float32),
            torch.empty_like(values, dtype=torch.float32),
            queries.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)]


def _topk_attention_setup(ctx, inputs, output):
    queries, keys, values, k, scale, bias, metric, eo, ei, causal, window, ql, kl = inputs
    out, ids, weights, lse, coverage = output
    ctx.save_for_backward(queries, keys, values, bias, out, ids, weights, lse, coverage, eo, ei,
                          ql, kl)
    ctx.args = (scale, metric, causal, window)


def _topk_attention_grad(ctx, grads):
    grad_out, _, grad_weights, grad_lse, grad_coverage = grads
    queries, keys, values, bias, out, ids, weights, lse, coverage, eo, ei, ql, kl = ctx.saved_tensors
    scale, metric, causal, window = ctx.args
    dq, dk, dv, db = _topk_attention_backward_op(queries, keys, values, out, ids, weights, lse,
                                                 coverage, grad_out, grad_weights, grad_lse,
                                                 grad_coverage, scale, bias, metric, eo, ei,
                                                 causal, window, ql, kl)
    return (dq.to(queries.dtype), dk.to(keys.dtype), dv.to(values.dtype), None, None,
            None if bias is None else db.to(bias.dtype), None, None, None, None, None, None, None)


_topk_attention_op.register_autograd(_topk_attention_grad, setup_context=_topk_attention_setup)


# --- the full-catalog softmax loss ---------------------------------------------------------

@torch.library.custom_op("softretrieval::full_softmax_loss", mutates_args=())
def _softmax_loss_op(queries: Tensor, keys: Tensor, targets: Tensor, scale: float,
                     bias: Optional[Tensor], metric: str, excl_offsets: Optional[Tensor],
                     excl_ids: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, False, -1, None, None)
    loss, lse = grad.softmax_loss(_np(queries), _np(keys), _np_int(targets), scale=scale,
                                  bias=kw["bias"], exclude=kw["exclude"], metric=metric)
    return [torch.from_numpy(loss).to(queries.device), torch.from_numpy(lse).to(queries.device)]


@_softmax_loss_op.register_fake
def _(queries, keys, targets, scale, bias, metric, excl_offsets, excl_ids):
    return [queries.new_empty(queries.shape[:1], dtype=torch.float32),
            queries.new_empty(queries.shape[:1], dtype=torch.float32)]


@torch.library.custom_op("softretrieval::full_softmax_loss_backward", mutates_args=())
def _softmax_loss_backward_op(queries: Tensor, keys: Tensor, targets: Tensor, lse: Tensor,
                              grad_loss: Tensor, scale: float, bias: Optional[Tensor], metric: str,
                              excl_offsets: Optional[Tensor],
                              excl_ids: Optional[Tensor]) -> List[Tensor]:
    kw = _kw(scale, bias, metric, excl_offsets, excl_ids, False, -1, None, None)
    g = grad.softmax_loss_backward(_np(queries), _np(keys), _np_int(targets), _np(lse),
                                   _np(grad_loss), scale=scale, bias=kw["bias"],
                                   exclude=kw["exclude"], metric=metric,
                                   device=_backward_device(queries))
    return _grads_out(g, queries)


@_softmax_loss_backward_op.register_fake
def _(queries, keys, targets, lse, grad_loss, scale, bias, metric, excl_offsets, excl_ids):
    return [torch.empty_like(queries, dtype=torch.float32),
            torch.empty_like(keys, dtype=torch.float32),
            queries.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)]


def _softmax_loss_setup(ctx, inputs, output):
    queries, keys, targets, scale, bias, metric, eo, ei = inputs
    ctx.save_for_backward(queries, keys, targets, bias, output[1], eo, ei)
    ctx.args = (scale, metric)


def _softmax_loss_grad(ctx, grads):
    grad_loss = grads[0]
    queries, keys, targets, bias, lse, eo, ei = ctx.saved_tensors
    scale, metric = ctx.args
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq, dk, db = _softmax_loss_backward_op(queries, keys, targets, lse, grad_loss, scale, bias,
                                           metric, eo, ei)
    return (dq.to(queries.dtype), dk.to(keys.dtype), None, None,
            None if bias is None else db.to(bias.dtype), None, None, None)


_softmax_loss_op.register_autograd(_softmax_loss_grad, setup_context=_softmax_loss_setup)


# --- the public functions --------------------------------------------------------------------

def _common(queries, keys, scale, temperature, exclude, window, seq_lens):
    """Operator arguments shared by every function: the scale (1/temperature,
    default 1/sqrt(d)), exclusions as CSR tensors, the window (-1: none) and
    the lengths as tensors."""
    for name, value in (("scale", scale), ("temperature", temperature)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise TypeError(f"{name} is not differentiable here: pass a number (a tensor that "
                            "requires grad would be detached silently)")
    if window is not None:
        window = validate.positive_int(window, "window")
    if temperature is not None:
        if scale is not None:
            raise ValueError("give scale or temperature, not both")
        t = float(temperature)
        if not t > 0 or not np.isfinite(t):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        scale = 1.0 / t
    d = queries.shape[-1]
    scale = validate.scale_value(scale, d)
    eo = ei = None
    if exclude is not None:
        if isinstance(exclude, tuple):
            exclude = tuple(_np_int(torch.as_tensor(a)) for a in exclude)
        else:
            exclude = [_np_int(torch.as_tensor(a)) for a in exclude]
        offsets, ids = validate.exclusion_lists(exclude, queries.shape[0], keys.shape[0])
        eo, ei = torch.from_numpy(offsets), torch.from_numpy(ids)
    ql = kl = None
    if seq_lens is not None:
        q, k = seq_lens if isinstance(seq_lens, tuple) else (seq_lens, seq_lens)
        ql, kl = torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(k, dtype=torch.int64)
    return float(scale), eo, ei, -1 if window is None else int(window), ql, kl


def attention(queries: Tensor, keys: Tensor, values: Optional[Tensor] = None, *,
              scale: Optional[float] = None, temperature: Optional[float] = None,
              bias: Optional[Tensor] = None, metric: str = "ip", exclude=None,
              causal: bool = False, window: Optional[int] = None, seq_lens=None,
              return_lse: bool = False):
    """:func:`softretrieval.attention` on torch tensors, differentiable with
    respect to ``queries``, ``keys``, ``values`` and ``bias`` (and through
    ``lse`` with ``return_lse``). ``temperature`` is ``1 / scale``. Shapes,
    modes and arguments as the numpy function; ``exclude`` a list of
    integer arrays or a CSR ``(offsets, ids)`` pair; ``seq_lens`` a tensor or
    a ``(q_lens, k_lens)`` pair. Returns ``out`` (float32), and ``lse``."""
    scale, eo, ei, window, ql, kl = _common(queries, keys, scale, temperature, exclude, window, seq_lens)
    out, lse = _attention_op(queries, keys, keys if values is None else values, scale, bias, metric,
                             eo, ei, causal, window, ql, kl)
    return (out, lse) if return_lse else out


def logsumexp(queries: Tensor, keys: Tensor, *, scale: Optional[float] = None,
              temperature: Optional[float] = None, bias: Optional[Tensor] = None,
              metric: str = "ip", exclude=None, causal: bool = False,
              window: Optional[int] = None, seq_lens=None) -> Tensor:
    """:func:`softretrieval.logsumexp` on torch tensors, differentiable with
    respect to ``queries``, ``keys`` and ``bias``: the exact log-partition of
    a softmax over every key, in one streaming pass each way."""
    scale, eo, ei, window, ql, kl = _common(queries, keys, scale, temperature, exclude, window, seq_lens)
    return _logsumexp_op(queries, keys, scale, bias, metric, eo, ei, causal, window, ql, kl)


def topk_attention(queries: Tensor, keys: Tensor, values: Optional[Tensor] = None, k: int = 32, *,
                   scale: Optional[float] = None, temperature: Optional[float] = None,
                   bias: Optional[Tensor] = None, metric: str = "ip", exclude=None,
                   causal: bool = False, window: Optional[int] = None,
                   seq_lens=None) -> TopKAttention:
    """:func:`softretrieval.topk_attention` on torch tensors: a
    :class:`~softretrieval.TopKAttention` of tensors (``out``, ``ids``,
    ``weights``, ``lse``, ``coverage``), differentiable with respect to
    ``queries``, ``keys``, ``values`` and ``bias`` through ``out`` and
    ``weights`` (to the selected keys), ``lse`` (to every key) and
    ``coverage`` (both)."""
    scale, eo, ei, window, ql, kl = _common(queries, keys, scale, temperature, exclude, window,
                                            seq_lens)
    k = validate.positive_int(k, "k")
    res = _topk_attention_op(queries, keys, keys if values is None else values, k, scale, bias,
                             metric, eo, ei, causal, window, ql, kl)
    return TopKAttention(*res)


def memory_attention(q: Tensor, k: Tensor, v: Tensor, memory, *, topk: int = 32,
                     causal: bool = True, gate: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """:func:`softretrieval.memory_attention` on torch tensors: local
    attention over the sequence's own ``k``, ``v`` (causal) and top-k
    attention over the :class:`~softretrieval.KNNMemory`, combined as one
    exact softmax (``gate=None``) or mixed per head by ``gate`` (H,).
    Differentiable with respect to ``q``, ``k``, ``v`` and ``gate``; the
    memory's entries are constants (no gradient), as in Memorizing
    Transformers. Returns ``(out (T, H, dv), coverage (T, H))``."""
    if q.dim() != 3:
        raise ValueError(f"q must have shape (T, H, d), got {tuple(q.shape)}")
    if gate is not None:
        _gate(gate.detach().cpu().numpy() if isinstance(gate, Tensor) else gate, q.shape[1])
        gate = torch.as_tensor(gate, device=q.device)
    local, lse_local = attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    keys, values = memory.snapshot()
    if keys.shape[0] == 0:
        empty = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
        if gate is None:
            return local, empty
        g = gate.to(torch.float32)[None, :, None]
        return (1 - g) * local, empty
    mem = topk_attention(q, torch.from_numpy(keys).to(q.device),
                         torch.from_numpy(values).to(q.device), topk, scale=scale,
                         metric=memory.metric)
    if gate is not None:
        g = gate.to(torch.float32)[None, :, None]
        return g * mem.out + (1 - g) * local, mem.coverage
    lse_top = mem.lse + torch.log(mem.coverage)          # the top-k entries' own partition
    top = torch.maximum(lse_local, lse_top)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_local = torch.exp(lse_local - top)[..., None]
    w_mem = torch.exp(lse_top - top)[..., None]
    total = w_local + w_mem
    out = (w_local * local + w_mem * mem.out) / torch.where(total > 0, total, torch.ones_like(total))
    return out, mem.coverage


def full_softmax_loss(queries: Tensor, keys: Tensor, targets: Tensor, *,
                      temperature: Optional[float] = None, scale: Optional[float] = None,
                      bias: Optional[Tensor] = None, exclude=None, metric: str = "ip",
                      reduction: str = "mean") -> Tensor:
    """The exact cross-entropy of each query against the whole catalog:
    ``loss_i = lse_i - logit(q_i, k_{t_i})`` with ``lse_i`` over every key
    (:func:`logsumexp`), no sampling and no (B, N) logits.

    Parameters
    ----------
    queries : (B, d) tensor (e.g. user-tower outputs)
    keys : (N, d) tensor (item-tower outputs for the whole catalog)
    targets : (B,) integer tensor, each query's positive item in ``0..N-1``
    temperature or scale : the logit scale is ``1 / temperature`` (or
        ``scale``; default ``1 / sqrt(d)``).
    bias : (N,) tensor, optional: added to every logit (e.g. ``-log p(item)``
        for a logQ / popularity correction); differentiable.
    exclude : per-query ids left out of the softmax (e.g. a user's other
        positives), as in :func:`softretrieval.attention`; a query's target
        may not be excluded.
    metric : "ip" (default), "cosine" or "l2".
    reduction : "mean" (default), "sum" or "none" (the (B,) losses).

    Gradients flow to ``queries``, ``keys`` and ``bias`` in one streaming
    pass over the catalog (that of :func:`softretrieval.logsumexp_backward`),
    the targets' own terms added into the same sums: the keys' gradient is
    the one (N, d) array returned, no second.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (B, d) and keys (N, d) must share d, got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an int64 (or int32) tensor of item indices")
    B, N = queries.shape[0], keys.shape[0]
    if targets.shape != (B,):
        raise ValueError(f"targets must have shape ({B},), got {tuple(targets.shape)}")
    t = targets.to(torch.int64)
    if B and (int(t.min()) < 0 or int(t.max()) >= N):
        raise ValueError(f"targets must lie in 0..{N - 1}")
    scale_v, eo, ei, _, _, _ = _common(queries, keys, scale, temperature, exclude, None, None)
    if eo is not None:
        offsets, ids = eo.numpy(), ei.numpy()
        tn = t.cpu().numpy()
        for i in range(B):
            if tn[i] in ids[offsets[i]:offsets[i + 1]]:
                raise ValueError(f"targets[{i}] = {tn[i]} is excluded for its query")
    if metric not in ("ip", "cosine", "l2"):
        raise ValueError(f"metric must be one of ('ip', 'cosine', 'l2'), got {metric!r}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    loss, _ = _softmax_loss_op(queries, keys, t, scale_v, bias, metric, eo, ei)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
