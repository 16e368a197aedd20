"""Numba kernels for the numpy backend: the same ops, names and results as reference.py.

Each op is a thin Python wrapper (shapes, flat views, output allocation)
around one compiled loop that makes a single pass over its data.

The loops are serial on purpose: every one of them runs between two BLAS
matrix products, and the BLAS threads keep spinning for a while after each
product. A parallel Numba loop started then fights them for the cores: on 2
cores it took about 4 ms whatever its size, 7x slower than the serial loop at
3M elements and 40-400x slower at 20k-524k (benchmarks/thread_pools.py). So
the cores go to BLAS and fastnn's kernels never use Numba's thread pool.

Kernels are compiled on first use and cached on disk (`cache=True`; Numba
falls back to a user cache folder when the install is read-only).
"""
import numba
import numpy as np

from fastnn.kernels import reference
from fastnn.kernels.reference import (GOLDEN, MIX1, MIX2, UNIT_BITS, augment_key, dropout_key,
                                     keep_threshold)
from fastnn.threads import configure_thread_pools

configure_thread_pools()

DTYPES = (np.float32, np.float64)  # other dtypes (float16) run reference.py (kernels/__init__)



def _jit(function, **flags):
    """Compile with Numba, cached on disk where any cache folder is writable.

    error_model="numpy": no per-division zero checks, so the loops vectorise.
    """
    options = dict(nogil=True, error_model="numpy", **flags)
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # no writable cache folder at all: compile in each process
        return numba.njit(cache=False, **options)(function)

_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_UNIT_SHIFT = np.uint64(64 - UNIT_BITS)


@_jit
def _mix64(z):
    """SplitMix64's finaliser (reference.mix64): cpu.py's one copy."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def _flat(a):
    """A 1-D view of a C-contiguous array (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


# -- relu --------------------------------------------------------------------
@_jit
def _relu_forward(x, out):
    for i in range(x.size):
        v = x[i]
        # only positive values (subnormals too) and NaN (as np.maximum keeps it)
        # pass; the form of gpu.py's relu, which must not let a flushed
        # negative subnormal through
        out[i] = v if (v > 0 or v != v) else 0


@_jit
def _relu_backward(dout, out, dx):
    for i in range(dout.size):
        dx[i] = dout[i] if out[i] > 0 else 0


def _memory_order(*arrays):
    """Flat views of arrays that share one dense layout (e.g. the stack's feature-major
    (K, N, H) views of (K, H, N) arrays), walked in memory order; None when they do not."""
    a = arrays[0]
    perm = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    views = [b.transpose(perm) for b in arrays]
    if all(v.flags.c_contiguous and v.strides == views[0].strides for v in views):
        return [v.reshape(-1) for v in views]
    return None


def relu_forward(x):
    out = np.empty_like(x)  # x's layout (order "K")
    flat = _memory_order(x, out)
    if flat is None:
        out = np.empty(x.shape, dtype=x.dtype)
        flat = [_flat(x), out.reshape(-1)]
    _relu_forward(*flat)
    return out


def relu_backward(dout, out):
    dx = np.empty_like(out)
    flat = _memory_order(dout, out, dx)
    if flat is None:
        dx = np.empty(dout.shape, dtype=dout.dtype)
        flat = [_flat(dout), _flat(out), dx.reshape(-1)]
    _relu_backward(*flat)
    return dx


# -- dropout -----------------------------------------------------------------
@_jit
def _dropout(x, out, key, threshold, scale):
    for i in range(x.size):
        z = _mix64(np.uint64(i) * _GOLDEN + key)
        out[i] = x[i] * scale if (z >> _UNIT_SHIFT) >= threshold else 0


def dropout_forward(x, p, seed, step):
    out = np.empty(x.shape, dtype=x.dtype)
    _dropout(_flat(x), out.reshape(-1), np.uint64(dropout_key(seed, step)),
             np.uint64(keep_threshold(p)), x.dtype.type(1.0 / (1.0 - p)))
    return out


def dropout_backward(dout, p, seed, step):
    return dropout_forward(dout, p, seed, step)


# -- augmentation ------------------------------------------------------------
@_jit
def _flip_crop(x, out, key, flip, padding):
    n, channels, height, width = x.shape
    span = np.uint64(2 * padding + 1)
    for i in range(n):
        z = _mix64(np.uint64(i) * _GOLDEN + key)
        mirrored = flip and (z >> np.uint64(63)) == np.uint64(1)
        dy = np.int64(((z >> np.uint64(32)) & np.uint64(0xFFFF)) % span) - padding
        dx = np.int64((z & np.uint64(0xFFFF)) % span) - padding
        for c in range(channels):
            for r in range(height):
                src_r = r + dy
                for col in range(width):
                    src_c = (width - 1 - col if mirrored else col) + dx
                    if 0 <= src_r < height and 0 <= src_c < width:
                        out[i, c, r, col] = x[i, c, src_r, src_c]
                    else:
                        out[i, c, r, col] = 0


def flip_crop(x, seed, step, flip, padding):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _flip_crop(x, out, np.uint64(augment_key(seed, step)), bool(flip), np.int64(padding))
    return out


# -- losses ------------------------------------------------------------------
@_jit
def _softmax_loss(x, y, smoothing, inv_n, dx, row_loss):
    n, c = x.shape
    off = smoothing / c            # label smoothing: q = (1 - s) * onehot + s / C
    on = 1.0 - smoothing
    for i in range(n):
        label = y[i]
        if label < 0 or label >= c:  # unchecked labels: NaN, never an out-of-bounds read
            row_loss[i] = np.nan
            dx[i, :] = np.nan
            continue
        top = x[i, 0]
        for j in range(1, c):
            top = max(top, x[i, j])
        total = 0.0
        shifted_sum = 0.0
        for j in range(c):
            shifted = np.float64(x[i, j] - top)
            e = np.exp(shifted)
            dx[i, j] = e
            total += e
            shifted_sum += shifted
        log_total = np.log(total)
        if smoothing != 0:  # -sum_j q_j log p_j, log p_j = shifted_j - log_total
            row_loss[i] = log_total - on * (x[i, label] - top) - off * shifted_sum
        else:
            row_loss[i] = log_total - (x[i, label] - top)
        scale = inv_n / total
        for j in range(c):
            dx[i, j] = dx[i, j] * scale
        if smoothing != 0:
            for j in range(c):
                dx[i, j] -= off * inv_n
            dx[i, label] -= on * inv_n
        else:
            dx[i, label] -= inv_n


@_jit
def _svm_loss(x, y, dx, row_loss):
    n, c = x.shape
    inv_n = 1.0 / n
    for i in range(n):
        label = y[i]
        if label < 0 or label >= c:
            row_loss[i] = np.nan
            dx[i, :] = np.nan
            continue
        correct = x[i, label]
        total = 0.0
        positive = 0
        for j in range(c):
            margin = x[i, j] - correct + 1
            if j != label and margin > 0:
                total += margin
                positive += 1
                dx[i, j] = inv_n
            else:
                if j != label and margin != margin:  # NaN scores make a NaN loss
                    total += margin
                dx[i, j] = 0
        dx[i, label] = -positive * inv_n
        row_loss[i] = total


def _row_loss(kernel, x, y, *args):
    x = np.ascontiguousarray(x)
    dx = np.empty(x.shape, dtype=x.dtype)
    row_loss = np.empty(x.shape[0], dtype=np.float64)
    kernel(x, np.ascontiguousarray(y), *args, dx, row_loss)
    return x.dtype.type(row_loss.sum() / max(x.shape[0], 1)), dx


def softmax_loss(x, y, smoothing=0.0):
    if x.ndim == 3:  # members (K, N, C) on shared labels: per-member means
        members, n, c = x.shape
        x2d = np.ascontiguousarray(x).reshape(members * n, c)
        dx = np.empty(x2d.shape, dtype=x.dtype)
        row_loss = np.empty(members * n, dtype=np.float64)
        _softmax_loss(x2d, np.tile(np.ascontiguousarray(y), members), float(smoothing),
                      1.0 / max(n, 1), dx, row_loss)
        losses = row_loss.reshape(members, n).sum(axis=1) / max(n, 1)
        return losses.astype(x.dtype), dx.reshape(x.shape)
    return _row_loss(_softmax_loss, x, y, float(smoothing), 1.0 / max(x.shape[0], 1))


def svm_loss(x, y):
    return _row_loss(_svm_loss, x, y)


# -- batchnorm (x is (N, D), C order: rows are read whole, columns accumulate)
@_jit
def _batchnorm_train_forward(x, gamma, beta, eps, out, x_hat, inv_std, mean, var):
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            total[j] += x[i, j]
    for j in range(d):
        mean[j] = total[j] / n
        total[j] = 0.0
    for i in range(n):
        for j in range(d):
            centered = x[i, j] - mean[j]
            total[j] += centered * centered
    for j in range(d):
        var[j] = total[j] / n
        inv_std[j] = 1.0 / np.sqrt(var[j] + eps)
    for i in range(n):
        for j in range(d):
            normed = (x[i, j] - mean[j]) * inv_std[j]
            x_hat[i, j] = normed
            out[i, j] = normed * gamma[j] + beta[j]


@_jit
def _batchnorm_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    n, d = dout.shape
    sum_dout = np.zeros(d, dtype=np.float64)
    sum_dout_xhat = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            g = dout[i, j]
            sum_dout[j] += g
            sum_dout_xhat[j] += g * x_hat[i, j]
    scale = np.empty(d, dtype=dx.dtype)
    for j in range(d):
        dbeta[j] = sum_dout[j]
        dgamma[j] = sum_dout_xhat[j]
        scale[j] = gamma[j] * inv_std[j] / n
    for i in range(n):
        for j in range(d):
            dx[i, j] = scale[j] * (n * dout[i, j] - dbeta[j] - x_hat[i, j] * dgamma[j])


def _batchnorm_forward_call(kernel, x, gamma, beta, eps, feature_axis):
    """Run a batchnorm forward kernel: (out, x_hat, inv_std, mean, var)."""
    x = np.ascontiguousarray(x)
    out, x_hat = np.empty_like(x), np.empty_like(x)
    inv_std, mean, var = (np.empty(x.shape[feature_axis], dtype=x.dtype) for _ in range(3))
    kernel(x, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), x.dtype.type(eps),
           out, x_hat, inv_std, mean, var)
    return out, x_hat, inv_std, mean, var


def _batchnorm_backward_call(kernel, dout, x_hat, gamma, inv_std, feature_axis):
    """Run a batchnorm backward kernel: (dx, dgamma, dbeta)."""
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(dout)
    dgamma, dbeta = (np.empty(dout.shape[feature_axis], dtype=dout.dtype) for _ in range(2))
    kernel(dout, np.ascontiguousarray(x_hat), np.ascontiguousarray(gamma),
           np.ascontiguousarray(inv_std), dx, dgamma, dbeta)
    return dx, dgamma, dbeta


def batchnorm_train_forward(x, gamma, beta, eps):
    return _batchnorm_forward_call(_batchnorm_train_forward, x, gamma, beta, eps, 1)


def batchnorm_backward(dout, x_hat, gamma, inv_std):
    return _batchnorm_backward_call(_batchnorm_backward, dout, x_hat, gamma, inv_std, 1)


# -- update rules (in place): one kernel each, over (A, K, B) blocks ---------
# A lone parameter is the one-member block (1, 1, size); the stack passes its
# members' blocks (fastnn.stacked). h (K, H) holds the rule's scalars in
# w.dtype, one row per member (cast as reference.py casts them, so the
# arithmetic matches fastnn.optim's rules); l2 (K,), use_l2 and partial: see
# _l2_args. The inner loop over b is contiguous and vectorises.
@_jit
def _sgd(w, dw, h, l2, use_l2, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, l2_k = h[k, 0], l2[k]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                if use_l2:
                    g = g + l2_k * wi
                    partial[k, b] += wi * wi
                w[a, k, b] = wi - g * lr


@_jit
def _sgd_momentum(w, dw, v, h, l2, use_l2, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, momentum, l2_k = h[k, 0], h[k, 1], l2[k]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                if use_l2:
                    g = g + l2_k * wi
                    partial[k, b] += wi * wi
                vi = v[a, k, b] * momentum - g * lr
                v[a, k, b] = vi
                w[a, k, b] = wi + vi


@_jit
def _sgd_nesterov(w, dw, v, h, l2, use_l2, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, momentum, l2_k = h[k, 0], h[k, 1], l2[k]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                if use_l2:
                    g = g + l2_k * wi
                    partial[k, b] += wi * wi
                vi = v[a, k, b] * momentum - g * lr
                v[a, k, b] = vi
                w[a, k, b] = (wi + momentum * vi) - g * lr


@_jit
def _rmsprop(w, dw, cache, h, l2, use_l2, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, decay, one_minus_decay, eps, l2_k = h[k, 0], h[k, 1], h[k, 2], h[k, 3], l2[k]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                if use_l2:
                    g = g + l2_k * wi
                    partial[k, b] += wi * wi
                ci = cache[a, k, b] * decay + one_minus_decay * (g * g)
                cache[a, k, b] = ci
                w[a, k, b] = wi - lr * g / (np.sqrt(ci) + eps)


@_jit
def _adam(w, dw, m, v, h, l2, use_l2, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2 = h[k, 0], h[k, 1], h[k, 2], \
                h[k, 3], h[k, 4]
            c1, c2, eps, decay, l2_k = h[k, 5], h[k, 6], h[k, 7], h[k, 8], l2[k]
            for b in range(inner):
                wi, g = w[a, k, b], dw[a, k, b]
                if use_l2:
                    g = g + l2_k * wi
                    partial[k, b] += wi * wi
                mi = m[a, k, b] * beta1 + one_minus_beta1 * g
                vi = v[a, k, b] * beta2 + one_minus_beta2 * (g * g)
                m[a, k, b] = mi
                v[a, k, b] = vi
                # decay: adamw's decoupled weight decay (1 for adam; w * 1 is exact)
                w[a, k, b] = wi * decay - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


def _scalar_rows(h, members, dtype):
    """The rule's scalars h (floats, 0-d or (K,) arrays) as a (K, len(h)) array of dtype."""
    if members == 1 and all(np.ndim(v) == 0 for v in h):
        return np.array([h], dtype=dtype)  # casts each value as dtype.type(value) does
    rows = np.empty((members, len(h)), dtype=dtype)
    for j, value in enumerate(h):
        rows[:, j] = value
    return rows


_NO_L2 = {}


def _l2_args(w, l2):
    """(l2 (K,) in w.dtype, whether to use it, the (K, B) partial sums of w**2)."""
    if l2 is None:
        key = (w.shape[1], w.dtype)
        if key not in _NO_L2:  # placeholders the kernel never reads
            _NO_L2[key] = (np.zeros(w.shape[1], dtype=w.dtype), False,
                           np.zeros((1, 1), dtype=w.dtype))
        return _NO_L2[key]
    return np.ascontiguousarray(l2, dtype=w.dtype), True, np.zeros(w.shape[1:], dtype=w.dtype)


def _update_op(kernel, reference_op):
    """The table op for one rule's kernel: reference_op's signature and results.

    A parameter or state array that is not C-contiguous (a transposed view,
    say) runs reference_op, which takes any strides and gives the same values.
    """
    def op(w, dw, state, h, l2=None):
        if not (w.flags.c_contiguous and all(s.flags.c_contiguous for s in state)):
            return reference_op(w, dw, state, h, l2)
        shape = w.shape if w.ndim == 3 else (1, 1, w.size)
        blocks = w.reshape(shape)
        l2_args = _l2_args(blocks, l2)
        kernel(blocks, np.ascontiguousarray(dw).reshape(shape),
               *(s.reshape(shape) for s in state), _scalar_rows(h, shape[1], w.dtype), *l2_args)
        if l2_args[1]:
            return l2_args[2].sum(axis=1, dtype=np.float64).astype(w.dtype)
        return None

    op.__name__ = op.__qualname__ = reference_op.__name__
    op.__doc__ = reference_op.__doc__
    return op


sgd_ = _update_op(_sgd, reference.sgd_)
sgd_momentum_ = _update_op(_sgd_momentum, reference.sgd_momentum_)
sgd_nesterov_ = _update_op(_sgd_nesterov, reference.sgd_nesterov_)
rmsprop_ = _update_op(_rmsprop, reference.rmsprop_)
adam_ = _update_op(_adam, reference.adam_)


# -- stacked models (fastnn.stacked) -----------------------------------------
# Same results as the reference.py versions; per-member values are (K,)
# arrays, cast here to the data's dtype as reference.py casts them.
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


def dropout_stacked_forward(x, seed_keys, thresholds, scales, step):
    """x (N, K, H), any strides; the result is laid out (K, H, N) in memory, as the stack's."""
    from fastnn.kernels.reference import dropout_step_term

    # The stack passes a (K, H, N) array viewed as (N, K, H): this is then no copy,
    # and the kernel sees contiguous rows (an any-strides kernel ran 10x slower).
    x_khn = np.ascontiguousarray(x.transpose(1, 2, 0))
    out = np.empty_like(x_khn)
    _dropout_stacked(x_khn, out, np.ascontiguousarray(seed_keys, dtype=np.uint64),
                     np.uint64(dropout_step_term(step)),
                     np.ascontiguousarray(thresholds, dtype=np.uint64),
                     np.ascontiguousarray(scales, dtype=x.dtype))
    return out.transpose(2, 0, 1)


def dropout_stacked_backward(dout, seed_keys, thresholds, scales, step):
    return dropout_stacked_forward(dout, seed_keys, thresholds, scales, step)


def _jit_sums(function):
    """_jit for float64 sums along a row: reassociation lets them vectorise.

    Only these small helpers get the flag; the kernels that call them keep
    the ordinary float semantics (and NaN/inf handling: no other fastmath).
    """
    return _jit(function, fastmath={"reassoc"})


@_jit_sums
def _row_sum(x, j):
    total = 0.0
    for i in range(x.shape[1]):
        total += x[j, i]
    return total


@_jit_sums
def _row_squared_deviation(x, j, center):
    total = 0.0
    for i in range(x.shape[1]):
        centered = x[j, i] - center
        total += centered * centered
    return total


@_jit_sums
def _row_dot(a, b, j):
    total = 0.0
    for i in range(a.shape[1]):
        total += a[j, i] * b[j, i]
    return total


# batchnorm with features as rows (x (D, N)): the same arithmetic as the
# column kernels above, each feature's N values read as one contiguous row
@_jit
def _batchnorm_rows_train_forward(x, gamma, beta, eps, out, x_hat, inv_std, mean, var):
    d, n = x.shape
    for j in range(d):
        mean[j] = _row_sum(x, j) / n
        var[j] = _row_squared_deviation(x, j, mean[j]) / n
        inv_std[j] = 1.0 / np.sqrt(var[j] + eps)
        center, scale, g, b = mean[j], inv_std[j], gamma[j], beta[j]
        for i in range(n):
            normed = (x[j, i] - center) * scale
            x_hat[j, i] = normed
            out[j, i] = normed * g + b


@_jit
def _batchnorm_rows_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    d, n = dout.shape
    scale = np.empty(d, dtype=dx.dtype)
    for j in range(d):
        dbeta[j] = _row_sum(dout, j)
        dgamma[j] = _row_dot(dout, x_hat, j)
        scale[j] = gamma[j] * inv_std[j] / n
        s, db, dg = scale[j], dbeta[j], dgamma[j]
        for i in range(n):
            dx[j, i] = s * (n * dout[j, i] - db - x_hat[j, i] * dg)


def batchnorm_rows_train_forward(x, gamma, beta, eps):
    return _batchnorm_forward_call(_batchnorm_rows_train_forward, x, gamma, beta, eps, 0)


def batchnorm_rows_backward(dout, x_hat, gamma, inv_std):
    return _batchnorm_backward_call(_batchnorm_rows_backward, dout, x_hat, gamma, inv_std, 0)


@_jit
def _l2_stacked(dw, w, reg, partial):
    outer, members, inner = w.shape
    for a in range(outer):
        for k in range(members):
            reg_k = reg[k]
            # partial sums per (member, column): the inner loop vectorises
            for b in range(inner):
                wi = w[a, k, b]
                dw[a, k, b] += reg_k * wi
                partial[k, b] += wi * wi


def l2_stacked_(dw, w, reg):
    if not (dw.flags.c_contiguous and w.flags.c_contiguous):
        return reference.l2_stacked_(dw, w, reg)
    partial = np.zeros(w.shape[1:], dtype=w.dtype)
    _l2_stacked(dw, w, np.ascontiguousarray(reg, dtype=w.dtype), partial)
    return partial.sum(axis=1, dtype=np.float64).astype(w.dtype)


# -- norms: layernorm and groupnorm -------------------------------------------
# One row per normalised unit (a sample for layernorm, a sample's group for
# groupnorm), read whole and contiguous: the row sums use the vectorised
# float64 helpers above; gamma and beta sums accumulate in float64 too.
@_jit
def _layernorm_forward(x, gamma, beta, eps, out, x_hat, inv_std):
    n, d = x.shape
    for i in range(n):
        mean = _row_sum(x, i) / d
        scale = 1.0 / np.sqrt(_row_squared_deviation(x, i, mean) / d + eps)
        inv_std[i] = scale
        for j in range(d):
            normed = (x[i, j] - mean) * scale
            x_hat[i, j] = normed
            out[i, j] = normed * gamma[j] + beta[j]


@_jit_sums
def _row_gamma_sums(dout, x_hat, gamma, i):
    """Over row i: (sum of g, sum of g * x_hat) with g = dout * gamma, the gradient
    reaching x_hat."""
    total = 0.0
    total_xhat = 0.0
    for j in range(dout.shape[1]):
        g = dout[i, j] * gamma[j]
        total += g
        total_xhat += g * x_hat[i, j]
    return total, total_xhat


@_jit
def _layernorm_backward(dout, x_hat, gamma, inv_std, dx, dgamma, dbeta):
    n, d = dout.shape
    sum_dout = np.zeros(d, dtype=np.float64)
    sum_dout_xhat = np.zeros(d, dtype=np.float64)
    for i in range(n):
        for j in range(d):
            grad = dout[i, j]
            sum_dout[j] += grad
            sum_dout_xhat[j] += grad * x_hat[i, j]
        mean_g, mean_g_xhat = _row_gamma_sums(dout, x_hat, gamma, i)
        mean_g /= d
        mean_g_xhat /= d
        scale = inv_std[i]
        for j in range(d):
            dx[i, j] = scale * (dout[i, j] * gamma[j] - mean_g - x_hat[i, j] * mean_g_xhat)
    for j in range(d):
        dgamma[j] = sum_dout_xhat[j]
        dbeta[j] = sum_dout[j]


def layernorm_forward(x, gamma, beta, eps):
    x = np.ascontiguousarray(x)
    out, x_hat = np.empty_like(x), np.empty_like(x)
    inv_std = np.empty(x.shape[0], dtype=x.dtype)
    _layernorm_forward(x, np.ascontiguousarray(gamma), np.ascontiguousarray(beta),
                       x.dtype.type(eps), out, x_hat, inv_std)
    return out, x_hat, inv_std


def layernorm_backward(dout, x_hat, gamma, inv_std):
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(dout)
    dgamma, dbeta = (np.empty(dout.shape[1], dtype=dout.dtype) for _ in range(2))
    _layernorm_backward(dout, np.ascontiguousarray(x_hat), np.ascontiguousarray(gamma),
                        np.ascontiguousarray(inv_std), dx, dgamma, dbeta)
    return dx, dgamma, dbeta


# groupnorm: x seen as rows (N * G, C/G, H * W) for the affine part and as
# (N * G, C/G * H * W) for the statistics; row r is group r % G of a sample
@_jit
def _groupnorm_forward(x, rows, gamma, beta, groups, eps, out, x_hat, inv_std):
    count, channels, positions = x.shape
    length = channels * positions
    for r in range(count):
        first = (r % groups) * channels
        mean = _row_sum(rows, r) / length
        scale = 1.0 / np.sqrt(_row_squared_deviation(rows, r, mean) / length + eps)
        inv_std[r] = scale
        for c in range(channels):
            g, b = gamma[first + c], beta[first + c]
            for k in range(positions):
                normed = (x[r, c, k] - mean) * scale
                x_hat[r, c, k] = normed
                out[r, c, k] = normed * g + b


@_jit
def _groupnorm_backward(dout, x_hat, gamma, inv_std, groups, dx, dgamma, dbeta):
    count, channels, positions = dout.shape
    length = channels * positions
    sum_dout = np.zeros(groups * channels, dtype=np.float64)
    sum_dout_xhat = np.zeros(groups * channels, dtype=np.float64)
    for r in range(count):
        first = (r % groups) * channels
        mean_g = 0.0  # g = dout * gamma, the gradient reaching x_hat
        mean_g_xhat = 0.0
        for c in range(channels):
            channel_sum = 0.0
            channel_dot = 0.0
            for k in range(positions):
                grad = dout[r, c, k]
                channel_sum += grad
                channel_dot += grad * x_hat[r, c, k]
            sum_dout[first + c] += channel_sum
            sum_dout_xhat[first + c] += channel_dot
            mean_g += gamma[first + c] * channel_sum
            mean_g_xhat += gamma[first + c] * channel_dot
        mean_g /= length
        mean_g_xhat /= length
        scale = inv_std[r]
        for c in range(channels):
            g = gamma[first + c]
            for k in range(positions):
                dx[r, c, k] = scale * (dout[r, c, k] * g - mean_g - x_hat[r, c, k] * mean_g_xhat)
    for c in range(groups * channels):
        dgamma[c] = sum_dout_xhat[c]
        dbeta[c] = sum_dout[c]


def _group_rows(a, groups):
    """A C-contiguous (N, C, H, W) array as (N * groups, C / groups, H * W)."""
    n, c = a.shape[:2]
    return np.ascontiguousarray(a).reshape(n * groups, c // groups, -1)


def groupnorm_forward(x, gamma, beta, groups, eps):
    x3 = _group_rows(x, groups)
    out, x_hat = np.empty_like(x3), np.empty_like(x3)
    inv_std = np.empty(x3.shape[0], dtype=x3.dtype)
    _groupnorm_forward(x3, x3.reshape(x3.shape[0], -1), np.ascontiguousarray(gamma),
                       np.ascontiguousarray(beta), groups, x3.dtype.type(eps), out, x_hat, inv_std)
    return (out.reshape(x.shape), x_hat.reshape(x.shape),
            inv_std.reshape(x.shape[0], groups))


def groupnorm_backward(dout, x_hat, gamma, inv_std, groups):
    dout3 = _group_rows(dout, groups)
    dx = np.empty_like(dout3)
    dgamma, dbeta = (np.empty(dout.shape[1], dtype=dout.dtype) for _ in range(2))
    _groupnorm_backward(dout3, _group_rows(x_hat, groups), np.ascontiguousarray(gamma),
                        np.ascontiguousarray(inv_std).reshape(-1), groups, dx, dgamma, dbeta)
    return dx.reshape(dout.shape), dgamma, dbeta
