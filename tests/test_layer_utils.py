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
from fastnn import layer_utils
from fastnn.layer_utils import (affine_bn_relu_backward, affine_bn_relu_forward,
                                affine_relu_backward, affine_relu_forward, conv_relu_backward,
                                conv_relu_forward, conv_relu_pool_backward, conv_relu_pool_forward)
from fastnn.layers import conv_forward_naive

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


# -- convolutional sandwiches ----------------------------------------------------
CONV_PARAM = {"stride": 1, "pad": 1}
POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


def _conv_case(seed, x_shape=(2, 3, 4, 6), w_shape=(3, 3, 3, 3), bn=False):
    """Conv inputs whose pre-activations (after the batchnorm, if any) keep MARGIN from 0."""
    rng = np.random.default_rng(seed)
    while True:
        x, w, b = (rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[:1]))
        pre, _ = conv_forward_naive(x, w, b, CONV_PARAM)
        gamma, beta = rng.standard_normal(w_shape[0]) + 1.0, 0.5 * rng.standard_normal(w_shape[0])
        if bn:
            mean, var = pre.mean(axis=(0, 2, 3)), pre.var(axis=(0, 2, 3))
            pre = ((pre - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
                   * gamma[:, None, None] + beta[:, None, None])
        flat = np.sort(pre.reshape(-1))
        # no kink in reach, and distinct values (the pool's maximum stays put)
        if np.abs(pre).min() > MARGIN and np.diff(flat).min() > MARGIN:
            return x, w, b, gamma, beta


def _assert_matches_numerical(grad, numerical, label):
    """grad within GRAD_TOL of the numerical gradient, relative to each entry and to the
    gradient's scale: rel_error alone is per entry, and on an entry near 0 it measures the
    central difference's own round-off (~1e-10 absolute)."""
    scale = float(np.abs(numerical).max())
    np.testing.assert_allclose(fastnn.to_numpy(grad), numerical, rtol=GRAD_TOL,
                               atol=GRAD_TOL * scale, err_msg=str(label))


def _check(forward, backward, inputs, out_shape, seed):
    xp = fastnn.xp()
    dout = xp.asarray(np.random.default_rng(seed).standard_normal(out_shape))
    out, cache = forward(*inputs)
    assert out.shape == out_shape
    grads = backward(dout, cache)
    for i, grad in enumerate(grads):
        def f(_, i=i):
            return forward(*inputs)[0]
        numerical = eval_numerical_gradient_array(f, inputs[i], dout)
        assert grad.shape == inputs[i].shape
        _assert_matches_numerical(grad, numerical, i)


def test_conv_relu_backward_matches_numerical(backend):
    xp = backend
    x, w, b, _, _ = (xp.asarray(a) for a in _conv_case(0))
    _check(lambda x_, w_, b_: conv_relu_forward(x_, w_, b_, CONV_PARAM), conv_relu_backward,
           [x, w, b], (2, 3, 4, 6), 1)


def test_conv_relu_pool_backward_matches_numerical(backend):
    xp = backend
    x, w, b, _, _ = (xp.asarray(a) for a in _conv_case(2))
    _check(lambda x_, w_, b_: conv_relu_pool_forward(x_, w_, b_, CONV_PARAM, POOL_PARAM),
           conv_relu_pool_backward, [x, w, b], (2, 3, 2, 3), 3)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_conv_bn_act_backward_matches_numerical(backend, activation):
    xp = backend
    x, w, b, gamma, beta = (xp.asarray(a) for a in _conv_case(4, bn=True))
    sandwich_forward = getattr(layer_utils, f"conv_bn_{activation}_forward")

    def forward(x_, w_, b_, gamma_, beta_):
        return sandwich_forward(x_, w_, b_, gamma_, beta_, CONV_PARAM, {"mode": "train"})

    out, cache = forward(x, w, b, gamma, beta)
    dout = xp.asarray(np.random.default_rng(5).standard_normal(out.shape))
    grads = getattr(layer_utils, f"conv_bn_{activation}_backward")(dout, cache)
    inputs = [x, w, b, gamma, beta]
    for i, grad in enumerate(grads):
        def f(_, i=i):
            return forward(*inputs)[0]
        numerical = eval_numerical_gradient_array(f, inputs[i], dout)
        if i == 2:  # the bias feeds a batchnorm, which subtracts it again: gradient 0
            np.testing.assert_allclose(fastnn.to_numpy(grad), 0, atol=1e-10)
            np.testing.assert_allclose(fastnn.to_numpy(numerical), 0, atol=1e-8)
            continue
        _assert_matches_numerical(grad, numerical, i)
