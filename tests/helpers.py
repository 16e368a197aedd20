"""Small helpers shared by the test modules (plain functions, no fixtures)."""
import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def tolerances(dtype):
    """(rtol, atol) for comparing two computations of the same value in `dtype`."""
    return (1e-5, 1e-6) if np.dtype(dtype) == np.float32 else (1e-11, 1e-13)


def is_0d_array(value, xp):
    """True when `value` is a 0-d array of module `xp` (not a scalar type)."""
    return isinstance(value, xp.ndarray) and value.ndim == 0


def host_copies(*values):
    """numpy copies of the arrays among `values` (other values as they are).

    A backend's result is compared with the reference run on these: on cupy
    the table's op may be the reference itself, and comparing it with itself
    would check nothing.
    """
    from fastnn import to_numpy

    return [to_numpy(v).copy() if hasattr(v, "shape") and not isinstance(v, np.generic) else v
            for v in values]


def backend_tolerances(xp, dtype):
    """(rtol, atol) for a result of backend `xp` against numpy's: float32 ones on a GPU,
    whose exp, log and summation orders differ from numpy's."""
    return tolerances(dtype if xp is np else np.float32)


def numba_kernels():
    """{module.name: dispatcher} of every Numba kernel in fastnn.kernels' modules."""
    import sys

    import numba

    import fastnn.kernels  # noqa: F401  (loads every family module)

    return {f"{name}.{attr}": obj for name, module in list(sys.modules.items())
            if name.startswith("fastnn.kernels.")
            for attr, obj in vars(module).items()
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == name}
