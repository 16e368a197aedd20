"""Shared fixtures: one test body runs on every backend and dtype.

`backend` makes a backend active for the test and yields its array module;
the cupy case skips (with the reason) when CuPy or a GPU is missing, and
only the cupy case ever asks for CuPy, so numpy runs never import it. With
FASTNN_REQUIRE_CUPY=1 in the environment (benchmarks/gpu_check.sh sets it)
the cupy case fails instead of skipping: a GPU check cannot pass without a GPU.
Tests build their inputs with numpy, move them with `xp.asarray`, and
compare on the host through `fastnn.to_numpy`.
"""
import os

import numpy as np
import pytest

import fastnn


def _cupy_skip_reason():
    from fastnn.backend import cupy_available

    if cupy_available():
        return None
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'fastnn[cuda13]' or 'fastnn[cuda12]')"
    return "CuPy is installed but no CUDA GPU is usable"


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """The array module of the active backend (`numpy` or `cupy`) for this test."""
    name = request.param
    if name == "cupy":
        reason = _cupy_skip_reason()
        if reason and os.environ.get("FASTNN_REQUIRE_CUPY") == "1":
            pytest.fail(f"FASTNN_REQUIRE_CUPY=1, but {reason}", pytrace=False)
        if reason:
            pytest.skip(reason)
    with fastnn.use_backend(name):
        yield fastnn.xp()


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    """A floating dtype every layer, rule and model must keep."""
    return np.dtype(request.param)


@pytest.fixture(autouse=True)
def _numpy_backend_by_default():
    """Every test starts (and leaves) with the numpy backend active."""
    fastnn.set_backend("numpy")
    yield
    fastnn.set_backend("numpy")


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A folder holding a tiny cifar-10-batches-py (tests/tiny_cifar.py), made once per run."""
    from tiny_cifar import write_tiny_cifar

    return str(write_tiny_cifar(tmp_path_factory.mktemp("cifar")))

