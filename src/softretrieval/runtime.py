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
"""

import os
import threading
import warnings

from . import config

#: Held by every parallel kernel call.
LOCK = threading.Lock()

_blas = None


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


def parallel_call(kernel, *args):
    """Run a parallel Numba kernel under the lock, BLAS on one thread."""
    import numba

    with LOCK:
        if _blas is None:
            _setup()
        numba.set_num_threads(num_threads())
        with _blas.limit(limits=1), warnings.catch_warnings():
            # The strided (multi-head) specialization compiles a BLAS call on a
            # strided array that never runs (it copies tiles first); Numba
            # warns about it when it compiles.
            warnings.simplefilter("ignore", numba.NumbaPerformanceWarning)
            return kernel(*args)
