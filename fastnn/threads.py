"""CPU threads: one count for the BLAS pool and Numba.

fastnn's Numba kernels are serial (see fastnn/kernels/_numba.py), so the cores
belong to the BLAS library's matrix products and the two pools never fight.
The count defaults to `NUMBA_NUM_THREADS` (all cores when unset);
`set_num_threads(n)` changes it for both Numba and BLAS. OpenBLAS's idle threads
are told to stop spinning sooner (shorten_blas_spin), since the conv kernels run
threads of their own right after its products.
"""
import os

from fastnn.checks import as_size

_blas_limiter = None
_num_threads = None  # set by set_num_threads; None: NUMBA_NUM_THREADS


def _limit_blas(n):
    """Limit the BLAS pool(s) numpy uses to `n` threads (kept for the process)."""
    global _blas_limiter
    from threadpoolctl import ThreadpoolController

    _blas_limiter = ThreadpoolController().limit(limits=int(n), user_api="blas")


def _numba():
    """The numba module, or None where it cannot be imported (fastnn.kernels then runs the
    reference ops)."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def _thread_limit():
    """NUMBA_NUM_THREADS as Numba reads it (all cores when unset)."""
    numba = _numba()
    if numba is not None:
        return numba.config.NUMBA_NUM_THREADS
    return int(os.environ.get("NUMBA_NUM_THREADS") or os.cpu_count() or 1)


def set_num_threads(n):
    """Use `n` threads (1 to NUMBA_NUM_THREADS) for matrix products and Numba."""
    limit = _thread_limit()
    n = as_size(n, "the thread count")
    if not 1 <= n <= limit:
        raise ValueError(f"thread count must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    global _num_threads
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(n)  # for the user's own parallel Numba code
    _limit_blas(n)
    _num_threads = n


def get_num_threads():
    """The number of threads fastnn's CPU work uses (starts no thread pool)."""
    if _num_threads is not None:
        return _num_threads
    return _thread_limit()


# OpenBLAS's idle threads spin for 2**28 cycles (about 0.1 s) after each product before
# they sleep. Spinning, one holds a core that the conv kernels' threads want right after an
# affine layer's product: ThreeLayerConvNet's conv took twice as long there (13 -> 26 ms).
# 2**20 cycles (about 0.5 ms) still bridges back-to-back products (benchmarks/README.md).
BLAS_SPIN_LOG2_CYCLES = 20


def openblas_pthreads_libraries():
    """Paths of the loaded OpenBLAS libraries that run their own (pthreads) thread pool."""
    from threadpoolctl import threadpool_info

    return [pool["filepath"] for pool in threadpool_info()
            if pool.get("internal_api") == "openblas" and pool.get("threading_layer") == "pthreads"]


def shorten_blas_spin():
    """Make the loaded OpenBLAS (pthreads) builds' idle threads sleep after
    2**BLAS_SPIN_LOG2_CYCLES cycles of spinning.

    OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when its thread pool starts: this sets the
    variable, has OpenBLAS read its environment again and stops its pool, which the next
    threaded product starts anew. A value the user set is left alone, as is any other BLAS.
    """
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return
    import ctypes

    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_SPIN_LOG2_CYCLES)
    for path in openblas_pthreads_libraries():
        lib = ctypes.CDLL(path)
        if all(hasattr(lib, name) for name in ("openblas_read_env", "blas_thread_shutdown_")):
            lib.openblas_read_env()  # (an older or differently built OpenBLAS keeps its default)
            lib.blas_thread_shutdown_()


def configure_thread_pools():
    """Called when the Numba kernels load: honour NUMBA_NUM_THREADS for BLAS too, and
    shorten OpenBLAS's spinning (shorten_blas_spin)."""
    shorten_blas_spin()
    if os.environ.get("NUMBA_NUM_THREADS"):
        _limit_blas(_thread_limit())
