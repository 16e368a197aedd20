"""fastnn.checks: sizes as exact Python ints, hyperparameters as finite floats, one message each."""
import math

import numpy as np
import pytest

from fastnn.checks import as_optional_size, as_real, as_size


@pytest.mark.parametrize("value", [7, np.int8(7), np.uint64(7), np.int64(7)])
def test_as_size_gives_a_python_int(value):
    size = as_size(value, "n")
    assert size == 7 and type(size) is int


def test_as_size_keeps_numpy_integers_exact():
    # converted before any arithmetic: neither wraps
    assert as_size(np.int16(30000), "a") + as_size(np.int16(30000), "b") == 60000
    assert as_size(np.uint64(2**64 - 1), "n") == 2**64 - 1
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 100\], got 18446744073709551615"):
        as_size(np.uint64(2**64 - 1), "n", low=1, high=100)


@pytest.mark.parametrize("value", [2.5, 3.0, np.float64(3), "3", True, np.True_, None, [3]])
def test_as_size_refuses_what_is_not_an_integer(value):
    with pytest.raises(TypeError, match="batch_size must be an integer, got"):
        as_size(value, "batch_size")


def test_as_size_ranges():
    assert as_size(0, "n") == 0
    with pytest.raises(ValueError, match="num_epochs must be an integer >= 0, got -1"):
        as_size(-1, "num_epochs")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        as_size(0, "batch_size", low=1)
    assert as_optional_size(None, "n") is None
    assert as_optional_size(np.int32(5), "n") == 5


def test_as_real():
    assert as_real(np.float32(0.5), "lr", 0, math.inf, low_open=True) == 0.5
    assert type(as_real(1, "x")) is float
    with pytest.raises(ValueError, match="learning_rate must be a positive finite number, got -1"):
        as_real(-1, "learning_rate", 0, math.inf, low_open=True)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="must be a positive finite number"):
            as_real(bad, "learning_rate", 0, math.inf, low_open=True)
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\), got 1"):
        as_real(1, "momentum", 0, 1, high_open=True)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -0.1"):
        as_real(-0.1, "weight_decay", 0)
    for bad in ("0.1", True, None, np.ones(2)):
        with pytest.raises(TypeError, match="lr must be a number, got"):
            as_real(bad, "lr")
