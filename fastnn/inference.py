"""Batched prediction, with optional test-time augmentation (TTA).

Every path that scores a whole split (Solver.check_accuracy, `fastnn train`'s
test pass, `fastnn evaluate`, `fastnn tune`) goes through `batch_scores`, so
no path runs 10,000 images through a ConvNet in one batch (its activations
would not fit in memory).

Test-time augmentation averages an image's scores over views of it, each
view one batched pass of the model (airbench's `infer`, tta_level 0/1/2):
  tta=0  the image as given;
  tta=1  the mean of the image's and its left-right mirror's scores (= flip=True);
  tta=2  half tta=1's mean, half the mean of tta=1's mean over the image translated
         by one pixel down-right and up-left (edges padded by reflection): weights
         1/4 for the image and its mirror, 1/8 for each of the four shifted views.
"""
import numbers

import numpy as np

from fastnn.backend import get_array_module, to_numpy
from fastnn.checks import as_size

DEFAULT_BATCH_SIZE = 256


TTA_LEVELS = (0, 1, 2)


def _check(X, batch_size, flip, tta=None):
    """(batch_size as a Python int >= 1, the TTA level of flip and tta); TTA only for images."""
    batch_size = as_size(batch_size, "batch_size", low=1)
    if tta is None:
        level = 1 if flip else 0
    elif isinstance(tta, bool) or not isinstance(tta, numbers.Integral) or tta not in TTA_LEVELS:
        raise ValueError(f"tta must be one of {TTA_LEVELS} (0: none, 1: mirror, 2: mirror and "
                         f"1-pixel translations), got {tta!r}")
    elif flip and tta != 1:
        raise ValueError(f"flip=True is tta=1; got both flip=True and tta={tta!r}: pass tta "
                         f"alone")
    else:
        level = int(tta)
    if level and X.ndim != 4:
        raise ValueError(f"flip averaging and tta mirror images shaped (N, C, H, W); X has "
                         f"shape {X.shape}: pass flip=False (tta=0) for other inputs")
    return batch_size, level


def _mirror_mean(model, xp, batch, scores):
    """The mean of `scores` (the model's scores of batch (B, C, H, W)) and its mirror's."""
    mirrored = model.loss(xp.ascontiguousarray(batch[..., ::-1]))
    return (scores + mirrored) * scores.dtype.type(0.5)


def _view_scores(model, xp, batch, level):
    """The scores of batch (B, C, H, W) at each TTA level 0..level, each (B, classes), one
    model pass per view (a level's views include the lower levels')."""
    plain = model.loss(batch)
    if level == 0:
        return (plain,)
    mirrored = _mirror_mean(model, xp, batch, plain)
    if level == 1:
        return plain, mirrored
    height, width = batch.shape[2:]
    padded = xp.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    shifted = [_mirror_mean(model, xp, view, model.loss(view)) for view in (
        xp.ascontiguousarray(padded[:, :, :height, :width]),  # content moved down-right
        xp.ascontiguousarray(padded[:, :, 2:, 2:]))]          # and up-left
    half = plain.dtype.type(0.5)
    return plain, mirrored, (mirrored + (shifted[0] + shifted[1]) * half) * half


def _batches(model, X, batch_size):
    """Yield (start, batch): X's rows start:start+batch_size on the model's backend and dtype."""
    xp = get_array_module(*model.params.values())
    dtype = getattr(model, "dtype", None)
    for start in range(0, X.shape[0], batch_size):
        yield start, xp.asarray(X[start:start + batch_size], dtype=dtype)


def batch_scores(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """Yield (start, scores) for rows start:start+batch_size of X (N, ...); scores (B, C).

    Each batch moves to the model's backend (and dtype) on its own, so a
    host X never goes to the device whole. flip=True is tta=1; tta (0, 1, 2):
    the test-time augmentation level (see the module docstring).
    """
    batch_size, level = _check(X, batch_size, flip, tta)
    xp = get_array_module(*model.params.values())
    for start, batch in _batches(model, X, batch_size):
        yield start, _view_scores(model, xp, batch, level)[-1]


def predict_scores(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """Scores (N, C) for X (N, ...) on the model's backend, batch_size rows at a time."""
    xp = get_array_module(*model.params.values())
    parts = [scores for _, scores in batch_scores(model, X, batch_size, flip, tta)]
    if not parts:
        return xp.zeros((0, 0), dtype=getattr(model, "dtype", np.float32))
    return xp.concatenate(parts)


def predict(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """Predicted labels (N,) (int64, on the model's backend) for X (N, ...), in batches.

    Raises ValueError when some images get NaN scores (NaN or infinite pixels, NaN
    parameters, an overflow): argmax would label them class 0 without a word.
    """
    xp = get_array_module(*model.params.values())
    labels, nan_rows = [], []
    for _, scores in batch_scores(model, X, batch_size, flip, tta):
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


def count_correct(model, X, y, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """How many rows of X the model labels as y (N,): a 0-d int64 array on the model's
    backend (no device read, so a training loop can call it without a sync)."""
    xp = get_array_module(*model.params.values())
    y = xp.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"X has {X.shape[0]} rows but y has shape {y.shape}; "
                         "they need one label per row")
    correct = xp.zeros((), dtype=np.int64)
    for start, scores in batch_scores(model, X, batch_size, flip, tta):
        correct += (xp.argmax(scores, axis=1) == y[start:start + scores.shape[0]]).sum()
    return correct


def accuracy(model, X, y, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """Fraction of X (N, ...) the model labels as y (N,): a Python float (0.0 for N = 0)."""
    return float(count_correct(model, X, y, batch_size, flip, tta)) / max(X.shape[0], 1)


def plain_and_flip_accuracy(model, X, y, batch_size=DEFAULT_BATCH_SIZE, tta=1):
    """(accuracy without, accuracy with test-time augmentation at level tta: 1, flip
    averaging, or 2) of X (N, C, H, W) against y (N,), Python floats, from one pass: the
    plain scores of each batch are also the first view of its average."""
    if _check(X, batch_size, flip=False, tta=tta)[1] == 0:
        raise ValueError("plain_and_flip_accuracy compares plain scores with tta 1 or 2, "
                         f"got tta={tta!r}: use accuracy() for plain scores alone")
    accuracies = tta_accuracies(model, X, y, batch_size, tta)
    return accuracies[0], accuracies[-1]


def tta_accuracies(model, X, y, batch_size=DEFAULT_BATCH_SIZE, tta=1):
    """The accuracies (Python floats) at each TTA level 0..tta of X (N, C, H, W) against
    y (N,), from one pass: a level's views include the lower levels'."""
    batch_size, level = _check(X, batch_size, flip=False, tta=tta)
    xp = get_array_module(*model.params.values())
    y = xp.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"X has {X.shape[0]} rows but y has shape {y.shape}; "
                         "they need one label per row")
    correct = xp.zeros(level + 1, dtype=np.int64)
    for start, batch in _batches(model, X, batch_size):
        labels = y[start:start + batch.shape[0]]
        correct += xp.stack([(xp.argmax(scores, axis=1) == labels).sum()
                             for scores in _view_scores(model, xp, batch, level)])
    n = max(X.shape[0], 1)
    return tuple(int(v) / n for v in to_numpy(correct))
