"""Where the kernels run: ``device="cpu" | "cuda" | "auto"``."""

DEVICES = ("cpu", "cuda", "auto")

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
    return kernels.__name__ == f"{__package__}.cuda"
