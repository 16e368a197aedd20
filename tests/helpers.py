"""Small helpers shared by the test modules (plain functions, no fixtures)."""
import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def tolerances(dtype):
    """(rtol, atol) for comparing two computations of the same value in `dtype`."""
    return (1e-5, 1e-6) if np.dtype(dtype) == np.float32 else (1e-11, 1e-13)


def is_0d_array(value, xp):
    """True when `value` is a 0-d array of module `xp` (not a scalar type)."""
    return isinstance(value, xp.ndarray) and value.ndim == 0
