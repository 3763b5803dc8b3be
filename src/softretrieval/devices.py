"""Where the kernels run: ``device="cpu" | "cuda" | "auto"``, and the small
protocol every target module implements (:class:`Target`).

A target is a module — :mod:`softretrieval.cpu`, :mod:`softretrieval.cuda` —
that compiles the shared functions (:func:`softretrieval.rules.shared`) with
its own jit and provides the members of :class:`Target`. A third target (or a
new mode) is added there; the public layer only calls these members.
"""

from typing import Any, Protocol

DEVICES = ("cpu", "cuda", "auto")


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

    def run(self, Q, K, V, bias, **terms) -> dict:
        """One kernel problem on host arrays (see :func:`softretrieval.cpu.run`):
        returns host arrays ``out``, ``lse``, ``topk_logits``, ``topk_ids``,
        ``topk_count`` as the mode asks, and ``bad``."""

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
