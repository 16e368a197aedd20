"""Tests for fastnn.gradient_check: numerical gradients of known functions, rel_error."""
import numpy as np
import pytest

import fastnn
from fastnn.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array, rel_error


def test_eval_numerical_gradient_sum_of_squares(backend):
    xp = backend
    x_host = np.random.default_rng(0).standard_normal((3, 4))
    x = xp.asarray(x_host)
    grad = eval_numerical_gradient(lambda v: (v * v).sum(), x, verbose=False)
    np.testing.assert_allclose(fastnn.to_numpy(grad), 2 * x_host, rtol=1e-8, atol=1e-10)
    assert grad.shape == x.shape
    assert isinstance(grad, xp.ndarray)  # the module of x, as the contract says
    np.testing.assert_array_equal(fastnn.to_numpy(x), x_host)  # x restored


def test_eval_numerical_gradient_nonlinear():
    x = np.array([0.3, -1.2, 2.0])
    grad = eval_numerical_gradient(lambda v: np.sin(v).sum() + v[0] * v[1], x, verbose=False)
    expected = np.cos(x) + np.array([x[1], x[0], 0.0])
    np.testing.assert_allclose(grad, expected, rtol=1e-8)


def test_eval_numerical_gradient_verbose_prints(capsys):
    eval_numerical_gradient(lambda v: (v ** 2).sum(), np.array([1.0, 2.0]), verbose=True)
    assert capsys.readouterr().out.count("\n") == 2
    eval_numerical_gradient(lambda v: (v ** 2).sum(), np.array([1.0, 2.0]), verbose=False)
    assert capsys.readouterr().out == ""


def test_eval_numerical_gradient_step_size():
    # for a cubic the central difference is off by exactly h**2 (f''' / 6 = 1)
    x = np.array([1.0])
    grad = eval_numerical_gradient(lambda v: (v ** 3).sum(), x, verbose=False, h=1e-2)
    assert grad[0] == pytest.approx(3.0 + 1e-4, rel=1e-9)


def test_eval_numerical_gradient_array(backend):
    xp, rng = backend, np.random.default_rng(1)
    x_host = rng.standard_normal((2, 3))
    df_host = rng.standard_normal((2, 3))
    x, df = xp.asarray(x_host), xp.asarray(df_host)
    grad = eval_numerical_gradient_array(lambda v: v * v, x, df)
    np.testing.assert_allclose(fastnn.to_numpy(grad), 2 * x_host * df_host, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(fastnn.to_numpy(x), x_host)
    assert isinstance(grad, xp.ndarray)


def test_eval_numerical_gradient_array_matrix_product():
    rng = np.random.default_rng(2)
    a, x, df = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    grad = eval_numerical_gradient_array(lambda v: a @ v, x, df)
    np.testing.assert_allclose(grad, a.T @ df, rtol=1e-8)


def test_rel_error_basics(backend):
    xp = backend
    a = xp.asarray(np.array([1.0, 2.0, 3.0]))
    assert rel_error(a, a) == 0.0
    assert isinstance(rel_error(a, a), float)
    b = xp.asarray(np.array([1.0, 2.0, 6.0]))
    assert rel_error(a, b) == pytest.approx(3.0 / 9.0)  # the worst element counts
    assert rel_error(a, b) == rel_error(b, a)
    assert rel_error(xp.asarray(np.array([1.0])), xp.asarray(np.array([2.0]))) == pytest.approx(1 / 3)
    assert rel_error(xp.zeros(3), xp.zeros(3)) == 0.0  # no division by zero
    assert rel_error(xp.asarray(np.array([1.0, -1.0])), xp.asarray(np.array([-1.0, 1.0]))) == 1.0
