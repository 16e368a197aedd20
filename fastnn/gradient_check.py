"""Numerical gradients for checking backward passes (central differences).

Works on numpy and cupy arrays: the gradients come back as arrays of x's
module (float64). Run checks in float64 for tight errors.
"""
import numpy as np

from fastnn.backend import get_array_module, to_numpy


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Numerical gradient of the scalar function f at x (modified in place, restored)."""
    grad = np.zeros(x.shape, dtype=np.float64)
    for ix in np.ndindex(*x.shape):
        old = float(x[ix])
        x[ix] = old + h
        fxph = float(f(x))
        x[ix] = old - h
        fxmh = float(f(x))
        x[ix] = old
        grad[ix] = (fxph - fxmh) / (2 * h)
        if verbose:
            print(ix, grad[ix])
    return get_array_module(x).asarray(grad)


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Numerical gradient of sum(f(x) * df) at x, for array-valued f."""
    df = to_numpy(df).astype(np.float64)
    grad = np.zeros(x.shape, dtype=np.float64)
    for ix in np.ndindex(*x.shape):
        old = float(x[ix])
        x[ix] = old + h
        pos = to_numpy(f(x)).astype(np.float64)
        x[ix] = old - h
        neg = to_numpy(f(x)).astype(np.float64)
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
    return get_array_module(x).asarray(grad)


def rel_error(x, y):
    """Max relative error between two arrays of any backend."""
    x = to_numpy(x).astype(np.float64)
    y = to_numpy(y).astype(np.float64)
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))
