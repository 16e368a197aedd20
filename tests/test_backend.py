"""Tests for the backend facade: fastnn.set_backend / get_backend / use_backend / xp / to_numpy."""
import importlib.util
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import fastnn
from fastnn import backend as B

HAVE_CUPY_PACKAGE = importlib.util.find_spec("cupy") is not None


@pytest.fixture
def fake_cupy(monkeypatch):
    """Let set_backend("cupy") succeed without CuPy: the import returns a stand-in module.

    This tests the switching logic (what use_backend restores, what xp()
    returns) on machines without a GPU; nothing computes with the stand-in.
    """
    module = types.SimpleNamespace(__name__="fake_cupy")
    monkeypatch.setattr(B, "_import_cupy", lambda: module)
    return module


def test_default_backend_is_numpy():
    assert fastnn.get_backend() == "numpy"
    assert fastnn.xp() is np


def test_set_backend_numpy(backend):
    fastnn.set_backend("numpy")
    assert fastnn.get_backend() == "numpy"
    assert fastnn.xp() is np


def test_backend_fixture_activates(backend):
    assert fastnn.xp() is backend
    assert fastnn.get_backend() == ("numpy" if backend is np else "cupy")


@pytest.mark.parametrize("name", ["torch", "NumPy", "", "gpu", None])
def test_unknown_backend_is_value_error_and_changes_nothing(name):
    with pytest.raises(ValueError) as info:
        fastnn.set_backend(name)
    assert repr(name) in str(info.value) or str(name) in str(info.value)
    assert fastnn.get_backend() == "numpy"
    assert fastnn.xp() is np


def test_use_backend_unknown_name_changes_nothing():
    with pytest.raises(ValueError):
        with fastnn.use_backend("jax"):
            pass
    assert fastnn.get_backend() == "numpy"


@pytest.mark.skipif(HAVE_CUPY_PACKAGE, reason="CuPy is installed: the missing-CuPy error cannot occur")
def test_cupy_missing_is_runtime_error_saying_how_to_install():
    with pytest.raises(RuntimeError) as info:
        fastnn.set_backend("cupy")
    message = str(info.value)
    assert "pip install" in message and "cupy" in message.lower()
    assert fastnn.get_backend() == "numpy"
    with pytest.raises(RuntimeError):
        with fastnn.use_backend("cupy"):
            pass
    assert fastnn.get_backend() == "numpy"
    assert B.cupy_available() is False


def test_use_backend_switches_and_restores(fake_cupy):
    with fastnn.use_backend("cupy"):
        assert fastnn.get_backend() == "cupy"
        assert fastnn.xp() is fake_cupy
        with fastnn.use_backend("numpy"):
            assert fastnn.get_backend() == "numpy"
            assert fastnn.xp() is np
        assert fastnn.get_backend() == "cupy"
    assert fastnn.get_backend() == "numpy"
    assert fastnn.xp() is np


def test_use_backend_restores_previous_on_exception(fake_cupy):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with fastnn.use_backend("cupy"):
            assert fastnn.get_backend() == "cupy"
            raise Boom
    assert fastnn.get_backend() == "numpy"

    fastnn.set_backend("cupy")
    with pytest.raises(Boom):
        with fastnn.use_backend("numpy"):
            assert fastnn.xp() is np
            raise Boom
    assert fastnn.get_backend() == "cupy"
    assert fastnn.xp() is fake_cupy


def test_set_backend_returns_to_numpy(fake_cupy):
    fastnn.set_backend("cupy")
    assert fastnn.get_backend() == "cupy"
    fastnn.set_backend("numpy")
    assert fastnn.get_backend() == "numpy"
    assert fastnn.xp() is np


@pytest.mark.parametrize("value", [
    np.arange(6.0).reshape(2, 3), [[1, 2], [3, 4]], np.float32(2.5), 3.0,
    np.zeros((0, 4), dtype=np.int64)])
def test_to_numpy_of_host_values(value):
    out = fastnn.to_numpy(value)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, np.asarray(value))
    assert out.dtype == np.asarray(value).dtype


def test_to_numpy_of_backend_array(backend):
    host = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = fastnn.to_numpy(backend.asarray(host))
    assert type(out) is np.ndarray
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, host)


def test_get_array_module_numpy_and_scalars():
    a = np.zeros(3)
    assert B.get_array_module(a) is np
    assert B.get_array_module(a, None, 1, 2.0, np.float32(1)) is np


def test_get_array_module_rejects_non_arrays():
    with pytest.raises(TypeError):
        B.get_array_module(np.zeros(2), [1.0, 2.0])


def test_get_array_module_mixed_numpy_and_cupy_names_both(backend):
    if backend is np:
        pytest.skip("needs CuPy arrays")
    with pytest.raises(TypeError) as info:
        B.get_array_module(np.zeros(3), backend.zeros(3))
    assert "numpy" in str(info.value) and "cupy" in str(info.value)
    with pytest.raises(TypeError):
        B.get_array_module(backend.zeros(3), np.zeros(3))
    assert B.get_array_module(backend.zeros(3)) is backend


def test_mixed_modules_rejected_by_layers(backend):
    if backend is np:
        pytest.skip("needs CuPy arrays")
    from fastnn.layers import affine_forward

    with pytest.raises(TypeError):
        affine_forward(backend.zeros((2, 3)), np.zeros((3, 4)), np.zeros(4))


def _run_python(code):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


OPTIONAL = ("cupy", "torch", "tqdm", "matplotlib")


def test_import_loads_no_optional_library():
    """Importing fastnn and its core modules imports neither CuPy nor torch, tqdm, matplotlib."""
    out = _run_python(f"""
        import sys
        import fastnn, fastnn.layers, fastnn.layer_utils, fastnn.optim, fastnn.solver
        import fastnn.classifiers, fastnn.gradient_check, fastnn.kernels, fastnn.serialization
        print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}))
        """)
    assert out.strip() == "[]", f"optional libraries imported: {out.strip()}"


def test_numpy_training_loads_no_optional_library():
    """A whole numpy-backend session (layers, kernels, a short Solver run, save/load) leaves CuPy unimported."""
    out = _run_python(f"""
        import os, sys, tempfile
        import numpy as np
        import fastnn
        from fastnn.classifiers import FullyConnectedNet
        from fastnn.solver import Solver
        rng = np.random.default_rng(0)
        X = rng.standard_normal((20, 6)).astype(np.float32)
        y = rng.integers(0, 3, 20)
        model = FullyConnectedNet([5], input_dim=6, num_classes=3, dropout=0.1,
                                  use_batchnorm=True, seed=0)
        data = dict(X_train=X, y_train=y, X_val=X, y_val=y)
        Solver(model, data, num_epochs=1, batch_size=10, verbose=False, seed=0).train()
        path = os.path.join(tempfile.mkdtemp(), "m.npz")
        fastnn.save(model, path)
        fastnn.load(path)
        print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}))
        """)
    assert out.strip() == "[]", f"optional libraries imported: {out.strip()}"


@pytest.mark.skipif(B.cupy_available(), reason="CuPy and a GPU are here: the cupy cases run")
def test_require_cupy_makes_the_cupy_cases_fail_instead_of_skipping(tmp_path):
    """FASTNN_REQUIRE_CUPY=1 (benchmarks/gpu_check.sh) turns the backend fixture's skip into
    a failure, so a GPU check without a working GPU cannot pass."""
    import os

    test = "tests/test_backend.py::test_get_array_module_mixed_numpy_and_cupy_names_both"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for require in ("1", "0"):
        env = dict(os.environ, FASTNN_REQUIRE_CUPY=require)
        runs[require] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
             f"{test}[cupy]"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert runs["1"].returncode != 0 and "FASTNN_REQUIRE_CUPY=1, but" in runs["1"].stdout
    assert runs["0"].returncode == 0 and "1 skipped" in runs["0"].stdout
