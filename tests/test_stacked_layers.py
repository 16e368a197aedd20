"""Tests for fastnn.stacked_layers: member k of a stacked layer computes the plain layer of
fastnn.layers with member k's parameters; the plain layers take no member axis."""
import numpy as np
import pytest

import fastnn
from fastnn import layers
from fastnn import stacked_layers as sl
from helpers import backend_tolerances

K, N, D, M = 3, 5, 4, 6


def _normal(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


def _host(a):
    return fastnn.to_numpy(a)


@pytest.mark.parametrize("shared", [True, False])
def test_affine_stacked_is_affine_per_member(backend, shared):
    rng = np.random.default_rng(0)
    x = _normal(backend, rng, N, 2, 2) if shared else _normal(backend, rng, K, N, D)
    w, b = _normal(backend, rng, K, D, M), _normal(backend, rng, K, M)
    out, cache = sl.affine_stacked_forward(x, w, b)
    dout = _normal(backend, rng, K, N, M)
    dx, dw, db = sl.affine_stacked_backward(dout, cache)
    rtol, atol = backend_tolerances(backend, np.float64)
    dx_sum = 0
    for k in range(K):
        x_k = x if shared else x[k]
        out_k, cache_k = layers.affine_forward(x_k, w[k], b[k])
        np.testing.assert_allclose(_host(out[k]), _host(out_k), rtol=rtol, atol=atol)
        dx_k, dw_k, db_k = layers.affine_backward(dout[k], cache_k)
        np.testing.assert_allclose(_host(dw[k]), _host(dw_k), rtol=rtol, atol=atol)
        np.testing.assert_allclose(_host(db[k]), _host(db_k), rtol=rtol, atol=atol)
        if shared:
            dx_sum = dx_sum + _host(dx_k)
        else:
            np.testing.assert_allclose(_host(dx[k]), _host(dx_k), rtol=rtol, atol=atol)
    if shared:  # a shared input's gradient sums the members'
        np.testing.assert_allclose(_host(dx), dx_sum, rtol=rtol, atol=atol)


def test_batchnorm_stacked_is_batchnorm_per_member(backend):
    rng = np.random.default_rng(1)
    x = _normal(backend, rng, K, N, M)
    gamma, beta = _normal(backend, rng, K, M), _normal(backend, rng, K, M)
    stacked_param = {"mode": "train"}
    out, cache = sl.batchnorm_stacked_forward(x, gamma, beta, stacked_param)
    dout = _normal(backend, rng, K, N, M)
    dx, dgamma, dbeta = sl.batchnorm_stacked_backward(dout, cache)
    rtol, atol = backend_tolerances(backend, np.float64)
    for k in range(K):
        param = {"mode": "train"}
        out_k, cache_k = layers.batchnorm_forward(x[k], gamma[k], beta[k], param)
        np.testing.assert_allclose(_host(out[k]), _host(out_k), rtol=rtol, atol=atol)
        for got, expected in zip((dx[k], dgamma[k], dbeta[k]),
                                 layers.batchnorm_backward(dout[k], cache_k)):
            np.testing.assert_allclose(_host(got), _host(expected), rtol=rtol, atol=atol)
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(_host(stacked_param[key][k]), _host(param[key]),
                                       rtol=rtol, atol=atol)
    stacked_param["mode"] = "test"
    test_out, _ = sl.batchnorm_stacked_forward(x, gamma, beta, stacked_param)
    param = {"mode": "test", "running_mean": stacked_param["running_mean"][1],
             "running_var": stacked_param["running_var"][1]}
    np.testing.assert_allclose(_host(test_out[1]),
                               _host(layers.batchnorm_forward(x[1], gamma[1], beta[1], param)[0]),
                               rtol=rtol, atol=atol)


def test_dropout_stacked_draws_each_members_own_mask(backend):
    x = backend.asarray(np.random.default_rng(2).standard_normal((K, N, M)))
    ps, seeds = [0.3, 0.0, 0.5], [7, 8, 9]
    out, cache = sl.dropout_stacked_forward(x, {"mode": "train", "p": ps, "seed": seeds,
                                                "step": 4})
    dx = sl.dropout_stacked_backward(x, cache)
    for k in range(K):
        out_k, _ = layers.dropout_forward(x[k], {"mode": "train", "p": ps[k], "seed": seeds[k],
                                                 "step": 4})
        np.testing.assert_array_equal(_host(out[k]), _host(out_k))
        np.testing.assert_array_equal(_host(dx[k]), _host(out_k))
    same, _ = sl.dropout_stacked_forward(x, {"mode": "test", "p": ps, "seed": seeds})
    assert same is x


def test_plain_layers_take_no_member_axis():
    """The course's layers are chosen by name, never by array rank: stacked arrays are an error
    pointing at fastnn.stacked_layers (the plain layers once switched to it silently)."""
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((N, D)), rng.standard_normal((K, D, M)), rng.standard_normal((K, M))
    with pytest.raises(ValueError, match="affine_forward"):
        layers.affine_forward(x, w, b)
    with pytest.raises(ValueError, match=r"batchnorm_forward: x must be 2-D"):
        layers.batchnorm_forward(rng.standard_normal((K, N, M)), np.ones((K, M)),
                                 np.zeros((K, M)), {"mode": "train"})
    with pytest.raises(ValueError, match="dropout_stacked_forward"):
        layers.dropout_forward(rng.standard_normal((K, N, M)),
                               {"mode": "train", "p": [0.5] * K, "seed": [1] * K})
    with pytest.raises(ValueError, match="affine_stacked_forward: w must be"):
        sl.affine_stacked_forward(x, w[0], b[0])
