"""Stacked layers: the layers of fastnn.layers for K models held along a leading member axis.

Each `*_stacked_forward` returns `(out, cache)`, each `*_stacked_backward` takes
`(dout, cache)`, as in fastnn.layers; member k computes what the plain layer
computes with member k's parameters. Parameters: w (K, D, M), b (K, M),
gamma and beta (K, M). Activations are (K, N, M), kept feature-major in
memory ((K, M, N): every product is then on contiguous or transposed operands
and each feature's N values are one contiguous row). A shared input x
(N, d1, ...) of the first layer meets all K weight matrices in one matrix
product (when w is the (K, D, M) view of a (D, K, M) array, as
fastnn.stacked holds its first layer).

`STACKED_LAYERS` is the layer set (fastnn.classifiers.fc_net.LayerSet) that
StackedFullyConnectedNet runs FullyConnectedNet's loss with.
"""
import functools

import numpy as np

from fastnn import kernels
from fastnn.backend import get_array_module, module_by_name
from fastnn.layer_utils import LayerSet
from fastnn.layers import _batchnorm_settings, _dropout_step, relu_backward, relu_forward


def _is_per_member(x, w):
    return x.ndim == 3 and x.shape[0] == w.shape[0] and x.shape[2] == w.shape[1]


def affine_stacked_forward(x, w, b):
    """out_k = x_k @ w_k + b_k: w (K, D, M), b (K, M), x shared (N, d1, ...) with
    d1*... = D, or one per member (K, N, D) -> out (K, N, M), memory (K, M, N)."""
    xp = get_array_module(x, w, b)
    if w.ndim != 3:
        raise ValueError(f"affine_stacked_forward: w must be (K, D, M), got shape {w.shape}; "
                         "use fastnn.layers.affine_forward for one model")
    k, d, m = w.shape
    if b.shape != (k, m):
        raise ValueError(f"affine_stacked_forward: w of shape {w.shape} needs b of shape "
                         f"{(k, m)}, got {b.shape}")
    if _is_per_member(x, w):  # out_k^T = w_k^T @ x_k^T, batched over members
        out_t = xp.matmul(w.transpose(0, 2, 1), x.transpose(0, 2, 1))          # (K, M, N)
    else:
        n = x.shape[0]
        x2d = x.reshape(n, -1)
        if x2d.shape[1] != d:
            raise ValueError(f"affine_stacked_forward: x of shape {x.shape} has {x2d.shape[1]} "
                             f"features per example; w of shape {w.shape} needs {d} (shared "
                             f"input) or x of shape ({k}, N, {d}) (one input per member)")
        # one product for all members: (K*M, D) @ (D, N); free when w is a (D, K, M) view
        w_mem = w.transpose(1, 0, 2).reshape(d, k * m)
        out_t = xp.matmul(w_mem.T, x2d.T).reshape(k, m, n)
    out_t += b[:, :, None]
    return out_t.transpose(0, 2, 1), (x, w)


def affine_stacked_backward(dout, cache, need_dx=True):
    """dout (K, N, M) -> (dx shaped like x, dw and db shaped and laid out like w and b);
    dx is None when need_dx is False."""
    x, w = cache
    xp = get_array_module(dout, x, w)
    k, d, m = w.shape
    dout_t = dout.transpose(0, 2, 1)                                           # (K, M, N)
    db = dout.sum(axis=1)
    if _is_per_member(x, w):
        dw = xp.matmul(x.transpose(0, 2, 1), dout)                             # (K, D, M)
        dx = xp.matmul(w, dout_t).transpose(0, 2, 1) if need_dx else None      # (K, N, D)
        return dx, dw, db
    n = x.shape[0]
    x2d = x.reshape(n, d)
    dout_rows = dout_t.reshape(k * m, n)
    # dw laid out as w is: the (K, D, M) view of a (D, K, M) array
    dw = xp.matmul(x2d.T, dout_rows.T).reshape(d, k, m).transpose(1, 0, 2)
    dx = None
    if need_dx:
        dx = xp.matmul(dout_rows.T, w.transpose(1, 0, 2).reshape(d, k * m).T).reshape(x.shape)
    return dx, dw, db


def batchnorm_stacked_forward(x, gamma, beta, bn_param):
    """Batchnorm of x (K, N, D) with gamma, beta (K, D): each member over its own N examples.

    bn_param as in fastnn.layers.batchnorm_forward, its running statistics (K, D).
    """
    if x.ndim != 3:
        raise ValueError(f"batchnorm_stacked_forward: x must be (K, N, D), got shape {x.shape}")
    xp, mode, eps, momentum, running_mean, running_var = _batchnorm_settings(
        x, gamma, beta, bn_param, "batchnorm_stacked_forward")
    if mode == "train":
        # each feature's N values as a row: (K*D, N), free when feature-major
        k, n, d = x.shape
        rows = x.transpose(0, 2, 1).reshape(k * d, n)
        out, x_hat, inv_std, mean, var = kernels.for_module(xp).batchnorm_rows_train_forward(
            rows, gamma.reshape(-1), beta.reshape(-1), eps)
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean.reshape(k, d)
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var.reshape(k, d)
        return out.reshape(k, d, n).transpose(0, 2, 1), (x_hat, gamma, inv_std)
    scale = gamma / xp.sqrt(running_var + x.dtype.type(eps))
    shift = beta - running_mean * scale
    return x * scale[:, None, :] + shift[:, None, :], None


def batchnorm_stacked_backward(dout, cache):
    """dout (K, N, D) -> (dx (K, N, D), dgamma (K, D), dbeta (K, D)); a train-mode cache."""
    if cache is None:
        raise ValueError("batchnorm_stacked_backward needs the cache of a train-mode forward "
                         "pass; test mode uses fixed running statistics and has no backward")
    x_hat, gamma, inv_std = cache
    ops = kernels.for_module(get_array_module(dout, x_hat))
    k, n, d = dout.shape
    dx, dgamma, dbeta = ops.batchnorm_rows_backward(dout.transpose(0, 2, 1).reshape(k * d, n),
                                                    x_hat, gamma.reshape(-1), inv_std)
    return dx.reshape(k, d, n).transpose(0, 2, 1), dgamma.reshape(k, d), dbeta.reshape(k, d)


@functools.lru_cache(maxsize=256)
def _dropout_constants(module, seeds, ps, dtype):
    """(seed keys, keep thresholds, scales) of K members on the device, made once per stack."""
    from fastnn.kernels.reference import dropout_seed_keys, keep_threshold

    xp = module_by_name(module)
    return (xp.asarray(dropout_seed_keys(seeds)),
            xp.asarray(np.array([keep_threshold(p) for p in ps], dtype=np.uint64)),
            xp.asarray(np.array([1.0 / (1.0 - p) for p in ps], dtype=dtype)))


def dropout_stacked_forward(x, dropout_param):
    """Inverted dropout of x (K, N, H); dropout_param as for fastnn.layers.dropout_forward
    but with `p` and `seed` sequences of K values: member k's mask is the one its own
    (N, H) activation gets with (p_k, seed_k, step). Test mode: identity."""
    mode = dropout_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"dropout mode must be 'train' or 'test', got {mode!r}")
    ps = tuple(float(p) for p in dropout_param["p"])
    if any(not 0.0 <= p < 1.0 for p in ps):
        raise ValueError(f"dropout p (the probability of dropping a unit) must be in [0, 1), "
                         f"got {list(ps)}")
    if mode == "test" or not any(ps):
        return x, None
    seeds = dropout_param.get("seed")
    if seeds is None or len(seeds) != len(ps) or x.ndim != 3 or x.shape[0] != len(ps):
        raise ValueError(f"dropout_stacked_forward needs x (K, N, H) and one seed per member; "
                         f"got x of shape {x.shape}, {len(ps)} p values and seeds {seeds}")
    xp = get_array_module(x)
    module = "numpy" if xp is np else "cupy"
    constants = _dropout_constants(module, tuple(int(s) for s in seeds), ps,
                                   np.dtype(x.dtype).name)
    step = _dropout_step(dropout_param)
    # the kernels take (N, K, H) views of (K, H, N) activations
    out = kernels.for_module(xp).dropout_stacked_forward(x.transpose(1, 0, 2), *constants, step)
    return out.transpose(1, 0, 2), (constants, step)


def dropout_stacked_backward(dout, cache):
    """Gradient of dropout_stacked_forward: dout (K, N, H) through the same masks and scales."""
    if cache is None:
        return dout
    constants, step = cache
    return kernels.for_module(get_array_module(dout)).dropout_stacked_backward(
        dout.transpose(1, 0, 2), *constants, step).transpose(1, 0, 2)


# -- sandwiches ------------------------------------------------------------------
def affine_relu_stacked_forward(x, w, b):
    """relu(affine_stacked(x, w, b)) -> out (K, N, M)."""
    a, fc_cache = affine_stacked_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_stacked_backward(dout, cache, need_dx=True):
    """dout (K, N, M) -> (dx, dw, db); dx is None when need_dx is False."""
    fc_cache, relu_cache = cache
    return affine_stacked_backward(relu_backward(dout, relu_cache), fc_cache, need_dx)


def affine_bn_relu_stacked_forward(x, w, b, gamma, beta, bn_param):
    """relu(batchnorm_stacked(affine_stacked(x, w, b))) -> out (K, N, M)."""
    a, fc_cache = affine_stacked_forward(x, w, b)
    normed, bn_cache = batchnorm_stacked_forward(a, gamma, beta, bn_param)
    out, relu_cache = relu_forward(normed)
    return out, (fc_cache, bn_cache, relu_cache)


def affine_bn_relu_stacked_backward(dout, cache, need_dx=True):
    """dout (K, N, M) -> (dx, dw, db, dgamma, dbeta); dx is None when need_dx is False."""
    fc_cache, bn_cache, relu_cache = cache
    da, dgamma, dbeta = batchnorm_stacked_backward(relu_backward(dout, relu_cache), bn_cache)
    dx, dw, db = affine_stacked_backward(da, fc_cache, need_dx)
    return dx, dw, db, dgamma, dbeta


# layernorm is not stacked (yet): a stack refuses normalization="layernorm"
STACKED_LAYERS = LayerSet(
    affine_stacked_forward, affine_stacked_backward,
    affine_relu_stacked_forward, affine_relu_stacked_backward,
    affine_bn_relu_stacked_forward, affine_bn_relu_stacked_backward,
    None, None,
    dropout_stacked_forward, dropout_stacked_backward)
