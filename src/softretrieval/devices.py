"""Where the kernels run: ``device="cpu" | "cuda" | "auto"``, and the small
protocol every target module implements (:class:`Target`).

A target is a module — :mod:`softretrieval.cpu`, :mod:`softretrieval.cuda` —
that compiles the shared functions (:func:`softretrieval.rules.shared`) with
its own jit and provides the members of :class:`Target`; the public layer
runs problems through ``run`` (and, for arrays on the GPU, through
``cuda.launch`` and the finishing kernels built from the same rules).
"""

from typing import Any, NamedTuple, Protocol

import numpy as np

DEVICES = ("cpu", "cuda", "auto")

_NONE = np.zeros(0, np.int64)
_NO_SCALE = np.zeros(0, np.float32)


class Rows(NamedTuple):
    """Stored rows a kernel reads (keys or values): ``data[:, col:col + width]``
    in a storage dtype (:mod:`softretrieval.storage`), times ``scale[j]``
    when ``scale`` (int8 row scales) is not empty."""

    data: Any            # (N, W) C-contiguous
    scale: Any = _NO_SCALE
    col: int = 0
    width: int = 0       # d or dv


class Logits(NamedTuple):
    """How a key turns dot products into logits (see :mod:`softretrieval.rules`)."""

    bias: Any = _NO_SCALE     # (N,) float32 in logit units, or (0,)
    key_mode: int = 0         # constants.KEYS_PLAIN / KEYS_SQNORM / KEYS_UNIT
    key_coef: Any = np.float32(0.0)


class Masks(NamedTuple):
    """Per-query masks: CSR id lists (sorted per query) and key windows
    ``[row_lo, row_hi)``; empty arrays for none. The lists are exclusions,
    or allow-lists when ``allow`` (then a query sees only its listed keys:
    :func:`rules.list_row`)."""

    excl_off: Any = _NONE     # (R + 1,) int64
    excl_ids: Any = _NONE
    row_lo: Any = _NONE       # (R,) int64
    row_hi: Any = _NONE
    allow: bool = False


def masks(exclude=None, window=None, allow=False):
    """:class:`Masks` from ``exclude = (offsets, ids)`` (an allow-list with
    ``allow``) and ``window = (lo, hi)`` (or None)."""
    off, ids = (_NONE, _NONE) if exclude is None else exclude
    lo, hi = (_NONE, _NONE) if window is None else window
    return Masks(off, ids, lo, hi, allow)


class Mode(NamedTuple):
    """What a call computes: the softmax state (``want_soft``), the weighted
    sum of values (``want_acc``), the top ``k`` (0: none), and the hits of a
    range search (CPU only; :mod:`softretrieval.ranges`): each query i's
    keys whose logit is at or above ``range_min[i]``, stored in slots
    ``range_slots[i]:range_slots[i + 1]`` of each key split's buffer (hits
    beyond them are counted, not stored)."""

    want_soft: bool = True
    want_acc: bool = True
    k: int = 0
    range_min: Any = _NO_SCALE    # (R,) float32 logits, or (0,): no range search
    range_slots: Any = _NONE      # (R + 1,) int64 slot offsets, or (0,)


class Problem(NamedTuple):
    """One kernel problem (a batch element and KV head) in the kernels' terms."""

    Q: Any               # (R, d) float32 queries, query terms applied (scale, unit, log2 e)
    keys: Rows
    values: Rows
    values_given: bool   # False: the keys serve as values
    logits: Logits
    masks: Masks
    row_const: Any       # (R,) float64, natural log: logit = kernel logit + row_const
    #                      (None on the GPU path, where the kernel adds the query terms)


class QueryTerms(NamedTuple):
    """Query terms a GPU kernel applies itself to queries that never visit
    the host: logit ``= qmult * q.k`` (of the unit query with ``qunit``)
    ``+ qsq_coef * |q|^2 + bias_mult * bias``."""

    qmult: float = 1.0
    qunit: bool = False
    qsq_coef: float = 0.0
    bias_mult: float = 1.0


class Target(Protocol):
    """What the public layer needs of a target module."""

    #: "cpu" or "cuda": the ``device`` name that selects it.
    NAME: str
    #: Whether its arrays live on a GPU (results then come back through
    #: ``run``; ``device_view`` copies host arrays over).
    IS_GPU: bool
    #: The shared core, top-k buffer and per-row rules compiled for it.
    shared: Any

    def available(self) -> bool:
        """Whether the target can run here."""

    def run(self, problem: Problem, mode: Mode) -> dict:
        """One :class:`Problem` (see :func:`softretrieval.cpu.run`): returns host
        arrays ``out``, ``lse``, ``topk_logits``, ``topk_ids``, ``topk_count``
        as the :class:`Mode` asks, and ``bad``."""

    def device_view(self, a):
        """``a`` as this target's kernels read it (a device array on a GPU)."""

_INSTALL = 'pip install "softretrieval[cuda]" (numba-cuda) on a machine with an NVIDIA GPU and driver'


def kernels(device):
    """The kernel module for ``device``: :mod:`softretrieval.cpu` or
    :mod:`softretrieval.cuda`. ``"auto"`` picks CUDA when numba-cuda is
    installed and finds a GPU, else the CPU; ``"cuda"`` without them raises
    ValueError saying how to install the extra."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        from . import cpu

        return cpu
    try:
        from . import cuda
    except ImportError as exc:
        if device == "auto":
            from . import cpu

            return cpu
        raise ValueError(f"device='cuda' needs numba-cuda ({exc}): {_INSTALL}") from None
    if cuda.available():
        return cuda
    if device == "auto":
        from . import cpu

        return cpu
    raise ValueError(f"device='cuda' but numba-cuda finds no CUDA GPU: {_INSTALL}")


def is_gpu(kernels):
    """Whether ``kernels`` (from :func:`kernels`) run on the GPU."""
    return kernels.IS_GPU
