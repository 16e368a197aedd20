"""Fast convolution and max pooling: the naive layers' signatures and results, on fast kernels.

The numpy backend runs chunked channels-last im2col (Numba) plus one sgemm
per chunk (fastnn/kernels/cpu.py); the cupy backend im2col/pool CUDA
kernels plus `cupy.matmul` (gpu.py). Inputs may be any strided (N, C, H, W)
view; the outputs are (N, C, H, W) views of channels-last memory on numpy,
which is the layout these layers read fastest, so a stack of them never
changes layout. A fast forward's cache goes to the fast backward.
"""
from fastnn import kernels
from fastnn.backend import get_array_module
from fastnn.layers import conv_geometry, pool_geometry


def conv_forward_fast(x, w, b, conv_param):
    """As conv_forward_naive: x (N, C, H, W), w (F, C, HH, WW), b (F,) -> out (N, F, H', W').

    b may be None (no bias; the backward's db is then None).
    """
    xp = get_array_module(x, w, b)
    stride, pad, _, _ = conv_geometry(x, w, b if b is not None else w[:, 0, 0, 0], conv_param,
                                      "conv_forward_fast")
    return kernels.for_module(xp).conv_forward(x, w, b, stride, pad)


def conv_backward_fast(dout, cache, need_dx=True):
    """dout (N, F, H', W') -> (dx (N, C, H, W), dw (F, C, HH, WW), db (F,)).

    With need_dx=False (a first layer) dx is None and its product is skipped.
    """
    xp = get_array_module(dout)
    return kernels.for_module(xp).conv_backward(dout, cache, need_dx)


def max_pool_forward_fast(x, pool_param):
    """As max_pool_forward_naive: x (N, C, H, W) -> out (N, C, H', W'), H' floored."""
    xp = get_array_module(x)
    pool_height, pool_width, stride = pool_geometry(x, pool_param, "max_pool_forward_fast")
    return kernels.for_module(xp).max_pool_forward(x, pool_height, pool_width, stride)


def max_pool_backward_fast(dout, cache):
    """dout (N, C, H', W') -> dx (N, C, H, W); gradient to each window's first maximum."""
    xp = get_array_module(dout)
    return kernels.for_module(xp).max_pool_backward(dout, cache)
