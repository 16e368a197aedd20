"""Tests for fastnn.layer_utils: sandwich layers against numerical gradients.

The relu kink would spoil a central difference that straddles it, so inputs
are resampled until every pre-activation is at least 1e-3 from zero (a step
of h = 1e-5 in any input moves a pre-activation by far less than that); the
bound is then the same 1e-7 as for the single layers.
"""
import numpy as np
import pytest

import fastnn
from fastnn.gradient_check import eval_numerical_gradient_array, rel_error
from fastnn.layer_utils import (affine_bn_relu_backward, affine_bn_relu_forward,
                                affine_relu_backward, affine_relu_forward)

GRAD_TOL = 1e-7
MARGIN = 1e-3


def _affine_inputs(rng, x_shape=(4, 3, 2), M=5):
    D = int(np.prod(x_shape[1:]))
    return (rng.standard_normal(x_shape), rng.standard_normal((D, M)), rng.standard_normal(M))


def _affine_relu_case(seed):
    rng = np.random.default_rng(seed)
    while True:
        x, w, b = _affine_inputs(rng)
        pre = x.reshape(x.shape[0], -1) @ w + b
        if np.abs(pre).min() > MARGIN:
            return x, w, b, rng.standard_normal(pre.shape)


def _affine_bn_relu_case(seed):
    rng = np.random.default_rng(seed)
    while True:
        x, w, b = _affine_inputs(rng)
        gamma, beta = rng.standard_normal(w.shape[1]) + 1.0, 0.5 * rng.standard_normal(w.shape[1])
        a = x.reshape(x.shape[0], -1) @ w + b
        pre = gamma * (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5) + beta
        if np.abs(pre).min() > MARGIN:
            return x, w, b, gamma, beta, rng.standard_normal(pre.shape)


def test_affine_relu_backward_matches_numerical(backend):
    xp = backend
    x, w, b, dout = (xp.asarray(a) for a in _affine_relu_case(0))
    out, cache = affine_relu_forward(x, w, b)
    dx, dw, db = affine_relu_backward(dout, cache)
    assert out.shape == dout.shape and dx.shape == x.shape
    assert float(xp.min(out)) == 0.0  # some units are off: the relu is exercised

    def f(x_, w_, b_):
        return affine_relu_forward(x_, w_, b_)[0]

    assert rel_error(dx, eval_numerical_gradient_array(lambda v: f(v, w, b), x, dout)) < GRAD_TOL
    assert rel_error(dw, eval_numerical_gradient_array(lambda v: f(x, v, b), w, dout)) < GRAD_TOL
    assert rel_error(db, eval_numerical_gradient_array(lambda v: f(x, w, v), b, dout)) < GRAD_TOL


def test_affine_bn_relu_backward_matches_numerical(backend):
    xp = backend
    x, w, b, gamma, beta, dout = (xp.asarray(a) for a in _affine_bn_relu_case(1))
    out, cache = affine_bn_relu_forward(x, w, b, gamma, beta, {"mode": "train"})
    dx, dw, db, dgamma, dbeta = affine_bn_relu_backward(dout, cache)
    assert float(xp.min(out)) == 0.0 and float(xp.max(out)) > 0.0

    def f(x_, w_, b_, g_, be_):
        return affine_bn_relu_forward(x_, w_, b_, g_, be_, {"mode": "train"})[0]

    args = [x, w, b, gamma, beta]
    numeric = []
    for index in range(5):
        def g(v, index=index):
            return f(*args[:index], v, *args[index + 1:])

        numeric.append(eval_numerical_gradient_array(g, args[index], dout))
    for analytic, num, name in zip((dx, dw, dgamma, dbeta), numeric[:2] + numeric[3:],
                                   ("dx", "dw", "dgamma", "dbeta")):
        assert rel_error(analytic, num) < GRAD_TOL, name
    # batchnorm subtracts the batch mean, so the affine bias has no effect: db is 0,
    # and a relative error between two round-off values near 0 means nothing
    np.testing.assert_allclose(fastnn.to_numpy(db), 0, atol=1e-12)
    np.testing.assert_allclose(numeric[2], 0, atol=1e-9)


def test_affine_bn_relu_updates_running_stats(backend):
    xp = backend
    x, w, b, gamma, beta, _ = (xp.asarray(a) for a in _affine_bn_relu_case(2))
    bn_param = {"mode": "train"}
    affine_bn_relu_forward(x, w, b, gamma, beta, bn_param)
    a = fastnn.to_numpy(x).reshape(x.shape[0], -1) @ fastnn.to_numpy(w) + fastnn.to_numpy(b)
    np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_mean"]), 0.1 * a.mean(0), rtol=1e-10)


@pytest.mark.parametrize("sandwich", ["affine_relu", "affine_bn_relu"])
def test_need_dx_false_gives_none(backend, sandwich, dtype):
    xp = backend
    if sandwich == "affine_relu":
        x, w, b, dout = (xp.asarray(a, dtype=dtype) for a in _affine_relu_case(3))
        out, cache = affine_relu_forward(x, w, b)
        full = affine_relu_backward(dout, cache)
        partial = affine_relu_backward(dout, cache, need_dx=False)
    else:
        x, w, b, gamma, beta, dout = (xp.asarray(a, dtype=dtype) for a in _affine_bn_relu_case(3))
        out, cache = affine_bn_relu_forward(x, w, b, gamma, beta, {"mode": "train"})
        full = affine_bn_relu_backward(dout, cache)
        partial = affine_bn_relu_backward(dout, cache, need_dx=False)
    assert out.dtype == dtype
    assert partial[0] is None and full[0] is not None
    assert full[0].shape == x.shape
    assert len(full) == len(partial)
    for a, c in zip(full[1:], partial[1:]):
        assert a.dtype == dtype and c.dtype == dtype
        np.testing.assert_array_equal(fastnn.to_numpy(a), fastnn.to_numpy(c))


# -- affine - layernorm - relu ---------------------------------------------------
def _affine_ln_relu_case(seed):
    rng = np.random.default_rng(seed)
    while True:
        x, w, b = _affine_inputs(rng)
        gamma, beta = rng.standard_normal(w.shape[1]) + 1.0, 0.5 * rng.standard_normal(w.shape[1])
        a = x.reshape(x.shape[0], -1) @ w + b
        pre = gamma * (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5) + beta
        if np.abs(pre).min() > MARGIN:
            return x, w, b, gamma, beta, rng.standard_normal(pre.shape)


def test_affine_ln_relu_backward_matches_numerical(backend):
    from fastnn.layer_utils import affine_ln_relu_backward, affine_ln_relu_forward

    xp = backend
    x, w, b, gamma, beta, dout = (xp.asarray(a) for a in _affine_ln_relu_case(4))
    out, cache = affine_ln_relu_forward(x, w, b, gamma, beta, {})
    grads = affine_ln_relu_backward(dout, cache)
    assert float(xp.min(out)) == 0.0 and float(xp.max(out)) > 0.0
    args = [x, w, b, gamma, beta]
    for index, name in enumerate(("dx", "dw", "db", "dgamma", "dbeta")):
        def g(v, index=index):
            return affine_ln_relu_forward(*args[:index], v, *args[index + 1:], {})[0]

        numeric = eval_numerical_gradient_array(g, args[index], dout)
        assert grads[index].shape == args[index].shape
        assert rel_error(grads[index], numeric) < GRAD_TOL, name
    partial = affine_ln_relu_backward(dout, cache, need_dx=False)
    assert partial[0] is None
    for a, c in zip(grads[1:], partial[1:]):
        np.testing.assert_array_equal(fastnn.to_numpy(a), fastnn.to_numpy(c))
