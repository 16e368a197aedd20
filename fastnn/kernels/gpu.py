"""CuPy kernels for the cupy backend: the same ops, names and results as reference.py.

NOT YET RUN ON A GPU: written without one (see the GPU-speed issue). The
tests in tests/test_kernels.py compare every op here with the reference on
cupy; `bash benchmarks/gpu_check.sh` runs them. Ops not defined here (the
SVM loss, batchnorm, augmentation, the stacked ops) use the reference code.

Each kernel is an ElementwiseKernel (RawKernel for the softmax loss) built
on first use and cached, so importing this module does not touch CuPy. They are compiled
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
        const long long c, {T}* dx, double* row_loss) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const {T}* xi = x + i * c;
    {T}* di = dx + i * c;
    const long long label = y[i];
    const double inv_n = 1.0 / (double)n, off = smoothing / (double)c, on = 1.0 - smoothing;
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
    """cpu.py's softmax loss on the device: (loss 0-d of x.dtype, dx (N, C)); no sync."""
    import cupy

    x = cupy.ascontiguousarray(x)
    n, c = x.shape
    dx = cupy.empty_like(x)
    row_loss = cupy.empty(n, dtype=np.float64)
    threads = 128
    kernel = _softmax_loss_kernel("float" if x.dtype == np.float32 else "double")
    kernel(((n + threads - 1) // threads,), (threads,),
           (x, cupy.ascontiguousarray(y, dtype=np.int64), np.float64(smoothing), np.int64(n),
            np.int64(c), dx, row_loss))
    return (row_loss.sum() / max(n, 1)).astype(x.dtype), dx
