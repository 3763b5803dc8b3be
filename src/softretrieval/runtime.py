"""Process-wide set-up for the CPU kernels: threads, BLAS, and a lock.

Nothing here runs at ``import softretrieval``; :func:`parallel_call` does the
set-up on the first kernel call, so importing the package stays fast.

* **Threading layer.** Numba's default OpenMP layer leaves its threads
  spinning after a parallel region, which made torch's CPU attention ~3x
  slower in the same process. We select Numba's ``workqueue`` layer instead,
  unless the user chose one (``NUMBA_THREADING_LAYER``) or Numba's threads
  were already started. ``workqueue`` aborts on concurrent parallel calls, so
  every kernel call holds :data:`LOCK`: calls from several Python threads
  queue (on 2 cores nothing is lost).
* **BLAS.** ``np.dot`` inside the kernels calls SciPy's OpenBLAS; inside a
  parallel region it must run on one thread, so each call limits the BLAS
  libraries to one thread and restores them afterwards.
* **Ctrl-C.** Python runs signal handlers only in the main thread, between
  bytecodes; a long kernel call would hold it for seconds, and a handler
  that Numba's runtime happens to run mid-call surfaces as ``SystemError``.
  Long calls therefore run in a helper thread while the main thread waits:
  Ctrl-C raises ``KeyboardInterrupt`` there at once, sets the kernel's stop
  flag (polled once per key tile), waits for the kernel to return, and
  propagates, the partial result discarded.
"""

import os
import threading
import warnings

from . import config

#: Held by every parallel kernel call.
LOCK = threading.Lock()

_blas = None
_helper = None    # one long-lived thread for interruptible calls (thread-local Numba state stays warm)


def _setup():
    global _blas
    import numba

    try:
        numba.threading_layer()
    except ValueError:
        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS np.dot uses in Numba)
    from threadpoolctl import ThreadpoolController

    _blas = ThreadpoolController().select(user_api="blas")


def num_threads():
    """Threads the CPU kernels use: ``config.NUM_THREADS`` or all of Numba's."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if config.NUM_THREADS is None:
        return limit
    return max(1, min(int(config.NUM_THREADS), limit))


def parallel_call(kernel, *args, stop=None, work=None, blas=True):
    """Run a parallel Numba kernel under the lock, BLAS on one thread
    (``blas=False``: for kernels that call no BLAS; limiting it costs
    milliseconds per call).

    ``stop``: a (1,) int64 array the kernel polls between key tiles (it
    returns early once ``stop[0] != 0``); ``work``: the call's size (in
    multiply-adds, or for a per-row finish, rows times k), None if unknown.
    A call from the main thread with a ``stop`` flag and more than
    ``config.INTERRUPTIBLE_WORK`` of work runs in a helper thread, so that
    Ctrl-C interrupts it promptly (module docstring). Either way a Ctrl-C
    ends the call with ``KeyboardInterrupt``. A kernel with a serial twin
    (:func:`with_serial_twin`) runs the twin when ``work`` is below
    ``config.SERIAL_WORK``.
    """
    if work is not None and work < config.SERIAL_WORK and hasattr(kernel, "serial"):
        kernel = kernel.serial
    if (stop is not None and work is not None and work > config.INTERRUPTIBLE_WORK
            and threading.current_thread() is threading.main_thread()):
        return _in_helper_thread(kernel, args, stop, blas)
    return _locked_call(kernel, args, blas)


def with_serial_twin(kernel):
    """Give a ``parallel=True`` kernel a serial twin, ``kernel.serial``: the
    same Python function compiled without ``parallel=True`` (its ``prange``
    a plain loop), cached under its own name. Every call of a parallel
    kernel wakes Numba's workqueue threads, about 0.1 ms even for one row;
    :func:`parallel_call` runs the twin for calls too small to repay that.
    Returns ``kernel``."""
    import types

    from numba import njit

    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__,
                              f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__ = f.__module__
    twin.__doc__ = f.__doc__
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    kernel.serial = njit(cache=True, **options)(twin)
    return kernel


def _locked_call(kernel, args, blas):
    import contextlib

    import numba

    with LOCK:
        if _blas is None:
            _setup()
        numba.set_num_threads(num_threads())
        limit = _blas.limit(limits=1) if blas else contextlib.nullcontext()
        with limit, warnings.catch_warnings():
            # The strided (multi-head) specialization compiles a BLAS call on a
            # strided array that never runs (it copies tiles first); Numba
            # warns about it when it compiles.
            warnings.simplefilter("ignore", numba.NumbaPerformanceWarning)
            try:
                return kernel(*args)
            except SystemError as exc:
                if _caused_by_interrupt(exc):
                    raise KeyboardInterrupt from None
                raise


def _caused_by_interrupt(exc):
    """Whether a KeyboardInterrupt is in the chain of ``exc``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _in_helper_thread(kernel, args, stop, blas):
    """:func:`_locked_call` in the helper thread; the main thread waits where
    Ctrl-C can reach it."""
    from concurrent import futures

    global _helper
    if _helper is None:
        _helper = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="softretrieval-kernel")
    future = _helper.submit(_locked_call, kernel, args, blas)
    try:
        while True:
            try:
                return future.result(timeout=0.05)
            except futures.TimeoutError:      # (not the built-in TimeoutError before 3.11)
                continue
    except KeyboardInterrupt:
        stop[0] = 1
        future.exception()       # wait for the kernel to notice
        raise
