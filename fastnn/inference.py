"""Batched prediction, with optional flip test-time averaging.

Every path that scores a whole split (Solver.check_accuracy, `fastnn train`'s
test pass, `fastnn evaluate`, `fastnn tune`) goes through `batch_scores`, so
no path runs 10,000 images through a ConvNet in one batch (its activations
would not fit in memory). With `flip`, an image's scores are the mean of the
scores of the image and of its left-right mirror.
"""
import numpy as np

from fastnn.backend import get_array_module, to_numpy
from fastnn.checks import as_size

DEFAULT_BATCH_SIZE = 256


def _check(X, batch_size, flip):
    """batch_size as a Python int (>= 1); flip only for images."""
    batch_size = as_size(batch_size, "batch_size", low=1)
    if flip and X.ndim != 4:
        raise ValueError(f"flip averaging mirrors images shaped (N, C, H, W); X has shape "
                         f"{X.shape}: pass flip=False for other inputs")
    return batch_size


def batch_scores(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False):
    """Yield (start, scores) for rows start:start+batch_size of X (N, ...); scores (B, C).

    Each batch moves to the model's backend (and dtype) on its own, so a
    host X never goes to the device whole.
    """
    batch_size = _check(X, batch_size, flip)
    xp = get_array_module(*model.params.values())
    dtype = getattr(model, "dtype", None)
    for start in range(0, X.shape[0], batch_size):
        batch = xp.asarray(X[start:start + batch_size], dtype=dtype)
        scores = model.loss(batch)
        if flip:
            mirrored = model.loss(xp.ascontiguousarray(batch[..., ::-1]))
            scores = (scores + mirrored) * scores.dtype.type(0.5)
        yield start, scores


def predict_scores(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False):
    """Scores (N, C) for X (N, ...) on the model's backend, batch_size rows at a time."""
    xp = get_array_module(*model.params.values())
    parts = [scores for _, scores in batch_scores(model, X, batch_size, flip)]
    if not parts:
        return xp.zeros((0, 0), dtype=getattr(model, "dtype", np.float32))
    return xp.concatenate(parts)


def predict(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False):
    """Predicted labels (N,) (int64, on the model's backend) for X (N, ...), in batches.

    Raises ValueError when some images get NaN scores (NaN or infinite pixels, NaN
    parameters, an overflow): argmax would label them class 0 without a word.
    """
    xp = get_array_module(*model.params.values())
    labels, nan_rows = [], []
    for _, scores in batch_scores(model, X, batch_size, flip):
        labels.append(xp.argmax(scores, axis=1))
        nan_rows.append(xp.isnan(scores).any(axis=1))
    if not labels:
        return xp.zeros(0, dtype=np.int64)
    nan_rows = xp.concatenate(nan_rows)
    if bool(nan_rows.any()):  # one device read per call: predict hands labels to the user
        _refuse_nan_scores(X, to_numpy(nan_rows))
    return xp.concatenate(labels).astype(np.int64, copy=False)


def _refuse_nan_scores(X, nan_rows):
    """ValueError naming the images (rows of X) whose scores are NaN, and the likely cause."""
    rows = np.flatnonzero(nan_rows)
    shown = ", ".join(str(i) for i in rows[:5]) + (", ..." if rows.size > 5 else "")
    xp = get_array_module(X)
    bad_pixels = int(xp.count_nonzero(~xp.isfinite(xp.asarray(X)))) if X.dtype.kind in "fc" else 0
    cause = (f"X holds {bad_pixels} NaN or infinite values: clean or drop those images"
             if bad_pixels else "X is finite, so the model's parameters hold NaN or its scores "
             "overflow: check the model (e.g. the run that trained it)")
    raise ValueError(f"the scores of {rows.size} of {nan_rows.size} images are NaN (rows "
                     f"{shown}), so they have no predicted class; {cause}")


def count_correct(model, X, y, batch_size=DEFAULT_BATCH_SIZE, flip=False):
    """How many rows of X the model labels as y (N,): a 0-d int64 array on the model's
    backend (no device read, so a training loop can call it without a sync)."""
    xp = get_array_module(*model.params.values())
    y = xp.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"X has {X.shape[0]} rows but y has shape {y.shape}; "
                         "they need one label per row")
    correct = xp.zeros((), dtype=np.int64)
    for start, scores in batch_scores(model, X, batch_size, flip):
        correct += (xp.argmax(scores, axis=1) == y[start:start + scores.shape[0]]).sum()
    return correct


def accuracy(model, X, y, batch_size=DEFAULT_BATCH_SIZE, flip=False):
    """Fraction of X (N, ...) the model labels as y (N,): a Python float (0.0 for N = 0)."""
    return float(count_correct(model, X, y, batch_size, flip)) / max(X.shape[0], 1)


def plain_and_flip_accuracy(model, X, y, batch_size=DEFAULT_BATCH_SIZE):
    """(accuracy without, accuracy with flip averaging) of X (N, C, H, W) against y (N,),
    Python floats, from one pass: each batch is scored once as given and once mirrored."""
    batch_size = _check(X, batch_size, flip=True)
    xp = get_array_module(*model.params.values())
    y = xp.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"X has {X.shape[0]} rows but y has shape {y.shape}; "
                         "they need one label per row")
    dtype = getattr(model, "dtype", None)
    correct = xp.zeros(2, dtype=np.int64)
    for start in range(0, X.shape[0], batch_size):
        batch = xp.asarray(X[start:start + batch_size], dtype=dtype)
        labels = y[start:start + batch.shape[0]]
        plain = model.loss(batch)
        both = (plain + model.loss(xp.ascontiguousarray(batch[..., ::-1]))) * plain.dtype.type(0.5)
        correct += xp.stack([(xp.argmax(plain, axis=1) == labels).sum(),
                             (xp.argmax(both, axis=1) == labels).sum()])
    plain_correct, flip_correct = (int(v) for v in to_numpy(correct))
    n = max(X.shape[0], 1)
    return plain_correct / n, flip_correct / n
