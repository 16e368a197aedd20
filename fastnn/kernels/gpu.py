"""CuPy kernels for the cupy backend: the same ops, names and results as reference.py.

NOT YET RUN ON A GPU: written without one (see the GPU-speed issue). The
tests in tests/test_kernels.py compare every op here with the reference on
cupy; `bash benchmarks/gpu_check.sh` runs them. Ops not defined here (the
losses, batchnorm, augmentation, the stacked ops) use the reference code.

Each kernel is an ElementwiseKernel built on first use and cached
(`_kernel`), so importing this module does not touch CuPy. They are compiled
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
