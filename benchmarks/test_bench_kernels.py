"""Per-kernel benchmarks: every op in fastnn.kernels.OPS, fast table vs reference.

Implementations, grouped by op and shape so pytest-benchmark compares them:
  reference       fastnn.kernels.reference on numpy arrays (plain NumPy)
  numpy           fastnn.kernels.for_module(numpy) (the Numba versions, or the
                  reference where an op has none: the group name then says so)
  cupy-reference  the reference on cupy arrays      } GPU only; skipped with
  cupy            fastnn.kernels.for_module(cupy)   } the reason elsewhere

The arguments and shapes of each op are its entry in fastnn.kernels.examples
(the models' sizes, float32 like them), the table the tests use too.

    python -m pytest benchmarks/test_bench_kernels.py
    python -m pytest benchmarks/test_bench_kernels.py -k "adam_ and 3072x1024"

Each op runs once before timing (Numba compilation, CuPy kernel builds);
GPU timings synchronise the device inside the timed function.
"""
import numpy as np
import pytest

from fastnn import kernels
from fastnn.kernels import OPS, examples, reference

import trainers

IMPLEMENTATIONS = ["reference", "numpy", "cupy-reference", "cupy"]


def shape_name(shape):
    return "x".join(str(d) for d in shape)


def make_args(op, shape, rng, xp, table):
    """The op's example arguments at `shape`, on xp; a backward's saved state from `table`'s
    own forward (a first conv layer, of 3 channels, skips its dx as the models do)."""
    if examples.EXAMPLES[op].forward is None:
        return examples.to_module(xp, examples.args(op, rng, shape, xp))
    dout, saved = examples.backward_args(op, table, rng, shape, xp)
    return (dout, saved) + ((False,) if op == "conv_backward" and shape[1] == 3 else ())


def _cases():
    for op in OPS:
        for shape in examples.EXAMPLES[op].shapes:
            for impl in IMPLEMENTATIONS:
                yield pytest.param(op, shape, impl, id=f"{op}-{shape_name(shape)}-{impl}")


@pytest.mark.parametrize("op, shape, impl", list(_cases()))
def test_kernel(benchmark, op, shape, impl):
    if impl.startswith("cupy"):
        reason = trainers.skip_reason("fastnn-cupy")
        if reason:
            pytest.skip(reason)
        import cupy as xp

        def sync():
            xp.cuda.Device().synchronize()
    else:
        xp = np

        def sync():
            pass

    table = reference if impl.endswith("reference") else kernels.for_module(xp)
    fn = getattr(table, op)
    args = make_args(op, shape, np.random.default_rng(0), xp, table)

    def run():
        fn(*args)
        sync()

    run()  # compile / build and first touch, untimed
    benchmark.group = f"{op} {shape_name(shape)}"
    if kernels.for_module(np).__dict__[op] is getattr(reference, op):
        benchmark.group += " (the numpy table uses the reference here)"
    benchmark.extra_info.update(
        op=op, shape=list(shape), implementation=impl,
        function=f"{fn.__module__}.{fn.__name__}",
        bytes_per_call=int(sum(a.nbytes for a in args if hasattr(a, "nbytes"))
                           + sum(b.nbytes for a in args if isinstance(a, tuple) for b in a
                                 if hasattr(b, "nbytes"))))
    benchmark(run)
