"""Augmentation: random flips and crops, a pure function of (seed, step, image).

`flip` is a bool (a random flip per image, from the step's key) or a boolean
array (N,) naming the images to mirror: the Solver's alternating flips
(rng.alternating_flips), drawn per dataset image rather than per batch row.

The op's reference (plain xp, the declaration) and its Numba version; the cupy
table runs the reference.
"""
import numpy as np

from fastnn.backend import get_array_module
from fastnn.kernels._numba import _GOLDEN, _jit, _mix64
from fastnn.kernels.registry import declare
from fastnn.kernels.rng import _hash_positions, augment_key


def flip_crop_offsets(xp, count, seed, step, padding):
    """Per image: (flip as bool, row shift, column shift), shifts in [-padding, padding]."""
    z = _hash_positions(xp, count, augment_key(seed, step))
    span = xp.uint64(2 * padding + 1)
    flips = (z >> xp.uint64(63)) == xp.uint64(1)
    dy = ((z >> xp.uint64(32)) & xp.uint64(0xFFFF)) % span
    dx = (z & xp.uint64(0xFFFF)) % span
    return flips, dy.astype(xp.int64) - padding, dx.astype(xp.int64) - padding


def _given_flips(xp, flip, n):
    """The boolean array (n,) `flip` names, or None when `flip` is a bool (True: random)."""
    if getattr(flip, "ndim", 0) == 0:
        return None
    if flip.shape != (n,):
        raise ValueError(f"flip as an array names the images to mirror: it needs shape ({n},), "
                         f"got {flip.shape}")
    return xp.asarray(flip, dtype=bool)


def _reflect(xp, index, size):
    """Indices past an edge reflected back inside (no edge repeat), as numpy's and
    torch's "reflect" padding: valid for indices in (-size, 2 * size - 1)."""
    index = xp.abs(index)
    return xp.where(index >= size, 2 * (size - 1) - index, index)


@declare()
def flip_crop(x, seed, step, flip, padding, reflect=False):
    """Random horizontal flips and random crops of the padded images x (N, C, H, W).

    Image i is shifted by (dy, dx) in [-padding, padding] (pixels shifted in
    are 0, or with `reflect` the image's reflection: airbench's translations;
    padding < H, W) and mirrored left-right: with probability 1/2 when `flip`
    is True, never when False, exactly when flip[i] for a boolean array flip (N,).
    """
    xp = get_array_module(x)
    n, channels, height, width = x.shape
    flips, dy, dx = flip_crop_offsets(xp, n, seed, step, padding)
    given = _given_flips(xp, flip, n)
    if given is not None:
        flips = given
    elif not flip:
        flips = xp.zeros_like(flips)
    rows = xp.arange(height)[None, :] + dy[:, None]
    cols = xp.arange(width)[None, :]
    cols = xp.where(flips[:, None], width - 1 - cols, cols) + dx[:, None]
    if reflect:
        rows, cols = _reflect(xp, rows, height), _reflect(xp, cols, width)
    valid = (((rows >= 0) & (rows < height))[:, None, :, None]
             & ((cols >= 0) & (cols < width))[:, None, None, :])
    picked = x[xp.arange(n)[:, None, None, None], xp.arange(channels)[None, :, None, None],
               xp.clip(rows, 0, height - 1)[:, None, :, None],
               xp.clip(cols, 0, width - 1)[:, None, None, :]]
    return xp.where(valid, picked, x.dtype.type(0))


@_jit
def _reflected(index, size):
    index = abs(index)
    return 2 * (size - 1) - index if index >= size else index


@_jit
def _flip_crop(x, out, key, flip, padding, given, reflect):
    # given: the images to mirror (bool, (N,)), or empty for flip's random choice
    n, channels, height, width = x.shape
    span = np.uint64(2 * padding + 1)
    source_cols = np.empty(width, dtype=np.int64)
    for i in range(n):
        z = _mix64(np.uint64(i) * _GOLDEN + key)
        if given.shape[0]:
            mirrored = given[i]
        else:
            mirrored = flip and (z >> np.uint64(63)) == np.uint64(1)
        dy = np.int64(((z >> np.uint64(32)) & np.uint64(0xFFFF)) % span) - padding
        dx = np.int64((z & np.uint64(0xFFFF)) % span) - padding
        if reflect:  # every pixel comes from inside: one column map per image, then a gather
            for col in range(width):
                source_cols[col] = _reflected((width - 1 - col if mirrored else col) + dx, width)
            for c in range(channels):
                for r in range(height):
                    src_r = _reflected(r + dy, height)
                    for col in range(width):
                        out[i, c, r, col] = x[i, c, src_r, source_cols[col]]
            continue
        for c in range(channels):
            for r in range(height):
                src_r = r + dy
                for col in range(width):
                    src_c = (width - 1 - col if mirrored else col) + dx
                    if 0 <= src_r < height and 0 <= src_c < width:
                        out[i, c, r, col] = x[i, c, src_r, src_c]
                    else:
                        out[i, c, r, col] = 0


@flip_crop.register("numpy")
def flip_crop_numba(x, seed, step, flip, padding, reflect=False):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    given = _given_flips(np, flip, x.shape[0])
    _flip_crop(x, out, np.uint64(augment_key(seed, int(step))), given is None and bool(flip),
               np.int64(padding), np.zeros(0, dtype=bool) if given is None else given,
               bool(reflect))
    return out
