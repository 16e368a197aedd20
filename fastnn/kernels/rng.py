"""The keyed random numbers of dropout and augmentation: a pure function of (seed, step, position).

A counter-based generator (SplitMix64's finaliser): the same integer
arithmetic on every backend, so every backend draws the same mask. The Numba
(_numba._mix64) and CUDA (_cupy.HASH) copies of `mix64` repeat it.
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

    The one SplitMix64 of the plain-xp code (_numba.py and _cupy.py have one each).
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
DROPOUT_STREAM, AUGMENT_STREAM, FLIP_STREAM = 1, 2, 3


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


def alternating_flips(indices, seed, epoch):
    """Boolean (N,): whether each dataset image `indices` (N,) is mirrored in `epoch`.

    airbench's alternating flips: image i is mirrored in epoch 0 by a coin of
    (seed, i) and, after that, exactly in the epochs it was not in the one
    before: coin(seed, i) XOR (epoch odd). `epoch` is an int or a 0-d integer
    array (the Solver's, computed on the device from the step counter).
    """
    xp = get_array_module(indices)
    z = _hash_positions_of(xp, indices, stream_key(seed, 0, FLIP_STREAM))
    coins = (z >> xp.uint64(63)) == xp.uint64(1)
    return coins ^ (epoch % 2 == 1)


def keep_threshold(p):
    """Units whose 24-bit hash is >= this are kept: P(keep) = 1 - p (to 2**-24)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    return int(round(p * (1 << UNIT_BITS)))


def dropout_keep(xp, size, seed, step, p):
    """Boolean keep-mask of `size` units (flat, C order) for (seed, step)."""
    z = _hash_positions(xp, size, dropout_key(seed, step))
    return (z >> xp.uint64(64 - UNIT_BITS)) >= xp.uint64(keep_threshold(p))


def _hash_positions(xp, count, key):
    """SplitMix64 of positions 0..count-1 under `key` (an int or a 0-d uint64 array)."""
    return _hash_positions_of(xp, xp.arange(count, dtype=xp.uint64), key)


def _hash_positions_of(xp, positions, key):
    """SplitMix64 of the integer array `positions` under `key` (an int or a 0-d uint64 array)."""
    key = xp.uint64(key) if isinstance(key, numbers.Integral) else key
    return mix64(positions.astype(xp.uint64, copy=False) * xp.uint64(GOLDEN) + key, xp)


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
