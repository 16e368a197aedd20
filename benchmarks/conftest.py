"""Fixtures for the benchmark suites (pytest-benchmark; never collected by the tests).

Run them with `python -m pytest benchmarks` (the repo's testpaths keep a
bare `pytest` to tests/). The data and the sgemm ceiling are made once per
session; GPU contenders skip with the reason when CuPy, PyTorch CUDA or a
GPU is missing.
"""
import pytest

import fastnn
import machine
import workloads


@pytest.fixture(scope="session")
def bench_data():
    """The 49,000 / 1,000 split: real CIFAR-10 when $FASTNN_DATA holds it, else random."""
    return workloads.load_data()


@pytest.fixture(scope="session")
def sgemm_rates():
    """GFLOP/s of a 4096^3 float32 product per library and device (the ceiling)."""
    return machine.sgemm_rates()


@pytest.fixture(scope="session")
def environment():
    """Versions, thread counts and hardware, recorded in every benchmark's extra_info."""
    return machine.environment()


@pytest.fixture(autouse=True)
def _numpy_backend_by_default():
    """Every benchmark starts (and leaves) with the numpy backend active."""
    fastnn.set_backend("numpy")
    yield
    fastnn.set_backend("numpy")
