"""Numba kernels for the numpy backend: the same ops, names and results as reference.py.

Each op is a thin Python wrapper (shapes, flat views, output allocation)
around one compiled loop that makes a single pass over its data.

The loops are serial on purpose: every one of them runs between two BLAS
matrix products, and the BLAS threads keep spinning for a while after each
product. A parallel Numba loop started then fights them for the cores and
ran 7-10x slower than the serial loop at every size we measured (20k to 3M
elements, 2 cores; see benchmarks/README.md), so the cores go to BLAS and
Numba never starts its thread pool (fastnn.threads.configure_thread_pools).

Kernels are compiled on first use and cached on disk (`cache=True`; Numba
falls back to a user cache folder when the install is read-only).
"""
import numba
import numpy as np

from fastnn.kernels.reference import GOLDEN, MIX1, MIX2, UNIT_BITS, dropout_key, keep_threshold
from fastnn.threads import configure_thread_pools

configure_thread_pools()



def _jit(function):
    """Compile with Numba, cached on disk where any cache folder is writable.

    error_model="numpy": no per-division zero checks, so the loops vectorise.
    """
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(function)
    except RuntimeError:  # no writable cache folder at all: compile in each process
        return numba.njit(cache=False, nogil=True, error_model="numpy")(function)

_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_UNIT_SHIFT = np.uint64(64 - UNIT_BITS)


def _flat(a):
    """A 1-D view of a C-contiguous array (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


# -- relu --------------------------------------------------------------------
@_jit
def _relu_forward(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0 if v < 0 else v  # NaN stays NaN, as np.maximum keeps it


@_jit
def _relu_backward(dout, out, dx):
    for i in range(dout.size):
        dx[i] = dout[i] if out[i] > 0 else 0


def relu_forward(x):
    out = np.empty(x.shape, dtype=x.dtype)
    _relu_forward(_flat(x), out.reshape(-1))
    return out


def relu_backward(dout, out):
    dx = np.empty(dout.shape, dtype=dout.dtype)
    _relu_backward(_flat(dout), _flat(out), dx.reshape(-1))
    return dx


# -- dropout -----------------------------------------------------------------
@_jit
def _dropout(x, out, key, threshold, scale):
    for i in range(x.size):
        z = np.uint64(i) * _GOLDEN + key
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        z = z ^ (z >> _S31)
        out[i] = x[i] * scale if (z >> _UNIT_SHIFT) >= threshold else 0


def dropout_forward(x, p, seed, step):
    out = np.empty(x.shape, dtype=x.dtype)
    _dropout(_flat(x), out.reshape(-1), np.uint64(dropout_key(seed, step)),
             np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))
    return out


def dropout_backward(dout, p, seed, step):
    return dropout_forward(dout, p, seed, step)


# -- augmentation ------------------------------------------------------------
@_jit
def _flip_crop(x, out, key, flip, padding):
    n, channels, height, width = x.shape
    span = np.uint64(2 * padding + 1)
    for i in range(n):
        z = np.uint64(i) * _GOLDEN + key
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        z = z ^ (z >> _S31)
        mirrored = flip and (z >> np.uint64(63)) == np.uint64(1)
        dy = np.int64(((z >> np.uint64(32)) & np.uint64(0xFFFF)) % span) - padding
        dx = np.int64((z & np.uint64(0xFFFF)) % span) - padding
        for c in range(channels):
            for r in range(height):
                src_r = r + dy
                for col in range(width):
                    src_c = (width - 1 - col if mirrored else col) + dx
                    if 0 <= src_r < height and 0 <= src_c < width:
                        out[i, c, r, col] = x[i, c, src_r, src_c]
                    else:
                        out[i, c, r, col] = 0


def flip_crop(x, seed, step, flip, padding):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _flip_crop(x, out, np.uint64(dropout_key(seed, step)), bool(flip), np.int64(padding))
    return out


# -- losses ------------------------------------------------------------------
@_jit
def _softmax_loss(x, y, dx, row_loss):
    n, c = x.shape
    inv_n = 1.0 / n
    for i in range(n):
        label = y[i]
        if label < 0 or label >= c:  # unchecked labels: NaN, never an out-of-bounds read
            row_loss[i] = np.nan
            dx[i, :] = np.nan
            continue
        top = x[i, 0]
        for j in range(1, c):
            top = max(top, x[i, j])
        total = 0.0
        for j in range(c):
            e = np.exp(np.float64(x[i, j] - top))
            dx[i, j] = e
            total += e
        row_loss[i] = np.log(total) - (x[i, label] - top)
        scale = inv_n / total
        for j in range(c):
            dx[i, j] = dx[i, j] * scale
        dx[i, label] -= inv_n


@_jit
def _svm_loss(x, y, dx, row_loss):
    n, c = x.shape
    inv_n = 1.0 / n
    for i in range(n):
        label = y[i]
        if label < 0 or label >= c:
            row_loss[i] = np.nan
            dx[i, :] = np.nan
            continue
        correct = x[i, label]
        total = 0.0
        positive = 0
        for j in range(c):
            margin = x[i, j] - correct + 1
            if j != label and margin > 0:
                total += margin
                positive += 1
                dx[i, j] = inv_n
            else:
                if j != label and margin != margin:  # NaN scores make a NaN loss
                    total += margin
                dx[i, j] = 0
        dx[i, label] = -positive * inv_n
        row_loss[i] = total


def _row_loss(kernel, x, y):
    x = np.ascontiguousarray(x)
    dx = np.empty(x.shape, dtype=x.dtype)
    row_loss = np.empty(x.shape[0], dtype=np.float64)
    kernel(x, np.ascontiguousarray(y), dx, row_loss)
    return x.dtype.type(row_loss.sum() / max(x.shape[0], 1)), dx


def softmax_loss(x, y):
    return _row_loss(_softmax_loss, x, y)


def svm_loss(x, y):
    return _row_loss(_svm_loss, x, y)


# -- update rules (in place, flat) -------------------------------------------
# The float32 scalars are made here, as reference.py makes them, so the
# arithmetic matches the functional rules in fastnn.optim.
@_jit
def _sgd(w, dw, lr):
    for i in range(w.size):
        w[i] -= dw[i] * lr


@_jit
def _sgd_momentum(w, dw, v, lr, momentum):
    for i in range(w.size):
        vi = v[i] * momentum - dw[i] * lr
        v[i] = vi
        w[i] += vi


@_jit
def _rmsprop(w, dw, cache, lr, decay, one_minus_decay, eps):
    for i in range(w.size):
        g = dw[i]
        ci = cache[i] * decay + one_minus_decay * (g * g)
        cache[i] = ci
        w[i] -= lr * g / (np.sqrt(ci) + eps)


@_jit
def _adam(w, dw, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps):
    for i in range(w.size):
        g = dw[i]
        mi = m[i] * beta1 + one_minus_beta1 * g
        vi = v[i] * beta2 + one_minus_beta2 * (g * g)
        m[i] = mi
        v[i] = vi
        w[i] -= lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


def _flat_inplace(*arrays):
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("in-place updates need C-contiguous arrays")
    return [a.reshape(-1) for a in arrays]


def sgd_(w, dw, lr):
    f = w.dtype.type
    _sgd(*_flat_inplace(w, np.ascontiguousarray(dw)), f(lr))


def sgd_momentum_(w, dw, v, lr, momentum):
    f = w.dtype.type
    _sgd_momentum(*_flat_inplace(w, np.ascontiguousarray(dw), v), f(lr), f(momentum))


def rmsprop_(w, dw, cache, lr, decay_rate, eps):
    f = w.dtype.type
    _rmsprop(*_flat_inplace(w, np.ascontiguousarray(dw), cache), f(lr), f(decay_rate),
             f(1 - decay_rate), f(eps))


def adamw_(w, dw, m, v, lr, beta1, beta2, eps, t, weight_decay):
    if weight_decay:  # decoupled decay first, as reference.adamw_ does it
        w *= w.dtype.type(1 - lr * weight_decay)
    adam_(w, dw, m, v, lr, beta1, beta2, eps, t)


def adam_(w, dw, m, v, lr, beta1, beta2, eps, t):
    f = w.dtype.type
    _adam(*_flat_inplace(w, np.ascontiguousarray(dw), m, v), f(lr), f(beta1), f(1 - beta1),
          f(beta2), f(1 - beta2), f(1 - beta1 ** t), f(1 - beta2 ** t), f(eps))
