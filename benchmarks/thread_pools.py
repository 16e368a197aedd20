"""Why fastnn's Numba kernels are serial: a parallel loop right after a BLAS product.

    python benchmarks/thread_pools.py [--repeats 30] [--threads N]

Times a relu (one pass, float32) as a serial Numba loop and as a `prange`
loop at 20k, 100k, 524k and 3M elements, in two settings:
  idle        back-to-back calls, no matrix product in between;
  after gemm  right after a 512x1024 @ 1024x1024 float32 product (numpy's
              BLAS), which is where every element-wise op of a training step
              runs.
Medians of `--repeats` calls, in microseconds. The BLAS threads keep spinning
for a while after a product, so a parallel loop started then waits for the
cores they hold.
"""
import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np
from numba import prange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = (20_000, 100_000, 524_288, 3_000_000)


@numba.njit(nogil=True, error_model="numpy")
def relu_serial(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else 0


@numba.njit(parallel=True, nogil=True, error_model="numpy")
def relu_parallel(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0 else 0


def median_us(kernel, x, out, repeats, gemm=None):
    times = []
    for _ in range(repeats):
        if gemm is not None:
            gemm()
        start = time.perf_counter()
        kernel(x, out)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for Numba and BLAS (default: fastnn.get_num_threads())")
    args = parser.parse_args(argv)

    import fastnn
    from threadpoolctl import threadpool_info
    from machine import OtherLoad

    if args.threads is not None:
        fastnn.set_num_threads(args.threads)
    threads = fastnn.get_num_threads()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 1024), dtype=np.float32)
    b = rng.standard_normal((1024, 1024), dtype=np.float32)
    c = np.empty((512, 1024), dtype=np.float32)

    def gemm():
        np.matmul(a, b, out=c)

    arrays = {n: (rng.standard_normal(n, dtype=np.float32), np.empty(n, dtype=np.float32))
              for n in SIZES}
    for kernel in (relu_serial, relu_parallel):  # compile, start the pool
        kernel(*arrays[SIZES[0]])
    gemm()
    time.sleep(0.5)  # let the BLAS threads go back to sleep before the idle runs

    rows = []
    with OtherLoad() as load:
        for n in SIZES:
            x, out = arrays[n]
            rows.append([n] + [median_us(k, x, out, args.repeats)
                               for k in (relu_serial, relu_parallel)])
        for row in rows:
            x, out = arrays[row[0]]
            row += [median_us(k, x, out, args.repeats, gemm) for k in (relu_serial, relu_parallel)]

    blas = "; ".join(f"{p['internal_api']} {p.get('version')} ({p.get('threading_layer')}, "
                     f"{p['num_threads']} threads)"
                     for p in threadpool_info() if p.get("user_api") == "blas")
    print(f"numba {numba.__version__} (threading layer {numba.threading_layer()}, "
          f"{threads} threads) | numpy {np.__version__} | BLAS {blas} | "
          f"{os.cpu_count()} logical CPUs")
    print(f"relu, float32, median of {args.repeats} calls, microseconds; "
          "'after gemm' = right after a 512x1024x1024 sgemm")
    print(f"{'elements':>10} | {'idle: serial':>12} {'prange':>8} {'ratio':>6} | "
          f"{'after gemm: serial':>18} {'prange':>8} {'ratio':>6}")
    for n, s_idle, p_idle, s_after, p_after in rows:
        print(f"{n:>10} | {s_idle:>12.1f} {p_idle:>8.1f} {p_idle / s_idle:>5.2f}x | "
              f"{s_after:>18.1f} {p_after:>8.1f} {p_after / s_after:>5.2f}x")
    print("ratio = prange time / serial time (above 1: the parallel loop is slower)")
    if load.share is not None:
        print(f"other processes used {100 * load.share:.0f}% of the CPUs meanwhile"
              + (" -- a busy machine: rerun when it is quiet" if load.share > 0.05 else ""))
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    if timeout:
        print(f"OPENBLAS_THREAD_TIMEOUT={timeout}: OpenBLAS threads spin 2**{timeout} cycles "
              "after a product before they sleep")


if __name__ == "__main__":
    main()
