"""Max pooling, and a convolution fused with the max pool that follows it (conv_pool).

Each op: its reference (plain xp, the declaration), its Numba version and its
CuPy version. On numpy a 3x3 Winograd conv with a 2x2 stride-2 pool pools each
output tile as it is made (winograd.py); elsewhere conv_pool
is the two ops one after the other (conv_pool_ops).
"""
import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._cupy import _element_strides, _launch
from fastnn.kernels._numba import _channels_last, _jit, _row_blocks, _run_chunks
from fastnn.kernels.conv import (_conv_operands, _filters_from_matrix, _tap_slices,
                                 conv_backward, conv_backward_cupy, conv_backward_numba,
                                 conv_forward, conv_forward_cupy, conv_forward_numba)
from fastnn.kernels.registry import declare
from fastnn.kernels.winograd import (_takes_over, _winograd_backward, _winograd_fits,
                                     _winograd_forward)


# -- reference ------------------------------------------------------------------
@declare()
def max_pool_forward(x, pool_height, pool_width, stride):
    """x (N, C, H, W) -> (out (N, C, H', W'), saved), H' = 1 + (H - pool_height) // stride."""
    xp = get_array_module(x)
    out_height = 1 + (x.shape[2] - pool_height) // stride
    out_width = 1 + (x.shape[3] - pool_width) // stride
    # taps in row-major order: argmax's first maximum is the window's first in row-major order
    windows = xp.stack([x[(slice(None), slice(None)) + _tap_slices(i, j, out_height, out_width,
                                                                   stride)]
                        for i in range(pool_height) for j in range(pool_width)], axis=-1)
    argmax = xp.argmax(windows, axis=-1)
    out = xp.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return out, (x.shape, argmax, pool_height, pool_width, stride)


@declare()
def max_pool_backward(dout, saved):
    """dout (N, C, H', W') -> dx (N, C, H, W): each window's gradient to its first maximum."""
    x_shape, argmax, pool_height, pool_width, stride = saved
    xp = get_array_module(dout, argmax)
    out_height, out_width = dout.shape[2:]
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    zero = dout.dtype.type(0)
    for tap in range(pool_height * pool_width):
        rows, cols = _tap_slices(tap // pool_width, tap % pool_width, out_height, out_width, stride)
        dx[:, :, rows, cols] += xp.where(argmax == tap, dout, zero)
    return dx


def conv_pool_ops(conv_forward, conv_backward, max_pool_forward, max_pool_backward):
    """(conv_pool_forward, conv_pool_backward) made of a module's conv and pool ops.

    conv_pool_forward(x, w, b, stride, pad, pool_height, pool_width, pool_stride)
    -> (max_pool_forward(conv_forward(x, ...)), (conv saved, pool saved));
    conv_pool_backward(dout, saved, need_dx=True) -> (dx or None, dw, db or None).
    """
    def conv_pool_forward(x, w, b, stride, pad, pool_height, pool_width, pool_stride):
        out, conv_saved = conv_forward(x, w, b, stride, pad)
        pooled, pool_saved = max_pool_forward(out, pool_height, pool_width, pool_stride)
        return pooled, (conv_saved, pool_saved)

    def conv_pool_backward(dout, saved, need_dx=True):
        conv_saved, pool_saved = saved
        return conv_backward(max_pool_backward(dout, pool_saved), conv_saved, need_dx)

    return conv_pool_forward, conv_pool_backward


conv_pool_forward, conv_pool_backward = conv_pool_ops(conv_forward, conv_backward,
                                                      max_pool_forward, max_pool_backward)
declare()(conv_pool_forward)
declare()(conv_pool_backward)


# -- Numba ----------------------------------------------------------------------
@_jit
def _max_pool_forward(x, pool_height, pool_width, stride, out, argmax):
    """x (n, H, W, C) -> out, argmax (n, H', W', C): the window's max and its first tap."""
    n, out_height, out_width, channels = out.shape
    for image in range(n):
        for oy in range(out_height):
            for ox in range(out_width):
                y0, x0 = oy * stride, ox * stride
                for c in range(channels):
                    out[image, oy, ox, c] = x[image, y0, x0, c]
                    argmax[image, oy, ox, c] = 0
                tap = 0
                for i in range(pool_height):
                    for j in range(pool_width):
                        if tap > 0:  # strictly greater: ties keep the first tap (row-major)
                            for c in range(channels):
                                v = x[image, y0 + i, x0 + j, c]
                                if _takes_over(v, out[image, oy, ox, c]):
                                    out[image, oy, ox, c] = v
                                    argmax[image, oy, ox, c] = tap
                        tap += 1


@_jit
def _max_pool_backward_tiled(dout, argmax, pool_height, pool_width, dx):
    """Windows that tile the input (stride = window): each dx value written once, no scatter."""
    n, out_height, out_width, channels = dout.shape
    height, width = dx.shape[1], dx.shape[2]
    for image in range(n):
        for y in range(height):
            oy, i = y // pool_height, y % pool_height
            for xx in range(width):
                ox, j = xx // pool_width, xx % pool_width
                if oy >= out_height or ox >= out_width:  # the floored-off edge: no window
                    for c in range(channels):
                        dx[image, y, xx, c] = 0
                    continue
                tap = i * pool_width + j
                for c in range(channels):
                    hit = argmax[image, oy, ox, c] == tap
                    dx[image, y, xx, c] = dout[image, oy, ox, c] if hit else 0


@_jit
def _max_pool_backward(dout, argmax, pool_width, stride, dx):
    n, out_height, out_width, channels = dout.shape
    dx[:] = 0
    for image in range(n):
        for oy in range(out_height):
            for ox in range(out_width):
                for c in range(channels):
                    tap = argmax[image, oy, ox, c]
                    dx[image, oy * stride + tap // pool_width, ox * stride + tap % pool_width,
                       c] += dout[image, oy, ox, c]


@max_pool_forward.register("numpy")
def max_pool_forward_numba(x, pool_height, pool_width, stride):
    """x (N, C, H, W) any strides -> (out, saved); out an (N, C, H', W') channels-last view."""
    x_nhwc = _channels_last(x)
    n, height, width, channels = x_nhwc.shape
    out_height = 1 + (height - pool_height) // stride
    out_width = 1 + (width - pool_width) // stride
    out = np.empty((n, out_height, out_width, channels), dtype=x_nhwc.dtype)
    argmax = np.empty(out.shape, dtype=np.uint8 if pool_height * pool_width <= 256 else np.int32)

    def work(start, stop, worker):
        _max_pool_forward(x_nhwc[start:stop], pool_height, pool_width, stride, out[start:stop],
                          argmax[start:stop])

    _run_chunks(work, n, _row_blocks(n, out[0].size))
    return out.transpose(0, 3, 1, 2), (x_nhwc.shape, argmax, pool_height, pool_width, stride)


@max_pool_backward.register("numpy")
def max_pool_backward_numba(dout, saved):
    """dout (N, C, H', W') any strides -> dx, an (N, C, H, W) channels-last view."""
    x_shape, argmax, pool_height, pool_width, stride = saved
    dout_nhwc = _channels_last(dout)
    dx = np.empty(x_shape, dtype=dout_nhwc.dtype)

    tiled = stride == pool_height == pool_width

    def work(start, stop, worker):
        if tiled:
            _max_pool_backward_tiled(dout_nhwc[start:stop], argmax[start:stop], pool_height,
                                     pool_width, dx[start:stop])
        else:
            _max_pool_backward(dout_nhwc[start:stop], argmax[start:stop], pool_width, stride,
                               dx[start:stop])

    _run_chunks(work, x_shape[0], _row_blocks(x_shape[0], dout_nhwc[0].size))
    return dx.transpose(0, 3, 1, 2)


def _pool_fuses(height, width, w_shape, stride, pad, pool_height, pool_width, pool_stride):
    """A Winograd conv (of an H x W output) whose 2x2 output tiles are the pool's windows
    (an odd H or W: its last row or column, which the pool drops, is never made)."""
    return (_winograd_fits(w_shape, stride, pad) and (pool_height, pool_width, pool_stride)
            == (2, 2, 2) and min(height, width) >= 2)


# where the pool does not fuse: the two ops, one after the other
_conv_then_pool, _conv_then_pool_backward = conv_pool_ops(
    conv_forward_numba, conv_backward_numba, max_pool_forward_numba, max_pool_backward_numba)


@conv_pool_forward.register("numpy")
def conv_pool_forward_numba(x, w, b, stride, pad, pool_height, pool_width, pool_stride):
    """max_pool_forward(conv_forward(x, w, b, stride, pad), ...) -> (out, (conv saved, pool saved)).

    A 3x3 Winograd conv with a 2x2 stride-2 pool pools each output tile as it is
    made: the full-size conv output never exists (nor an odd size's dropped edge).
    """
    pool = (pool_height, pool_width, pool_stride)
    if not _pool_fuses(x.shape[2], x.shape[3], w.shape, stride, pad, *pool):
        return _conv_then_pool(x, w, b, stride, pad, *pool)
    x_nhwc, w_mat, bias = _conv_operands(x, w, b)
    pooled, argmax = _winograd_forward(x_nhwc, w_mat, bias, pool=True)
    conv_saved = (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    pool_saved = (x_nhwc.shape[:3] + (w.shape[0],), argmax) + pool
    return pooled.transpose(0, 3, 1, 2), (conv_saved, pool_saved)


@conv_pool_backward.register("numpy")
def conv_pool_backward_numba(dout, saved, need_dx=True):
    """dout (N, F, H'', W'') of the pool's output -> (dx or None, dw, db or None)."""
    conv_saved, pool_saved = saved
    x_nhwc, w_mat, w_shape, stride, pad, has_bias = conv_saved
    conv_shape, argmax = pool_saved[:2]  # (N, H, W, F): the conv output's, channels-last
    if not _pool_fuses(conv_shape[1], conv_shape[2], w_shape, stride, pad, *pool_saved[2:]):
        return _conv_then_pool_backward(dout, saved, need_dx)
    dout_nhwc = _channels_last(dout).astype(x_nhwc.dtype, copy=False)
    dx, dw_mat, db = _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias, argmax)
    return ((None if dx is None else dx.transpose(0, 3, 1, 2)),
            _filters_from_matrix(dw_mat, w_shape), db)


# -- CuPy: one thread per output (forward) or input (backward) element ------------
# (pool kernels compiled with conv.py's: _cupy._raw_kernel, per dtype on first use)
POOL_SOURCE = r"""
extern "C" __global__ void fastnn_max_pool_forward_{T}(
        const {T}* x, long long sn, long long sc, long long sh, long long sw, int channels,
        int pool_height, int pool_width, int stride, int out_height, int out_width,
        {T}* out, int* argmax, long long total) {{
    // out, argmax (N, C, H', W') contiguous; argmax: the window's first maximum, row-major,
    // or its first NaN, which then stays (np.argmax's rule, as the reference pool)
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int ox = (int)(idx % out_width);
    int oy = (int)((idx / out_width) % out_height);
    int c = (int)((idx / ((long long)out_width * out_height)) % channels);
    long long n = idx / ((long long)out_width * out_height * channels);
    const {T}* base = x + n * sn + c * sc + (long long)(oy * stride) * sh
        + (long long)(ox * stride) * sw;
    {T} best = base[0];
    int best_tap = 0;
    for (int i = 0; i < pool_height; ++i)
        for (int j = 0; j < pool_width; ++j) {{
            {T} v = base[i * sh + j * sw];
            if (v > best || (v != v && best == best)) {{ best = v; best_tap = i * pool_width + j; }}
        }}
    out[idx] = best;
    argmax[idx] = best_tap;
}}

extern "C" __global__ void fastnn_max_pool_backward_{T}(
        const {T}* dout, const int* argmax, int channels, int height, int width,
        int pool_height, int pool_width, int stride, int out_height, int out_width, {T}* dx,
        long long total) {{
    // dx (N, C, H, W) contiguous; dout and argmax (N, C, H', W') contiguous
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int xx = (int)(idx % width);
    int y = (int)((idx / width) % height);
    long long plane = idx / ((long long)width * height);  // n * C + c
    {T} sum = 0;
    int oy_first = y >= pool_height ? (y - pool_height) / stride + 1 : 0;
    int ox_first = xx >= pool_width ? (xx - pool_width) / stride + 1 : 0;
    for (int oy = oy_first; oy <= y / stride && oy < out_height; ++oy)
        for (int ox = ox_first; ox <= xx / stride && ox < out_width; ++ox) {{
            long long o = (plane * out_height + oy) * out_width + ox;
            if (argmax[o] == (y - oy * stride) * pool_width + (xx - ox * stride)) sum += dout[o];
        }}
    dx[idx] = sum;
}}
"""


@max_pool_forward.register("cupy")
def max_pool_forward_cupy(x, pool_height, pool_width, stride):
    import cupy

    n, channels, height, width = x.shape
    out_height = 1 + (height - pool_height) // stride
    out_width = 1 + (width - pool_width) // stride
    out = cupy.empty((n, channels, out_height, out_width), dtype=x.dtype)
    argmax = cupy.empty(out.shape, dtype=cupy.int32)
    _launch(POOL_SOURCE, "max_pool_forward", x.dtype, out.size, x, *_element_strides(x),
            np.int32(channels),
            np.int32(pool_height), np.int32(pool_width), np.int32(stride), np.int32(out_height),
            np.int32(out_width), out, argmax)
    return out, (x.shape, argmax, pool_height, pool_width, stride)


@max_pool_backward.register("cupy")
def max_pool_backward_cupy(dout, saved):
    import cupy

    x_shape, argmax, pool_height, pool_width, stride = saved
    n, channels, height, width = x_shape
    dout = cupy.ascontiguousarray(dout)
    dx = cupy.empty(x_shape, dtype=dout.dtype)
    _launch(POOL_SOURCE, "max_pool_backward", dout.dtype, dx.size, dout, argmax,
            np.int32(channels),
            np.int32(height), np.int32(width), np.int32(pool_height), np.int32(pool_width),
            np.int32(stride), np.int32(dout.shape[2]), np.int32(dout.shape[3]), dx)
    return dx


_conv_pool_cupy = conv_pool_ops(conv_forward_cupy, conv_backward_cupy, max_pool_forward_cupy,
                                max_pool_backward_cupy)
conv_pool_forward.register("cupy")(_conv_pool_cupy[0])
conv_pool_backward.register("cupy")(_conv_pool_cupy[1])
