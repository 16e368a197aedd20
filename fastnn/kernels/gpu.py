"""CuPy kernels for the cupy backend: the same ops, names and results as reference.py.

NOT YET RUN ON A GPU: written without one (see the GPU-speed issue). The
tests in tests/test_kernels.py compare every op here with the reference run by
numpy on host copies; `bash benchmarks/gpu_check.sh` runs them. Ops not defined here (the
SVM loss, batchnorm, augmentation, the stacked ops) use the reference code.

Each kernel is an ElementwiseKernel (RawKernel for the softmax loss and in
the convolution section) built on first use and cached (`_kernel`,
`_raw_kernel`), so importing this module does not touch CuPy. They are compiled
with `--fmad=false`: a fused multiply-add would round differently from the
separate cupy operations of the reference and of fastnn.optim, and the
update rules must give the same parameters. The norms (layernorm, groupnorm;
at the end) are one RawModule per dtype, also built on first use.
tests/test_kernels.py compile-checks the CUDA sources here with nvcc.
"""
import functools
import math

import numpy as np

from fastnn.kernels.reference import (GOLDEN, MIX1, MIX2, UNIT_BITS, conv_pool_ops, dropout_key,
                                     keep_threshold)

DTYPES = (np.float32, np.float64)  # other dtypes (float16) run reference.py (kernels/__init__)

_HASH = f"""
unsigned long long z = (unsigned long long)i * {GOLDEN}ULL + key;
z = (z ^ (z >> 30)) * {MIX1}ULL;
z = (z ^ (z >> 27)) * {MIX2}ULL;
z = z ^ (z >> 31);
const bool keep = (z >> {64 - UNIT_BITS}) >= threshold;
"""

_SOURCES = {
    # CuPy compiles with -ftz=true, where `x < 0 ? 0 : x` may pass a negative
    # subnormal through; this form keeps NaN (as np.maximum does) and lets
    # only positive values through
    "relu_forward": ("T x", "T y", "y = (x > (T)0 || isnan(x)) ? x : (T)0"),
    "relu_backward": ("T dout, T out", "T dx", "dx = out > (T)0 ? dout : (T)0"),
    # i is the element's C-order position, as in reference.dropout_keep
    "dropout": ("T x, uint64 key, uint64 threshold, T scale", "T y",
                _HASH + "y = keep ? x * scale : (T)0;"),
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
    # step a 0-d device array (the Solver's step counter): the key is a 0-d device
    # array too, which the kernel broadcasts (no device read)
    key = dropout_key(seed, step)
    return _kernel("dropout")(x, np.uint64(key) if isinstance(key, int) else key,
                              np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))


def dropout_backward(dout, p, seed, step):
    return dropout_forward(dout, p, seed, step)


# -- update rules: one formula each, the operations of reference.py in its order
# g is the gradient (dw, plus l2_k * w when l2 is given); w and the state
# are read and written; the scalars are named in optim.SPECS[rule].scalars order.
_RULES = {
    "sgd": ((), ("lr",), "w = w - g * lr;"),
    "sgd_momentum": (("v",), ("lr", "momentum"), "v = v * momentum - g * lr; w = w + v;"),
    "sgd_nesterov": (("v",), ("lr", "momentum"),
                     "v = v * momentum - g * lr; w = (w + momentum * v) - g * lr;"),
    "rmsprop": (("cache",), ("lr", "decay", "one_minus_decay", "eps"),
                "cache = cache * decay + one_minus_decay * (g * g);"
                "w = w - lr * g / (sqrt(cache) + eps);"),
    "adam": (("m", "v"), ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "c1",
                          "c2", "eps", "decay"),
             "m = m * beta1 + one_minus_beta1 * g;"
             "v = v * beta2 + one_minus_beta2 * (g * g);"
             "w = w * decay - lr * (m / c1) / (sqrt(v / c2) + eps);"),
}


def rule_source(rule, on_device):
    """(in_params, out_params, operation) of rule `rule`'s ElementwiseKernel.

    on_device[j]: scalar j is read from a device array (one value, or one
    per member of (A, K, B) blocks: member k of element i is (i / inner) % K)
    rather than passed as a kernel argument.
    """
    state, names, body = _RULES[rule]
    params, reads = ["T g"], []
    for name, device in zip(names, on_device):
        if device:
            params.append(f"raw T {name}_k")
            reads.append(f"const T {name} = {name}_k[(i / inner) % {name}_k.size()];")
        else:
            params.append(f"T {name}")
    params.append("int64 inner")
    return ", ".join(params), ", ".join(f"T {n}" for n in ("w", *state)), "".join(reads) + body


@functools.lru_cache(maxsize=None)
def _rule_kernel(rule, on_device):
    import cupy

    mask = "".join("d" if d else "s" for d in on_device)
    return cupy.ElementwiseKernel(*rule_source(rule, on_device), f"fastnn_{rule}_{mask}",
                                  options=("--fmad=false",))


def _update_op(rule):
    """The table op of one rule: reference.py's signature and results."""
    def op(w, dw, state, h, l2=None):
        import cupy

        sums = None
        if l2 is not None:  # blocks (A, K, B); the kernel then needs no reduction
            sums = cupy.einsum("akb,akb->k", w, w)
            dw = dw + l2.astype(w.dtype)[None, :, None] * w
        if hasattr(h, "shape"):  # scalar rows (H,) or (K, H): contiguous columns
            columns = cupy.ascontiguousarray(h.astype(w.dtype, copy=False).reshape(
                -1, h.shape[-1]).T)
            h = tuple(columns[j] for j in range(columns.shape[0]))
        on_device = tuple(not isinstance(v, (int, float)) for v in h)
        args = [cupy.asarray(v).astype(w.dtype, copy=False).reshape(-1) if device
                else w.dtype.type(v) for v, device in zip(h, on_device)]
        inner = w.shape[2] if w.ndim == 3 else w.size
        _rule_kernel(rule, on_device)(dw, *args, np.int64(inner), w, *state)
        return sums

    op.__name__ = op.__qualname__ = f"{rule}_"
    return op


sgd_ = _update_op("sgd")
sgd_momentum_ = _update_op("sgd_momentum")
sgd_nesterov_ = _update_op("sgd_nesterov")
rmsprop_ = _update_op("rmsprop")
adam_ = _update_op("adam")


# -- softmax loss: one thread per row, as cpu.py's loop (exp and sums in double)
SOFTMAX_LOSS_SOURCE = r"""
extern "C" __global__ void fastnn_softmax_loss_{T}(
        const {T}* x, const long long* y, const double smoothing, const long long n,
        const long long c, const double inv_n, {T}* dx, double* row_loss) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const {T}* xi = x + i * c;
    {T}* di = dx + i * c;
    const long long label = y[i];
    const double off = smoothing / (double)c, on = 1.0 - smoothing;
    if (label < 0 || label >= c) {  // unchecked labels: NaN, never an out-of-bounds read
        row_loss[i] = nan("");
        for (long long j = 0; j < c; ++j) di[j] = ({T})nan("");
        return;
    }
    {T} top = xi[0];
    for (long long j = 1; j < c; ++j) top = xi[j] > top ? xi[j] : top;
    double total = 0.0, shifted_sum = 0.0;
    for (long long j = 0; j < c; ++j) {
        const double shifted = (double)({T})(xi[j] - top);
        const double e = exp(shifted);
        di[j] = ({T})e;
        total += e;
        shifted_sum += shifted;
    }
    const double log_total = log(total);
    const double correct = (double)({T})(xi[label] - top);
    row_loss[i] = smoothing != 0.0 ? log_total - on * correct - off * shifted_sum
                                   : log_total - correct;
    const double scale = inv_n / total;
    for (long long j = 0; j < c; ++j) {  // rounded to T at each step, as cpu.py stores them
        {T} d = ({T})((double)di[j] * scale);
        if (smoothing != 0.0) d = ({T})((double)d - off * inv_n);
        di[j] = d;
    }
    di[label] = ({T})((double)di[label] - (smoothing != 0.0 ? on : 1.0) * inv_n);
}
"""


@functools.lru_cache(maxsize=None)
def _softmax_loss_kernel(type_name):
    import cupy

    source = SOFTMAX_LOSS_SOURCE.replace("{T}", type_name)
    return cupy.RawKernel(source, f"fastnn_softmax_loss_{type_name}", options=("--fmad=false",))


def softmax_loss(x, y, smoothing=0.0):
    """cpu.py's softmax loss on the device: (loss 0-d of x.dtype, dx (N, C)); no sync.

    Members: x (K, N, C) on shared labels -> (losses (K,), dx (K, N, C)).
    """
    import cupy

    members = x.shape[0] if x.ndim == 3 else None
    n, c = x.shape[-2:]
    x2d = cupy.ascontiguousarray(x).reshape(-1, c)
    y = cupy.ascontiguousarray(y, dtype=np.int64)
    if members is not None:
        y = cupy.tile(y, members)
    rows = x2d.shape[0]
    dx = cupy.empty_like(x2d)
    row_loss = cupy.empty(rows, dtype=np.float64)
    threads = 128
    kernel = _softmax_loss_kernel("float" if x.dtype == np.float32 else "double")
    kernel(((rows + threads - 1) // threads,), (threads,),
           (x2d, y, np.float64(smoothing), np.int64(rows), np.int64(c),
            np.float64(1.0 / max(n, 1)), dx, row_loss))
    if members is not None:
        losses = row_loss.reshape(members, n).sum(axis=1) / max(n, 1)
        return losses.astype(x.dtype), dx.reshape(x.shape)
    return (row_loss.sum() / max(n, 1)).astype(x.dtype), dx


# -- norms: layernorm and groupnorm -------------------------------------------
# One thread block per normalised row (a sample for layernorm, a sample's
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


def _empty_to_reference(op):
    """Empty inputs go to the reference op: a launch over zero rows is a CUDA error."""
    from fastnn.kernels import reference

    reference_op = getattr(reference, op.__name__)

    @functools.wraps(op)
    def wrapper(first, *args):
        return (reference_op if first.size == 0 else op)(first, *args)

    return wrapper


@_empty_to_reference
def layernorm_forward(x, gamma, beta, eps):
    n, d = x.shape
    return _norm_rows_forward(x, gamma, beta, eps, n, 1, d, 1)


@_empty_to_reference
def layernorm_backward(dout, x_hat, gamma, inv_std):
    n, d = dout.shape
    dx = _norm_rows_backward(dout, x_hat, gamma, inv_std, n, 1, d, 1)
    return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)


@_empty_to_reference
def groupnorm_forward(x, gamma, beta, groups, eps):
    n, c = x.shape[:2]
    out, x_hat, inv_std = _norm_rows_forward(x, gamma, beta, eps, n * groups, groups,
                                             c // groups, math.prod(x.shape[2:]))
    return out, x_hat, inv_std.reshape(n, groups)


@_empty_to_reference
def groupnorm_backward(dout, x_hat, gamma, inv_std, groups):
    n, c = dout.shape[:2]
    dx = _norm_rows_backward(dout, x_hat, gamma, inv_std, n * groups, groups, c // groups,
                             math.prod(dout.shape[2:]))
    return dx, (dout * x_hat).sum(axis=(0, 2, 3)), dout.sum(axis=(0, 2, 3))


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
    // out, argmax (N, C, H', W') contiguous; argmax: the window's first maximum, row-major,
    // or its first NaN, which then stays (np.argmax's rule, as reference.py's pool)
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


conv_pool_forward, conv_pool_backward = conv_pool_ops(conv_forward, conv_backward,
                                                      max_pool_forward, max_pool_backward)
