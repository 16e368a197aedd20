"""Fast convolution and max pooling: the naive layers' signatures and results, on fast kernels.

The numpy backend runs chunked channels-last Winograd F(2x2, 3x3) for 3x3
stride-1 convolutions of 8+ channels (with a following 2x2 pool fused in by
conv_pool_forward_fast) and im2col plus one sgemm per chunk for the others
(fastnn/kernels/conv.py, winograd.py, pool.py); the cupy backend im2col/pool
CUDA kernels plus `cupy.matmul` (the same modules). Inputs may be any strided
(N, C, H, W) view; the outputs are (N, C, H, W) views of channels-last memory on numpy,
which is the layout these layers read fastest, so a stack of them never
changes layout. A fast forward's cache goes to the fast backward.
"""
import types
from typing import NamedTuple

from fastnn import kernels
from fastnn.backend import get_array_module
from fastnn.kernels import reference
from fastnn.layers import (channels_last_rows, conv_geometry, from_channels_last_rows,
                           pool_geometry)


class _EmptyBatch(NamedTuple):
    """The cache of a fast forward on an empty batch (N = 0), which runs the reference op as
    the naive layer does: the fast kernels split the batch into chunks and have none."""
    saved: tuple


def conv_forward_fast(x, w, b, conv_param):
    """As conv_forward_naive: x (N, C, H, W), w (F, C, HH, WW), b (F,) -> out (N, F, H', W').

    b may be None (no bias; the backward's db is then None).
    """
    xp = get_array_module(x, w, b)
    stride, pad, _, _ = conv_geometry(x, w, b, conv_param, "conv_forward_fast")
    if x.shape[0] == 0:
        out, saved = reference.conv_forward(x, w, b, stride, pad)
        return out, _EmptyBatch(saved)
    return kernels.for_module(xp).conv_forward(x, w, b, stride, pad)


def conv_backward_fast(dout, cache, need_dx=True):
    """dout (N, F, H', W') -> (dx (N, C, H, W), dw (F, C, HH, WW), db (F,)).

    With need_dx=False (a first layer) dx is None and its product is skipped.
    """
    if isinstance(cache, _EmptyBatch):
        return reference.conv_backward(dout, cache.saved, need_dx)
    xp = get_array_module(dout)
    return kernels.for_module(xp).conv_backward(dout, cache, need_dx)


def conv_pool_forward_fast(x, w, b, conv_param, pool_param):
    """max_pool_forward_fast(conv_forward_fast(x, w, b, conv_param), pool_param) as one op
    -> (out (N, F, H'', W''), cache).

    On numpy a 3x3 stride-1 pad-1 conv (Winograd) with a 2x2 stride-2 pool pools each
    output tile as it is made; otherwise it is the two layers.
    """
    xp = get_array_module(x, w, b)
    stride, pad, out_height, out_width = conv_geometry(x, w, b, conv_param,
                                                       "conv_pool_forward_fast")
    conv_shape = (x.shape[0], w.shape[0], out_height, out_width)
    pool_height, pool_width, pool_stride = pool_geometry(
        types.SimpleNamespace(ndim=4, shape=conv_shape), pool_param, "conv_pool_forward_fast")
    pool = (pool_height, pool_width, pool_stride)
    if x.shape[0] == 0:
        out, saved = reference.conv_pool_forward(x, w, b, stride, pad, *pool)
        return out, _EmptyBatch(saved)
    return kernels.for_module(xp).conv_pool_forward(x, w, b, stride, pad, *pool)


def conv_pool_backward_fast(dout, cache, need_dx=True):
    """dout (N, F, H'', W'') -> (dx (N, C, H, W) or None, dw, db or None); need_dx as for
    conv_backward_fast."""
    if isinstance(cache, _EmptyBatch):
        return reference.conv_pool_backward(dout, cache.saved, need_dx)
    xp = get_array_module(dout)
    return kernels.for_module(xp).conv_pool_backward(dout, cache, need_dx)


def max_pool_forward_fast(x, pool_param):
    """As max_pool_forward_naive: x (N, C, H, W) -> out (N, C, H', W'), H' floored."""
    xp = get_array_module(x)
    pool_height, pool_width, stride = pool_geometry(x, pool_param, "max_pool_forward_fast")
    if x.shape[0] == 0:
        out, saved = reference.max_pool_forward(x, pool_height, pool_width, stride)
        return out, _EmptyBatch(saved)
    return kernels.for_module(xp).max_pool_forward(x, pool_height, pool_width, stride)


def max_pool_backward_fast(dout, cache):
    """dout (N, C, H', W') -> dx (N, C, H, W); gradient to each window's first maximum."""
    if isinstance(cache, _EmptyBatch):
        return reference.max_pool_backward(dout, cache.saved)
    xp = get_array_module(dout)
    return kernels.for_module(xp).max_pool_backward(dout, cache)


def _spatial_batchnorm_act_forward(x, gamma, beta, bn_param, activation):
    """activation(spatial batchnorm(x)), fused (ops batchnorm_{activation}_*) -> (out,
    per-element rows, mean, inv_std) of channels-last rows; mode test: (out, None, None, None)."""
    xp = get_array_module(x, gamma, beta)
    where = f"spatial_batchnorm_{activation}_forward"
    if getattr(x, "ndim", None) != 4 or gamma.shape != (x.shape[1],) or beta.shape != gamma.shape:
        raise ValueError(f"{where}: x (N, C, H, W) needs gamma and beta of "
                         f"shape (C,); got x {getattr(x, 'shape', None)}, gamma {gamma.shape}, "
                         f"beta {beta.shape}")
    mode = bn_param.get("mode", "train")
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    channels = x.shape[1]
    rows = channels_last_rows(x)
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = xp.zeros(channels, dtype=x.dtype)
    if running_var is None:
        running_var = xp.zeros(channels, dtype=x.dtype)
    table = kernels.for_module(xp)
    if mode == "train":
        out, mean, inv_std, var = getattr(table, f"batchnorm_{activation}_train_forward")(
            rows, gamma, beta, eps)
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
        return out, rows, mean, inv_std
    if mode == "test":
        bn_param["running_mean"], bn_param["running_var"] = running_mean, running_var
        out = getattr(table, f"batchnorm_{activation}_test_forward")(
            rows, gamma, beta, running_mean, running_var, eps)
        return out, None, None, None
    raise ValueError(f"batchnorm mode must be 'train' or 'test', got {mode!r}")


def _check_train_cache(cache, where):
    if cache is None:
        raise ValueError(f"{where} needs the cache of a train-mode forward "
                         "pass; test mode uses fixed running statistics and has no backward")


def spatial_batchnorm_relu_forward(x, gamma, beta, bn_param):
    """relu(spatial_batchnorm_forward(x, gamma, beta, bn_param)) in two fused passes.

    x (N, C, H, W), gamma and beta (C,), bn_param as for batchnorm_forward
    (running statistics updated the same way) -> out (N, C, H, W), a view of
    channels-last rows. The cache keeps x's rows and out (no x_hat).
    """
    out, rows, mean, inv_std = _spatial_batchnorm_act_forward(x, gamma, beta, bn_param, "relu")
    cache = None if rows is None else (rows, out, gamma, mean, inv_std)
    return from_channels_last_rows(out, x.shape), cache


def spatial_batchnorm_relu_backward(dout, cache):
    """dout (N, C, H, W) -> (dx (N, C, H, W), dgamma (C,), dbeta (C,)); a train-mode cache."""
    _check_train_cache(cache, "spatial_batchnorm_relu_backward")
    rows, out, gamma, mean, inv_std = cache
    xp = get_array_module(dout, rows)
    dx, dgamma, dbeta = kernels.for_module(xp).batchnorm_relu_backward(
        channels_last_rows(dout), rows, out, gamma, mean, inv_std)
    return from_channels_last_rows(dx, dout.shape), dgamma, dbeta


def spatial_batchnorm_gelu_forward(x, gamma, beta, bn_param):
    """gelu(spatial_batchnorm_forward(x, gamma, beta, bn_param)) in two fused passes, as
    spatial_batchnorm_relu_forward (gelu as layers.gelu_forward: exact, with erf).

    x (N, C, H, W), gamma and beta (C,) -> out (N, C, H, W), a view of channels-last
    rows. The cache keeps x's rows, gamma and beta (the backward recomputes the
    batchnorm's output from them).
    """
    out, rows, mean, inv_std = _spatial_batchnorm_act_forward(x, gamma, beta, bn_param, "gelu")
    cache = None if rows is None else (rows, gamma, beta, mean, inv_std)
    return from_channels_last_rows(out, x.shape), cache


def spatial_batchnorm_gelu_backward(dout, cache):
    """dout (N, C, H, W) -> (dx (N, C, H, W), dgamma (C,), dbeta (C,)); a train-mode cache."""
    _check_train_cache(cache, "spatial_batchnorm_gelu_backward")
    rows, gamma, beta, mean, inv_std = cache
    xp = get_array_module(dout, rows)
    dx, dgamma, dbeta = kernels.for_module(xp).batchnorm_gelu_backward(
        channels_last_rows(dout), rows, gamma, beta, mean, inv_std)
    return from_channels_last_rows(dx, dout.shape), dgamma, dbeta
