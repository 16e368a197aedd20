"""Sandwich layers: common layer sequences as one forward/backward pair."""
from typing import Callable, NamedTuple, Optional

from fastnn.fast_layers import (conv_backward_fast, conv_forward_fast, max_pool_backward_fast,
                                max_pool_forward_fast, spatial_batchnorm_gelu_backward,
                                spatial_batchnorm_gelu_forward, spatial_batchnorm_relu_backward,
                                spatial_batchnorm_relu_forward)
from fastnn.layers import (affine_backward, affine_forward, batchnorm_backward,
                           batchnorm_forward, dropout_backward, dropout_forward,
                           layernorm_backward, layernorm_forward, relu_backward, relu_forward)


def affine_relu_forward(x, w, b):
    """relu(x @ w + b): x (N, D...), w (D, M), b (M,) -> out (N, M)."""
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache, need_dx=True):
    """dout (N, M) -> (dx, dw, db); dx is None when need_dx is False."""
    fc_cache, relu_cache = cache
    return affine_backward(relu_backward(dout, relu_cache), fc_cache, need_dx)


def affine_bn_relu_forward(x, w, b, gamma, beta, bn_param):
    """relu(batchnorm(x @ w + b)) -> out (N, M); bn_param as in batchnorm_forward."""
    a, fc_cache = affine_forward(x, w, b)
    normed, bn_cache = batchnorm_forward(a, gamma, beta, bn_param)
    out, relu_cache = relu_forward(normed)
    return out, (fc_cache, bn_cache, relu_cache)


def affine_bn_relu_backward(dout, cache, need_dx=True):
    """dout (N, M) -> (dx, dw, db, dgamma, dbeta); dx is None when need_dx is False."""
    fc_cache, bn_cache, relu_cache = cache
    dnormed = relu_backward(dout, relu_cache)
    da, dgamma, dbeta = batchnorm_backward(dnormed, bn_cache)
    dx, dw, db = affine_backward(da, fc_cache, need_dx)
    return dx, dw, db, dgamma, dbeta


def affine_ln_relu_forward(x, w, b, gamma, beta, ln_param):
    """relu(layernorm(x @ w + b)) -> out (N, M); ln_param as in layernorm_forward."""
    a, fc_cache = affine_forward(x, w, b)
    normed, ln_cache = layernorm_forward(a, gamma, beta, ln_param)
    out, relu_cache = relu_forward(normed)
    return out, (fc_cache, ln_cache, relu_cache)


def affine_ln_relu_backward(dout, cache, need_dx=True):
    """dout (N, M) -> (dx, dw, db, dgamma, dbeta); dx is None when need_dx is False."""
    fc_cache, ln_cache, relu_cache = cache
    dnormed = relu_backward(dout, relu_cache)
    da, dgamma, dbeta = layernorm_backward(dnormed, ln_cache)
    dx, dw, db = affine_backward(da, fc_cache, need_dx)
    return dx, dw, db, dgamma, dbeta


# -- convolutional sandwiches (on the fast layers, as in the course) ----------
def conv_relu_forward(x, w, b, conv_param):
    """relu(conv(x, w) + b): x (N, C, H, W), w (F, C, HH, WW), b (F,) -> out (N, F, H', W')."""
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    out, relu_cache = relu_forward(a)
    return out, (conv_cache, relu_cache)


def conv_relu_backward(dout, cache):
    """dout (N, F, H', W') -> (dx, dw, db)."""
    conv_cache, relu_cache = cache
    return conv_backward_fast(relu_backward(dout, relu_cache), conv_cache)


def conv_relu_pool_forward(x, w, b, conv_param, pool_param):
    """max_pool(relu(conv(x, w) + b)) -> out (N, F, H'', W'')."""
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    s, relu_cache = relu_forward(a)
    out, pool_cache = max_pool_forward_fast(s, pool_param)
    return out, (conv_cache, relu_cache, pool_cache)


def conv_relu_pool_backward(dout, cache):
    """dout (N, F, H'', W'') -> (dx, dw, db)."""
    conv_cache, relu_cache, pool_cache = cache
    ds = max_pool_backward_fast(dout, pool_cache)
    return conv_backward_fast(relu_backward(ds, relu_cache), conv_cache)


def conv_bn_relu_forward(x, w, b, gamma, beta, conv_param, bn_param):
    """relu(spatial_batchnorm(conv(x, w) + b)) -> out (N, F, H', W'); gamma, beta (F,).

    The batchnorm and the relu run fused (fast_layers.spatial_batchnorm_relu_forward).
    """
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    out, bn_relu_cache = spatial_batchnorm_relu_forward(a, gamma, beta, bn_param)
    return out, (conv_cache, bn_relu_cache)


def conv_bn_relu_backward(dout, cache):
    """dout (N, F, H', W') -> (dx, dw, db, dgamma, dbeta)."""
    conv_cache, bn_relu_cache = cache
    dan, dgamma, dbeta = spatial_batchnorm_relu_backward(dout, bn_relu_cache)
    dx, dw, db = conv_backward_fast(dan, conv_cache)
    return dx, dw, db, dgamma, dbeta


def conv_bn_gelu_forward(x, w, b, gamma, beta, conv_param, bn_param):
    """gelu(spatial_batchnorm(conv(x, w) + b)) -> out (N, F, H', W'); gamma, beta (F,).

    The batchnorm and the gelu run fused (fast_layers.spatial_batchnorm_gelu_forward).
    """
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    out, bn_gelu_cache = spatial_batchnorm_gelu_forward(a, gamma, beta, bn_param)
    return out, (conv_cache, bn_gelu_cache)


def conv_bn_gelu_backward(dout, cache):
    """dout (N, F, H', W') -> (dx, dw, db, dgamma, dbeta)."""
    conv_cache, bn_gelu_cache = cache
    dan, dgamma, dbeta = spatial_batchnorm_gelu_backward(dout, bn_gelu_cache)
    dx, dw, db = conv_backward_fast(dan, conv_cache)
    return dx, dw, db, dgamma, dbeta


class LayerSet(NamedTuple):
    """The layers a fully connected net is built from (fastnn.classifiers.FullyConnectedNet).

    FC_LAYERS are the course's, for one model; fastnn.stacked_layers.STACKED_LAYERS
    the same layers for K models along a member axis. A norm left None is not available.
    """
    affine_forward: Callable
    affine_backward: Callable
    affine_relu_forward: Callable
    affine_relu_backward: Callable
    affine_bn_relu_forward: Callable
    affine_bn_relu_backward: Callable
    affine_ln_relu_forward: Optional[Callable]
    affine_ln_relu_backward: Optional[Callable]
    dropout_forward: Callable
    dropout_backward: Callable


FC_LAYERS = LayerSet(affine_forward, affine_backward, affine_relu_forward, affine_relu_backward,
                     affine_bn_relu_forward, affine_bn_relu_backward, affine_ln_relu_forward,
                     affine_ln_relu_backward, dropout_forward, dropout_backward)
