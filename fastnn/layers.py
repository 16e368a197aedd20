"""Layers: each `*_forward` returns `(out, cache)`, each `*_backward` takes `(dout, cache)`.

Written once against the array namespace: every function computes in the
module of the arrays it is given and keeps their dtype. Hot element-wise ops
go through the kernel table (`fastnn.kernels`).

Stacked models (K of them along a leading member axis) have their own
layers, named as such: fastnn.stacked_layers.
"""
import math

import numpy as np

from fastnn import kernels
from fastnn.kernels import reference
from fastnn.backend import get_array_module
from fastnn.checks import as_size


def affine_forward(x, w, b):
    """out = x.reshape(N, D) @ w + b.

    x (N, d1, ..., dk) with D = d1*...*dk, w (D, M), b (M,) -> out (N, M).
    """
    xp = get_array_module(x, w, b)
    width = math.prod(x.shape[1:])
    if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
        raise ValueError(
            f"affine_forward: x of shape {x.shape} (width {width}) needs w of shape "
            f"({width}, M) and b of shape (M,); got w {w.shape} and b {b.shape}")
    x2d = x.reshape(x.shape[0], width)
    out = xp.matmul(x2d, w)
    out += b
    return out, (x, w)


def affine_backward(dout, cache, need_dx=True):
    """dout (N, M) -> (dx shaped like x, dw (D, M), db (M,)).

    With need_dx=False (a first layer, whose input needs no gradient) dx is None.
    """
    x, w = cache
    x2d = x.reshape(x.shape[0], w.shape[0])
    dw = x2d.T @ dout
    db = dout.sum(axis=0)
    dx = (dout @ w.T).reshape(x.shape) if need_dx else None
    return dx, dw, db


def relu_forward(x):
    """max(x, 0), any shape."""
    xp = get_array_module(x)
    out = kernels.for_module(xp).relu_forward(x)
    return out, out


def relu_backward(dout, cache):
    """dout where the forward output was positive, else 0."""
    xp = get_array_module(dout, cache)
    return kernels.for_module(xp).relu_backward(dout, cache)


def gelu_forward(x):
    """x * Phi(x), Phi the standard normal CDF (exact, with erf: PyTorch's GELU default),
    any shape -> (out, cache)."""
    xp = get_array_module(x)
    return kernels.for_module(xp).gelu_forward(x), x


def gelu_backward(dout, cache):
    """dout * (Phi(x) + x phi(x)), x the forward's input, same shape as dout."""
    xp = get_array_module(dout, cache)
    return kernels.for_module(xp).gelu_backward(dout, cache)


def _batchnorm_settings(x, gamma, beta, bn_param, where):
    """Check a batchnorm's arguments (x (..., N, D), gamma and beta x's shape without N)
    -> (xp, mode, eps, momentum, running_mean, running_var); in test mode the running
    statistics (zeros when absent) are stored in bn_param."""
    xp = get_array_module(x, gamma, beta)
    mode = bn_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"batchnorm mode must be 'train' or 'test', got {mode!r}")
    if x.dtype.kind != "f":
        raise ValueError(f"{where}: x must be a floating array, got dtype {x.dtype}; "
                         "convert it first (x.astype(np.float32))")
    if x.shape[-2] == 0 and mode == "train":
        raise ValueError(f"{where}: x is an empty batch (shape {x.shape}); train mode "
                         "needs at least one row to compute the batch statistics")
    features = x.shape[:-2] + x.shape[-1:]
    if gamma.shape != features or beta.shape != features:
        raise ValueError(f"{where}: x of shape {x.shape} needs gamma and beta of shape "
                         f"{features}; got {gamma.shape} and {beta.shape}")
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = xp.zeros(features, dtype=x.dtype)
    if running_var is None:
        running_var = xp.zeros(features, dtype=x.dtype)
    if mode == "test":
        bn_param["running_mean"], bn_param["running_var"] = running_mean, running_var
    return (xp, mode, bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9), running_mean,
            running_var)


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalisation of x (N, D) with gamma, beta (D,) -> out (N, D).

    bn_param: `mode` ("train"/"test"), optional `eps` (1e-5) and `momentum`
    (0.9); keeps `running_mean` / `running_var` (zeros on first use), updated
    in train mode with the biased batch variance.
    """
    if x.ndim != 2:
        raise ValueError(f"batchnorm_forward: x must be 2-D (N, D), got shape {x.shape}; "
                         "reshape it (x.reshape(N, -1)) or use a spatial batchnorm for images")
    xp, mode, eps, momentum, running_mean, running_var = _batchnorm_settings(
        x, gamma, beta, bn_param, "batchnorm_forward")
    if mode == "train":
        out, x_hat, inv_std, mean, var = kernels.for_module(xp).batchnorm_train_forward(
            x, gamma, beta, eps)
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
        return out, (x_hat, gamma, inv_std)
    scale = gamma / xp.sqrt(running_var + x.dtype.type(eps))
    return x * scale + (beta - running_mean * scale), None


def batchnorm_backward(dout, cache):
    """dout (N, D) -> (dx (N, D), dgamma (D,), dbeta (D,)); needs a train-mode cache."""
    if cache is None:
        raise ValueError("batchnorm_backward needs the cache of a train-mode forward pass; "
                         "test mode uses fixed running statistics and has no backward")
    x_hat, gamma, inv_std = cache
    xp = get_array_module(dout, x_hat)
    return kernels.for_module(xp).batchnorm_backward(dout, x_hat, gamma, inv_std)


def draw_seed(xp):
    """A fresh seed from the generator of array module `xp` (np.random or cupy.random).

    On cupy this reads a device value (a synchronisation): pass seeds where
    it matters, as FullyConnectedNet does.
    """
    return int(xp.random.randint(0, 2**31 - 1))


def _dropout_seed(dropout_param, xp):
    seed = dropout_param.get("seed")
    return draw_seed(xp) if seed is None else seed


def _dropout_step(dropout_param):
    """dropout_param's step: an int, or a 0-d integer array passed on as it is (the
    Solver's step counter, which it updates in place: the kernels read it when they run)."""
    step = dropout_param.get("step", 0)
    if hasattr(step, "shape") and reference.is_step_array(step):
        return step
    return int(step)


def dropout_forward(x, dropout_param):
    """Inverted dropout of x (any shape): units dropped with probability `p`.

    dropout_param: `p`, `mode` ("train"/"test"), optional `seed` and `step`
    (0; an int, or a 0-d integer array read when the op runs). The mask is a
    pure function of (seed, step, position), the same on every backend; kept
    units are scaled by 1 / (1 - p). Test mode: identity.
    """
    mode = dropout_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"dropout mode must be 'train' or 'test', got {mode!r}")
    if np.ndim(dropout_param["p"]):
        raise ValueError(f"dropout p must be one number, got {dropout_param['p']}; one p per "
                         "stacked member is fastnn.stacked_layers.dropout_stacked_forward")
    p = float(dropout_param["p"])
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p (the probability of dropping a unit) must be in [0, 1), got {p}")
    if mode == "test" or p == 0.0:
        return x, None
    if x.dtype.kind != "f":  # the 1 / (1 - p) scale would be truncated
        raise ValueError(f"dropout_forward: x must be a floating array, got dtype {x.dtype}; "
                         "convert it first (x.astype(np.float32))")
    xp = get_array_module(x)
    seed, step = _dropout_seed(dropout_param, xp), _dropout_step(dropout_param)
    return kernels.for_module(xp).dropout_forward(x, p, seed, step), (p, seed, step)


def dropout_backward(dout, cache):
    """Gradient of dropout_forward: dout through the same mask and scale."""
    if cache is None:
        return dout
    xp = get_array_module(dout)
    p, seed, step = cache
    return kernels.for_module(xp).dropout_backward(dout, p, seed, step)


def _check_scores_and_labels(x, y):
    xp = get_array_module(x, y)
    if x.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"scores x is an empty batch (shape {x.shape}); the loss is a mean over "
                         "rows and needs at least one")
    if x.dtype.kind != "f":
        raise ValueError(f"scores x must be a floating array, got dtype {x.dtype}; "
                         "convert it first (x.astype(np.float32))")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match scores {x.shape}, "
                         f"got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {y.dtype}; "
                         "convert with y.astype(int) if they are whole numbers")
    num_classes = x.shape[1]
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) for {num_classes} classes; "
                         f"got values from {int(y.min())} to {int(y.max())}")
    return xp


def svm_loss(x, y):
    """Multiclass hinge loss: x (N, C) scores, y (N,) labels -> (loss 0-d array, dx (N, C))."""
    xp = _check_scores_and_labels(x, y)
    loss, dx = kernels.for_module(xp).svm_loss(x, y)
    return xp.asarray(loss), dx


def softmax_loss(x, y):
    """Softmax cross-entropy: x (N, C) scores, y (N,) labels -> (loss 0-d array, dx (N, C))."""
    xp = _check_scores_and_labels(x, y)
    loss, dx = kernels.for_module(xp).softmax_loss(x, y)
    return xp.asarray(loss), dx


# -- norms: layernorm and spatial groupnorm -----------------------------------
def layernorm_forward(x, gamma, beta, ln_param):
    """Layer normalisation of x (N, D): each row over its D features -> out (N, D).

    gamma, beta (D,); ln_param: optional `eps` (1e-5). The same in train and
    test mode (no running statistics).
    """
    xp = get_array_module(x, gamma, beta)
    if x.ndim != 2 or gamma.shape != (x.shape[1],) or beta.shape != (x.shape[1],):
        raise ValueError(f"layernorm_forward: x of shape {x.shape} needs gamma and beta of shape "
                         f"({x.shape[1] if x.ndim == 2 else 'D'},) and x of shape (N, D); "
                         f"got gamma {gamma.shape} and beta {beta.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"layernorm_forward: x must be a floating array, got dtype {x.dtype}; "
                         "convert it first (x.astype(np.float32))")
    eps = (ln_param or {}).get("eps", 1e-5)
    out, x_hat, inv_std = kernels.for_module(xp).layernorm_forward(x, gamma, beta, eps)
    return out, (x_hat, gamma, inv_std)


def layernorm_backward(dout, cache):
    """dout (N, D) -> (dx (N, D), dgamma (D,), dbeta (D,))."""
    x_hat, gamma, inv_std = cache
    xp = get_array_module(dout, x_hat)
    return kernels.for_module(xp).layernorm_backward(dout, x_hat, gamma, inv_std)


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Group normalisation of images x (N, C, H, W) -> out (N, C, H, W).

    Each sample's C channels form G groups of C/G channels, each normalised
    over its channels and positions; gamma, beta (1, C, 1, 1); gn_param:
    optional `eps` (1e-5). The same in train and test mode.
    """
    xp = get_array_module(x, gamma, beta)
    if x.ndim != 4:
        raise ValueError(f"spatial_groupnorm_forward: x must be images (N, C, H, W), got shape "
                         f"{x.shape}")
    channels = x.shape[1]
    if gamma.shape != (1, channels, 1, 1) or beta.shape != (1, channels, 1, 1):
        raise ValueError(f"spatial_groupnorm_forward: x of shape {x.shape} needs gamma and beta "
                         f"of shape (1, {channels}, 1, 1); got {gamma.shape} and {beta.shape}")
    if isinstance(G, bool) or int(G) != G or G < 1 or channels % G:
        raise ValueError(f"spatial_groupnorm_forward: G={G} groups must be a positive integer "
                         f"that divides the C={channels} channels of x {x.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"spatial_groupnorm_forward: x must be a floating array, got dtype "
                         f"{x.dtype}; convert it first (x.astype(np.float32))")
    groups = int(G)
    eps = (gn_param or {}).get("eps", 1e-5)
    out, x_hat, inv_std = kernels.for_module(xp).groupnorm_forward(
        x, gamma.reshape(channels), beta.reshape(channels), groups, eps)
    return out, (x_hat, gamma, inv_std, groups)


def spatial_groupnorm_backward(dout, cache):
    """dout (N, C, H, W) -> (dx (N, C, H, W), dgamma (1, C, 1, 1), dbeta (1, C, 1, 1))."""
    x_hat, gamma, inv_std, groups = cache
    xp = get_array_module(dout, x_hat)
    channels = gamma.size
    dx, dgamma, dbeta = kernels.for_module(xp).groupnorm_backward(
        dout, x_hat, gamma.reshape(channels), inv_std, groups)
    return dx, dgamma.reshape(1, channels, 1, 1), dbeta.reshape(1, channels, 1, 1)


# -- convolution, max pooling, spatial batchnorm -----------------------------
# The naive layers run the reference ops (plain xp; fastnn.kernels.reference);
# fastnn.fast_layers has the same layers on the fast kernels.
def conv_geometry(x, w, b, conv_param, where="conv_forward"):
    """Check a convolution's arguments -> (stride, pad, out_height, out_width).

    x (N, C, H, W), w (F, C, HH, WW), b (F,) or None; H + 2*pad - HH must be divisible
    by the stride (W likewise) and the filter must fit the padded input.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{where}: x must be 4-D (N, C, H, W), got shape {x.shape}; "
                         "add the missing axis (e.g. x[None] for one image)")
    if w.ndim != 4 or w.shape[1] != x.shape[1] or (b is not None and b.shape != (w.shape[0],)):
        raise ValueError(f"{where}: x of shape {x.shape} needs w of shape "
                         f"(F, {x.shape[1]}, HH, WW) and b of shape (F,); got w {w.shape} and "
                         f"b {None if b is None else b.shape}")
    stride = as_size(conv_param["stride"], f"{where}: conv_param['stride']", low=1)
    pad = as_size(conv_param["pad"], f"{where}: conv_param['pad']", low=0)
    sizes = []
    for axis, name in ((2, "H"), (3, "W")):
        size, filter_size = x.shape[axis], w.shape[axis]
        padded = size + 2 * pad
        if filter_size > padded:
            raise ValueError(f"{where}: the filter ({name} {filter_size}) is larger than the "
                             f"padded input ({name} {size} + 2*pad {pad} = {padded}); use a "
                             "smaller filter or more padding")
        if (padded - filter_size) % stride:
            raise ValueError(f"{where}: {name} + 2*pad - filter = {size} + 2*{pad} - "
                             f"{filter_size} = {padded - filter_size} is not divisible by the "
                             f"stride {stride}; change the padding or the stride")
        sizes.append(kernels.conv.conv_output_size(size, filter_size, stride, pad))
    return stride, pad, sizes[0], sizes[1]


def pool_geometry(x, pool_param, where="max_pool_forward"):
    """Check a max pool's arguments -> (pool_height, pool_width, stride)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{where}: x must be 4-D (N, C, H, W), got shape {x.shape}")
    pool_height, pool_width, stride = (as_size(pool_param[key], f"{where}: pool_param[{key!r}]",
                                               low=1)
                                       for key in ("pool_height", "pool_width", "stride"))
    if pool_height > x.shape[2] or pool_width > x.shape[3]:
        raise ValueError(f"{where}: the {pool_height}x{pool_width} window is larger than the "
                         f"{x.shape[2]}x{x.shape[3]} input")
    return pool_height, pool_width, stride


def conv_forward_naive(x, w, b, conv_param):
    """Convolution (cross-correlation) of x (N, C, H, W) with w (F, C, HH, WW), plus b (F,).

    conv_param: `stride`, `pad` (zeros on all four sides; x is not modified)
    -> out (N, F, H', W'), H' = 1 + (H + 2*pad - HH) / stride, W' likewise.
    """
    get_array_module(x, w, b)
    stride, pad, _, _ = conv_geometry(x, w, b, conv_param, "conv_forward_naive")
    return reference.conv_forward(x, w, b, stride, pad)


def conv_backward_naive(dout, cache):
    """dout (N, F, H', W') -> (dx (N, C, H, W), dw (F, C, HH, WW), db (F,))."""
    return reference.conv_backward(dout, cache)


def max_pool_forward_naive(x, pool_param):
    """Max pooling of x (N, C, H, W); pool_param: `pool_height`, `pool_width`, `stride`.

    -> out (N, C, H', W'), H' = 1 + (H - pool_height) // stride (floored).
    """
    get_array_module(x)
    pool_height, pool_width, stride = pool_geometry(x, pool_param, "max_pool_forward_naive")
    return reference.max_pool_forward(x, pool_height, pool_width, stride)


def max_pool_backward_naive(dout, cache):
    """dout (N, C, H', W') -> dx (N, C, H, W); each window's gradient to its first maximum
    (row-major), zero where no window reaches."""
    return reference.max_pool_backward(dout, cache)


def channels_last_rows(x):
    """x (N, C, H, W) -> (N*H*W, C) rows: no copy when x is a channels-last array seen as NCHW."""
    n, channels, height, width = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * height * width, channels)


def from_channels_last_rows(rows, shape):
    """(N*H*W, C) rows -> an (N, C, H, W) view of them."""
    n, channels, height, width = shape
    return rows.reshape(n, height, width, channels).transpose(0, 3, 1, 2)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batchnorm of x (N, C, H, W) per channel over N, H and W; gamma, beta (C,).

    bn_param as in batchnorm_forward. The output is channels-last in memory
    (an (N, C, H, W) view), as the fast conv layers make and take it.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"spatial_batchnorm_forward: x must be 4-D (N, C, H, W), got shape "
                         f"{x.shape}")
    out, cache = batchnorm_forward(channels_last_rows(x), gamma, beta, bn_param)
    return from_channels_last_rows(out, x.shape), cache


def spatial_batchnorm_backward(dout, cache):
    """dout (N, C, H, W) -> (dx (N, C, H, W), dgamma (C,), dbeta (C,))."""
    dx, dgamma, dbeta = batchnorm_backward(channels_last_rows(dout), cache)
    return from_channels_last_rows(dx, dout.shape), dgamma, dbeta
