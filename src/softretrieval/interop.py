"""torch tensors, DLPack arrays and numpy arrays in; results in the caller's kind out.

The one place where arrays that are not numpy arrays are converted. Two parts:

* :func:`host` turns an input into a numpy array: a CPU torch tensor by
  ``Tensor.numpy()`` (a view: no copy; bfloat16, which numpy lacks, is
  converted to float32), any other object with ``__dlpack__`` in host memory
  by ``np.from_dlpack`` (a view), anything else by ``np.asarray``.
  :func:`softretrieval.validate.as_array` calls it, so every input check
  reads numpy arrays.
* :func:`boundary` decorates every public function and method: it converts
  the array arguments with :func:`host` (arrays already on the GPU, with
  ``__cuda_array_interface__``, stay as they are for the CUDA path) and
  returns the results as torch tensors when any array argument was a torch
  tensor (zero-copy ``torch.from_numpy``; GPU results with
  ``torch.as_tensor`` on the tensor's device), as numpy arrays otherwise.
  Result named tuples (:class:`~softretrieval.TopKAttention`,
  :class:`~softretrieval.MemoryRead`, the gradients) convert field by field.

A tensor that requires grad is refused (``TypeError``) while torch records
gradients: the plain functions do not propagate them (``softretrieval.torch``
does). Under ``torch.no_grad()`` or ``torch.inference_mode()`` it is read
detached. torch is never imported here: a tensor can only exist when the
caller imported torch, so ``sys.modules`` tells.
"""

import functools
import sys

import numpy as np

#: DLPack device types numpy reads (host memory), and names of the others for errors.
_HOST_DEVICES = {1: "CPU", 3: "CUDA host", 11: "ROCm host", 13: "CUDA managed"}
_GPU_HINT = ("copy it to the host (e.g. .cpu()); attention, logsumexp, topk and topk_attention read "
             "arrays with __cuda_array_interface__ (CuPy, numba, torch CUDA) in place with "
             "device='cuda'")
_OTHER_DEVICES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm",
                  12: "ExtDev", 14: "oneAPI", 15: "WebGPU", 16: "Hexagon", 17: "MAIA"}


def _torch_tensor(x):
    """Whether ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def on_gpu(x):
    """Whether ``x`` lives on the GPU and is read in place by the CUDA path
    (``__cuda_array_interface__``: CuPy, numba device arrays, torch CUDA
    tensors; or a numba device array of the simulator)."""
    if _torch_tensor(x):
        return x.is_cuda
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _detached(t, name, where):
    """A torch tensor without autograd history; TypeError for one that
    requires grad while gradients are recorded."""
    import torch

    if not t.requires_grad:
        return t
    if torch.is_grad_enabled():
        raise TypeError(
            f"{name} requires grad, but {where} does not propagate gradients: use "
            "softretrieval.torch for autograd, or pass it detached (.detach(), or call under "
            "torch.no_grad())")
    return t.detach()


def host(x, name, where="softretrieval"):
    """``x`` as a numpy array in host memory, without a copy where numpy can
    view it (torch CPU tensors, host DLPack arrays, numpy arrays, memory
    maps). ``name`` names the argument in errors, ``where`` the function.

    Raises TypeError for a tensor that requires grad (see the module
    docstring), for arrays on a GPU or another device, and for objects that
    are neither arrays nor nested sequences of numbers.
    """
    if isinstance(x, np.ndarray):
        return x
    if _torch_tensor(x):
        return _torch_host(_detached(x, name, where), name)
    if on_gpu(x):
        raise TypeError(f"{name} is on the GPU, but it must be in host memory here: {_GPU_HINT}")
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return _dlpack_host(x, name)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} must be an array of numbers (not ragged): {exc}") from None
    if arr.dtype == object and arr.ndim == 0:
        raise TypeError(f"{name} must be an array (numpy, torch, an object with __dlpack__, or "
                        f"a nested sequence of numbers), got {type(x).__name__}")
    return arr


def _torch_host(t, name):
    import torch

    if t.device.type != "cpu":
        raise TypeError(f"{name} is a torch tensor on {t.device}, but it must be in host memory "
                        f"here: {_GPU_HINT}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}")
    if t.dtype == torch.bfloat16:      # numpy has no bfloat16: converted (a copy)
        t = t.to(torch.float32)
    try:
        return t.numpy()
    except (RuntimeError, TypeError) as exc:   # a tensor subclass or a dtype numpy lacks
        raise TypeError(f"{name} could not be read as a numpy array: {exc}") from None


def _dlpack_host(x, name):
    device_type = int(x.__dlpack_device__()[0])
    if device_type not in _HOST_DEVICES:
        kind = _OTHER_DEVICES.get(device_type, "unknown")
        raise TypeError(f"{name} is a DLPack array on a {kind} device (DLPack device type "
                        f"{device_type}), but it must be in host memory here: {_GPU_HINT}")
    try:
        return np.from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be read through DLPack ({exc}); numpy reads bool, "
                        "integer and float arrays (convert bfloat16 to float32 first)") from None


def _argument(x, name, where):
    """One argument of a public call, converted: host arrays to numpy, GPU
    arrays (and torch CUDA tensors, detached) kept, the elements of a list
    or tuple converted one level down (``exclude``, ``merge``'s parts, a
    :class:`TopKAttention`); anything else (numbers, strings, objects)
    unchanged for the function's own checks."""
    if x is None or isinstance(x, (np.ndarray, str, int, float)):
        return x
    if _torch_tensor(x):
        t = _detached(x, name, where)
        return t if t.is_cuda else _torch_host(t, name)
    if isinstance(x, (list, tuple)):
        items = [_element(a, f"{name}[{i}]", where) for i, a in enumerate(x)]
        if all(a is b for a, b in zip(items, x)):
            return x
        return type(x)(*items) if hasattr(type(x), "_fields") else type(x)(items)
    if on_gpu(x):
        return x
    if hasattr(x, "__dlpack__"):
        return host(x, name, where)
    return x


def _element(x, name, where):
    if isinstance(x, (list, tuple)):
        return x
    return _argument(x, name, where)


def _torch_like(args):
    """``(True, device)`` when an argument is a torch tensor (device: the
    first CUDA tensor's, else None), ``(False, None)`` otherwise."""
    found, device = False, None
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if _torch_tensor(t):
                found = True
                if device is None and t.is_cuda:
                    device = t.device
    return found, device


def to_torch(result, device=None):
    """``result`` with its arrays as torch tensors: numpy arrays shared
    (``torch.from_numpy``; a read-only one copied), GPU arrays on ``device``
    (``torch.as_tensor``, shared), tuples and named tuples field by field;
    anything else unchanged."""
    import torch

    if isinstance(result, np.ndarray):
        return torch.from_numpy(result if result.flags.writeable else result.copy())
    if isinstance(result, np.generic):
        return torch.as_tensor(np.asarray(result))
    if isinstance(result, tuple):
        fields = [to_torch(a, device) for a in result]
        return type(result)(*fields) if hasattr(type(result), "_fields") else tuple(fields)
    if on_gpu(result) and not _torch_tensor(result):
        return torch.as_tensor(result, device=device)
    return result


def boundary(f):
    """Decorate a public function or method: array arguments converted by
    :func:`host` (GPU arrays kept), results returned as torch tensors when an
    array argument was a torch tensor (:func:`to_torch`), else unchanged."""
    code = f.__code__
    names = code.co_varnames[:code.co_argcount]
    where = f"softretrieval.{f.__qualname__}"

    @functools.wraps(f)
    def call(*args, **kwargs):
        is_torch, device = _torch_like(list(args) + list(kwargs.values()))
        args = [_argument(a, n, where) for a, n in zip(args, names)] + list(args[len(names):])
        kwargs = {n: _argument(a, n, where) for n, a in kwargs.items()}
        result = f(*args, **kwargs)
        return to_torch(result, device) if is_torch else result

    return call
