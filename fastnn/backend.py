"""The active backend and array-namespace helpers.

Functions compute in the module of the arrays they are given
(`get_array_module`); the active backend only decides where models create
their parameters and where `Solver` puts its data. CuPy is imported lazily,
the first time it is asked for.
"""
import contextlib
import importlib

import numpy as np

BACKENDS = ("numpy", "cupy")
_active = "numpy"
_cupy = None


def _import_cupy():
    """Return the cupy module, or raise RuntimeError saying how to get it."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        raise RuntimeError(
            "the 'cupy' backend needs CuPy, which is not installed "
            f"({exc}). Install the wheel for your driver's CUDA major (`nvidia-smi` shows "
            "it): `pip install 'fastnn[cuda13]'` for CUDA 13, `pip install 'fastnn[cuda12]'` "
            "for CUDA 12.") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise RuntimeError(
            f"the 'cupy' backend needs a CUDA GPU, but CuPy cannot reach one ({exc}). "
            "Check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES.") from exc
    if count < 1:
        raise RuntimeError("the 'cupy' backend needs a CUDA GPU, but none is visible. "
                           "Check `nvidia-smi` and CUDA_VISIBLE_DEVICES.")
    _cupy = cupy
    return cupy


def cupy_available():
    """True when CuPy imports and sees a GPU (imports CuPy; never raises)."""
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


def set_backend(name):
    """Make `name` ("numpy" or "cupy") the backend for new models and data."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "cupy":
        _import_cupy()
    _active = name


def get_backend():
    """The active backend's name."""
    return _active


@contextlib.contextmanager
def use_backend(name):
    """Context manager: `name` is the active backend inside, the previous one after."""
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def xp():
    """The active array module (numpy or cupy)."""
    return _import_cupy() if _active == "cupy" else np


def is_cupy_array(a):
    """True for a cupy.ndarray, without importing CuPy when it is not loaded."""
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_array_module(*arrays):
    """The array module of `arrays` (Python scalars and None are ignored).

    Raises TypeError when arrays of two modules are mixed, naming both.
    """
    found = None
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool, np.generic)):
            continue
        module = "cupy" if is_cupy_array(a) else "numpy" if isinstance(a, np.ndarray) else None
        if module is None:
            type_name = type(a).__module__.split(".")[0]
            if type_name == "cupy":  # a cupy array before fastnn loaded CuPy
                _import_cupy()
                module = "cupy"
            else:
                raise TypeError(f"expected a numpy or cupy array, got {type(a).__name__}")
        if found is None:
            found = module
        elif module != found:
            raise TypeError(f"arrays from two array modules in one call: {found} and {module}; "
                            "move them to one backend first (fastnn.to_numpy, or cupy.asarray)")
    return _cupy if found == "cupy" else np


def module_by_name(name):
    """The array module called `name` ("numpy" or "cupy")."""
    return _import_cupy() if name == "cupy" else np


def to_numpy(a):
    """A host numpy.ndarray from a numpy or cupy array (or anything array-like)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)

