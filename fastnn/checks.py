"""Argument checks shared by the library: one clear message per bad size or hyperparameter.

Sizes are converted with `operator.index` before anything else: a numpy integer
becomes an exact Python int, so arithmetic on it cannot wrap (np.int8(100) + 100
is -56 in numpy) and comparisons see its true value. Booleans are refused (True
is not a size), and so are floats, even integral ones (2.5 epochs, "3").
"""
import math
import numbers
import operator

import numpy as np

__all__ = ["as_size", "as_optional_size", "as_sizes", "as_real"]


def as_size(value, name, low=0, high=None):
    """`value` as a Python int in [low, high] (high None: no upper bound).

    Raises TypeError (naming `name` and the value) for anything that is not an integer
    (bool, float, str, ...) and ValueError for an integer out of range.
    """
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError  # True is an int to Python, but never a size
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} "
                        f"({type(value).__name__})") from None
    if size < low or (high is not None and size > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {size}")
    return size


def as_optional_size(value, name, low=0, high=None):
    """None stays None (meaning "all" or "not given"); anything else as `as_size`."""
    return None if value is None else as_size(value, name, low, high)


def as_sizes(values, name, low=0, high=None):
    """A sequence of sizes (list, tuple, 1-D array) as a list of Python ints, each checked as
    `as_size` and named `name[i]` in messages."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}")
    return [as_size(v, f"{name}[{i}]", low, high) for i, v in enumerate(values)]


def as_real(value, name, low=-math.inf, high=math.inf, *, low_open=False, high_open=False):
    """`value` as a finite Python float in the interval from low to high.

    The ends are included unless low_open / high_open. Raises TypeError for a value
    that is not a real number (bool, str, None, an array of several values) and
    ValueError for NaN, an infinity or a value outside the interval.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if not math.isfinite(number) or below or above:
        interval = (("(" if low_open else "[") + f"{low:g}, {high:g}"
                    + (")" if high_open else "]"))
        if (low, high, low_open) == (0, math.inf, True):
            wanted = "a positive finite number"
        elif (low, high, low_open) == (0, math.inf, False):
            wanted = "a finite number >= 0"
        else:
            wanted = f"a finite number in {interval}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number
