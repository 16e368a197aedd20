"""What every family's Numba kernels share: `_jit`, the hash, layout and thread helpers.

Each op's Numba version is a thin Python wrapper (shapes, flat views, output
allocation) around one compiled loop that makes a single pass over its data.

The loops are serial on purpose: every one of them runs between two BLAS
matrix products, and the BLAS threads keep spinning for a while after each
product. A parallel Numba loop started then fights them for the cores: on 2
cores it took about 4 ms whatever its size, 7x slower than the serial loop at
3M elements and 40-400x slower at 20k-524k (benchmarks/thread_pools.py). So
the cores go to BLAS and fastnn's kernels never use Numba's thread pool.
The conv and norm kernels split a batch over Python threads of their own
(_run_chunks), each with a one-thread BLAS; loading this module shortens
OpenBLAS's spinning (fastnn.threads.shorten_blas_spin) so that an idle BLAS
thread does not hold a core they need, and keeps freed memory in the process
(fastnn.memory.keep_freed_memory) so that each step's large arrays do not
page-fault anew.

Kernels are compiled on first use and cached on disk in a user folder, never
in the installed package (fastnn.kernels.compile_cache: `~/.cache/fastnn/numba`
or `$NUMBA_CACHE_DIR`).
"""
import os

import numpy as np

from fastnn.kernels import registry
from fastnn.kernels.rng import GOLDEN, MIX1, MIX2, UNIT_BITS
from fastnn.memory import keep_freed_memory
from fastnn.threads import configure_thread_pools, get_num_threads

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload
except ImportError as exc:  # a broken install (e.g. llvmlite missing): numpy runs the references
    # Importing stays silent (the contract's modules import cleanly); the commands say it
    # once they run on numpy (runs.setup_runtime), where the speed matters.
    numba = ir = types = None
    registry.unavailable["numpy"] = (
        f"Numba cannot be imported ({type(exc).__name__}: {exc}); the CPU backend runs its "
        "plain-numpy reference ops, which are correct but much slower. Reinstall Numba (pip "
        "install --force-reinstall numba) for the fast kernels.")

    def intrinsic(function):  # the stand-ins leave the kernels uncompiled and unregistered
        return function

    def overload(function, **options):
        return lambda implementation: implementation
else:
    from fastnn.kernels import compile_cache

    configure_thread_pools()
    keep_freed_memory()  # the kernels' large temporaries are reused, not page-faulted anew


def _jit(function, **flags):
    """Compile with Numba, cached on disk in the user cache folder when it is writable.

    error_model="numpy": no per-division zero checks, so the loops vectorise. Without
    Numba the function stays plain Python (its op's numpy registration is dropped).
    """
    if numba is None:
        return function
    return compile_cache.enable(numba.njit(nogil=True, error_model="numpy", **flags)(function))


def _jit_float32(function):
    """_jit for float32 arithmetic that LLVM may contract into FMAs (the polynomials of
    activations.py); no other fast-math flag, so NaN and inf keep IEEE semantics."""
    return _jit(function, fastmath={"contract"})


def _jit_inline(function):
    """_jit for a body inlined into its callers (Numba IR inlining), so that a constant
    argument, such as an activation's number, is folded away in each caller."""
    return _jit(function, inline="always")


_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_UNIT_SHIFT = np.uint64(64 - UNIT_BITS)


@_jit
def _mix64(z):
    """SplitMix64's finaliser (rng.mix64): the Numba kernels' one copy."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def _flat(a):
    """A 1-D view of a C-contiguous array (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


def _channels_last(x):
    """(N, C, H, W) any strides -> a C-contiguous (N, H, W, C) array (no copy if already so)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _memory_order(*arrays):
    """Flat views of arrays that share one dense layout (e.g. the stack's feature-major
    (K, N, H) views of (K, H, N) arrays), walked in memory order; None when they do not."""
    a = arrays[0]
    perm = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    views = [b.transpose(perm) for b in arrays]
    if all(v.flags.c_contiguous and v.strides == views[0].strides for v in views):
        return [v.reshape(-1) for v in views]
    return None


def elementwise_unary(kernel, x):
    """kernel(flat x, flat out) -> out, laid out as x when x is dense (the stack's
    feature-major views stay so), else in C order."""
    if x.flags.c_contiguous:  # the common case, without _memory_order's layout search
        out = np.empty(x.shape, dtype=x.dtype)
        kernel(x.reshape(-1), out.reshape(-1))
        return out
    out = np.empty_like(x)  # x's layout (order "K")
    flat = _memory_order(x, out)
    if flat is None:
        out = np.empty(x.shape, dtype=x.dtype)
        flat = [_flat(x), out.reshape(-1)]
    kernel(*flat)
    return out


def elementwise_binary(kernel, a, b):
    """kernel(flat a, flat b, flat out) -> out for a and b of one shape and dtype, laid out as
    b when the two share a dense layout, else in C order."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        out = np.empty(a.shape, dtype=a.dtype)
        kernel(a.reshape(-1), b.reshape(-1), out.reshape(-1))
        return out
    out = np.empty_like(b)
    flat = _memory_order(a, b, out)
    if flat is None:
        out = np.empty(a.shape, dtype=a.dtype)
        flat = [_flat(a), _flat(b), out.reshape(-1)]
    kernel(*flat)
    return out


def _jit_sums(function):
    """_jit for float64 sums along a row: reassociation lets them vectorise.

    Only these small helpers get the flag; the kernels that call them keep
    the ordinary float semantics (and NaN/inf handling: no other fastmath).
    """
    return _jit(function, fastmath={"reassoc"})


@_jit_sums
def _row_sum(x, j):
    total = 0.0
    for i in range(x.shape[1]):
        total += x[j, i]
    return total


@_jit_sums
def _row_squared_deviation(x, j, center):
    total = 0.0
    for i in range(x.shape[1]):
        centered = x[j, i] - center
        total += centered * centered
    return total


@_jit_sums
def _row_dot(a, b, j):
    total = 0.0
    for i in range(a.shape[1]):
        total += a[j, i] * b[j, i]
    return total


# column (or Winograd tile) buffer per chunk of images in the conv kernels (conv.py,
# winograd.py): it and the product stay in L2 (2 MB here)
CONV_CHUNK_BYTES = 1 << 20

_conv_workers = {}  # thread count -> (ThreadPoolExecutor, threadpoolctl controller)
# a forked child (multiprocessing, say) has none of the parent's threads: new pools there
os.register_at_fork(after_in_child=_conv_workers.clear)


def _run_chunks(work, n, step):
    """work(start, stop, worker) for the image chunks [start, stop) of a batch of n.

    With T threads (fastnn.threads), T Python threads take every T-th chunk,
    each running its own Numba kernels (nogil) and single-threaded sgemms:
    no core waits on another between the small products, and the BLAS pool
    does not spin against the kernels (see the module docstring). The BLAS
    thread count is restored afterwards.
    """
    chunks = [(start, min(n, start + step)) for start in range(0, n, step)]
    threads = min(get_num_threads(), len(chunks))
    if threads <= 1:
        for start, stop in chunks:
            work(start, stop, 0)
        return
    pool = _conv_workers.get(threads)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import ThreadpoolController

        pool = _conv_workers[threads] = (ThreadPoolExecutor(threads, "fastnn-conv"),
                                          ThreadpoolController())

    def run(worker):
        for start, stop in chunks[worker::threads]:
            work(start, stop, worker)

    executor, controller = pool
    with controller.limit(limits=1, user_api="blas"):
        for future in [executor.submit(run, worker) for worker in range(threads)]:
            future.result()


PARALLEL_MIN_VALUES = 1 << 16  # smaller arrays: one thread (a hand-off costs ~50 us)


def _row_blocks(rows, values_per_row):
    """Rows per thread for the row-parallel kernels (one block each; all rows when small)."""
    if rows * values_per_row < PARALLEL_MIN_VALUES:
        return max(rows, 1)
    return max(1, -(-rows // max(1, get_num_threads())))
