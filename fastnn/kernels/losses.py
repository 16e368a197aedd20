"""Losses: softmax cross-entropy (with label smoothing, and a member axis) and the SVM hinge.

Each op: its reference (plain xp, the declaration), its Numba version and, for
the softmax loss, its CuPy version (the cupy table runs the reference SVM loss).
"""
import functools

import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._numba import _jit
from fastnn.kernels.registry import declare


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


@declare()
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


@declare()
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


@softmax_loss.register("numpy")
def softmax_loss_numba(x, y, smoothing=0.0):
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


@svm_loss.register("numpy")
def svm_loss_numba(x, y):
    return _row_loss(_svm_loss, x, y)


# CuPy: one thread per row, as the Numba loop (exp and sums in double)
SOFTMAX_LOSS_SOURCE = r"""
extern "C" __global__ void fastnn_softmax_loss_{T}(
        const {T}* x, const long long* y, const double smoothing, const long long n,
        const long long c, const double inv_n, {T}* dx, double* row_loss) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const {T}* xi = x + i * c;
    {T}* di = dx + i * c;
    const long long label = y[i];
    const double off = smoothing / (double)c, on = 1.0 - smoothing;
    if (label < 0 || label >= c) {  // unchecked labels: NaN, never an out-of-bounds read
        row_loss[i] = nan("");
        for (long long j = 0; j < c; ++j) di[j] = ({T})nan("");
        return;
    }
    {T} top = xi[0];
    for (long long j = 1; j < c; ++j) top = xi[j] > top ? xi[j] : top;
    double total = 0.0, shifted_sum = 0.0;
    for (long long j = 0; j < c; ++j) {
        const double shifted = (double)({T})(xi[j] - top);
        const double e = exp(shifted);
        di[j] = ({T})e;
        total += e;
        shifted_sum += shifted;
    }
    const double log_total = log(total);
    const double correct = (double)({T})(xi[label] - top);
    row_loss[i] = smoothing != 0.0 ? log_total - on * correct - off * shifted_sum
                                   : log_total - correct;
    const double scale = inv_n / total;
    for (long long j = 0; j < c; ++j) {  // rounded to T at each step, as the Numba loop stores them
        {T} d = ({T})((double)di[j] * scale);
        if (smoothing != 0.0) d = ({T})((double)d - off * inv_n);
        di[j] = d;
    }
    di[label] = ({T})((double)di[label] - (smoothing != 0.0 ? on : 1.0) * inv_n);
}
"""


@functools.lru_cache(maxsize=None)
def _softmax_loss_kernel(type_name):
    import cupy

    source = SOFTMAX_LOSS_SOURCE.replace("{T}", type_name)
    return cupy.RawKernel(source, f"fastnn_softmax_loss_{type_name}", options=("--fmad=false",))


@softmax_loss.register("cupy")
def softmax_loss_cupy(x, y, smoothing=0.0):
    """The Numba softmax loss on the device: (loss 0-d of x.dtype, dx (N, C)); no sync.

    Members: x (K, N, C) on shared labels -> (losses (K,), dx (K, N, C)).
    """
    import cupy

    members = x.shape[0] if x.ndim == 3 else None
    n, c = x.shape[-2:]
    x2d = cupy.ascontiguousarray(x).reshape(-1, c)
    y = cupy.ascontiguousarray(y, dtype=np.int64)
    if members is not None:
        y = cupy.tile(y, members)
    rows = x2d.shape[0]
    dx = cupy.empty_like(x2d)
    row_loss = cupy.empty(rows, dtype=np.float64)
    threads = 128
    kernel = _softmax_loss_kernel("float" if x.dtype == np.float32 else "double")
    kernel(((rows + threads - 1) // threads,), (threads,),
           (x2d, y, np.float64(smoothing), np.int64(rows), np.int64(c),
            np.float64(1.0 / max(n, 1)), dx, row_loss))
    if members is not None:
        losses = row_loss.reshape(members, n).sum(axis=1) / max(n, 1)
        return losses.astype(x.dtype), dx.reshape(x.shape)
    return (row_loss.sum() / max(n, 1)).astype(x.dtype), dx
