"""Freed memory stays with the process: glibc's malloc told to keep large blocks.

A training step on the CPU allocates and frees the same large arrays again and
again (at batch 1024 one activation of the main job is 126 MB). glibc gives every
block over its mmap threshold (at most 32 MB by default) back to the kernel when
it is freed, so the next step's array of the same size page-faults on every 4 KB
it touches: the main job took 4.1 million page faults and 71 s of system time
(8% of its CPU time). `keep_freed_memory` raises the mmap and trim thresholds to
2 GB, so freed blocks are reused from the heap, as PyTorch's CPU allocator and
jemalloc do; the price is that the process keeps its peak memory until it exits.

It runs when the Numba kernels load. It changes nothing where the C library is not
glibc, nor where the user set glibc's own knobs (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), nor with FASTNN_KEEP_FREED_MEMORY=0.
"""
import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int; blocks over 2 GB are still mmapped
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
OPT_OUT = "FASTNN_KEEP_FREED_MEMORY"  # "0": leave the allocator alone

kept = False  # whether keep_freed_memory changed the allocator in this process


def keep_freed_memory():
    """Keep freed blocks of up to 2 GB in the heap for reuse (glibc only); returns whether
    the allocator was changed."""
    global kept
    if kept:
        return True
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    kept = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES))
    return kept
