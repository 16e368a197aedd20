"""Activations: relu, gelu and dropout (a stack's per-member dropout too).

Each op: its reference (plain xp, the declaration), its Numba version and its
CuPy version, in that order.
"""
import math

import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels import _cupy
from fastnn.kernels._numba import (_GOLDEN, _UNIT_SHIFT, _flat, _jit, _jit_float32,
                                   _jit_inline, _mix64, elementwise_binary, elementwise_unary,
                                   intrinsic, ir, overload, types)
from fastnn.kernels.registry import declare
from fastnn.kernels.rng import (GOLDEN, UNIT_BITS, dropout_key, dropout_keep, dropout_step_term,
                                keep_threshold, mix64)


# -- relu --------------------------------------------------------------------
@declare()
def relu_forward(x):
    """max(x, 0), same shape and dtype."""
    xp = get_array_module(x)
    return xp.maximum(x, x.dtype.type(0))


@declare(data_args=2)
def relu_backward(dout, out):
    """dout where the forward output was positive, else 0."""
    xp = get_array_module(dout, out)
    return xp.where(out > 0, dout, dout.dtype.type(0))


@_jit
def _relu_forward(x, out):
    for i in range(x.size):
        v = x[i]
        # only positive values (subnormals too) and NaN (as np.maximum keeps it)
        # pass; the form of the CuPy relu below, which must not let a flushed
        # negative subnormal through
        out[i] = v if (v > 0 or v != v) else 0


@_jit
def _relu_backward(dout, out, dx):
    for i in range(dout.size):
        dx[i] = dout[i] if out[i] > 0 else 0


@relu_forward.register("numpy")
def relu_forward_numba(x):
    return elementwise_unary(_relu_forward, x)


@relu_backward.register("numpy")
def relu_backward_numba(dout, out):
    return elementwise_binary(_relu_backward, dout, out)


_cupy._SOURCES.update({
    # CuPy compiles with -ftz=true, where `x < 0 ? 0 : x` may pass a negative
    # subnormal through; this form keeps NaN (as np.maximum does) and lets
    # only positive values through
    "relu_forward": ("T x", "T y", "y = (x > (T)0 || isnan(x)) ? x : (T)0"),
    "relu_backward": ("T dout, T out", "T dx", "dx = out > (T)0 ? dout : (T)0"),
})


@relu_forward.register("cupy")
def relu_forward_cupy(x):
    return _cupy._kernel("relu_forward")(x)


@relu_backward.register("cupy")
def relu_backward_cupy(dout, out):
    return _cupy._kernel("relu_backward")(dout, out)


# -- gelu: exact, x * Phi(x) with erf (PyTorch's approximate="none", airbench's) ----
_SQRT_HALF = 0.7071067811865476       # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327    # 1 / sqrt(2 pi)


def erf(xp, x):
    """erf of x element-wise on xp, in x's dtype: numpy has none (math.erf per element,
    in float64); cupy has cupyx.scipy.special.erf."""
    if xp is np:
        return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype, copy=False)
    import cupyx.scipy.special

    return cupyx.scipy.special.erf(x)


def gelu_xp(xp, x):
    """x * Phi(x) on xp (the references' gelu, shared with the fused batchnorm + gelu)."""
    half = x.dtype.type(0.5)
    return x * (half + half * erf(xp, x * x.dtype.type(_SQRT_HALF)))


def gelu_grad_xp(xp, x):
    """d gelu / dx = Phi(x) + x phi(x) on xp."""
    half = x.dtype.type(0.5)
    return (half + half * erf(xp, x * x.dtype.type(_SQRT_HALF))
            + x * x.dtype.type(_INV_SQRT_2PI) * xp.exp(-half * x * x))


@declare()
def gelu_forward(x):
    """x * Phi(x) (Phi the standard normal CDF, through erf), same shape and dtype."""
    return gelu_xp(get_array_module(x), x)


@declare(data_args=2)
def gelu_backward(dout, x):
    """dout * (Phi(x) + x phi(x)); x is the forward's input."""
    xp = get_array_module(dout, x)
    return dout * gelu_grad_xp(xp, x)


# -- the Numba kernels' scalar gelu: float32 through a polynomial erf and exp that LLVM
# vectorises (libm's erf and exp are scalar calls here: no SVML), float64 through libm
def _f32(*values):
    return tuple(np.float32(v) for v in values)


# Eigen's (and XLA's) float erf: x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in float32
# beyond; at +-4 this gives exactly +-1, so gelu(-40) is 0 and gelu(-inf) NaN, as the
# reference). Measured over every float32 input: within 3.3e-7 of erf (6.9e-8 in exact
# arithmetic, the rest float32 rounding), so gelu within 2.7e-7 |x| and its gradient within
# 2.3e-7 (the contract: 1e-6 of the largest magnitude; tests/test_kernels.py)
_P13, _P11, _P9, _P7, _P5, _P3, _P1 = _f32(
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_Q8, _Q6, _Q4, _Q2, _Q0 = _f32(-1.45660718464996e-05, -2.13374055278905e-04,
                               -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02)
# Cephes' expf: exp(t) = 2^n exp(r), n = round(t / ln 2), |r| <= ln(2) / 2, ln 2 in two parts
_E7, _E6, _E5, _E4, _E3, _E2 = _f32(1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                    4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LOG2E, _LN2_HI, _LN2_LO = _f32(1.4426950408889634, 0.693359375, -2.12194440e-4)
_ROUND = np.float32(1.5 * 2 ** 23)  # x + _ROUND - _ROUND rounds x (|x| < 2^22) to an integer
_EXP_MIN = np.float32(-87.0)        # exp below this: 0 (2^n stays a normal number above it)
_ZERO, _HALF, _ONE, _FOUR = _f32(0, 0.5, 1, 4)
_SQRT_HALF_F32, _INV_SQRT_2PI_F32 = _f32(_SQRT_HALF, _INV_SQRT_2PI)


@intrinsic
def _pow2_float32(typingctx, n):
    """2^n for an integral float32 n in [-126, 127], its bits made directly (vectorises)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        exponent = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(exponent, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


# inlined where they are called (Numba IR): LLVM's own inliner left the backward's erf and exp
# a call per value, which does not vectorise
@_jit_inline
def _erf_float32(v):
    # NaN fails both comparisons and stays NaN
    x = _FOUR if v > _FOUR else v
    x = -_FOUR if x < -_FOUR else x
    x2 = x * x
    p = ((((((_P13 * x2 + _P11) * x2 + _P9) * x2 + _P7) * x2 + _P5) * x2 + _P3) * x2 + _P1)
    q = (((_Q8 * x2 + _Q6) * x2 + _Q4) * x2 + _Q2) * x2 + _Q0
    return x * p / q


@_jit_inline
def _exp_nonpositive_float32(t):
    """exp(t) for t <= 0 (-inf and anything below -87 give 0; NaN gives 0 too)."""
    clamped = t if t >= _EXP_MIN else _EXP_MIN
    n = (clamped * _LOG2E + _ROUND) - _ROUND
    r = (clamped - n * _LN2_HI) - n * _LN2_LO
    y = ((((_E7 * r + _E6) * r + _E5) * r + _E4) * r + _E3) * r + _E2
    e = (y * (r * r) + r + _ONE) * _pow2_float32(n)
    return e if t >= _EXP_MIN else _ZERO


@_jit_inline
def _gelu_float32(v):
    return v * (_HALF + _HALF * _erf_float32(v * _SQRT_HALF_F32))


@_jit_inline
def _gelu_grad_float32(v):
    # NaN: Phi is NaN (the pdf term's 0 does not hide it); +-inf: inf * 0, NaN, as the reference
    return (_HALF + _HALF * _erf_float32(v * _SQRT_HALF_F32)
            + v * _INV_SQRT_2PI_F32 * _exp_nonpositive_float32(-_HALF * v * v))


def gelu_scalar(v):
    """gelu of one value inside a Numba kernel (here and the fused batchnorm + gelu), by its
    type (the overload below); this body is the float64 one, through libm's erf."""
    return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))


def gelu_grad_scalar(v):
    """d gelu / dx of one value inside a Numba kernel; this body is the float64 one."""
    return 0.5 * (1.0 + math.erf(v * _SQRT_HALF)) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)


_gelu_float64, _gelu_grad_float64 = _jit(gelu_scalar), _jit(gelu_grad_scalar)


# chosen by the value's type when a kernel compiles: float32 the vectorising one
@overload(gelu_scalar, inline="always")
def _gelu_scalar_typed(v):
    gelu = _gelu_float32 if v == types.float32 else _gelu_float64
    return lambda v: gelu(v)


@overload(gelu_grad_scalar, inline="always")
def _gelu_grad_scalar_typed(v):
    grad = _gelu_grad_float32 if v == types.float32 else _gelu_grad_float64
    return lambda v: grad(v)


@_jit_float32
def _gelu_forward(x, out):
    for i in range(x.size):
        out[i] = gelu_scalar(x[i])


@_jit_float32
def _gelu_backward(dout, x, dx):
    for i in range(dout.size):
        dx[i] = dout[i] * gelu_grad_scalar(x[i])


@gelu_forward.register("numpy")
def gelu_forward_numba(x):
    return elementwise_unary(_gelu_forward, x)


@gelu_backward.register("numpy")
def gelu_backward_numba(dout, x):
    return elementwise_binary(_gelu_backward, dout, x)


# erf of float or double (CUDA's overloads); literals cast to T so float stays float
_cupy._SOURCES.update({
    "gelu_forward": ("T x", "T y",
                     f"y = x * ((T)0.5 + (T)0.5 * erf(x * (T){_SQRT_HALF}))"),
    "gelu_backward": ("T dout, T x", "T dx",
                      f"dx = dout * ((T)0.5 + (T)0.5 * erf(x * (T){_SQRT_HALF})"
                      f" + x * (T){_INV_SQRT_2PI} * exp((T)-0.5 * x * x))"),
})


@gelu_forward.register("cupy")
def gelu_forward_cupy(x):
    return _cupy._kernel("gelu_forward")(x)


@gelu_backward.register("cupy")
def gelu_backward_cupy(dout, x):
    return _cupy._kernel("gelu_backward")(dout, x)


# -- dropout: its mask a pure function of (seed, step, position) (fastnn.kernels.rng)
@declare()
def dropout_forward(x, p, seed, step):
    """Inverted dropout: x * keep / (1 - p); x any shape."""
    xp = get_array_module(x)
    keep = dropout_keep(xp, x.size, seed, step, p).reshape(x.shape)
    return xp.where(keep, x * x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0))


@declare()
def dropout_backward(dout, p, seed, step):
    """Gradient of dropout_forward: the same mask and scale applied to dout."""
    return dropout_forward(dout, p, seed, step)


@_jit
def _dropout(x, out, key, threshold, scale):
    for i in range(x.size):
        z = _mix64(np.uint64(i) * _GOLDEN + key)
        out[i] = x[i] * scale if (z >> _UNIT_SHIFT) >= threshold else 0


@dropout_forward.register("numpy")
def dropout_forward_numba(x, p, seed, step):
    # step: an int or a 0-d array (host memory here: int() reads it at call time)
    out = np.empty(x.shape, dtype=x.dtype)
    _dropout(_flat(x), out.reshape(-1), np.uint64(dropout_key(seed, int(step))),
             np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))
    return out


@dropout_backward.register("numpy")
def dropout_backward_numba(dout, p, seed, step):
    return dropout_forward_numba(dout, p, seed, step)


# i is the element's C-order position, as in rng.dropout_keep
_cupy._SOURCES["dropout"] = ("T x, uint64 key, uint64 threshold, T scale", "T y",
                             _cupy._HASH + "y = keep ? x * scale : (T)0;")


@dropout_forward.register("cupy")
def dropout_forward_cupy(x, p, seed, step):
    # step a 0-d device array (the Solver's step counter): the key is a 0-d device
    # array too, which the kernel broadcasts (no device read)
    key = dropout_key(seed, step)
    return _cupy._kernel("dropout")(x, np.uint64(key) if isinstance(key, int) else key,
                                    np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))


@dropout_backward.register("cupy")
def dropout_backward_cupy(dout, p, seed, step):
    return dropout_forward_cupy(dout, p, seed, step)


# -- stacked dropout (fastnn.stacked): K members along a model axis, each its own mask
# Member k's dropout mask is the one dropout_keep draws for its own
# (seed_k, step) over its own (N, H) activation in C order, so a member of
# a stack drops exactly the units the same net trained alone would drop.
# The per-member key is split: `dropout_seed_keys` (host, once per stack)
# and the step term added on the device, so a step sends nothing to the GPU
# (both in fastnn.kernels.rng).
@declare()
def dropout_stacked_forward(x, seed_keys, thresholds, scales, step):
    """Inverted dropout of K members' activations, each member with its own mask.

    x (N, K, H), any strides: member k's activation is x[:, k, :].
    seed_keys (K,) uint64 (dropout_seed_keys of the members' seeds),
    thresholds (K,) uint64 (keep_threshold(p_k); 0 keeps every unit),
    scales (K,) of x.dtype (1 / (1 - p_k)). Returns out (N, K, H).
    """
    xp = get_array_module(x, seed_keys, thresholds, scales)
    n, _, width = x.shape
    term = dropout_step_term(step)
    keys = mix64(seed_keys + (xp.uint64(term) if isinstance(term, int) else term), xp)
    positions = (xp.arange(n, dtype=xp.uint64)[:, None, None] * xp.uint64(width)
                 + xp.arange(width, dtype=xp.uint64)[None, None, :])
    z = mix64(positions * xp.uint64(GOLDEN) + keys[None, :, None], xp)
    keep = (z >> xp.uint64(64 - UNIT_BITS)) >= thresholds[None, :, None]
    return xp.where(keep, x * scales[None, :, None], x.dtype.type(0))


@declare()
def dropout_stacked_backward(dout, seed_keys, thresholds, scales, step):
    """Gradient of dropout_stacked_forward: the same masks and scales applied to dout."""
    return dropout_stacked_forward(dout, seed_keys, thresholds, scales, step)


@_jit
def _dropout_stacked(x, out, seed_keys, step_term, thresholds, scales):
    members, width, n = x.shape  # C-contiguous (K, H, N): the stack's activation layout
    for k in range(members):
        key = _mix64(seed_keys[k] + step_term)
        threshold, scale = thresholds[k], scales[k]
        for j in range(width):
            for i in range(n):  # positions are C order over member k's (N, H)
                z = _mix64(np.uint64(i * width + j) * _GOLDEN + key)
                out[k, j, i] = x[k, j, i] * scale if (z >> _UNIT_SHIFT) >= threshold else 0


@dropout_stacked_forward.register("numpy")
def dropout_stacked_forward_numba(x, seed_keys, thresholds, scales, step):
    """x (N, K, H), any strides; the result is laid out (K, H, N) in memory, as the stack's."""
    # The stack passes a (K, H, N) array viewed as (N, K, H): this is then no copy,
    # and the kernel sees contiguous rows (an any-strides kernel ran 10x slower).
    x_khn = np.ascontiguousarray(x.transpose(1, 2, 0))
    out = np.empty_like(x_khn)
    _dropout_stacked(x_khn, out, np.ascontiguousarray(seed_keys, dtype=np.uint64),
                     np.uint64(dropout_step_term(int(step))),
                     np.ascontiguousarray(thresholds, dtype=np.uint64),
                     np.ascontiguousarray(scales, dtype=x.dtype))
    return out.transpose(2, 0, 1)


@dropout_stacked_backward.register("numpy")
def dropout_stacked_backward_numba(dout, seed_keys, thresholds, scales, step):
    return dropout_stacked_forward_numba(dout, seed_keys, thresholds, scales, step)
