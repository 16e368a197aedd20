"""Numba kernels for the numpy backend: the same ops, names and results as reference.py.

Each op is a thin Python wrapper (shapes, flat views, output allocation)
around one compiled loop that makes a single pass over its data.

The loops are serial on purpose: every one of them runs between two BLAS
matrix products, and the BLAS threads keep spinning for a while after each
product. A parallel Numba loop started then fights them for the cores: on 2
cores it took about 4 ms whatever its size, 7x slower than the serial loop at
3M elements and 40-400x slower at 20k-524k (benchmarks/thread_pools.py). So
the cores go to BLAS and fastnn's kernels never use Numba's thread pool.
The conv and norm kernels split a batch over Python threads of their own
(_run_chunks), each with a one-thread BLAS; loading this module shortens
OpenBLAS's spinning (fastnn.threads.shorten_blas_spin) so that an idle BLAS
thread does not hold a core they need.

Kernels are compiled on first use and cached on disk in a user folder, never
in the installed package (fastnn.kernels.compile_cache: `~/.cache/fastnn/numba`
or `$NUMBA_CACHE_DIR`).
"""
import os

import numba
import numpy as np

from fastnn.kernels import compile_cache, reference
from fastnn.kernels.reference import (GOLDEN, MIX1, MIX2, UNIT_BITS, augment_key, dropout_key,
                                     keep_threshold)
from fastnn.threads import configure_thread_pools, get_num_threads

configure_thread_pools()

DTYPES = (np.float32, np.float64)  # other dtypes (float16) run reference.py (kernels/__init__)



def _jit(function, **flags):
    """Compile with Numba, cached on disk in the user cache folder when it is writable.

    error_model="numpy": no per-division zero checks, so the loops vectorise.
    """
    return compile_cache.enable(numba.njit(nogil=True, error_model="numpy", **flags)(function))

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
    if x.flags.c_contiguous:  # the common case, without _memory_order's layout search
        out = np.empty(x.shape, dtype=x.dtype)
        _relu_forward(x.reshape(-1), out.reshape(-1))
        return out
    out = np.empty_like(x)  # x's layout (order "K")
    flat = _memory_order(x, out)
    if flat is None:
        out = np.empty(x.shape, dtype=x.dtype)
        flat = [_flat(x), out.reshape(-1)]
    _relu_forward(*flat)
    return out


def relu_backward(dout, out):
    if dout.flags.c_contiguous and out.flags.c_contiguous:
        dx = np.empty(dout.shape, dtype=dout.dtype)
        _relu_backward(dout.reshape(-1), out.reshape(-1), dx.reshape(-1))
        return dx
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
    # step: an int or a 0-d array (host memory here: int() reads it at call time)
    out = np.empty(x.shape, dtype=x.dtype)
    _dropout(_flat(x), out.reshape(-1), np.uint64(dropout_key(seed, int(step))),
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
    _flip_crop(x, out, np.uint64(augment_key(seed, int(step))), bool(flip), np.int64(padding))
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
    """The rule's scalars h as a (K, len(h)) array of dtype.

    h: scalar rows ((H,) or (K, H); used as they are when they are (K, H) of
    dtype already, as optim.begin_step makes them), or a tuple of floats, 0-d
    or (K,) arrays. The casts are reference.py's (dtype.type(value)).
    """
    if isinstance(h, np.ndarray):
        if h.ndim == 2 and h.shape[0] == members and h.dtype == dtype and h.flags.c_contiguous:
            return h
        return np.ascontiguousarray(np.broadcast_to(h.astype(dtype), (members, h.shape[-1])))
    if members == 1:
        try:  # floats and 0-d arrays (a (K,) array among floats makes this raise)
            rows = np.array([h], dtype=dtype)
            if rows.ndim == 2:
                return rows
        except (TypeError, ValueError):
            pass
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
                     np.uint64(dropout_step_term(int(step))),
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


# == convolution ==============================================================
# Activations live channels-last (N, H, W, C) in memory and are handed out
# as (N, C, H, W) views: then every pixel's channels are one contiguous
# vector, the im2col rows are contiguous copies of them, and the product of
# the columns with the filters writes the next layer's channels-last rows
# directly. Any other input layout is copied to channels-last once.
#
# A convolution runs over chunks of images: im2col of one chunk (Numba) and
# one sgemm on it (numpy's BLAS), or the Winograd tiles of one chunk (below)
# for the 3x3 stride-1 convs. No full-batch column buffer exists: the
# backward pass rebuilds each chunk's columns (or tiles), which costs less
# than keeping them (9x the input for a 3x3 filter, 4x as tiles).
CONV_CHUNK_BYTES = 1 << 20  # column buffer per chunk: it and the product stay in L2 (2 MB here)


def _channels_last(x):
    """(N, C, H, W) any strides -> a C-contiguous (N, H, W, C) array (no copy if already so)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _chunk_images(n, rows_per_image, row_bytes):
    """Images per chunk: the column buffer within CONV_CHUNK_BYTES, at least one image."""
    return max(1, min(n, CONV_CHUNK_BYTES // max(1, rows_per_image * row_bytes)))


@_jit
def _im2col(x, channels, width, filter_height, filter_width, stride, pad, out_height, out_width,
            cols):
    """x (n, H, W*C) -> cols (n*H'*W', HH*WW*C): a row per output pixel, taps (i, j, c).

    Zero padding is implicit. A filter row whose window lies inside the image
    is one contiguous run of WW*C values: one copy; only edge windows go tap by tap.
    """
    height = x.shape[1]
    run = filter_width * channels
    row = 0
    for image in range(x.shape[0]):
        for oy in range(out_height):
            for ox in range(out_width):
                x0 = ox * stride - pad
                inside = x0 >= 0 and x0 + filter_width <= width
                for i in range(filter_height):
                    y = oy * stride - pad + i
                    k = i * run
                    if y < 0 or y >= height:
                        for t in range(run):
                            cols[row, k + t] = 0
                    elif inside:
                        base = x0 * channels
                        for t in range(run):
                            cols[row, k + t] = x[image, y, base + t]
                    else:
                        for j in range(filter_width):
                            xx = x0 + j
                            if 0 <= xx < width:
                                for c in range(channels):
                                    cols[row, k + j * channels + c] = x[image, y, xx * channels + c]
                            else:
                                for c in range(channels):
                                    cols[row, k + j * channels + c] = 0
                row += 1


@_jit
def _col2im(dcols, channels, width, filter_height, filter_width, stride, pad, out_height,
            out_width, dx):
    """The adjoint of _im2col: dx (n, H, W*C) = the sum of the column entries read from each value."""
    height = dx.shape[1]
    run = filter_width * channels
    dx[:] = 0
    row = 0
    for image in range(dx.shape[0]):
        for oy in range(out_height):
            for ox in range(out_width):
                x0 = ox * stride - pad
                inside = x0 >= 0 and x0 + filter_width <= width
                for i in range(filter_height):
                    y = oy * stride - pad + i
                    k = i * run
                    if y < 0 or y >= height:
                        continue
                    if inside:
                        base = x0 * channels
                        for t in range(run):
                            dx[image, y, base + t] += dcols[row, k + t]
                    else:
                        for j in range(filter_width):
                            xx = x0 + j
                            if 0 <= xx < width:
                                for c in range(channels):
                                    dx[image, y, xx * channels + c] += dcols[row, k + j * channels + c]
                row += 1


_conv_workers = {}  # thread count -> (ThreadPoolExecutor, threadpoolctl controller)
# a forked child (multiprocessing, say) has none of the parent's threads: new pools there
os.register_at_fork(after_in_child=_conv_workers.clear)


def _run_chunks(work, n, step):
    """work(start, stop, worker) for the image chunks [start, stop) of a batch of n.

    With T threads (fastnn.threads), T Python threads take every T-th chunk,
    each running its own Numba kernels (nogil) and single-threaded sgemms:
    no core waits on another between the small products, and the BLAS pool
    does not spin against the kernels (see the module docstring). The BLAS
    thread count is restored afterwards.
    """
    chunks = [(start, min(n, start + step)) for start in range(0, n, step)]
    threads = min(get_num_threads(), len(chunks))
    if threads <= 1:
        for start, stop in chunks:
            work(start, stop, 0)
        return
    pool = _conv_workers.get(threads)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import ThreadpoolController

        pool = _conv_workers[threads] = (ThreadPoolExecutor(threads, "fastnn-conv"),
                                          ThreadpoolController())

    def run(worker):
        for start, stop in chunks[worker::threads]:
            work(start, stop, worker)

    executor, controller = pool
    with controller.limit(limits=1, user_api="blas"):
        for future in [executor.submit(run, worker) for worker in range(threads)]:
            future.result()


def _conv_shapes(x_nhwc, w_shape, stride, pad):
    n, height, width, channels = x_nhwc.shape
    _, _, filter_height, filter_width = w_shape
    out_height = 1 + (height + 2 * pad - filter_height) // stride
    out_width = 1 + (width + 2 * pad - filter_width) // stride
    pixels = out_height * out_width
    depth = filter_height * filter_width * channels
    step = _chunk_images(n, pixels, depth * x_nhwc.itemsize)
    return out_height, out_width, pixels, depth, step


# -- Winograd F(2x2, 3x3) ------------------------------------------------------
# A 3x3 convolution with stride 1 and pad 1 (every conv of ConvNet after its
# stem) as Lavin and Gray's F(2x2, 3x3): each 2x2 output tile is
# A^T [(G g G^T) * (B^T d B)] A of its 4x4 input tile d, so the products take
# 16 multiplies per tile and channel pair instead of 36 (2.25x fewer), as 16
# matrix products (tiles x C) @ (C x F) per chunk of images. The transforms
# are adds only and run channel-vectorised on tile-major (tiles, 16, C)
# arrays; the products read those through strided views. The backward pass
# uses the same tiles: dx is the forward transform of dout with the filters
# rotated and transposed, and the filters' gradient is G^T [sum over tiles of
# (B^T d B)^T (A dy A^T)] G. A narrow input (the stem's 3 channels) gives
# products too thin to pay for the transforms: im2col stays there.
WINOGRAD_MIN_CHANNELS = 8


def _winograd_fits(w_shape, stride, pad):
    filters, channels, filter_height, filter_width = w_shape
    return (filter_height, filter_width, stride, pad) == (3, 3, 1, 1) and min(
        channels, filters) >= WINOGRAD_MIN_CHANNELS


@_jit
def _fill_padded(x, argmax, image, padded):
    """padded[1:H+1, 1:W+1] = x[image] (n, H, W, C); the border stays as it is (zero).

    With argmax (not None), x is the gradient of a 2x2 stride-2 max pool instead,
    (n, H/2, W/2, C): each value goes to its window's argmax tap, zeros to the rest.
    """
    if argmax is None:
        padded[1:x.shape[1] + 1, 1:x.shape[2] + 1, :] = x[image]
        return
    for py in range(x.shape[1]):
        top, below = padded[2 * py + 1], padded[2 * py + 2]
        for px in range(x.shape[2]):
            left = 2 * px + 1
            for c in range(x.shape[3]):
                tap, g = argmax[image, py, px, c], x[image, py, px, c]
                top[left, c] = g if tap == 0 else 0
                top[left + 1, c] = g if tap == 1 else 0
                below[left, c] = g if tap == 2 else 0
                below[left + 1, c] = g if tap == 3 else 0


@_jit
def _winograd_input(x, argmax, start, stop, padded, v):
    """v (tiles, 16, C): B^T d B of every 4x4 tile d (pad 1) of images [start, stop) of
    x (n, H, W, C) (or of a max pool's gradient: see _fill_padded), tile by tile in
    row-major order.

    padded (2 * tiles_y + 2, 2 * tiles_x + 2, C) must be zero outside [1:H+1, 1:W+1]
    (only that part is written here).
    """
    channels = x.shape[3]
    tiles_y, tiles_x = (padded.shape[0] - 2) // 2, (padded.shape[1] - 2) // 2
    t = 0
    for image in range(start, stop):
        _fill_padded(x, argmax, image, padded)
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                x0 = 2 * tx
                vt = v[t]
                for i in range(4):  # each row of d times B
                    row = padded[2 * ty + i]
                    for c in range(channels):
                        d0, d1, d2, d3 = row[x0, c], row[x0 + 1, c], row[x0 + 2, c], row[x0 + 3, c]
                        vt[4 * i, c] = d0 - d2
                        vt[4 * i + 1, c] = d1 + d2
                        vt[4 * i + 2, c] = d2 - d1
                        vt[4 * i + 3, c] = d1 - d3
                for j in range(4):  # then B^T times each column, in place
                    for c in range(channels):
                        a0, a1, a2, a3 = vt[j, c], vt[4 + j, c], vt[8 + j, c], vt[12 + j, c]
                        vt[j, c] = a0 - a2
                        vt[4 + j, c] = a1 + a2
                        vt[8 + j, c] = a2 - a1
                        vt[12 + j, c] = a1 - a3
                t += 1


@_jit
def _rows_times_a(mt):
    """Each row of one tile's m (16, F) as 4x4 rows times A, in place into the row's
    first two slots: the first half of A^T m A."""
    for i in range(4):
        for f in range(mt.shape[1]):
            m0, m1, m2, m3 = mt[4 * i, f], mt[4 * i + 1, f], mt[4 * i + 2, f], mt[4 * i + 3, f]
            mt[4 * i, f] = m0 + m1 + m2
            mt[4 * i + 1, f] = m1 - m2 - m3


@_jit
def _winograd_output(m, start, stop, bias, out):
    """out (n, H, W, F) of images [start, stop): A^T m A + bias of each tile's m (16, F)
    in m (tiles, 16, F), which is overwritten."""
    height, width, filters = out.shape[1], out.shape[2], out.shape[3]
    tiles_y, tiles_x = (height + 1) // 2, (width + 1) // 2
    t = 0
    for image in range(start, stop):
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                mt = m[t]
                _rows_times_a(mt)
                y0, x0 = 2 * ty, 2 * tx
                for j in range(2):  # then A^T times those two columns
                    if x0 + j >= width:  # the odd edge: a tile half outside the image
                        continue
                    top = out[image, y0, x0 + j]
                    for f in range(filters):
                        top[f] = mt[j, f] + mt[4 + j, f] + mt[8 + j, f] + bias[f]
                    if y0 + 1 < height:
                        below = out[image, y0 + 1, x0 + j]
                        for f in range(filters):
                            below[f] = mt[4 + j, f] - mt[8 + j, f] - mt[12 + j, f] + bias[f]
                t += 1


@_jit
def _takes_over(v, best):
    """Whether a later tap v replaces a window's best so far: strictly greater (ties keep the
    first tap, row-major), or the window's first NaN, which then stays: np.argmax's rule, so
    a window holding NaN pools to NaN with its gradient to that NaN, as in reference.py."""
    # `not v <= best` is true for a greater v and for a NaN v; `best == best` keeps a NaN
    # best. This form measured as fast as the plain `v > best` (`v > best or ...` was ~8% slower)
    return not v <= best and best == best


@_jit
def _winograd_output_pool(m, start, stop, bias, pooled, argmax):
    """As _winograd_output, then a 2x2 stride-2 max pool of each tile (its window):
    pooled and argmax (n, H/2, W/2, F) get each window's max and first tap (row-major)."""
    tiles_y, tiles_x, filters = pooled.shape[1], pooled.shape[2], pooled.shape[3]
    t = 0
    for image in range(start, stop):
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                mt = m[t]
                _rows_times_a(mt)
                out, taps = pooled[image, ty, tx], argmax[image, ty, tx]
                for f in range(filters):
                    best, tap = mt[0, f] + mt[4, f] + mt[8, f] + bias[f], 0
                    v = mt[1, f] + mt[5, f] + mt[9, f] + bias[f]
                    if _takes_over(v, best):  # the pool's rule: first maximum, or first NaN
                        best, tap = v, 1
                    v = mt[4, f] - mt[8, f] - mt[12, f] + bias[f]
                    if _takes_over(v, best):
                        best, tap = v, 2
                    v = mt[5, f] - mt[9, f] - mt[13, f] + bias[f]
                    if _takes_over(v, best):
                        best, tap = v, 3
                    out[f] = best
                    taps[f] = tap
                t += 1


@_jit
def _winograd_output_grad(dout, argmax, start, stop, padded, e):
    """e (tiles, 16, F): A dy A^T of every 2x2 tile dy of images [start, stop) of
    dout (n, H, W, F) (or of a max pool's gradient: see _fill_padded), zero beyond
    the image: the gradient of each tile's m. padded is as for _winograd_input.
    """
    filters = dout.shape[3]
    tiles_y, tiles_x = (padded.shape[0] - 2) // 2, (padded.shape[1] - 2) // 2
    t = 0
    for image in range(start, stop):
        _fill_padded(dout, argmax, image, padded)
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                x0 = 2 * tx + 1
                et = e[t]
                for i in range(2):  # each row of dy times A^T: (p, q) -> (p, p + q, p - q, -q)
                    row = padded[2 * ty + 1 + i]
                    for f in range(filters):
                        p, q = row[x0, f], row[x0 + 1, f]
                        et[4 * i, f] = p
                        et[4 * i + 1, f] = p + q
                        et[4 * i + 2, f] = p - q
                        et[4 * i + 3, f] = -q
                for j in range(4):  # then A times each column: (z0, z1) -> (z0, z0 + z1, z0 - z1, -z1)
                    for f in range(filters):
                        z0, z1 = et[j, f], et[4 + j, f]
                        et[4 + j, f] = z0 + z1
                        et[8 + j, f] = z0 - z1
                        et[12 + j, f] = -z1
                t += 1


def _g_times(a):
    """G @ a over a's first axis, (3, ...) -> (4, ...): G's rows (1 0 0), (1 1 1)/2, (1 -1 1)/2, (0 0 1)."""
    half = a.dtype.type(0.5)
    outer = (a[0] + a[2]) * half
    return np.stack([a[0], outer + a[1] * half, outer - a[1] * half, a[2]])


def _g_transposed_times(a):
    """G^T @ a over a's first axis, (4, ...) -> (3, ...)."""
    half = a.dtype.type(0.5)
    both, diff = (a[1] + a[2]) * half, (a[1] - a[2]) * half
    return np.stack([a[0] + both, diff, both + a[3]])


def _winograd_filters(w_mat, flip=False):
    """w_mat (9C, F), taps (i, j, c) -> U (16, C, F): G g G^T of each (c, f) filter.

    flip: the input gradient's filters instead (rotated 180 degrees, C and F swapped): (16, F, C).
    """
    g = w_mat.reshape(3, 3, -1, w_mat.shape[1])
    if flip:
        g = g[::-1, ::-1].transpose(0, 1, 3, 2)
    u = _g_times(_g_times(g).swapaxes(0, 1)).swapaxes(0, 1)  # (4, 4, C, F)
    return np.ascontiguousarray(u.reshape(16, *u.shape[2:]))


def _winograd_filter_grad(du):
    """du (16, C, F), the gradient of U -> the filters' gradient (9C, F), taps (i, j, c)."""
    dg = du.reshape(4, 4, *du.shape[1:])
    dg = _g_transposed_times(_g_transposed_times(dg).swapaxes(0, 1)).swapaxes(0, 1)
    return np.ascontiguousarray(dg.reshape(-1, du.shape[2]))


def _winograd_geometry(x_nhwc, widths):
    """(tiles_y, tiles_x, tiles per image, images per chunk): a chunk's transformed tiles of
    all `widths` channel counts within CONV_CHUNK_BYTES."""
    n, height, width = x_nhwc.shape[:3]
    tiles_y, tiles_x = (height + 1) // 2, (width + 1) // 2
    tiles = tiles_y * tiles_x
    per_image = 16 * tiles * sum(widths) * x_nhwc.itemsize
    return tiles_y, tiles_x, tiles, max(1, min(n, CONV_CHUNK_BYTES // per_image))


def _winograd_forward(x_nhwc, w_mat, bias, pool=False):
    """x_nhwc (n, H, W, C), w_mat (9C, F), bias (F,) or None -> out (n, H, W, F).

    pool (H and W even): each 2x2 output tile max-pooled on the spot instead ->
    (pooled, argmax), both (n, H/2, W/2, F): the full-size output is never written.
    """
    n, height, width, channels = x_nhwc.shape
    filters, dtype = w_mat.shape[1], x_nhwc.dtype
    tiles_y, tiles_x, tiles, step = _winograd_geometry(x_nhwc, (channels, filters))
    u = _winograd_filters(w_mat)
    bias = np.zeros(filters, dtype) if bias is None else bias
    if pool:
        out = np.empty((n, tiles_y, tiles_x, filters), dtype=dtype)
        argmax = np.empty(out.shape, dtype=np.uint8)
    else:
        out = np.empty((n, height, width, filters), dtype=dtype)
    buffers = {}

    def work(start, stop, worker):
        if worker not in buffers:
            buffers[worker] = (np.zeros((2 * tiles_y + 2, 2 * tiles_x + 2, channels), dtype),
                               np.empty((step * tiles, 16, channels), dtype),
                               np.empty((step * tiles, 16, filters), dtype))
        padded, v, m = buffers[worker]
        count = (stop - start) * tiles
        v, m = v[:count], m[:count]
        _winograd_input(x_nhwc, None, start, stop, padded, v)
        np.matmul(v.transpose(1, 0, 2), u, out=m.transpose(1, 0, 2))
        if pool:
            _winograd_output_pool(m, start, stop, bias, out, argmax)
        else:
            _winograd_output(m, start, stop, bias, out)

    _run_chunks(work, n, step)
    return (out, argmax) if pool else out


def _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias, argmax=None):
    """-> (dx (n, H, W, C) or None, dw_mat (9C, F), db (F,) or None).

    argmax (n, H/2, W/2, F): dout_nhwc is the gradient of the output's 2x2 max pool
    (_winograd_forward with pool), unpooled tile by tile.
    """
    n, height, width, channels = x_nhwc.shape
    filters, dtype = w_mat.shape[1], x_nhwc.dtype
    widths = (channels, filters)
    tiles_y, tiles_x, tiles, step = _winograd_geometry(x_nhwc, widths)
    u_flipped = _winograd_filters(w_mat, flip=True) if need_dx else None
    dx = np.empty_like(x_nhwc) if need_dx else None
    no_bias = np.zeros(channels, dtype)
    dout_pixels = dout_nhwc.shape[1] * dout_nhwc.shape[2]
    dout_rows = dout_nhwc.reshape(n * dout_pixels, filters)
    partial = {}  # worker -> its buffers and partial sums

    def work(start, stop, worker):
        s = partial.get(worker)
        if s is None:
            padded = (2 * tiles_y + 2, 2 * tiles_x + 2)
            s = partial[worker] = dict(
                du=np.zeros((16, channels, filters), dtype), db=np.zeros(filters, dtype),
                du_chunk=np.empty((16, channels, filters), dtype),
                padded_x=np.zeros(padded + (channels,), dtype),
                padded_dout=np.zeros(padded + (filters,), dtype),
                v=np.empty((step * tiles, 16, channels), dtype),
                e=np.empty((step * tiles, 16, filters), dtype))
        count = (stop - start) * tiles
        v, e = s["v"][:count], s["e"][:count]
        _winograd_input(x_nhwc, None, start, stop, s["padded_x"], v)
        _winograd_output_grad(dout_nhwc, argmax, start, stop, s["padded_dout"], e)
        np.matmul(v.transpose(1, 2, 0), e.transpose(1, 0, 2), out=s["du_chunk"])
        s["du"] += s["du_chunk"]
        if has_bias:  # (a pool's gradient has the same sum as the unpooled one)
            s["db"] += dout_rows[start * dout_pixels:stop * dout_pixels].sum(axis=0)
        if need_dx:  # into the same buffers (their tiles are used up): less cache in use
            v_dout, m_dx = e, v
            _winograd_input(dout_nhwc, argmax, start, stop, s["padded_dout"], v_dout)
            np.matmul(v_dout.transpose(1, 0, 2), u_flipped, out=m_dx.transpose(1, 0, 2))
            _winograd_output(m_dx, start, stop, no_bias, dx)

    _run_chunks(work, n, step)
    states = [partial[worker] for worker in sorted(partial)]
    du, db = states[0]["du"], states[0]["db"]
    for s in states[1:]:  # the workers' partial sums, in worker order (deterministic)
        du += s["du"]
        db += s["db"]
    return dx, _winograd_filter_grad(du), (db if has_bias else None)


def _conv_operands(x, w, b):
    """-> (x as a C-contiguous (N, H, W, C), w as (HH*WW*C, F) in x's dtype, row order
    (i, j, c) as _im2col lays out a column row, b in x's dtype or None)."""
    x_nhwc = _channels_last(x)
    dtype = x_nhwc.dtype
    w_mat = np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=dtype).reshape(-1, w.shape[0])
    return x_nhwc, w_mat, (None if b is None else b.astype(dtype, copy=False))


def conv_forward(x, w, b, stride, pad):
    """x (N, C, H, W) any strides, w (F, C, HH, WW), b (F,) or None -> (out, saved).

    out is an (N, F, H', W') view of channels-last memory.
    """
    x_nhwc, w_mat, bias = _conv_operands(x, w, b)
    n, channels = x_nhwc.shape[0], x_nhwc.shape[3]
    filters, _, filter_height, filter_width = w.shape
    out_height, out_width, pixels, depth, step = _conv_shapes(x_nhwc, w.shape, stride, pad)
    dtype = x_nhwc.dtype
    if _winograd_fits(w.shape, stride, pad):
        out = _winograd_forward(x_nhwc, w_mat, bias)
        return out.transpose(0, 3, 1, 2), (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    out = np.empty((n, out_height, out_width, filters), dtype=dtype)
    out_rows = out.reshape(n * pixels, filters)
    x_rows = x_nhwc.reshape(n, x_nhwc.shape[1], -1)  # (N, H, W*C): a pixel row per image row
    buffers = {}

    def work(start, stop, worker):
        if worker not in buffers:
            buffers[worker] = np.empty((step * pixels, depth), dtype=dtype)
        chunk_cols = buffers[worker][:(stop - start) * pixels]
        _im2col(x_rows[start:stop], channels, x_nhwc.shape[2], filter_height, filter_width, stride,
                pad, out_height, out_width, chunk_cols)
        chunk_out = out_rows[start * pixels:stop * pixels]
        np.matmul(chunk_cols, w_mat, out=chunk_out)
        if bias is not None:
            chunk_out += bias

    _run_chunks(work, n, step)
    saved = (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    return out.transpose(0, 3, 1, 2), saved


def conv_backward(dout, saved, need_dx=True):
    """dout (N, F, H', W') any strides -> (dx (N, C, H, W) view or None, dw, db or None).

    Per chunk: the columns rebuilt (dw = columns^T dout), and the columns'
    gradient dout w^T back through col2im into dx. (dx as the convolution of
    dout with the flipped filters, an im2col of dout instead of the col2im,
    measured 0-45% slower on the reference net's layers: its im2col is F/C
    times wider.)
    """
    x_nhwc, w_mat, w_shape, stride, pad, has_bias = saved
    filters, channels, filter_height, filter_width = w_shape
    n = x_nhwc.shape[0]
    dtype = x_nhwc.dtype
    out_height, out_width, pixels, depth, step = _conv_shapes(x_nhwc, w_shape, stride, pad)
    dout_nhwc = _channels_last(dout).astype(dtype, copy=False)
    if _winograd_fits(w_shape, stride, pad):
        dx, dw_mat, db = _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias)
        return (None if dx is None else dx.transpose(0, 3, 1, 2)), _filters_from_matrix(
            dw_mat, w_shape), db
    dout_rows = dout_nhwc.reshape(n * pixels, filters)
    dx = np.empty_like(x_nhwc) if need_dx else None
    height, width = x_nhwc.shape[1:3]
    x_rows = x_nhwc.reshape(n, height, width * channels)
    dx_rows = None if dx is None else dx.reshape(n, height, width * channels)
    w_mat_t = w_mat.T
    partial = {}  # worker -> (dw sum, db sum, dw of one chunk, column buffer)

    def work(start, stop, worker):
        state = partial.get(worker)
        if state is None:
            state = partial[worker] = (
                np.zeros((depth, filters), dtype=dtype), np.zeros(filters, dtype=dtype),
                np.empty((depth, filters), dtype=dtype), np.empty((step * pixels, depth), dtype=dtype))
        dw_sum, db_sum, dw_chunk, cols = state
        chunk_cols = cols[:(stop - start) * pixels]
        chunk_dout = dout_rows[start * pixels:stop * pixels]
        _im2col(x_rows[start:stop], channels, width, filter_height, filter_width, stride, pad,
                out_height, out_width, chunk_cols)
        np.matmul(chunk_cols.T, chunk_dout, out=dw_chunk)
        dw_sum += dw_chunk
        if has_bias:
            db_sum += chunk_dout.sum(axis=0)
        if need_dx:
            np.matmul(chunk_dout, w_mat_t, out=chunk_cols)  # the columns' gradient, in place
            _col2im(chunk_cols, channels, width, filter_height, filter_width, stride, pad,
                    out_height, out_width, dx_rows[start:stop])

    _run_chunks(work, n, step)
    states = [partial[worker] for worker in sorted(partial)]
    dw_mat, db = states[0][0], states[0][1] if has_bias else None
    for state in states[1:]:  # the workers' partial sums, in worker order (deterministic)
        dw_mat += state[0]
        if has_bias:
            db += state[1]
    return (None if dx is None else dx.transpose(0, 3, 1, 2)), _filters_from_matrix(
        dw_mat, w_shape), db


def _filters_from_matrix(w_mat, w_shape):
    """(HH*WW*C, F), taps (i, j, c) -> a C-contiguous (F, C, HH, WW)."""
    filters, channels, filter_height, filter_width = w_shape
    return np.ascontiguousarray(
        w_mat.reshape(filter_height, filter_width, channels, filters).transpose(3, 2, 0, 1))


@_jit
def _max_pool_forward(x, pool_height, pool_width, stride, out, argmax):
    """x (n, H, W, C) -> out, argmax (n, H', W', C): the window's max and its first tap."""
    n, out_height, out_width, channels = out.shape
    for image in range(n):
        for oy in range(out_height):
            for ox in range(out_width):
                y0, x0 = oy * stride, ox * stride
                for c in range(channels):
                    out[image, oy, ox, c] = x[image, y0, x0, c]
                    argmax[image, oy, ox, c] = 0
                tap = 0
                for i in range(pool_height):
                    for j in range(pool_width):
                        if tap > 0:  # strictly greater: ties keep the first tap (row-major)
                            for c in range(channels):
                                v = x[image, y0 + i, x0 + j, c]
                                if _takes_over(v, out[image, oy, ox, c]):
                                    out[image, oy, ox, c] = v
                                    argmax[image, oy, ox, c] = tap
                        tap += 1


@_jit
def _max_pool_backward_tiled(dout, argmax, pool_height, pool_width, dx):
    """Windows that tile the input (stride = window): each dx value written once, no scatter."""
    n, out_height, out_width, channels = dout.shape
    height, width = dx.shape[1], dx.shape[2]
    for image in range(n):
        for y in range(height):
            oy, i = y // pool_height, y % pool_height
            for xx in range(width):
                ox, j = xx // pool_width, xx % pool_width
                if oy >= out_height or ox >= out_width:  # the floored-off edge: no window
                    for c in range(channels):
                        dx[image, y, xx, c] = 0
                    continue
                tap = i * pool_width + j
                for c in range(channels):
                    hit = argmax[image, oy, ox, c] == tap
                    dx[image, y, xx, c] = dout[image, oy, ox, c] if hit else 0


@_jit
def _max_pool_backward(dout, argmax, pool_width, stride, dx):
    n, out_height, out_width, channels = dout.shape
    dx[:] = 0
    for image in range(n):
        for oy in range(out_height):
            for ox in range(out_width):
                for c in range(channels):
                    tap = argmax[image, oy, ox, c]
                    dx[image, oy * stride + tap // pool_width, ox * stride + tap % pool_width,
                       c] += dout[image, oy, ox, c]


def max_pool_forward(x, pool_height, pool_width, stride):
    """x (N, C, H, W) any strides -> (out, saved); out an (N, C, H', W') channels-last view."""
    x_nhwc = _channels_last(x)
    n, height, width, channels = x_nhwc.shape
    out_height = 1 + (height - pool_height) // stride
    out_width = 1 + (width - pool_width) // stride
    out = np.empty((n, out_height, out_width, channels), dtype=x_nhwc.dtype)
    argmax = np.empty(out.shape, dtype=np.uint8 if pool_height * pool_width <= 256 else np.int32)

    def work(start, stop, worker):
        _max_pool_forward(x_nhwc[start:stop], pool_height, pool_width, stride, out[start:stop],
                          argmax[start:stop])

    _run_chunks(work, n, _row_blocks(n, out[0].size))
    return out.transpose(0, 3, 1, 2), (x_nhwc.shape, argmax, pool_height, pool_width, stride)


def max_pool_backward(dout, saved):
    """dout (N, C, H', W') any strides -> dx, an (N, C, H, W) channels-last view."""
    x_shape, argmax, pool_height, pool_width, stride = saved
    dout_nhwc = _channels_last(dout)
    dx = np.empty(x_shape, dtype=dout_nhwc.dtype)

    tiled = stride == pool_height == pool_width

    def work(start, stop, worker):
        if tiled:
            _max_pool_backward_tiled(dout_nhwc[start:stop], argmax[start:stop], pool_height,
                                     pool_width, dx[start:stop])
        else:
            _max_pool_backward(dout_nhwc[start:stop], argmax[start:stop], pool_width, stride,
                               dx[start:stop])

    _run_chunks(work, x_shape[0], _row_blocks(x_shape[0], dout_nhwc[0].size))
    return dx.transpose(0, 3, 1, 2)


def _pool_fuses(height, width, w_shape, stride, pad, pool_height, pool_width, pool_stride):
    """A Winograd conv (of an H x W output) whose 2x2 output tiles are the pool's windows."""
    return (_winograd_fits(w_shape, stride, pad) and (pool_height, pool_width, pool_stride)
            == (2, 2, 2) and height % 2 == 0 and width % 2 == 0)


# where the pool does not fuse: the two ops, one after the other
_conv_then_pool, _conv_then_pool_backward = reference.conv_pool_ops(
    conv_forward, conv_backward, max_pool_forward, max_pool_backward)


def conv_pool_forward(x, w, b, stride, pad, pool_height, pool_width, pool_stride):
    """max_pool_forward(conv_forward(x, w, b, stride, pad), ...) -> (out, (conv saved, pool saved)).

    A 3x3 Winograd conv with a 2x2 stride-2 pool on even sizes pools each output
    tile as it is made: the full-size conv output never exists.
    """
    pool = (pool_height, pool_width, pool_stride)
    if not _pool_fuses(x.shape[2], x.shape[3], w.shape, stride, pad, *pool):
        return _conv_then_pool(x, w, b, stride, pad, *pool)
    x_nhwc, w_mat, bias = _conv_operands(x, w, b)
    pooled, argmax = _winograd_forward(x_nhwc, w_mat, bias, pool=True)
    conv_saved = (x_nhwc, w_mat, w.shape, stride, pad, b is not None)
    pool_saved = (x_nhwc.shape[:3] + (w.shape[0],), argmax) + pool
    return pooled.transpose(0, 3, 1, 2), (conv_saved, pool_saved)


def conv_pool_backward(dout, saved, need_dx=True):
    """dout (N, F, H'', W'') of the pool's output -> (dx or None, dw, db or None)."""
    conv_saved, pool_saved = saved
    x_nhwc, w_mat, w_shape, stride, pad, has_bias = conv_saved
    conv_shape, argmax = pool_saved[:2]  # (N, H, W, F): the conv output's, channels-last
    if not _pool_fuses(conv_shape[1], conv_shape[2], w_shape, stride, pad, *pool_saved[2:]):
        return _conv_then_pool_backward(dout, saved, need_dx)
    dout_nhwc = _channels_last(dout).astype(x_nhwc.dtype, copy=False)
    dx, dw_mat, db = _winograd_backward(dout_nhwc, x_nhwc, w_mat, need_dx, has_bias, argmax)
    return ((None if dx is None else dx.transpose(0, 3, 1, 2)),
            _filters_from_matrix(dw_mat, w_shape), db)


# -- batchnorm + relu on channels-last rows (M, C), for the conv nets ---------
# Two passes each way: statistics (float64 sums per channel, shifted by the
# first row so that the one-pass variance keeps its precision), then the
# output. The T threads of _run_chunks take a block of rows each; their
# partial sums are added in thread order (deterministic).
@_jit
def _bn_stats(x, shift, total, total_sq):
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            d = np.float64(x[r, c]) - shift[c]
            total[c] += d
            total_sq[c] += d * d


@_jit
def _bn_relu_apply(x, mean, scale, beta, out):
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            # centred first: x * scale + (beta - mean * scale) loses digits when |mean| >> std
            v = (x[r, c] - mean[c]) * scale[c] + beta[c]
            out[r, c] = v if v > 0 else 0


@_jit
def _bn_relu_grad_sums(dout, x, out, mean, inv_std, total, total_xhat):
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            g = dout[r, c] if out[r, c] > 0 else 0  # a select, not a branch: it vectorises
            total[c] += g
            total_xhat[c] += g * ((x[r, c] - mean[c]) * inv_std[c])


@_jit
def _bn_relu_grad_apply(dout, x, out, mean, inv_std, factor, m, dbeta, dgamma, dx):
    """dx = factor * (m g - dbeta - x_hat dgamma), g = dout where out > 0 (as reference.py)."""
    rows, channels = x.shape
    for r in range(rows):
        for c in range(channels):
            g = dout[r, c] if out[r, c] > 0 else 0
            x_hat = (x[r, c] - mean[c]) * inv_std[c]
            dx[r, c] = factor[c] * (m * g - dbeta[c] - x_hat * dgamma[c])


PARALLEL_MIN_VALUES = 1 << 16  # smaller arrays: one thread (a hand-off costs ~50 us)


def _row_blocks(rows, values_per_row):
    """Rows per thread for the row-parallel kernels (one block each; all rows when small)."""
    if rows * values_per_row < PARALLEL_MIN_VALUES:
        return max(rows, 1)
    return max(1, -(-rows // max(1, get_num_threads())))


def _partial_sums(kernel, row_arrays, args):
    """kernel(*row blocks, *args, total, total2) per thread block -> the two (C,) float64 sums."""
    rows, channels = row_arrays[0].shape
    parts = {}

    def work(start, stop, worker):
        parts[start] = (np.zeros(channels), np.zeros(channels))
        kernel(*(a[start:stop] for a in row_arrays), *args, *parts[start])

    _run_chunks(work, rows, _row_blocks(rows, channels))
    first, second = np.zeros(channels), np.zeros(channels)
    for start in sorted(parts):  # block order: the same sums for the same thread count
        first += parts[start][0]
        second += parts[start][1]
    return first, second


def _run_rows(kernel, rows, row_arrays, *args):
    """kernel(*row blocks of row_arrays, *args) over the thread blocks of rows."""
    def work(start, stop, worker):
        kernel(*(a[start:stop] for a in row_arrays[:-1]), *args, row_arrays[-1][start:stop])

    _run_chunks(work, rows, _row_blocks(rows, row_arrays[0].shape[1]))


def batchnorm_relu_train_forward(x, gamma, beta, eps):
    x = np.ascontiguousarray(x)
    rows, channels = x.shape
    shift = x[0].astype(np.float64) if rows else np.zeros(channels)
    total, total_sq = _partial_sums(_bn_stats, (x,), (shift,))
    centered_mean = total / max(rows, 1)
    var = np.maximum(total_sq / max(rows, 1) - centered_mean ** 2, 0.0)
    mean = shift + centered_mean
    inv_std = 1.0 / np.sqrt(var + eps)
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    out = np.empty_like(x)
    _run_rows(_bn_relu_apply, rows, (x, out), mean, (inv_std * gamma).astype(x.dtype),
              beta.astype(x.dtype))
    return out, mean, inv_std, var.astype(x.dtype)


def batchnorm_relu_test_forward(x, gamma, beta, running_mean, running_var, eps):
    x = np.ascontiguousarray(x)
    scale = (gamma / np.sqrt(running_var + x.dtype.type(eps))).astype(x.dtype)
    out = np.empty_like(x)
    _run_rows(_bn_relu_apply, x.shape[0], (x, out), running_mean.astype(x.dtype), scale,
              beta.astype(x.dtype))
    return out


def batchnorm_relu_backward(dout, x, out, gamma, mean, inv_std):
    dout, x, out = (np.ascontiguousarray(a) for a in (dout, x, out))
    rows, channels = x.shape
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    dbeta, dgamma = _partial_sums(_bn_relu_grad_sums, (dout, x, out), (mean, inv_std))
    dgamma, dbeta = dgamma.astype(x.dtype), dbeta.astype(x.dtype)
    factor = (gamma * inv_std / x.dtype.type(max(rows, 1))).astype(x.dtype)
    dx = np.empty_like(x)
    _run_rows(_bn_relu_grad_apply, rows, (dout, x, out, dx), mean, inv_std, factor,
              x.dtype.type(rows), dbeta, dgamma)
    return dx, dgamma, dbeta
