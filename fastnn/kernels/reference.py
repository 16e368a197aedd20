"""Reference kernels: plain array-namespace code, correct on every backend.

Every fast kernel (cpu.py, gpu.py) is tested against these on random inputs.
Each function takes its array module from its arguments.
"""
import numbers

from fastnn.backend import get_array_module

# -- dropout mask: a pure function of (seed, step, position) ----------------
# A counter-based generator (SplitMix64's finaliser): the same integer
# arithmetic on every backend, so every backend draws the same mask. A unit
# is kept when the top 24 bits of its hash reach `threshold`.
_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
UNIT_BITS = 24


def mix64(z, xp=None):
    """SplitMix64's finaliser: of a Python int (host side, xp None) or of a uint64 array of xp.

    The one SplitMix64 of the reference code (cpu.py and gpu.py have one each).
    """
    if xp is None:
        z &= _MASK64
        z = ((z ^ (z >> 30)) * MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * MIX2) & _MASK64
        return z ^ (z >> 31)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(MIX2)
    return z ^ (z >> xp.uint64(31))


# Each purpose draws from its own stream of keys: a seed shared by dropout and
# augmentation (or a dropout seed equal to an augment seed) gives unrelated masks.
DROPOUT_STREAM, AUGMENT_STREAM = 1, 2


def is_step_array(step):
    """True when `step` is a 0-d integer array (the Solver's step counter, updated in place
    between steps) rather than an int; ValueError when it is neither."""
    if isinstance(step, numbers.Integral):
        return False
    if getattr(step, "shape", None) != () or step.dtype.kind not in "iu":
        raise ValueError(f"a step must be an int or a 0-d integer array, got {step!r}")
    return True


def stream_key(seed, step, stream):
    """The 64-bit key of (seed, step) in `stream`; positions are hashed with it.

    step an int: a Python int. step a 0-d integer array (of any module): a 0-d
    uint64 array of its module, computed there (no device read), equal to the int's key.
    """
    seed_key = mix64(int(seed) * GOLDEN + stream)
    if not is_step_array(step):
        return mix64(seed_key + int(step) * GOLDEN)
    xp = get_array_module(step)
    # (1,)-shaped until the end: numpy computes on 0-d arrays as on scalars, which warn
    # when the wrap-around arithmetic overflows
    term = step.reshape(1).astype(xp.uint64) * xp.uint64(GOLDEN)
    return mix64(term + xp.uint64(seed_key), xp).reshape(())


def dropout_key(seed, step):
    """The key of one dropout (seed, step) pair."""
    return stream_key(seed, step, DROPOUT_STREAM)


def augment_key(seed, step):
    """The key of one augmentation (seed, step) pair (flip_crop)."""
    return stream_key(seed, step, AUGMENT_STREAM)


def keep_threshold(p):
    """Units whose 24-bit hash is >= this are kept: P(keep) = 1 - p (to 2**-24)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    return int(round(p * (1 << UNIT_BITS)))


def dropout_keep(xp, size, seed, step, p):
    """Boolean keep-mask of `size` units (flat, C order) for (seed, step)."""
    z = _hash_positions(xp, size, dropout_key(seed, step))
    return (z >> xp.uint64(64 - UNIT_BITS)) >= xp.uint64(keep_threshold(p))


def dropout_forward(x, p, seed, step):
    """Inverted dropout: x * keep / (1 - p); x any shape."""
    xp = get_array_module(x)
    keep = dropout_keep(xp, x.size, seed, step, p).reshape(x.shape)
    return xp.where(keep, x * x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0))


def dropout_backward(dout, p, seed, step):
    """Gradient of dropout_forward: the same mask and scale applied to dout."""
    return dropout_forward(dout, p, seed, step)


def _hash_positions(xp, count, key):
    """SplitMix64 of positions 0..count-1 under `key` (an int or a 0-d uint64 array)."""
    key = xp.uint64(key) if isinstance(key, numbers.Integral) else key
    return mix64(xp.arange(count, dtype=xp.uint64) * xp.uint64(GOLDEN) + key, xp)


# -- augmentation: random flips and crops, a pure function of (seed, step, image)
def flip_crop_offsets(xp, count, seed, step, padding):
    """Per image: (flip as bool, row shift, column shift), shifts in [-padding, padding]."""
    z = _hash_positions(xp, count, augment_key(seed, step))
    span = xp.uint64(2 * padding + 1)
    flips = (z >> xp.uint64(63)) == xp.uint64(1)
    dy = ((z >> xp.uint64(32)) & xp.uint64(0xFFFF)) % span
    dx = (z & xp.uint64(0xFFFF)) % span
    return flips, dy.astype(xp.int64) - padding, dx.astype(xp.int64) - padding


def flip_crop(x, seed, step, flip, padding):
    """Random horizontal flips and zero-padded random crops of images x (N, C, H, W).

    Image i is shifted by (dy, dx) in [-padding, padding] (pixels shifted in
    are 0) and, when `flip`, mirrored left-right with probability 1/2.
    """
    xp = get_array_module(x)
    n, channels, height, width = x.shape
    flips, dy, dx = flip_crop_offsets(xp, n, seed, step, padding)
    if not flip:
        flips = xp.zeros_like(flips)
    rows = xp.arange(height)[None, :] + dy[:, None]
    cols = xp.arange(width)[None, :]
    cols = xp.where(flips[:, None], width - 1 - cols, cols) + dx[:, None]
    valid = (((rows >= 0) & (rows < height))[:, None, :, None]
             & ((cols >= 0) & (cols < width))[:, None, None, :])
    picked = x[xp.arange(n)[:, None, None, None], xp.arange(channels)[None, :, None, None],
               xp.clip(rows, 0, height - 1)[:, None, :, None],
               xp.clip(cols, 0, width - 1)[:, None, None, :]]
    return xp.where(valid, picked, x.dtype.type(0))


# -- relu --------------------------------------------------------------------
def relu_forward(x):
    """max(x, 0), same shape and dtype."""
    xp = get_array_module(x)
    return xp.maximum(x, x.dtype.type(0))


def relu_backward(dout, out):
    """dout where the forward output was positive, else 0."""
    xp = get_array_module(dout, out)
    return xp.where(out > 0, dout, dout.dtype.type(0))


# -- losses ------------------------------------------------------------------
# The losses do not check their labels (fastnn.layers does, Solver does once
# up front). A label outside [0, C) makes the loss and that row of dx NaN,
# as the Numba and CuPy kernels do: computed on the device, with no sync,
# where plain indexing would raise (numpy), or wrap around to a plausible
# loss on the wrong class (negative labels on numpy; every bad label on cupy).
def _labels_to_index(xp, y, num_classes):
    """(valid (N,) bool, labels with each bad one replaced by class 0)."""
    valid = (y >= 0) & (y < num_classes)
    return valid, xp.where(valid, y, 0)


def _nan_rows(xp, a, valid):
    """a with the rows (axis -2) of invalid labels set to NaN."""
    return xp.where(valid[..., :, None], a, a.dtype.type(float("nan")))


def softmax_loss(x, y, smoothing=0.0):
    """Mean softmax cross-entropy of scores x (N, C) and labels y (N,).

    smoothing s: the target of row i is q = (1 - s) * onehot(y_i) + s / C
    (label smoothing; 0: the plain loss), loss = mean_i -sum_j q_ij log p_ij,
    dx = (p - q) / N. Returns (loss as a 0-d array, dx (N, C)); no label checks
    (a bad label: NaN). Member axis: x (K, N, C) with shared labels ->
    (losses (K,), dx (K, N, C)).
    """
    xp = get_array_module(x, y)
    n, classes = x.shape[-2:]
    f = x.dtype.type
    valid, labels = _labels_to_index(xp, y, classes)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    log_probs = _nan_rows(xp, shifted - log_z, valid)
    rows = xp.arange(n)
    picked = log_probs[..., rows, labels]
    dx = xp.exp(log_probs)
    if smoothing:
        per_row = f(1 - smoothing) * picked + f(smoothing / classes) * log_probs.sum(axis=-1)
        loss = -per_row.sum(axis=-1) / f(n)
        dx[..., rows, labels] -= f(1 - smoothing)
        dx -= f(smoothing / classes)
    else:
        loss = -picked.sum(axis=-1) / f(n)
        dx[..., rows, labels] -= 1
    dx /= f(n)
    return loss, dx


def svm_loss(x, y):
    """Mean multiclass hinge loss (margin 1, correct class excluded).

    Returns (loss as a 0-d array, dx (N, C)); no label checks (a bad label: NaN).
    """
    xp = get_array_module(x, y)
    n = x.shape[0]
    valid, labels = _labels_to_index(xp, y, x.shape[1])
    rows = xp.arange(n)
    correct = x[rows, labels][:, None]
    margins = xp.maximum(x - correct + x.dtype.type(1), x.dtype.type(0))
    margins[rows, labels] = 0
    loss = _nan_rows(xp, margins, valid).sum() / x.dtype.type(n)
    dx = (margins > 0).astype(x.dtype)
    dx[rows, labels] -= dx.sum(axis=1)
    dx /= x.dtype.type(n)
    return loss, _nan_rows(xp, dx, valid)


# -- batchnorm ---------------------------------------------------------------
def batchnorm_train_forward(x, gamma, beta, eps):
    """Normalise x (N, D) with its batch statistics.

    Returns (out, x_hat, inv_std, mean, var); var is the biased variance.
    """
    xp = get_array_module(x, gamma, beta)
    mean = x.mean(axis=0)
    centered = x - mean
    var = (centered * centered).mean(axis=0)
    inv_std = x.dtype.type(1) / xp.sqrt(var + x.dtype.type(eps))
    x_hat = centered * inv_std
    return x_hat * gamma + beta, x_hat, inv_std, mean, var


def batchnorm_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx, dgamma, dbeta) of batchnorm_train_forward; all (N, D) / (D,)."""
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    scale = gamma * inv_std / dout.dtype.type(n)
    dx = scale * (n * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


# -- update rules: one in-place step each (fastnn.optim.SPECS says which) ------
# Signature: rule_(w, dw, state, h, l2=None). w, dw and the state arrays
# (a tuple, in the rule's SPECS order) are a parameter of any shape, or the
# (A, K, B) blocks of K stacked members, member k owning [:, k, :]
# (fastnn.stacked). h: the rule's scalars (optim.SPECS[rule].scalars), each a
# Python float, a 0-d array or, for blocks, a (K,) array with one value per
# member (on w's device: a step's scalars need not come from the host); or h
# is one array of "scalar rows", (H,) or (K, H), column j holding scalar j
# (optim.begin_step writes them in place before a step); they
# are cast to w.dtype, as the course's Python floats are. l2: None, or (K,)
# for blocks: the step uses dw + l2_k * w_k (the L2 gradient, added while w
# is read) and returns each member's sum(w_k ** 2) before the step;
# without l2 it returns None. The formulas are the contract's, in the
# order of operations every backend's kernel repeats.
def _scalars(w, h):
    """h as w.dtype values that broadcast against w (per-member ones as (1, K, 1))."""
    xp = get_array_module(w)
    if hasattr(h, "shape"):  # scalar rows: its columns
        h = [h[..., j] for j in range(h.shape[-1])]
    out = []
    for value in h:
        if isinstance(value, (int, float)):
            out.append(w.dtype.type(value))
            continue
        value = xp.asarray(value).astype(w.dtype)
        out.append(value.reshape(1, -1, 1) if value.ndim and w.ndim == 3 else value.reshape(()))
    return out


def _with_l2(dw, w, l2):
    """(the gradient to step with, per-member sum(w**2) or None)."""
    if l2 is None:
        return dw, None
    xp = get_array_module(dw, w, l2)
    return dw + l2.astype(w.dtype)[None, :, None] * w, xp.einsum("akb,akb->k", w, w)


def sgd_(w, dw, state, h, l2=None):
    (lr,) = _scalars(w, h)
    dw, sums = _with_l2(dw, w, l2)
    w -= dw * lr
    return sums


def sgd_momentum_(w, dw, state, h, l2=None):
    (v,), (lr, momentum) = state, _scalars(w, h)
    dw, sums = _with_l2(dw, w, l2)
    v *= momentum
    v -= dw * lr
    w += v
    return sums


def sgd_nesterov_(w, dw, state, h, l2=None):
    """v = momentum * v - lr * dw; w + momentum * v - lr * dw."""
    (v,), (lr, momentum) = state, _scalars(w, h)
    dw, sums = _with_l2(dw, w, l2)
    v *= momentum
    v -= dw * lr
    w += momentum * v
    w -= dw * lr
    return sums


def rmsprop_(w, dw, state, h, l2=None):
    xp = get_array_module(w, dw)
    (cache,), (lr, decay, one_minus_decay, eps) = state, _scalars(w, h)
    dw, sums = _with_l2(dw, w, l2)
    cache *= decay
    cache += one_minus_decay * (dw * dw)
    w -= lr * dw / (xp.sqrt(cache) + eps)
    return sums


def adam_(w, dw, state, h, l2=None):
    """Adam (and AdamW: `decay` = 1 - lr * weight_decay multiplies w first)."""
    xp = get_array_module(w, dw)
    (m, v), (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps,
             decay) = state, _scalars(w, h)
    dw, sums = _with_l2(dw, w, l2)
    m *= beta1
    m += one_minus_beta1 * dw
    v *= beta2
    v += one_minus_beta2 * (dw * dw)
    w *= decay
    w -= lr * (m / c1) / (xp.sqrt(v / c2) + eps)
    return sums


# -- stacked models (fastnn.stacked): K members along a model axis ----------
# Member k's dropout mask is the one dropout_keep draws for its own
# (seed_k, step) over its own (N, H) activation in C order, so a member of
# a stack drops exactly the units the same net trained alone would drop.
# The per-member key is split: `dropout_seed_keys` (host, once per stack)
# and the step term added on the device, so a step sends nothing to the GPU.
def dropout_seed_keys(seeds):
    """Host uint64 array: the seed half of dropout_key for each seed in `seeds`."""
    import numpy as np

    return np.array([mix64(int(s) * GOLDEN + DROPOUT_STREAM) for s in seeds], dtype=np.uint64)


def dropout_step_term(step):
    """The step half of a key (the key is mix64(seed_key + this)): an int for an int step,
    a 0-d uint64 array of its module for a 0-d integer array step."""
    if not is_step_array(step):
        return (int(step) * GOLDEN) & _MASK64
    xp = get_array_module(step)
    return (step.reshape(1).astype(xp.uint64) * xp.uint64(GOLDEN)).reshape(())


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


def dropout_stacked_backward(dout, seed_keys, thresholds, scales, step):
    """Gradient of dropout_stacked_forward: the same masks and scales applied to dout."""
    return dropout_stacked_forward(dout, seed_keys, thresholds, scales, step)


def batchnorm_rows_train_forward(x, gamma, beta, eps):
    """batchnorm_train_forward with features as rows: x (D, N), feature j is x[j].

    The stack keeps activations feature-major, (K*H, N). Returns (out (D, N),
    x_hat (D, N), inv_std, mean, var (D,)).
    """
    out, x_hat, inv_std, mean, var = batchnorm_train_forward(x.T, gamma, beta, eps)
    return out.T, x_hat.T, inv_std, mean, var


def batchnorm_rows_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx (D, N), dgamma (D,), dbeta (D,)) of batchnorm_rows_train_forward."""
    dx, dgamma, dbeta = batchnorm_backward(dout.T, x_hat.T, gamma, inv_std)
    return dx.T, dgamma, dbeta


def l2_stacked_(dw, w, reg):
    """L2 regularisation of K members in one pass: dw += reg_k * w in place.

    w, dw (A, K, B), member k owning [:, k, :]; reg (K,) floats. Returns the
    per-member sum(w_k ** 2) as a (K,) array of w.dtype.
    """
    xp = get_array_module(dw, w, reg)
    dw += reg.astype(w.dtype)[None, :, None] * w
    return xp.einsum("akb,akb->k", w, w)


# -- norms: layernorm and groupnorm -------------------------------------------
# Both normalise rows of their own: a sample's D features (layernorm) or a
# sample's group of C/G channels over all positions (groupnorm), with the
# biased variance; gamma and beta are per feature / per channel.
def _normalise_rows(rows, eps):
    """rows (R, L) -> (x_hat (R, L), inv_std (R,)), each row to mean 0 and variance 1."""
    xp = get_array_module(rows)
    centered = rows - rows.mean(axis=1, keepdims=True)
    var = (centered * centered).mean(axis=1)
    inv_std = rows.dtype.type(1) / xp.sqrt(var + rows.dtype.type(eps))
    return centered * inv_std[:, None], inv_std


def _normalise_rows_backward(g, x_hat, inv_std):
    """dx (R, L) of _normalise_rows from g = dL/dx_hat (R, L)."""
    return inv_std[:, None] * (g - g.mean(axis=1, keepdims=True)
                               - x_hat * (g * x_hat).mean(axis=1, keepdims=True))


def layernorm_forward(x, gamma, beta, eps):
    """Normalise each row of x (N, D); gamma, beta (D,).

    Returns (out (N, D), x_hat (N, D), inv_std (N,)).
    """
    x_hat, inv_std = _normalise_rows(x, eps)
    return x_hat * gamma + beta, x_hat, inv_std


def layernorm_backward(dout, x_hat, gamma, inv_std):
    """Gradients (dx (N, D), dgamma (D,), dbeta (D,)) of layernorm_forward."""
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    return _normalise_rows_backward(dout * gamma, x_hat, inv_std), dgamma, dbeta


def groupnorm_forward(x, gamma, beta, groups, eps):
    """Normalise x (N, C, H, W) over each sample's `groups` groups of C/groups channels.

    gamma, beta (C,). Returns (out, x_hat (both N, C, H, W), inv_std (N, groups)).
    """
    n = x.shape[0]
    x_hat, inv_std = _normalise_rows(x.reshape(n * groups, -1), eps)
    x_hat = x_hat.reshape(x.shape)
    return (x_hat * gamma[None, :, None, None] + beta[None, :, None, None], x_hat,
            inv_std.reshape(n, groups))


def groupnorm_backward(dout, x_hat, gamma, inv_std, groups):
    """Gradients (dx (N, C, H, W), dgamma (C,), dbeta (C,)) of groupnorm_forward."""
    n = dout.shape[0]
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3))
    g = (dout * gamma[None, :, None, None]).reshape(n * groups, -1)
    dx = _normalise_rows_backward(g, x_hat.reshape(n * groups, -1), inv_std.reshape(-1))
    return dx.reshape(dout.shape), dgamma, dbeta


# == convolution ==============================================================
# Convolution and max pooling on NCHW arrays of any strides, in plain xp: the
# naive layers (fastnn.layers.*_naive) run these, and the fast kernels are
# tested against them. No Python loop over pixels: the loops run over the
# filter's (or window's) taps, each tap a strided slice of the whole batch.
# The saved state of a forward goes only to the backward of the same table.
def _tap_slices(tap_row, tap_col, out_height, out_width, stride):
    """The (rows, cols) slices that tap (tap_row, tap_col) reads for every output position."""
    return (slice(tap_row, tap_row + stride * (out_height - 1) + 1, stride),
            slice(tap_col, tap_col + stride * (out_width - 1) + 1, stride))


def _im2col(x_padded, filter_height, filter_width, stride, out_height, out_width):
    """x_padded (N, C, Hp, Wp) -> columns (N, C*HH*WW, H'*W'), rows ordered (c, i, j) like w."""
    xp = get_array_module(x_padded)
    n, channels = x_padded.shape[:2]
    taps = [x_padded[(slice(None), slice(None)) + _tap_slices(i, j, out_height, out_width, stride)]
            for i in range(filter_height) for j in range(filter_width)]
    return xp.stack(taps, axis=2).reshape(n, channels * filter_height * filter_width,
                                          out_height * out_width)


def conv_out_size(size, filter_size, stride, pad):
    """1 + (size + 2*pad - filter_size) // stride (checked by the layers first)."""
    return 1 + (size + 2 * pad - filter_size) // stride


def conv_forward(x, w, b, stride, pad):
    """x (N, C, H, W), w (F, C, HH, WW), b (F,) or None (no bias) -> (out (N, F, H', W'), saved)."""
    xp = get_array_module(x, w, b)
    n, _, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height = conv_out_size(height, filter_height, stride, pad)
    out_width = conv_out_size(width, filter_width, stride, pad)
    x_padded = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = _im2col(x_padded, filter_height, filter_width, stride, out_height, out_width)
    out = xp.matmul(w.reshape(filters, -1), cols).reshape(n, filters, out_height, out_width)
    if b is not None:
        out += b.reshape(filters, 1, 1)
    return out, (x, w, stride, pad, b is not None)


def conv_backward(dout, saved, need_dx=True):
    """dout (N, F, H', W') -> (dx (N, C, H, W) or None, dw (F, C, HH, WW), db (F,) or None)."""
    x, w, stride, pad, has_bias = saved
    xp = get_array_module(dout, x, w)
    n, channels, height, width = x.shape
    filters, _, filter_height, filter_width = w.shape
    out_height, out_width = dout.shape[2:]
    dout3 = dout.reshape(n, filters, out_height * out_width)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    x_padded = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = _im2col(x_padded, filter_height, filter_width, stride, out_height, out_width)
    dw = xp.tensordot(dout3, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
    if not need_dx:
        return None, dw, db
    dcols = xp.matmul(w.reshape(filters, -1).T, dout3).reshape(
        n, channels, filter_height * filter_width, out_height, out_width)
    dx_padded = xp.zeros(x_padded.shape, dtype=dout.dtype)
    for tap in range(filter_height * filter_width):
        rows, cols_ = _tap_slices(tap // filter_width, tap % filter_width, out_height,
                                  out_width, stride)
        dx_padded[:, :, rows, cols_] += dcols[:, :, tap]
    return xp.ascontiguousarray(dx_padded[:, :, pad:pad + height, pad:pad + width]), dw, db


def max_pool_forward(x, pool_height, pool_width, stride):
    """x (N, C, H, W) -> (out (N, C, H', W'), saved), H' = 1 + (H - pool_height) // stride."""
    xp = get_array_module(x)
    out_height = 1 + (x.shape[2] - pool_height) // stride
    out_width = 1 + (x.shape[3] - pool_width) // stride
    # taps in row-major order: argmax's first maximum is the window's first in row-major order
    windows = xp.stack([x[(slice(None), slice(None)) + _tap_slices(i, j, out_height, out_width,
                                                                   stride)]
                        for i in range(pool_height) for j in range(pool_width)], axis=-1)
    argmax = xp.argmax(windows, axis=-1)
    out = xp.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return out, (x.shape, argmax, pool_height, pool_width, stride)


def max_pool_backward(dout, saved):
    """dout (N, C, H', W') -> dx (N, C, H, W): each window's gradient to its first maximum."""
    x_shape, argmax, pool_height, pool_width, stride = saved
    xp = get_array_module(dout, argmax)
    out_height, out_width = dout.shape[2:]
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    zero = dout.dtype.type(0)
    for tap in range(pool_height * pool_width):
        rows, cols = _tap_slices(tap // pool_width, tap % pool_width, out_height, out_width, stride)
        dx[:, :, rows, cols] += xp.where(argmax == tap, dout, zero)
    return dx


def conv_pool_ops(conv_forward, conv_backward, max_pool_forward, max_pool_backward):
    """(conv_pool_forward, conv_pool_backward) made of a module's conv and pool ops.

    conv_pool_forward(x, w, b, stride, pad, pool_height, pool_width, pool_stride)
    -> (max_pool_forward(conv_forward(x, ...)), (conv saved, pool saved));
    conv_pool_backward(dout, saved, need_dx=True) -> (dx or None, dw, db or None).
    """
    def conv_pool_forward(x, w, b, stride, pad, pool_height, pool_width, pool_stride):
        out, conv_saved = conv_forward(x, w, b, stride, pad)
        pooled, pool_saved = max_pool_forward(out, pool_height, pool_width, pool_stride)
        return pooled, (conv_saved, pool_saved)

    def conv_pool_backward(dout, saved, need_dx=True):
        conv_saved, pool_saved = saved
        return conv_backward(max_pool_backward(dout, pool_saved), conv_saved, need_dx)

    return conv_pool_forward, conv_pool_backward


conv_pool_forward, conv_pool_backward = conv_pool_ops(conv_forward, conv_backward,
                                                      max_pool_forward, max_pool_backward)


def batchnorm_relu_train_forward(x, gamma, beta, eps):
    """relu(batchnorm(x)) of rows x (M, C), batch statistics -> (out, mean, inv_std, var)."""
    xp = get_array_module(x, gamma, beta)
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    inv_std = 1 / xp.sqrt(var + x.dtype.type(eps))
    out = xp.maximum((x - mean) * (inv_std * gamma) + beta, x.dtype.type(0))
    return out, mean, inv_std.astype(x.dtype, copy=False), var


def batchnorm_relu_test_forward(x, gamma, beta, running_mean, running_var, eps):
    """relu(batchnorm(x)) of rows x (M, C) with fixed (running) statistics -> out (M, C)."""
    xp = get_array_module(x, gamma, beta)
    scale = gamma / xp.sqrt(running_var + x.dtype.type(eps))
    return xp.maximum((x - running_mean) * scale + beta, x.dtype.type(0))


def batchnorm_relu_backward(dout, x, out, gamma, mean, inv_std):
    """Gradient of batchnorm_relu_train_forward: dout (M, C) -> (dx, dgamma, dbeta)."""
    xp = get_array_module(dout, x, out)
    g = xp.where(out > 0, dout, dout.dtype.type(0))
    x_hat = (x - mean) * inv_std
    dbeta = g.sum(axis=0)
    dgamma = (g * x_hat).sum(axis=0)
    m = x.shape[0]
    dx = (gamma * inv_std / m) * (m * g - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta
