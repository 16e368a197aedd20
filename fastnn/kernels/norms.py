"""Norms of a sample's own values: layernorm (a sample's D features) and groupnorm (a
sample's group of C/G channels over all positions).

Each op: its reference (plain xp, the declaration), its Numba version and its
CuPy version, in that order.
"""
import functools
import math

import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._cupy import _empty_to_reference
from fastnn.kernels._numba import _jit, _jit_sums, _row_squared_deviation, _row_sum
from fastnn.kernels.registry import declare


# -- reference ------------------------------------------------------------------
# Both normalise rows of their own: a sample's D features (layernorm) or a
# sample's group of C/G channels over all positions (groupnorm), with the
# biased variance; gamma and beta are per feature / per channel.
def _normalise_rows(rows, eps):
    """rows (R, L) -> (x_hat (R, L), inv_std (R,)), each row to mean 0 and variance 1."""
    xp = get_array_module(rows)
    centered = rows - rows.mean(axis=1, keepdims=True)
    var = (centered * centered).mean(axis=1)
    inv_std = rows.dtype.type(1) / xp.sqrt(var + rows.dtype.type(eps))
    return centered * inv_std[:, None], inv_std


def _normalise_rows_backward(g, x_hat, inv_std):
    """dx (R, L) of _normalise_rows from g = dL/dx_hat (R, L)."""
    return inv_std[:, None] * (g - g.mean(axis=1, keepdims=True)
                               - x_hat * (g * x_hat).mean(axis=1, keepdims=True))


@declare(data_args=3)
def layernorm_forward(x, gamma, beta, eps):
    """Normalise each row of x (N, D); gamma, beta (D,).

    Returns (out (N, D), x_hat (N, D), inv_std (N,)).
    """
    x_hat, inv_std = _normalise_rows(x, eps)
    return x_hat * gamma + beta, x_hat, inv_std


@declare(data_args=4)
def layernorm_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx (N, D), dgamma (D,), dbeta (D,)) of layernorm_forward."""
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    return _normalise_rows_backward(dout * gamma, x_hat, inv_std), dgamma, dbeta


@declare(data_args=3)
def groupnorm_forward(x, gamma, beta, groups, eps):
    """Normalise x (N, C, H, W) over each sample's `groups` groups of C/groups channels.

    gamma, beta (C,). Returns (out, x_hat (both N, C, H, W), inv_std (N, groups)).
    """
    n = x.shape[0]
    x_hat, inv_std = _normalise_rows(x.reshape(n * groups, -1), eps)
    x_hat = x_hat.reshape(x.shape)
    return (x_hat * gamma[None, :, None, None] + beta[None, :, None, None], x_hat,
            inv_std.reshape(n, groups))


@declare(data_args=4)
def groupnorm_backward(dout, x_hat, gamma, inv_std, groups):
    """Gradients (dx (N, C, H, W), dgamma (C,), dbeta (C,)) of groupnorm_forward."""
    n = dout.shape[0]
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3))
    g = (dout * gamma[None, :, None, None]).reshape(n * groups, -1)
    dx = _normalise_rows_backward(g, x_hat.reshape(n * groups, -1), inv_std.reshape(-1))
    return dx.reshape(dout.shape), dgamma, dbeta


# -- Numba: one row per normalised unit (a sample for layernorm, a sample's group for
# groupnorm), read whole and contiguous: the row sums use the vectorised
# float64 helpers of _numba.py; gamma and beta sums accumulate in float64 too.
@_jit
def _layernorm_forward(x, gamma, beta, eps, out, x_hat, inv_std):
    n, d = x.shape
    for i in range(n):
        mean = _row_sum(x, i) / d
        scale = 1.0 / np.sqrt(_row_squared_deviation(x, i, mean) / d + eps)
        inv_std[i] = scale
        for j in range(d):
            normed = (x[i, j] - mean) * scale
            x_hat[i, j] = normed
            out[i, j] = normed * gamma[j] + beta[j]


@_jit_sums
def _row_gamma_sums(dout, x_hat, gamma, i):
    """Over row i: (sum of g, sum of g * x_hat) with g = dout * gamma, the gradient
    reaching x_hat."""
    total = 0.0
    total_xhat = 0.0
    for j in range(dout.shape[1]):
        g = dout[i, j] * gamma[j]
        total += g
        total_xhat += g * x_hat[i, j]
    return total, total_xhat


@_jit
def _layernorm_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    n, d = dout.shape
    sum_dout = np.zeros(d, dtype=np.float64)
    sum_dout_xhat = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            grad = dout[i, j]
            sum_dout[j] += grad
            sum_dout_xhat[j] += grad * x_hat[i, j]
        mean_g, mean_g_xhat = _row_gamma_sums(dout, x_hat, gamma, i)
        mean_g /= d
        mean_g_xhat /= d
        scale = inv_std[i]
        for j in range(d):
            dx[i, j] = scale * (dout[i, j] * gamma[j] - mean_g - x_hat[i, j] * mean_g_xhat)
    for j in range(d):
        dgamma[j] = sum_dout_xhat[j]
        dbeta[j] = sum_dout[j]


@layernorm_forward.register("numpy")
def layernorm_forward_numba(x, gamma, beta, eps):
    x = np.ascontiguousarray(x)
    out, x_hat = np.empty_like(x), np.empty_like(x)
    inv_std = np.empty(x.shape[0], dtype=x.dtype)
    _layernorm_forward(x, np.ascontiguousarray(gamma), np.ascontiguousarray(beta),
                       x.dtype.type(eps), out, x_hat, inv_std)
    return out, x_hat, inv_std


@layernorm_backward.register("numpy")
def layernorm_backward_numba(dout, x_hat, gamma, inv_std):
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(dout)
    dgamma, dbeta = (np.empty(dout.shape[1], dtype=dout.dtype) for _ in range(2))
    _layernorm_backward(dout, np.ascontiguousarray(x_hat), np.ascontiguousarray(gamma),
                        np.ascontiguousarray(inv_std), dx, dgamma, dbeta)
    return dx, dgamma, dbeta


# groupnorm: x seen as rows (N * G, C/G, H * W) for the affine part and as
# (N * G, C/G * H * W) for the statistics; row r is group r % G of a sample
@_jit
def _groupnorm_forward(x, rows, gamma, beta, groups, eps, out, x_hat, inv_std):
    count, channels, positions = x.shape
    length = channels * positions
    for r in range(count):
        first = (r % groups) * channels
        mean = _row_sum(rows, r) / length
        scale = 1.0 / np.sqrt(_row_squared_deviation(rows, r, mean) / length + eps)
        inv_std[r] = scale
        for c in range(channels):
            g, b = gamma[first + c], beta[first + c]
            for k in range(positions):
                normed = (x[r, c, k] - mean) * scale
                x_hat[r, c, k] = normed
                out[r, c, k] = normed * g + b


@_jit
def _groupnorm_backward(dout, x_hat, gamma, inv_std, groups, dx, dgamma, dbeta):
    count, channels, positions = dout.shape
    length = channels * positions
    sum_dout = np.zeros(groups * channels, dtype=np.float64)
    sum_dout_xhat = np.zeros(groups * channels, dtype=np.float64)
    for r in range(count):
        first = (r % groups) * channels
        mean_g = 0.0  # g = dout * gamma, the gradient reaching x_hat
        mean_g_xhat = 0.0
        for c in range(channels):
            channel_sum = 0.0
            channel_dot = 0.0
            for k in range(positions):
                grad = dout[r, c, k]
                channel_sum += grad
                channel_dot += grad * x_hat[r, c, k]
            sum_dout[first + c] += channel_sum
            sum_dout_xhat[first + c] += channel_dot
            mean_g += gamma[first + c] * channel_sum
            mean_g_xhat += gamma[first + c] * channel_dot
        mean_g /= length
        mean_g_xhat /= length
        scale = inv_std[r]
        for c in range(channels):
            g = gamma[first + c]
            for k in range(positions):
                dx[r, c, k] = scale * (dout[r, c, k] * g - mean_g - x_hat[r, c, k] * mean_g_xhat)
    for c in range(groups * channels):
        dgamma[c] = sum_dout_xhat[c]
        dbeta[c] = sum_dout[c]


def _group_rows(a, groups):
    """A C-contiguous (N, C, H, W) array as (N * groups, C / groups, H * W)."""
    n, c = a.shape[:2]
    return np.ascontiguousarray(a).reshape(n * groups, c // groups, -1)


@groupnorm_forward.register("numpy")
def groupnorm_forward_numba(x, gamma, beta, groups, eps):
    x3 = _group_rows(x, groups)
    out, x_hat = np.empty_like(x3), np.empty_like(x3)
    inv_std = np.empty(x3.shape[0], dtype=x3.dtype)
    _groupnorm_forward(x3, x3.reshape(x3.shape[0], -1), np.ascontiguousarray(gamma),
                       np.ascontiguousarray(beta), groups, x3.dtype.type(eps), out, x_hat, inv_std)
    return (out.reshape(x.shape), x_hat.reshape(x.shape),
            inv_std.reshape(x.shape[0], groups))


@groupnorm_backward.register("numpy")
def groupnorm_backward_numba(dout, x_hat, gamma, inv_std, groups):
    dout3 = _group_rows(dout, groups)
    dx = np.empty_like(dout3)
    dgamma, dbeta = (np.empty(dout.shape[1], dtype=dout.dtype) for _ in range(2))
    _groupnorm_backward(dout3, _group_rows(x_hat, groups), np.ascontiguousarray(gamma),
                        np.ascontiguousarray(inv_std).reshape(-1), groups, dx, dgamma, dbeta)
    return dx.reshape(dout.shape), dgamma, dbeta


# -- CuPy: one thread block per normalised row (a sample for layernorm, a sample's
# group for groupnorm; C-contiguous, `length` values). Element k of row r
# belongs to channel (r % groups) * channels + k / positions: layernorm is
# groups = 1, channels = D, positions = 1. dgamma and dbeta are column sums,
# left to cupy's reductions.
_NORM_THREADS = 256  # a power of two: block_sum halves it

NORM_SOURCE = r"""
__device__ T block_sum(T value, T* partial) {
    partial[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    const T total = partial[0];
    __syncthreads();  // every thread has read partial[0] before it is reused
    return total;
}

extern "C" __global__ void fastnn_norm_rows_forward(
        const T* x, const T* gamma, const T* beta, const T eps, const int length,
        const int groups, const int channels, const int positions,
        T* out, T* x_hat, T* inv_std) {
    __shared__ T partial[THREADS];
    const long long row = blockIdx.x;
    const long long offset = row * length;
    T total = 0;
    for (int k = threadIdx.x; k < length; k += blockDim.x) total += x[offset + k];
    const T mean = block_sum(total, partial) / length;
    T deviation = 0;
    for (int k = threadIdx.x; k < length; k += blockDim.x) {
        const T centered = x[offset + k] - mean;
        deviation += centered * centered;
    }
    const T scale = (T)1 / sqrt(block_sum(deviation, partial) / length + eps);
    if (threadIdx.x == 0) inv_std[row] = scale;
    const int first = (int)(row % groups) * channels;
    for (int k = threadIdx.x; k < length; k += blockDim.x) {
        const T normed = (x[offset + k] - mean) * scale;
        const int c = first + k / positions;
        x_hat[offset + k] = normed;
        out[offset + k] = normed * gamma[c] + beta[c];
    }
}

extern "C" __global__ void fastnn_norm_rows_backward(
        const T* dout, const T* x_hat, const T* gamma, const T* inv_std, const int length,
        const int groups, const int channels, const int positions, T* dx) {
    __shared__ T partial[THREADS];
    const long long row = blockIdx.x;
    const long long offset = row * length;
    const int first = (int)(row % groups) * channels;
    T sum_g = 0, sum_g_xhat = 0;  // g = dout * gamma, the gradient reaching x_hat
    for (int k = threadIdx.x; k < length; k += blockDim.x) {
        const T g = dout[offset + k] * gamma[first + k / positions];
        sum_g += g;
        sum_g_xhat += g * x_hat[offset + k];
    }
    const T mean_g = block_sum(sum_g, partial) / length;
    const T mean_g_xhat = block_sum(sum_g_xhat, partial) / length;
    const T scale = inv_std[row];
    for (int k = threadIdx.x; k < length; k += blockDim.x) {
        const T g = dout[offset + k] * gamma[first + k / positions];
        dx[offset + k] = scale * (g - mean_g - x_hat[offset + k] * mean_g_xhat);
    }
}
"""


def norm_source(dtype):
    """NORM_SOURCE for one dtype (float32 or float64), ready for NVRTC or nvcc."""
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    return f"#define T {ctype}\n#define THREADS {_NORM_THREADS}\n" + NORM_SOURCE


@functools.lru_cache(maxsize=None)
def _norm_module(dtype_name):
    import cupy

    return cupy.RawModule(code=norm_source(dtype_name), name_expressions=None)


def _norm_rows_forward(x, gamma, beta, eps, rows, groups, channels, positions):
    """(out, x_hat, inv_std (rows,)) of C-contiguous x normalised as `rows` rows."""
    import cupy

    x = cupy.ascontiguousarray(x)
    out, x_hat = cupy.empty_like(x), cupy.empty_like(x)
    inv_std = cupy.empty(rows, dtype=x.dtype)
    kernel = _norm_module(x.dtype.name).get_function("fastnn_norm_rows_forward")
    kernel((rows,), (_NORM_THREADS,),
           (x, cupy.ascontiguousarray(gamma), cupy.ascontiguousarray(beta), x.dtype.type(eps),
            np.int32(x.size // max(rows, 1)), np.int32(groups), np.int32(channels),
            np.int32(positions), out, x_hat, inv_std))
    return out, x_hat, inv_std


def _norm_rows_backward(dout, x_hat, gamma, inv_std, rows, groups, channels, positions):
    import cupy

    dout = cupy.ascontiguousarray(dout)
    dx = cupy.empty_like(dout)
    kernel = _norm_module(dout.dtype.name).get_function("fastnn_norm_rows_backward")
    kernel((rows,), (_NORM_THREADS,),
           (dout, cupy.ascontiguousarray(x_hat), cupy.ascontiguousarray(gamma),
            cupy.ascontiguousarray(inv_std), np.int32(dout.size // max(rows, 1)),
            np.int32(groups), np.int32(channels), np.int32(positions), dx))
    return dx


@layernorm_forward.register("cupy")
@_empty_to_reference(layernorm_forward)
def layernorm_forward_cupy(x, gamma, beta, eps):
    n, d = x.shape
    return _norm_rows_forward(x, gamma, beta, eps, n, 1, d, 1)


@layernorm_backward.register("cupy")
@_empty_to_reference(layernorm_backward)
def layernorm_backward_cupy(dout, x_hat, gamma, inv_std):
    n, d = dout.shape
    dx = _norm_rows_backward(dout, x_hat, gamma, inv_std, n, 1, d, 1)
    return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)


@groupnorm_forward.register("cupy")
@_empty_to_reference(groupnorm_forward)
def groupnorm_forward_cupy(x, gamma, beta, groups, eps):
    n, c = x.shape[:2]
    out, x_hat, inv_std = _norm_rows_forward(x, gamma, beta, eps, n * groups, groups,
                                             c // groups, math.prod(x.shape[2:]))
    return out, x_hat, inv_std.reshape(n, groups)


@groupnorm_backward.register("cupy")
@_empty_to_reference(groupnorm_backward)
def groupnorm_backward_cupy(dout, x_hat, gamma, inv_std, groups):
    n, c = dout.shape[:2]
    dx = _norm_rows_backward(dout, x_hat, gamma, inv_std, n * groups, groups, c // groups,
                             math.prod(dout.shape[2:]))
    return dx, (dout * x_hat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))
