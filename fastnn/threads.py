"""CPU threads: one count for the BLAS pool and Numba.

fastnn's Numba kernels are serial (see fastnn/kernels/cpu.py), so the cores
belong to the BLAS library's matrix products and the two pools never fight.
The count defaults to `NUMBA_NUM_THREADS` (all cores when unset);
`set_num_threads(n)` changes it for both Numba and BLAS.
"""
import os

_blas_limiter = None
_num_threads = None  # set by set_num_threads; None: NUMBA_NUM_THREADS


def _limit_blas(n):
    """Limit the BLAS pool(s) numpy uses to `n` threads (kept for the process)."""
    global _blas_limiter
    from threadpoolctl import ThreadpoolController

    _blas_limiter = ThreadpoolController().limit(limits=int(n), user_api="blas")


def set_num_threads(n):
    """Use `n` threads (1 to NUMBA_NUM_THREADS) for matrix products and Numba."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= limit:
        raise ValueError(f"thread count must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    global _num_threads
    numba.set_num_threads(int(n))  # for the user's own parallel Numba code
    _limit_blas(n)
    _num_threads = int(n)


def get_num_threads():
    """The number of threads fastnn's CPU work uses (starts no thread pool)."""
    if _num_threads is not None:
        return _num_threads
    import numba

    return numba.config.NUMBA_NUM_THREADS


def configure_thread_pools():
    """Called when the Numba kernels load: honour NUMBA_NUM_THREADS for BLAS too."""
    if os.environ.get("NUMBA_NUM_THREADS"):
        import numba

        _limit_blas(numba.config.NUMBA_NUM_THREADS)
