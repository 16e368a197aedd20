"""What every family's CuPy kernels share: memoized kernel factories and the hash.

NOT YET RUN ON A GPU: written without one (see the GPU-speed issue). The
tests in tests/test_kernels.py compare every op's CuPy version with the
reference run by numpy on host copies; `bash benchmarks/gpu_check.sh` runs them.

Each kernel is an ElementwiseKernel (`elementwise`, its source in SOURCES) or
a RawKernel / RawModule, built on first use and cached, so importing fastnn
never imports CuPy (the factories import it when first called). They are
compiled with `--fmad=false`: a fused multiply-add would round differently from
the separate cupy operations of the reference and of fastnn.optim, and the
update rules must give the same parameters. tests/test_kernels.py compile-checks
the CUDA sources with nvcc (and runs the convolution ones on the host with g++).
"""
import functools

import numpy as np

from fastnn.kernels.rng import GOLDEN, MIX1, MIX2, UNIT_BITS

_HASH = f"""
unsigned long long z = (unsigned long long)i * {GOLDEN}ULL + key;
z = (z ^ (z >> 30)) * {MIX1}ULL;
z = (z ^ (z >> 27)) * {MIX2}ULL;
z = z ^ (z >> 31);
const bool keep = (z >> {64 - UNIT_BITS}) >= threshold;
"""

# name -> (in_params, out_params, operation) of an ElementwiseKernel; each family adds its own
_SOURCES = {}


@functools.lru_cache(maxsize=None)
def _kernel(name):
    import cupy

    in_params, out_params, operation = _SOURCES[name]
    return cupy.ElementwiseKernel(in_params, out_params, operation, f"fastnn_{name}",
                                  options=("--fmad=false",))


# RawKernels whose source is a template with {T} for the C type ("float" or "double")
@functools.lru_cache(maxsize=None)
def _raw_kernel(source, name, dtype_name):
    import cupy

    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    return cupy.RawKernel(source.format(T=ctype), f"fastnn_{name}_{ctype}")


def _launch(source, name, dtype, total, *args):
    """Run kernel `name` of `source` with one thread per element; every kernel takes `total`
    last."""
    threads = 256
    blocks = (int(total) + threads - 1) // threads
    if blocks:
        _raw_kernel(source, name, np.dtype(dtype).name)((blocks,), (threads,),
                                                        args + (np.int64(total),))


def _element_strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def _empty_to_reference(reference_op):
    """Decorator: empty inputs go to `reference_op`: a launch over zero rows is a CUDA error."""
    def decorator(op):
        @functools.wraps(op)
        def wrapper(first, *args):
            return (reference_op if first.size == 0 else op)(first, *args)

        return wrapper

    return decorator
