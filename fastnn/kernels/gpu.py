"""CuPy kernels for the cupy backend: the same ops, names and results as reference.py.

NOT YET RUN ON A GPU: written without one (see the GPU-speed issue). The
tests in tests/test_kernels.py compare every op here with the reference on
cupy; `bash benchmarks/gpu_check.sh` runs them. Ops not defined here (the
losses, batchnorm, augmentation, the stacked ops) use the reference code.

Each kernel is an ElementwiseKernel (in the convolution section a
RawKernel) built on first use and cached (`_kernel`, `_raw_kernel`), so
importing this module does not touch CuPy. They are compiled
with `--fmad=false`: a fused multiply-add would round differently from the
separate cupy operations of the reference and of fastnn.optim, and the
update rules must give the same parameters.
"""
import functools

import numpy as np

from fastnn.kernels.reference import GOLDEN, MIX1, MIX2, UNIT_BITS, dropout_key, keep_threshold

DTYPES = (np.float32, np.float64)  # other dtypes (float16) run reference.py (kernels/__init__)

_HASH = f"""
unsigned long long z = (unsigned long long)i * {GOLDEN}ULL + key;
z = (z ^ (z >> 30)) * {MIX1}ULL;
z = (z ^ (z >> 27)) * {MIX2}ULL;
z = z ^ (z >> 31);
const bool keep = (z >> {64 - UNIT_BITS}) >= threshold;
"""

_SOURCES = {
    "relu_forward": ("T x", "T y", "y = x < (T)0 ? (T)0 : x"),
    "relu_backward": ("T dout, T out", "T dx", "dx = out > (T)0 ? dout : (T)0"),
    # i is the element's C-order position, as in reference.dropout_keep
    "dropout": ("T x, uint64 key, uint64 threshold, T scale", "T y",
                _HASH + "y = keep ? x * scale : (T)0;"),
    "sgd": ("T dw, T lr", "T w", "w -= dw * lr"),
    "sgd_momentum": ("T dw, T lr, T momentum", "T w, T v",
                     "v = v * momentum - dw * lr; w += v"),
    "rmsprop": ("T dw, T lr, T decay, T one_minus_decay, T eps", "T w, T cache",
                "cache = cache * decay + one_minus_decay * (dw * dw);"
                "w -= lr * dw / (sqrt(cache) + eps)"),
    "adam": ("T dw, T decay, T lr, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
             "T c1, T c2, T eps", "T w, T m, T v",
             "m = m * beta1 + one_minus_beta1 * dw;"
             "v = v * beta2 + one_minus_beta2 * (dw * dw);"
             "w = w * decay - lr * (m / c1) / (sqrt(v / c2) + eps)"),
}


@functools.lru_cache(maxsize=None)
def _kernel(name):
    import cupy

    in_params, out_params, operation = _SOURCES[name]
    return cupy.ElementwiseKernel(in_params, out_params, operation, f"fastnn_{name}",
                                  options=("--fmad=false",))


def relu_forward(x):
    return _kernel("relu_forward")(x)


def relu_backward(dout, out):
    return _kernel("relu_backward")(dout, out)


def dropout_forward(x, p, seed, step):
    return _kernel("dropout")(x, np.uint64(dropout_key(seed, step)),
                              np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))


def dropout_backward(dout, p, seed, step):
    return dropout_forward(dout, p, seed, step)


def sgd_(w, dw, lr):
    _kernel("sgd")(dw, w.dtype.type(lr), w)


def sgd_momentum_(w, dw, v, lr, momentum):
    f = w.dtype.type
    _kernel("sgd_momentum")(dw, f(lr), f(momentum), w, v)


def rmsprop_(w, dw, cache, lr, decay_rate, eps):
    f = w.dtype.type
    _kernel("rmsprop")(dw, f(lr), f(decay_rate), f(1 - decay_rate), f(eps), w, cache)


def adamw_(w, dw, m, v, lr, beta1, beta2, eps, t, weight_decay):
    f = w.dtype.type
    _kernel("adam")(dw, f(1 - lr * weight_decay), f(lr), f(beta1), f(1 - beta1), f(beta2),
                    f(1 - beta2), f(1 - beta1 ** t), f(1 - beta2 ** t), f(eps), w, m, v)


def adam_(w, dw, m, v, lr, beta1, beta2, eps, t):
    adamw_(w, dw, m, v, lr, beta1, beta2, eps, t, 0.0)


# == convolution ==============================================================
# CuPy 14 has no cuDNN: a convolution is an im2col RawKernel plus one
# cupy.matmul per chunk of images, its backward a product and a col2im
# kernel that gathers (one thread per input element, no atomics). Inputs
# are read through their strides (any view, channels-last included); conv
# outputs are channels-last memory seen as (N, F, H', W'), as on numpy.
# Each kernel is compiled for float and double on first use (_raw_kernel).
CONV_CHUNK_BYTES = 256 << 20  # column buffer per chunk

_CONV_SOURCE = r"""
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

extern "C" __global__ void fastnn_max_pool_forward_{T}(
        const {T}* x, long long sn, long long sc, long long sh, long long sw, int channels,
        int pool_height, int pool_width, int stride, int out_height, int out_width,
        {T}* out, int* argmax, long long total) {{
    // out, argmax (N, C, H', W') contiguous; argmax: the window's first maximum, row-major
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
            if (v > best) {{ best = v; best_tap = i * pool_width + j; }}
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
_CONV_KERNELS = ("im2col", "col2im", "max_pool_forward", "max_pool_backward")


def conv_source(ctype):
    """The CUDA source of the convolution kernels for `ctype` ("float" or "double")."""
    return _CONV_SOURCE.format(T=ctype)


@functools.lru_cache(maxsize=None)
def _raw_kernel(name, dtype_name):
    import cupy

    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    return cupy.RawKernel(conv_source(ctype), f"fastnn_{name}_{ctype}")


def _launch(name, dtype, total, *args):
    """Run kernel `name` with one thread per element; every kernel takes `total` last."""
    threads = 256
    blocks = (int(total) + threads - 1) // threads
    if blocks:
        _raw_kernel(name, np.dtype(dtype).name)((blocks,), (threads,), args + (np.int64(total),))


def _element_strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def _conv_chunk(n, rows_per_image, row_bytes):
    return max(1, min(n, CONV_CHUNK_BYTES // max(1, rows_per_image * row_bytes)))


def conv_forward(x, w, b, stride, pad):
    import cupy

    n, channels, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height = 1 + (height + 2 * pad - filter_height) // stride
    out_width = 1 + (width + 2 * pad - filter_width) // stride
    pixels, depth = out_height * out_width, channels * filter_height * filter_width
    w_mat = w.reshape(filters, depth).astype(x.dtype, copy=False)
    out_rows = cupy.empty((n * pixels, filters), dtype=x.dtype)
    step = _conv_chunk(n, pixels, depth * x.itemsize)
    cols = cupy.empty((step * pixels, depth), dtype=x.dtype)
    geometry = tuple(np.int32(v) for v in (channels, height, width, filter_height, filter_width,
                                            stride, pad, out_height, out_width))
    for start in range(0, n, step):
        rows = (min(n, start + step) - start) * pixels
        _launch("im2col", x.dtype, rows * depth, x, *_element_strides(x), *geometry,
                np.int32(start), cols)
        cupy.matmul(cols[:rows], w_mat.T, out=out_rows[start * pixels:start * pixels + rows])
    if b is not None:
        out_rows += b.astype(x.dtype, copy=False)
    out = out_rows.reshape(n, out_height, out_width, filters).transpose(0, 3, 1, 2)
    return out, (x, w_mat, w.shape, stride, pad, b is not None)


def conv_backward(dout, saved, need_dx=True):
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
        _launch("im2col", x.dtype, rows * depth, x, *_element_strides(x), *geometry,
                np.int32(start), cols)
        dw += chunk_dout.T @ cols[:rows]
        if need_dx:
            cupy.matmul(chunk_dout, w_mat, out=cols[:rows])
            _launch("col2im", x.dtype, (stop - start) * channels * height * width, cols,
                    *geometry, dx[start:stop])
    return dx, dw.reshape(w_shape), db


def max_pool_forward(x, pool_height, pool_width, stride):
    import cupy

    n, channels, height, width = x.shape
    out_height = 1 + (height - pool_height) // stride
    out_width = 1 + (width - pool_width) // stride
    out = cupy.empty((n, channels, out_height, out_width), dtype=x.dtype)
    argmax = cupy.empty(out.shape, dtype=cupy.int32)
    _launch("max_pool_forward", x.dtype, out.size, x, *_element_strides(x), np.int32(channels),
            np.int32(pool_height), np.int32(pool_width), np.int32(stride), np.int32(out_height),
            np.int32(out_width), out, argmax)
    return out, (x.shape, argmax, pool_height, pool_width, stride)


def max_pool_backward(dout, saved):
    import cupy

    x_shape, argmax, pool_height, pool_width, stride = saved
    n, channels, height, width = x_shape
    dout = cupy.ascontiguousarray(dout)
    dx = cupy.empty(x_shape, dtype=dout.dtype)
    _launch("max_pool_backward", dout.dtype, dx.size, dout, argmax, np.int32(channels),
            np.int32(height), np.int32(width), np.int32(pool_height), np.int32(pool_width),
            np.int32(stride), np.int32(dout.shape[2]), np.int32(dout.shape[3]), dx)
    return dx
