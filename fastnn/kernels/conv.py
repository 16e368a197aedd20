"""Convolution: the reference (plain xp), the Numba im2col path and the CuPy one.

Activations are (N, C, H, W) at every op boundary; the fast versions keep them
as channels-last memory seen as NCHW. The Numba conv of a 3x3 stride-1 pad-1
filter over 8+ channels runs Winograd F(2x2, 3x3) (winograd.py); max pooling
and the fused conv + pool are in pool.py. A forward's saved state goes only to
the backward of the same version.
"""
import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels import _numba
from fastnn.kernels._cupy import _element_strides, _launch
from fastnn.kernels._numba import _channels_last, _jit, _run_chunks
from fastnn.kernels.registry import declare
from fastnn.kernels.winograd import _winograd_backward, _winograd_fits, _winograd_forward


def conv_output_size(size, filter_size, stride, pad):
    """1 + (size + 2*pad - filter_size) // stride: a convolution's output height (or width).

    fastnn.layers.conv_geometry checks the sizes first.
    """
    return 1 + (size + 2 * pad - filter_size) // stride


# -- reference ------------------------------------------------------------------
# Convolution (and max pooling, pool.py) on NCHW arrays of any strides, in plain xp: the
# naive layers (fastnn.layers.*_naive) run these, and the fast kernels are
# tested against them. No Python loop over pixels: the loops run over the
# filter's (or window's) taps, each tap a strided slice of the whole batch.
# The saved state of a forward goes only to the backward of the same table.
def _tap_slices(tap_row, tap_col, out_height, out_width, stride):
    """The (rows, cols) slices that tap (tap_row, tap_col) reads for every output position."""
    return (slice(tap_row, tap_row + stride * (out_height - 1) + 1, stride),
            slice(tap_col, tap_col + stride * (out_width - 1) + 1, stride))


def _im2col_xp(x_padded, filter_height, filter_width, stride, out_height, out_width):
    """x_padded (N, C, Hp, Wp) -> columns (N, C*HH*WW, H'*W'), rows ordered (c, i, j) like w."""
    xp = get_array_module(x_padded)
    n, channels = x_padded.shape[:2]
    taps = [x_padded[(slice(None), slice(None)) + _tap_slices(i, j, out_height, out_width, stride)]
            for i in range(filter_height) for j in range(filter_width)]
    return xp.stack(taps, axis=2).reshape(n, channels * filter_height * filter_width,
                                          out_height * out_width)


@declare()
def conv_forward(x, w, b, stride, pad):
    """x (N, C, H, W), w (F, C, HH, WW), b (F,) or None (no bias) -> (out (N, F, H', W'), saved)."""
    xp = get_array_module(x, w, b)
    n, _, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height = conv_output_size(height, filter_height, stride, pad)
    out_width = conv_output_size(width, filter_width, stride, pad)
    x_padded = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = _im2col_xp(x_padded, filter_height, filter_width, stride, out_height, out_width)
    out = xp.matmul(w.reshape(filters, -1), cols).reshape(n, filters, out_height, out_width)
    if b is not None:
        out += b.reshape(filters, 1, 1)
    return out, (x, w, stride, pad, b is not None)


@declare()
def conv_backward(dout, saved, need_dx=True):
    """dout (N, F, H', W') -> (dx (N, C, H, W) or None, dw (F, C, HH, WW), db (F,) or None)."""
    x, w, stride, pad, has_bias = saved
    xp = get_array_module(dout, x, w)
    n, channels, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height, out_width = dout.shape[2:]
    dout3 = dout.reshape(n, filters, out_height * out_width)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    x_padded = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = _im2col_xp(x_padded, filter_height, filter_width, stride, out_height, out_width)
    dw = xp.tensordot(dout3, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
    if not need_dx:
        return None, dw, db
    dcols = xp.matmul(w.reshape(filters, -1).T, dout3).reshape(
        n, channels, filter_height * filter_width, out_height, out_width)
    dx_padded = xp.zeros(x_padded.shape, dtype=dout.dtype)
    for tap in range(filter_height * filter_width):
        rows, cols_ = _tap_slices(tap // filter_width, tap % filter_width, out_height,
                                  out_width, stride)
        dx_padded[:, :, rows, cols_] += dcols[:, :, tap]
    return xp.ascontiguousarray(dx_padded[:, :, pad:pad + height, pad:pad + width]), dw, db


# -- Numba ----------------------------------------------------------------------
# Activations live channels-last (N, H, W, C) in memory and are handed out
# as (N, C, H, W) views: then every pixel's channels are one contiguous
# vector, the im2col rows are contiguous copies of them, and the product of
# the columns with the filters writes the next layer's channels-last rows
# directly. Any other input layout is copied to channels-last once.
#
# A convolution runs over chunks of images: im2col of one chunk (Numba) and
# one sgemm on it (numpy's BLAS), or the Winograd tiles of one chunk (winograd.py)
# for the 3x3 stride-1 convs. No full-batch column buffer exists: the
# backward pass rebuilds each chunk's columns (or tiles), which costs less
# than keeping them (9x the input for a 3x3 filter, 4x as tiles).


def _chunk_images(n, rows_per_image, row_bytes):
    """Images per chunk: the column buffer within CONV_CHUNK_BYTES (_numba.py), at least one."""
    return max(1, min(n, _numba.CONV_CHUNK_BYTES // max(1, rows_per_image * row_bytes)))


@_jit
def _im2col(x, channels, width, filter_height, filter_width, stride, pad, out_height, out_width,
            cols):
    """x (n, H, W*C) -> cols (n*H'*W', HH*WW*C): a row per output pixel, taps (i, j, c).

    Zero padding is implicit. A filter row whose window lies inside the image
    is one contiguous run of WW*C values: one copy; only edge windows go tap by tap.
    """
    height = x.shape[1]
    run = filter_width * channels
    row = 0
    for image in range(x.shape[0]):
        for oy in range(out_height):
            for ox in range(out_width):
                x0 = ox * stride - pad
                inside = x0 >= 0 and x0 + filter_width <= width
                for i in range(filter_height):
                    y = oy * stride - pad + i
                    k = i * run
                    if y < 0 or y >= height:
                        for t in range(run):
                            cols[row, k + t] = 0
                    elif inside:
                        base = x0 * channels
                        for t in range(run):
                            cols[row, k + t] = x[image, y, base + t]
                    else:
                        for j in range(filter_width):
                            xx = x0 + j
                            if 0 <= xx < width:
                                for c in range(channels):
                                    cols[row, k + j * channels + c] = x[image, y, xx * channels + c]
                            else:
                                for c in range(channels):
                                    cols[row, k + j * channels + c] = 0
                row += 1


@_jit
def _col2im(dcols, channels, width, filter_height, filter_width, stride, pad, out_height,
            out_width, dx):
    """The adjoint of _im2col: dx (n, H, W*C) = the sum of the column entries read from each value."""
    height = dx.shape[1]
    run = filter_width * channels
    dx[:] = 0
    row = 0
    for image in range(dx.shape[0]):
        for oy in range(out_height):
            for ox in range(out_width):
                x0 = ox * stride - pad
                inside = x0 >= 0 and x0 + filter_width <= width
                for i in range(filter_height):
                    y = oy * stride - pad + i
                    k = i * run
                    if y < 0 or y >= height:
                        continue
                    if inside:
                        base = x0 * channels
                        for t in range(run):
                            dx[image, y, base + t] += dcols[row, k + t]
                    else:
                        for j in range(filter_width):
                            xx = x0 + j
                            if 0 <= xx < width:
                                for c in range(channels):
                                    dx[image, y, xx * channels + c] += dcols[row, k + j * channels + c]
                row += 1


def _conv_shapes(x_nhwc, w_shape, stride, pad):
    n, height, width, channels = x_nhwc.shape
    _, _, filter_height, filter_width = w_shape
    out_height = conv_output_size(height, filter_height, stride, pad)
    out_width = conv_output_size(width, filter_width, stride, pad)
    pixels = out_height * out_width
    depth = filter_height * filter_width * channels
    step = _chunk_images(n, pixels, depth * x_nhwc.itemsize)
    return out_height, out_width, pixels, depth, step


def _conv_operands(x, w, b):
    """-> (x as a C-contiguous (N, H, W, C), w as (HH*WW*C, F) in x's dtype, row order
    (i, j, c) as _im2col lays out a column row, b in x's dtype or None)."""
    x_nhwc = _channels_last(x)
    dtype = x_nhwc.dtype
    w_mat = np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=dtype).reshape(-1, w.shape[0])
    return x_nhwc, w_mat, (None if b is None else b.astype(dtype, copy=False))


@conv_forward.register("numpy")
def conv_forward_numba(x, w, b, stride, pad):
    """x (N, C, H, W) any strides, w (F, C, HH, WW), b (F,) or None -> (out, saved).

    out is an (N, F, H', W') view of channels-last memory.
    """
    x_nhwc, w_mat, bias = _conv_operands(x, w, b)
    n, channels = x_nhwc.shape[0], x_nhwc.shape[3]
    filters, _, filter_height, filter_width = w.shape
    out_height, out_width, pixels, depth, step = _conv_shapes(x_nhwc, w.shape, stride, pad)
    dtype = x_nhwc.dtype
    if _winograd_fits(w.shape, stride, pad, (out_height, out_width)):
        out = _winograd_forward(x_nhwc, w_mat, bias)
        return out.transpose(0, 3, 1, 2), (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    out = np.empty((n, out_height, out_width, filters), dtype=dtype)
    out_rows = out.reshape(n * pixels, filters)
    x_rows = x_nhwc.reshape(n, x_nhwc.shape[1], -1)  # (N, H, W*C): a pixel row per image row
    buffers = {}

    def work(start, stop, worker):
        if worker not in buffers:
            buffers[worker] = np.empty((step * pixels, depth), dtype=dtype)
        chunk_cols = buffers[worker][:(stop - start) * pixels]
        _im2col(x_rows[start:stop], channels, x_nhwc.shape[2], filter_height, filter_width, stride,
                pad, out_height, out_width, chunk_cols)
        chunk_out = out_rows[start * pixels:stop * pixels]
        np.matmul(chunk_cols, w_mat, out=chunk_out)
        if bias is not None:
            chunk_out += bias

    _run_chunks(work, n, step)
    saved = (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    return out.transpose(0, 3, 1, 2), saved


@conv_backward.register("numpy")
def conv_backward_numba(dout, saved, need_dx=True):
    """dout (N, F, H', W') any strides -> (dx (N, C, H, W) view or None, dw, db or None).

    Per chunk: the columns rebuilt (dw = columns^T dout), and the columns'
    gradient dout w^T back through col2im into dx. (dx as the convolution of
    dout with the flipped filters, an im2col of dout instead of the col2im,
    measured 0-45% slower on the reference net's layers: its im2col is F/C
    times wider.)
    """
    x_nhwc, w_mat, w_shape, stride, pad, has_bias = saved
    filters, channels, filter_height, filter_width = w_shape
    n = x_nhwc.shape[0]
    dtype = x_nhwc.dtype
    out_height, out_width, pixels, depth, step = _conv_shapes(x_nhwc, w_shape, stride, pad)
    dout_nhwc = _channels_last(dout).astype(dtype, copy=False)
    if _winograd_fits(w_shape, stride, pad, (out_height, out_width)):
        dx, dw_mat, db = _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias)
        return (None if dx is None else dx.transpose(0, 3, 1, 2)), _filters_from_matrix(
            dw_mat, w_shape), db
    dout_rows = dout_nhwc.reshape(n * pixels, filters)
    dx = np.empty_like(x_nhwc) if need_dx else None
    height, width = x_nhwc.shape[1:3]
    x_rows = x_nhwc.reshape(n, height, width * channels)
    dx_rows = None if dx is None else dx.reshape(n, height, width * channels)
    w_mat_t = w_mat.T
    partial = {}  # worker -> (dw sum, db sum, dw of one chunk, column buffer)

    def work(start, stop, worker):
        state = partial.get(worker)
        if state is None:
            state = partial[worker] = (
                np.zeros((depth, filters), dtype=dtype), np.zeros(filters, dtype=dtype),
                np.empty((depth, filters), dtype=dtype), np.empty((step * pixels, depth), dtype=dtype))
        dw_sum, db_sum, dw_chunk, cols = state
        chunk_cols = cols[:(stop - start) * pixels]
        chunk_dout = dout_rows[start * pixels:stop * pixels]
        _im2col(x_rows[start:stop], channels, width, filter_height, filter_width, stride, pad,
                out_height, out_width, chunk_cols)
        np.matmul(chunk_cols.T, chunk_dout, out=dw_chunk)
        dw_sum += dw_chunk
        if has_bias:
            db_sum += chunk_dout.sum(axis=0)
        if need_dx:
            np.matmul(chunk_dout, w_mat_t, out=chunk_cols)  # the columns' gradient, in place
            _col2im(chunk_cols, channels, width, filter_height, filter_width, stride, pad,
                    out_height, out_width, dx_rows[start:stop])

    _run_chunks(work, n, step)
    states = [partial[worker] for worker in sorted(partial)]
    dw_mat, db = states[0][0], states[0][1] if has_bias else None
    for state in states[1:]:  # the workers' partial sums, in worker order (deterministic)
        dw_mat += state[0]
        if has_bias:
            db += state[1]
    return (None if dx is None else dx.transpose(0, 3, 1, 2)), _filters_from_matrix(
        dw_mat, w_shape), db


def _filters_from_matrix(w_mat, w_shape):
    """(HH*WW*C, F), taps (i, j, c) -> a C-contiguous (F, C, HH, WW)."""
    filters, channels, filter_height, filter_width = w_shape
    return np.ascontiguousarray(
        w_mat.reshape(filter_height, filter_width, channels, filters).transpose(3, 2, 0, 1))


# -- CuPy -----------------------------------------------------------------------
# CuPy 14 has no cuDNN: a convolution is an im2col RawKernel plus one
# cupy.matmul per chunk of images, its backward a product and a col2im
# kernel that gathers (one thread per input element, no atomics). Inputs
# are read through their strides (any view, channels-last included); conv
# outputs are channels-last memory seen as (N, F, H', W'), as on numpy.
# Each kernel is compiled for float and double on first use (_cupy._raw_kernel).
CUPY_CHUNK_BYTES = 256 << 20  # column buffer per chunk

CONV_SOURCE = r"""
extern "C" __global__ void fastnn_im2col_{T}(
        const {T}* x, long long sn, long long sc, long long sh, long long sw,
        int channels, int height, int width, int filter_height, int filter_width,
        int stride, int pad, int out_height, int out_width, int first_image,
        {T}* cols, long long total) {{
    // cols (rows, C*HH*WW), a row per output pixel, taps ordered (c, i, j) as w.reshape(F, -1)
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int taps = filter_height * filter_width;
    const int depth = channels * taps;
    long long row = idx / depth;
    int k = (int)(idx % depth);
    int c = k / taps, i = (k % taps) / filter_width, j = k % filter_width;
    int pixels = out_height * out_width;
    long long n = row / pixels + first_image;
    int p = (int)(row % pixels);
    int y = (p / out_width) * stride - pad + i;
    int xx = (p % out_width) * stride - pad + j;
    cols[idx] = (y >= 0 && y < height && xx >= 0 && xx < width)
        ? x[n * sn + c * sc + y * sh + xx * sw] : ({T})0;
}}

extern "C" __global__ void fastnn_col2im_{T}(
        const {T}* dcols, int channels, int height, int width, int filter_height,
        int filter_width, int stride, int pad, int out_height, int out_width, {T}* dx,
        long long total) {{
    // dx (n, C, H, W) contiguous: each element sums the column entries that read it
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int xx = (int)(idx % width);
    int y = (int)((idx / width) % height);
    int c = (int)((idx / ((long long)width * height)) % channels);
    long long n = idx / ((long long)width * height * channels);
    const int taps = filter_height * filter_width;
    const long long depth = (long long)channels * taps;
    {T} sum = 0;
    for (int i = 0; i < filter_height; ++i) {{
        int ty = y + pad - i;
        if (ty < 0 || ty % stride) continue;
        int oy = ty / stride;
        if (oy >= out_height) continue;
        for (int j = 0; j < filter_width; ++j) {{
            int tx = xx + pad - j;
            if (tx < 0 || tx % stride) continue;
            int ox = tx / stride;
            if (ox >= out_width) continue;
            long long row = (n * out_height + oy) * out_width + ox;
            sum += dcols[row * depth + (c * filter_height + i) * filter_width + j];
        }}
    }}
    dx[idx] = sum;
}}
"""


def _conv_chunk(n, rows_per_image, row_bytes):
    return max(1, min(n, CUPY_CHUNK_BYTES // max(1, rows_per_image * row_bytes)))


@conv_forward.register("cupy")
def conv_forward_cupy(x, w, b, stride, pad):
    import cupy

    n, channels, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height = conv_output_size(height, filter_height, stride, pad)
    out_width = conv_output_size(width, filter_width, stride, pad)
    pixels, depth = out_height * out_width, channels * filter_height * filter_width
    w_mat = w.reshape(filters, depth).astype(x.dtype, copy=False)
    out_rows = cupy.empty((n * pixels, filters), dtype=x.dtype)
    step = _conv_chunk(n, pixels, depth * x.itemsize)
    cols = cupy.empty((step * pixels, depth), dtype=x.dtype)
    geometry = tuple(np.int32(v) for v in (channels, height, width, filter_height, filter_width,
                                            stride, pad, out_height, out_width))
    for start in range(0, n, step):
        rows = (min(n, start + step) - start) * pixels
        _launch(CONV_SOURCE, "im2col", x.dtype, rows * depth, x, *_element_strides(x),
                *geometry, np.int32(start), cols)
        cupy.matmul(cols[:rows], w_mat.T, out=out_rows[start * pixels:start * pixels + rows])
    if b is not None:
        out_rows += b.astype(x.dtype, copy=False)
    out = out_rows.reshape(n, out_height, out_width, filters).transpose(0, 3, 1, 2)
    return out, (x, w_mat, w.shape, stride, pad, b is not None)


@conv_backward.register("cupy")
def conv_backward_cupy(dout, saved, need_dx=True):
    import cupy

    x, w_mat, w_shape, stride, pad, has_bias = saved
    n, channels, height, width = x.shape
    filters, _, filter_height, filter_width = w_shape
    out_height, out_width = dout.shape[2:]
    pixels, depth = out_height * out_width, w_mat.shape[1]
    dout_rows = cupy.ascontiguousarray(dout.transpose(0, 2, 3, 1)).reshape(n * pixels, filters)
    db = dout_rows.sum(axis=0) if has_bias else None
    dw = cupy.zeros((filters, depth), dtype=x.dtype)
    dx = cupy.empty((n, channels, height, width), dtype=x.dtype) if need_dx else None
    step = _conv_chunk(n, pixels, depth * x.itemsize)
    cols = cupy.empty((step * pixels, depth), dtype=x.dtype)
    geometry = tuple(np.int32(v) for v in (channels, height, width, filter_height, filter_width,
                                            stride, pad, out_height, out_width))
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = (stop - start) * pixels
        chunk_dout = dout_rows[start * pixels:start * pixels + rows]
        _launch(CONV_SOURCE, "im2col", x.dtype, rows * depth, x, *_element_strides(x),
                *geometry, np.int32(start), cols)
        dw += chunk_dout.T @ cols[:rows]
        if need_dx:
            cupy.matmul(chunk_dout, w_mat, out=cols[:rows])
            _launch(CONV_SOURCE, "col2im", x.dtype, (stop - start) * channels * height * width,
                    cols, *geometry, dx[start:stop])
    return dx, dw.reshape(w_shape), db
