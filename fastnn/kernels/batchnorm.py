"""Batchnorm: over a batch's rows (N, D), with features as rows (the stack's (D, N)), and
fused with a relu or a gelu on channels-last rows (M, C) for the conv nets.

Each op: its reference (plain xp, the declaration), then its Numba version; the
cupy table runs the references.
"""
import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._numba import (_jit, _jit_float32, _jit_inline, _row_blocks, _row_dot,
                                   _row_squared_deviation, _row_sum, _run_chunks)
from fastnn.kernels.activations import gelu_grad_scalar, gelu_grad_xp, gelu_scalar, gelu_xp
from fastnn.kernels.registry import declare


# -- batchnorm of rows x (N, D) -----------------------------------------------
@declare(data_args=3)
def batchnorm_train_forward(x, gamma, beta, eps):
    """Normalise x (N, D) with its batch statistics.

    Returns (out, x_hat, inv_std, mean, var); var is the biased variance.
    """
    xp = get_array_module(x, gamma, beta)
    mean = x.mean(axis=0)
    centered = x - mean
    var = (centered * centered).mean(axis=0)
    inv_std = x.dtype.type(1) / xp.sqrt(var + x.dtype.type(eps))
    x_hat = centered * inv_std
    return x_hat * gamma + beta, x_hat, inv_std, mean, var


@declare(data_args=4)
def batchnorm_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx, dgamma, dbeta) of batchnorm_train_forward; all (N, D) / (D,)."""
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    scale = gamma * inv_std / dout.dtype.type(n)
    dx = scale * (n * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


@declare(data_args=3)
def batchnorm_rows_train_forward(x, gamma, beta, eps):
    """batchnorm_train_forward with features as rows: x (D, N), feature j is x[j].

    The stack keeps activations feature-major, (K*H, N). Returns (out (D, N),
    x_hat (D, N), inv_std, mean, var (D,)).
    """
    out, x_hat, inv_std, mean, var = batchnorm_train_forward(x.T, gamma, beta, eps)
    return out.T, x_hat.T, inv_std, mean, var


@declare(data_args=4)
def batchnorm_rows_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx (D, N), dgamma (D,), dbeta (D,)) of batchnorm_rows_train_forward."""
    dx, dgamma, dbeta = batchnorm_backward(dout.T, x_hat.T, gamma, inv_std)
    return dx.T, dgamma, dbeta


# Numba: x is (N, D), C order: rows are read whole, columns accumulate
@_jit
def _batchnorm_train_forward(x, gamma, beta, eps, out, x_hat, inv_std, mean, var):
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            total[j] += x[i, j]
    for j in range(d):
        mean[j] = total[j] / n
        total[j] = 0.0
    for i in range(n):
        for j in range(d):
            centered = x[i, j] - mean[j]
            total[j] += centered * centered
    for j in range(d):
        var[j] = total[j] / n
        inv_std[j] = 1.0 / np.sqrt(var[j] + eps)
    for i in range(n):
        for j in range(d):
            normed = (x[i, j] - mean[j]) * inv_std[j]
            x_hat[i, j] = normed
            out[i, j] = normed * gamma[j] + beta[j]


@_jit
def _batchnorm_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    n, d = dout.shape
    sum_dout = np.zeros(d, dtype=np.float64)
    sum_dout_xhat = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            g = dout[i, j]
            sum_dout[j] += g
            sum_dout_xhat[j] += g * x_hat[i, j]
    scale = np.empty(d, dtype=dx.dtype)
    for j in range(d):
        dbeta[j] = sum_dout[j]
        dgamma[j] = sum_dout_xhat[j]
        scale[j] = gamma[j] * inv_std[j] / n
    for i in range(n):
        for j in range(d):
            dx[i, j] = scale[j] * (n * dout[i, j] - dbeta[j] - x_hat[i, j] * dgamma[j])


def _batchnorm_forward_call(kernel, x, gamma, beta, eps, feature_axis):
    """Run a batchnorm forward kernel: (out, x_hat, inv_std, mean, var)."""
    x = np.ascontiguousarray(x)
    out, x_hat = np.empty_like(x), np.empty_like(x)
    inv_std, mean, var = (np.empty(x.shape[feature_axis], dtype=x.dtype) for _ in range(3))
    kernel(x, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), x.dtype.type(eps),
           out, x_hat, inv_std, mean, var)
    return out, x_hat, inv_std, mean, var


def _batchnorm_backward_call(kernel, dout, x_hat, gamma, inv_std, feature_axis):
    """Run a batchnorm backward kernel: (dx, dgamma, dbeta)."""
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(dout)
    dgamma, dbeta = (np.empty(dout.shape[feature_axis], dtype=dout.dtype) for _ in range(2))
    kernel(dout, np.ascontiguousarray(x_hat), np.ascontiguousarray(gamma),
           np.ascontiguousarray(inv_std), dx, dgamma, dbeta)
    return dx, dgamma, dbeta


@batchnorm_train_forward.register("numpy")
def batchnorm_train_forward_numba(x, gamma, beta, eps):
    return _batchnorm_forward_call(_batchnorm_train_forward, x, gamma, beta, eps, 1)


@batchnorm_backward.register("numpy")
def batchnorm_backward_numba(dout, x_hat, gamma, inv_std):
    return _batchnorm_backward_call(_batchnorm_backward, dout, x_hat, gamma, inv_std, 1)


# batchnorm with features as rows (x (D, N)): the same arithmetic as the
# column kernels above, each feature's N values read as one contiguous row
@_jit
def _batchnorm_rows_train_forward(x, gamma, beta, eps, out, x_hat, inv_std, mean, var):
    d, n = x.shape
    for j in range(d):
        mean[j] = _row_sum(x, j) / n
        var[j] = _row_squared_deviation(x, j, mean[j]) / n
        inv_std[j] = 1.0 / np.sqrt(var[j] + eps)
        center, scale, g, b = mean[j], inv_std[j], gamma[j], beta[j]
        for i in range(n):
            normed = (x[j, i] - center) * scale
            x_hat[j, i] = normed
            out[j, i] = normed * g + b


@_jit
def _batchnorm_rows_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    d, n = dout.shape
    scale = np.empty(d, dtype=dx.dtype)
    for j in range(d):
        dbeta[j] = _row_sum(dout, j)
        dgamma[j] = _row_dot(dout, x_hat, j)
        scale[j] = gamma[j] * inv_std[j] / n
        s, db, dg = scale[j], dbeta[j], dgamma[j]
        for i in range(n):
            dx[j, i] = s * (n * dout[j, i] - db - x_hat[j, i] * dg)


@batchnorm_rows_train_forward.register("numpy")
def batchnorm_rows_train_forward_numba(x, gamma, beta, eps):
    return _batchnorm_forward_call(_batchnorm_rows_train_forward, x, gamma, beta, eps, 0)


@batchnorm_rows_backward.register("numpy")
def batchnorm_rows_backward_numba(dout, x_hat, gamma, inv_std):
    return _batchnorm_backward_call(_batchnorm_rows_backward, dout, x_hat, gamma, inv_std, 0)


# -- batchnorm + an activation (relu, gelu) on channels-last rows (M, C), for the conv nets
def _bn_act_backward_xp(g, x, gamma, mean, inv_std):
    """(dx, dgamma, dbeta) of batchnorm from g, the gradient at its output (M, C)."""
    x_hat = (x - mean) * inv_std
    dbeta = g.sum(axis=0)
    dgamma = (g * x_hat).sum(axis=0)
    m = x.shape[0]
    dx = (gamma * inv_std / m) * (m * g - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def _bn_stats_xp(xp, x, eps):
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    return mean, var, 1 / xp.sqrt(var + x.dtype.type(eps))


@declare(data_args=3)
def batchnorm_relu_train_forward(x, gamma, beta, eps):
    """relu(batchnorm(x)) of rows x (M, C), batch statistics -> (out, mean, inv_std, var)."""
    xp = get_array_module(x, gamma, beta)
    mean, var, inv_std = _bn_stats_xp(xp, x, eps)
    out = xp.maximum((x - mean) * (inv_std * gamma) + beta, x.dtype.type(0))
    return out, mean, inv_std.astype(x.dtype, copy=False), var


@declare(data_args=5)
def batchnorm_relu_test_forward(x, gamma, beta, running_mean, running_var, eps):
    """relu(batchnorm(x)) of rows x (M, C) with fixed (running) statistics -> out (M, C)."""
    xp = get_array_module(x, gamma, beta)
    scale = gamma / xp.sqrt(running_var + x.dtype.type(eps))
    return xp.maximum((x - running_mean) * scale + beta, x.dtype.type(0))


@declare(data_args=4)
def batchnorm_relu_backward(dout, x, out, gamma, mean, inv_std):
    """Gradient of batchnorm_relu_train_forward: dout (M, C) -> (dx, dgamma, dbeta)."""
    xp = get_array_module(dout, x, out)
    g = xp.where(out > 0, dout, dout.dtype.type(0))
    return _bn_act_backward_xp(g, x, gamma, mean, inv_std)


@declare(data_args=3)
def batchnorm_gelu_train_forward(x, gamma, beta, eps):
    """gelu(batchnorm(x)) of rows x (M, C), batch statistics -> (out, mean, inv_std, var)."""
    xp = get_array_module(x, gamma, beta)
    mean, var, inv_std = _bn_stats_xp(xp, x, eps)
    out = gelu_xp(xp, (x - mean) * (inv_std * gamma) + beta)
    return out, mean, inv_std.astype(x.dtype, copy=False), var


@declare(data_args=5)
def batchnorm_gelu_test_forward(x, gamma, beta, running_mean, running_var, eps):
    """gelu(batchnorm(x)) of rows x (M, C) with fixed (running) statistics -> out (M, C)."""
    xp = get_array_module(x, gamma, beta)
    scale = gamma / xp.sqrt(running_var + x.dtype.type(eps))
    return gelu_xp(xp, (x - running_mean) * scale + beta)


@declare(data_args=4)
def batchnorm_gelu_backward(dout, x, gamma, beta, mean, inv_std):
    """Gradient of batchnorm_gelu_train_forward: dout (M, C) -> (dx, dgamma, dbeta).

    The batchnorm's output is recomputed from x (nothing but x kept per element)."""
    xp = get_array_module(dout, x, gamma, beta)
    g = dout * gelu_grad_xp(xp, (x - mean) * (inv_std * gamma) + beta)
    return _bn_act_backward_xp(g, x, gamma, mean, inv_std)


# Numba: two passes each way: statistics (float64 sums per channel, shifted by the
# first row so that the one-pass variance keeps its precision), then the
# output. The T threads of _run_chunks take a block of rows each; their
# partial sums are added in thread order (deterministic).
# The loops are written once for every activation: each kernel below calls an
# inlined body with its activation as a constant (RELU, GELU), which the
# compiler folds, so the relu kernels compile to the loops they were before.
RELU, GELU = 0, 1


@_jit
def _bn_stats(x, shift, total, total_sq):
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            d = np.float64(x[r, c]) - shift[c]
            total[c] += d
            total_sq[c] += d * d


@_jit_inline
def _bn_act_apply(x, mean, scale, beta, out, activation):
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            # centred first: x * scale + (beta - mean * scale) loses digits when |mean| >> std
            v = (x[r, c] - mean[c]) * scale[c] + beta[c]
            if activation == GELU:
                out[r, c] = gelu_scalar(v)
            else:
                out[r, c] = v if v > 0 else 0


@_jit_inline
def _bn_act_grad_sums(dout, x, out, mean, inv_std, gamma, beta, g_out, total, total_xhat,
                      activation):
    """The sums of g and g x_hat, g the gradient at the batchnorm's output; gelu's g (two
    transcendentals per value) is kept in g_out (dx's memory) for the second pass."""
    rows, channels = x.shape
    for r in range(rows):
        if activation == GELU:
            # a loop of its own: in float32 throughout, it vectorises at full width (beside
            # the float64 sums, at half)
            for c in range(channels):
                y = (x[r, c] - mean[c]) * inv_std[c] * gamma[c] + beta[c]
                g_out[r, c] = dout[r, c] * gelu_grad_scalar(y)
        for c in range(channels):
            if activation == GELU:
                g = g_out[r, c]
            else:
                g = dout[r, c] if out[r, c] > 0 else 0  # a select, not a branch: it vectorises
            total[c] += g
            total_xhat[c] += g * ((x[r, c] - mean[c]) * inv_std[c])


@_jit_inline
def _bn_act_grad_apply(dout, x, out, mean, inv_std, factor, m, dbeta, dgamma, dx, activation):
    """dx = factor * (m g - dbeta - x_hat dgamma), g the gradient at the batchnorm's output."""
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            if activation == GELU:
                g = dx[r, c]  # the first pass's
            else:
                g = dout[r, c] if out[r, c] > 0 else 0
            x_hat = (x[r, c] - mean[c]) * inv_std[c]
            dx[r, c] = factor[c] * (m * g - dbeta[c] - x_hat * dgamma[c])


# relu's backward reads its output (out > 0), gelu's recomputes the batchnorm's output
# from x; the relu kernels keep their own arguments (unused places filled by others).
# The gelu kernels compile with _jit_float32: in float32 their erf and exp are polynomials
# (activations.gelu_scalar) whose FMAs the flag allows; the relu kernels keep plain _jit
# (their machine code unchanged).
@_jit
def _bn_relu_apply(x, mean, scale, beta, out):
    _bn_act_apply(x, mean, scale, beta, out, RELU)


@_jit_float32
def _bn_gelu_apply(x, mean, scale, beta, out):
    _bn_act_apply(x, mean, scale, beta, out, GELU)


@_jit
def _bn_relu_grad_sums(dout, x, out, mean, inv_std, total, total_xhat):
    _bn_act_grad_sums(dout, x, out, mean, inv_std, mean, mean, out, total, total_xhat, RELU)


@_jit_float32
def _bn_gelu_grad_sums(dout, x, g_out, mean, inv_std, gamma, beta, total, total_xhat):
    _bn_act_grad_sums(dout, x, x, mean, inv_std, gamma, beta, g_out, total, total_xhat, GELU)


@_jit
def _bn_relu_grad_apply(dout, x, out, mean, inv_std, factor, m, dbeta, dgamma, dx):
    _bn_act_grad_apply(dout, x, out, mean, inv_std, factor, m, dbeta, dgamma, dx, RELU)


@_jit
def _bn_gelu_grad_apply(dout, x, mean, inv_std, factor, m, dbeta, dgamma, dx):
    _bn_act_grad_apply(dout, x, x, mean, inv_std, factor, m, dbeta, dgamma, dx, GELU)


def _partial_sums(kernel, row_arrays, args):
    """kernel(*row blocks, *args, total, total2) per thread block -> the two (C,) float64 sums."""
    rows, channels = row_arrays[0].shape
    parts = {}

    def work(start, stop, worker):
        parts[start] = (np.zeros(channels), np.zeros(channels))
        kernel(*(a[start:stop] for a in row_arrays), *args, *parts[start])

    _run_chunks(work, rows, _row_blocks(rows, channels))
    first, second = np.zeros(channels), np.zeros(channels)
    for start in sorted(parts):  # block order: the same sums for the same thread count
        first += parts[start][0]
        second += parts[start][1]
    return first, second


def _run_rows(kernel, rows, row_arrays, *args):
    """kernel(*row blocks of row_arrays, *args) over the thread blocks of rows."""
    def work(start, stop, worker):
        kernel(*(a[start:stop] for a in row_arrays[:-1]), *args, row_arrays[-1][start:stop])

    _run_chunks(work, rows, _row_blocks(rows, row_arrays[0].shape[1]))


def _bn_act_train_forward(apply, x, gamma, beta, eps):
    """The Numba fused train forward with `apply` (_bn_relu_apply, _bn_gelu_apply)."""
    x = np.ascontiguousarray(x)
    rows, channels = x.shape
    shift = x[0].astype(np.float64) if rows else np.zeros(channels)
    total, total_sq = _partial_sums(_bn_stats, (x,), (shift,))
    centered_mean = total / max(rows, 1)
    var = np.maximum(total_sq / max(rows, 1) - centered_mean ** 2, 0.0)
    mean = shift + centered_mean
    inv_std = 1.0 / np.sqrt(var + eps)
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    out = np.empty_like(x)
    _run_rows(apply, rows, (x, out), mean, (inv_std * gamma).astype(x.dtype),
              beta.astype(x.dtype))
    return out, mean, inv_std, var.astype(x.dtype)


def _bn_act_test_forward(apply, x, gamma, beta, running_mean, running_var, eps):
    x = np.ascontiguousarray(x)
    scale = (gamma / np.sqrt(running_var + x.dtype.type(eps))).astype(x.dtype)
    out = np.empty_like(x)
    _run_rows(apply, x.shape[0], (x, out), running_mean.astype(x.dtype), scale,
              beta.astype(x.dtype))
    return out


def _bn_act_backward(grad_sums, grad_apply, dout, x, out, gamma, mean, inv_std, *params):
    """The Numba fused backward: relu's kernels read out (C-contiguous); gelu's (out None)
    take params (gamma, beta) and keep their g in dx between the passes."""
    dout, x = np.ascontiguousarray(dout), np.ascontiguousarray(x)
    rows, channels = x.shape
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    dx = np.empty_like(x)
    per_value = (dout, x, np.ascontiguousarray(out) if out is not None else dx)
    dbeta, dgamma = _partial_sums(grad_sums, per_value, (mean, inv_std) + params)
    dgamma, dbeta = dgamma.astype(x.dtype), dbeta.astype(x.dtype)
    factor = (gamma * inv_std / x.dtype.type(max(rows, 1))).astype(x.dtype)
    _run_rows(grad_apply, rows, per_value[:2 if out is None else 3] + (dx,), mean, inv_std,
              factor, x.dtype.type(rows), dbeta, dgamma)
    return dx, dgamma, dbeta


@batchnorm_relu_train_forward.register("numpy")
def batchnorm_relu_train_forward_numba(x, gamma, beta, eps):
    return _bn_act_train_forward(_bn_relu_apply, x, gamma, beta, eps)


@batchnorm_relu_test_forward.register("numpy")
def batchnorm_relu_test_forward_numba(x, gamma, beta, running_mean, running_var, eps):
    return _bn_act_test_forward(_bn_relu_apply, x, gamma, beta, running_mean, running_var, eps)


@batchnorm_relu_backward.register("numpy")
def batchnorm_relu_backward_numba(dout, x, out, gamma, mean, inv_std):
    return _bn_act_backward(_bn_relu_grad_sums, _bn_relu_grad_apply, dout, x, out, gamma, mean,
                            inv_std)


@batchnorm_gelu_train_forward.register("numpy")
def batchnorm_gelu_train_forward_numba(x, gamma, beta, eps):
    return _bn_act_train_forward(_bn_gelu_apply, x, gamma, beta, eps)


@batchnorm_gelu_test_forward.register("numpy")
def batchnorm_gelu_test_forward_numba(x, gamma, beta, running_mean, running_var, eps):
    return _bn_act_test_forward(_bn_gelu_apply, x, gamma, beta, running_mean, running_var, eps)


@batchnorm_gelu_backward.register("numpy")
def batchnorm_gelu_backward_numba(dout, x, gamma, beta, mean, inv_std):
    return _bn_act_backward(_bn_gelu_grad_sums, _bn_gelu_grad_apply, dout, x, None, gamma, mean,
                            inv_std, np.ascontiguousarray(gamma), np.ascontiguousarray(beta))
