"""Thread configuration: the BLAS pool gets the cores and Numba's pool never starts.

fastnn/kernels/_numba.py explains why (a parallel Numba loop right after a BLAS
product fights the spinning BLAS threads and took about 4 ms whatever its size). These tests
pin that configuration down without timing anything.
"""
import json
import os
import subprocess
import sys

import numba
import pytest
from threadpoolctl import threadpool_info

import fastnn
from fastnn import threads
from helpers import numba_kernels


def test_every_numba_kernel_is_serial():
    kernels = numba_kernels()
    assert len(kernels) >= 8
    parallel = [name for name, d in kernels.items() if d.targetoptions.get("parallel")]
    assert parallel == []


def test_a_training_step_never_starts_numbas_thread_pool():
    script = """
import numpy as np, numba.np.ufunc.parallel as p
from fastnn.classifiers import FullyConnectedNet
from fastnn.solver import Solver
X = np.random.default_rng(0).standard_normal((64, 20)).astype(np.float32)
y = np.arange(64) % 10
model = FullyConnectedNet([16], input_dim=20, dropout=0.2, use_batchnorm=True, seed=0)
Solver(model, dict(X_train=X, y_train=y, X_val=X, y_val=y), update_rule="adam",
       batch_size=32, num_epochs=1, verbose=False).train()
print(p._is_initialized)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_set_num_threads_sets_numba_and_blas():
    before = fastnn.get_num_threads()
    try:
        fastnn.set_num_threads(1)
        assert fastnn.get_num_threads() == 1 == numba.get_num_threads()
        assert _blas_threads() and set(_blas_threads()) == {1}
    finally:
        fastnn.set_num_threads(before)
    assert set(_blas_threads()) == {before}


def test_set_num_threads_rejects_a_bad_count():
    with pytest.raises(ValueError, match="thread count"):
        fastnn.set_num_threads(0)
    with pytest.raises(ValueError, match="thread count"):
        fastnn.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    with pytest.raises(TypeError, match="the thread count must be an integer, got 1.5"):
        fastnn.set_num_threads(1.5)  # was floored to 1


def test_numba_num_threads_is_respected_by_blas_too():
    script = """
import json, fastnn
from threadpoolctl import threadpool_info
import fastnn.kernels  # loading the kernels applies the thread count
print(json.dumps([fastnn.get_num_threads(),
                  [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]]))
"""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env)
    numba_threads, blas_threads = json.loads(out.stdout)
    assert numba_threads == 1 and blas_threads and set(blas_threads) == {1}


_SPIN_SCRIPT = """
import ctypes, json, os
import numpy as np
a = np.ones((256, 256), np.float32)
a @ a  # OpenBLAS's pool starts with the timeout it read at load
import fastnn.kernels  # noqa: F401  (loading the kernels shortens the spin)
a @ a  # and restarts with the new one
from fastnn.threads import openblas_pthreads_libraries
lib = ctypes.CDLL(openblas_pthreads_libraries()[0])
print(json.dumps([lib.openblas_thread_timeout(), os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                  float((a @ a)[0, 0])]))
"""


@pytest.mark.skipif(not threads.openblas_pthreads_libraries(), reason="numpy's BLAS is not a pthreads OpenBLAS")
@pytest.mark.parametrize("user_value", [None, "12"])
def test_loading_the_kernels_shortens_openblas_spin_unless_the_user_chose(user_value):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    out = subprocess.run([sys.executable, "-c", _SPIN_SCRIPT], capture_output=True, text=True,
                         check=True, env=env)
    timeout, env_value, product = json.loads(out.stdout)
    expected = int(user_value) if user_value else threads.BLAS_SPIN_LOG2_CYCLES
    assert timeout == expected and env_value == str(expected)
    assert product == 256.0  # the restarted pool still computes
