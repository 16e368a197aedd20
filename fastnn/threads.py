"""CPU thread counts for the Numba kernels (and, through them, the BLAS pool).

`NUMBA_NUM_THREADS` sets the default; `set_num_threads(n)` changes it at
run time. Numba is imported only when one of these is called.
"""
import os


def set_num_threads(n):
    """Use `n` threads for the Numba kernels (at most NUMBA_NUM_THREADS)."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= limit:
        raise ValueError(f"thread count must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(int(n))


def get_num_threads():
    """The number of threads the Numba kernels use."""
    import numba

    return numba.get_num_threads()


def configure_thread_pools():
    """Stop Numba's and the BLAS library's thread pools from fighting over the cores.

    Called when the Numba kernels load, before Numba starts its pool. Numba's
    OpenMP workers spin for a while after each parallel loop by default, and
    with fastnn's steps alternating Numba kernels with BLAS matrix products,
    those spinning threads steal the cores the BLAS threads need (and back).
    A passive wait policy makes idle workers sleep at once. A value the user
    set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
