"""Tests for fastnn.fast_layers: the same results as the naive layers, on any strided input.

Fast against naive to 1e-9 of the largest magnitude in float64 and 1e-5 in
float32 (the contract's tolerance), on random shapes, on channels-last
views (the fast layers' own layout) and other strided views; the fused
batchnorm + relu / gelu against the composition of the public layers and against
numerical gradients.
"""
import numpy as np
import pytest

import fastnn
from fastnn import fast_layers, layers
from fastnn.gradient_check import eval_numerical_gradient_array, rel_error


def _host(a):
    return fastnn.to_numpy(a)


def _close(actual, expected, dtype):
    """Within the contract's tolerance of the largest magnitude of `expected`."""
    expected = _host(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-9
    np.testing.assert_allclose(_host(actual), expected, rtol=0, atol=tol * scale)


def _views(xp, a):
    """a as NCHW contiguous, as a channels-last view, and as a slice of a bigger array."""
    channels_last = xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    bigger = xp.zeros((a.shape[0], a.shape[1] + 1) + a.shape[2:], dtype=a.dtype)
    bigger[:, 1:] = a
    return {"nchw": a, "channels_last": channels_last, "sliced": bigger[:, 1:]}


def _random_conv_case(rng):
    """A random (x shape, w shape, stride, pad) whose stride fits."""
    while True:
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 3))
        hh, ww = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        h, w = int(rng.integers(max(1, hh - 2 * pad), 9)), int(rng.integers(max(1, ww - 2 * pad), 9))
        if (h + 2 * pad - hh) % stride == 0 and (w + 2 * pad - ww) % stride == 0:
            c, f = int(rng.integers(1, 5)), int(rng.integers(1, 5))
            return (int(rng.integers(1, 4)), c, h, w), (f, c, hh, ww), stride, pad


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_conv_fast_matches_naive(backend, dtype, seed, layout):
    xp, rng = backend, np.random.default_rng(seed)
    x_shape, w_shape, stride, pad = _random_conv_case(rng)
    x = _views(xp, xp.asarray(rng.standard_normal(x_shape), dtype=dtype))[layout]
    w = xp.asarray(rng.standard_normal(w_shape), dtype=dtype)
    b = xp.asarray(rng.standard_normal(w_shape[0]), dtype=dtype)
    conv_param = {"stride": stride, "pad": pad}
    out, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    out_naive, cache_naive = layers.conv_forward_naive(x, w, b, conv_param)
    assert out.shape == out_naive.shape and out.dtype == dtype
    _close(out, out_naive, dtype)
    dout = _views(xp, xp.asarray(rng.standard_normal(out.shape), dtype=dtype))[layout]
    grads = fast_layers.conv_backward_fast(dout, cache)
    for got, expected in zip(grads, layers.conv_backward_naive(dout, cache_naive)):
        assert got.shape == expected.shape and got.dtype == dtype
        _close(got, expected, dtype)


def test_conv_fast_without_bias_and_without_dx(backend):
    xp, rng = backend, np.random.default_rng(7)
    x = xp.asarray(rng.standard_normal((2, 3, 6, 5)))
    w = xp.asarray(rng.standard_normal((4, 3, 3, 3)))
    out, cache = fast_layers.conv_forward_fast(x, w, None, {"stride": 1, "pad": 1})
    zero = xp.zeros(4)
    out_naive, cache_naive = layers.conv_forward_naive(x, w, zero, {"stride": 1, "pad": 1})
    _close(out, out_naive, np.float64)
    dout = xp.asarray(rng.standard_normal(out.shape))
    dx, dw, db = fast_layers.conv_backward_fast(dout, cache, need_dx=False)
    assert dx is None and db is None
    _close(dw, layers.conv_backward_naive(dout, cache_naive)[1], np.float64)


def test_conv_fast_output_is_channels_last_on_numpy():
    """What lets a stack of fast layers run without a layout change."""
    rng = np.random.default_rng(8)
    out, _ = fast_layers.conv_forward_fast(rng.standard_normal((2, 3, 5, 5)),
                                           rng.standard_normal((4, 3, 3, 3)), np.zeros(4),
                                           {"stride": 1, "pad": 1})
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous


def test_conv_fast_does_not_modify_x(backend):
    xp, rng = backend, np.random.default_rng(9)
    x = xp.asarray(rng.standard_normal((2, 2, 4, 4)))
    before = _host(x).copy()
    out, cache = fast_layers.conv_forward_fast(x, xp.asarray(rng.standard_normal((3, 2, 3, 3))),
                                               xp.zeros(3), {"stride": 1, "pad": 2})
    fast_layers.conv_backward_fast(xp.ones(out.shape), cache)
    np.testing.assert_array_equal(_host(x), before)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_max_pool_fast_matches_naive(backend, dtype, seed, layout):
    xp, rng = backend, np.random.default_rng(seed)
    pool_height, pool_width, stride = (int(v) for v in rng.integers(1, 4, 3))
    x_shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4)),
               int(rng.integers(pool_height, 9)), int(rng.integers(pool_width, 9)))
    x = _views(xp, xp.asarray(rng.standard_normal(x_shape), dtype=dtype))[layout]
    pool_param = {"pool_height": pool_height, "pool_width": pool_width, "stride": stride}
    out, cache = fast_layers.max_pool_forward_fast(x, pool_param)
    out_naive, cache_naive = layers.max_pool_forward_naive(x, pool_param)
    np.testing.assert_array_equal(_host(out), _host(out_naive))
    dout = _views(xp, xp.asarray(rng.standard_normal(out.shape), dtype=dtype))[layout]
    dx = fast_layers.max_pool_backward_fast(dout, cache)
    assert dx.shape == x.shape and dx.dtype == dtype
    _close(dx, layers.max_pool_backward_naive(dout, cache_naive), dtype)


def test_max_pool_fast_tie_rule(backend, dtype):
    """Relu zeros and equal values: the gradient goes to the first maximum, row-major."""
    xp = backend
    x = np.zeros((1, 1, 4, 6))
    x[0, 0, 1, 0] = x[0, 0, 0, 1] = 2.0   # window (0, 0): (0, 1) comes first
    x[0, 0, 2:, 2:4] = 5.0               # window (1, 1): all four equal
    pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, cache = fast_layers.max_pool_forward_fast(xp.asarray(x, dtype=dtype), pool_param)
    dx = _host(fast_layers.max_pool_backward_fast(xp.ones(out.shape, dtype=dtype), cache))
    expected = np.zeros_like(x)
    expected[0, 0, 0, 1] = expected[0, 0, 2, 2] = 1
    expected[0, 0, 0, 2] = expected[0, 0, 0, 4] = expected[0, 0, 2, 0] = expected[0, 0, 2, 4] = 1
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("pool", [(2, 2, 2), (3, 3, 1), (2, 3, 1)])
def test_max_pool_fast_nan_rule(backend, dtype, pool):
    """A window holding NaN pools to NaN, its gradient to its first NaN (row-major), as the
    naive layer's np.argmax does: a NaN after a larger value, before one, two NaNs, inf."""
    xp = backend
    x = np.random.default_rng(12).standard_normal((2, 2, 6, 6))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan    # two NaNs in the first window
    x[0, 0, 0, 0] = 9.0                       # after the window's largest value
    x[0, 1, 2, 2] = np.nan                    # before a larger value
    x[0, 1, 3, 3] = 9.0
    x[1, 0, 4, 5], x[1, 0, 5, 4] = np.inf, np.nan
    x[1, 1] = np.nan                          # every value
    pool_height, pool_width, stride = pool
    pool_param = {"pool_height": pool_height, "pool_width": pool_width, "stride": stride}
    out, cache = fast_layers.max_pool_forward_fast(xp.asarray(x, dtype=dtype), pool_param)
    out_naive, cache_naive = layers.max_pool_forward_naive(x.astype(dtype), pool_param)
    assert np.isnan(_host(out)).any()
    np.testing.assert_array_equal(_host(out), out_naive)  # NaN where the naive layer has NaN
    dout = np.random.default_rng(13).standard_normal(out.shape).astype(dtype)
    dx = fast_layers.max_pool_backward_fast(xp.asarray(dout), cache)
    _close(dx, layers.max_pool_backward_naive(dout, cache_naive), dtype)


@pytest.mark.parametrize("channels", [3, 8])  # 8 channels: the Winograd (and fused pool) path
def test_fast_layers_take_an_empty_batch_as_the_naive_ones(backend, dtype, channels):
    """N = 0: empty outputs of the naive layers' shapes, and backwards that give empty dx."""
    xp = backend
    x = xp.zeros((0, channels, 6, 6), dtype=dtype)
    w = xp.asarray(np.random.default_rng(14).standard_normal((5, channels, 3, 3)), dtype=dtype)
    b = xp.zeros(5, dtype=dtype)
    conv_param, pool_param = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2,
                                                       "stride": 2}
    out, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    assert out.shape == layers.conv_forward_naive(x, w, b, conv_param)[0].shape == (0, 5, 6, 6)
    dx, dw, db = fast_layers.conv_backward_fast(xp.zeros(out.shape, dtype=dtype), cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (5,)
    assert not _host(dw).any() and dw.dtype == dtype
    pooled, pool_cache = fast_layers.max_pool_forward_fast(x, pool_param)
    assert pooled.shape == (0, channels, 3, 3) and pooled.dtype == dtype
    assert fast_layers.max_pool_backward_fast(pooled, pool_cache).shape == x.shape
    out, cache = fast_layers.conv_pool_forward_fast(x, w, None, conv_param, pool_param)
    assert out.shape == (0, 5, 3, 3)
    dx, dw, db = fast_layers.conv_pool_backward_fast(out, cache, need_dx=False)
    assert dx is None and db is None and dw.shape == w.shape


def test_fast_layers_reject_bad_input():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"5 \+ 2\*1 - 3 = 4 is not divisible by the stride 3"):
        fast_layers.conv_forward_fast(x, np.zeros((1, 2, 3, 3)), np.zeros(1),
                                      {"stride": 3, "pad": 1})
    with pytest.raises(ValueError, match="larger than the 5x5 input"):
        fast_layers.max_pool_forward_fast(x, {"pool_height": 6, "pool_width": 2, "stride": 1})


# -- fused spatial batchnorm + relu / gelu -----------------------------------------
ACTIVATIONS = ["relu", "gelu"]


def _fused(activation, direction):
    return getattr(fast_layers, f"spatial_batchnorm_{activation}_{direction}")


def _bn_act_naive(x, gamma, beta, bn_param, activation):
    normed, bn_cache = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    out, act_cache = getattr(layers, f"{activation}_forward")(normed)
    return out, (bn_cache, act_cache)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_spatial_batchnorm_act_matches_the_layers(backend, dtype, layout, activation):
    xp, rng = backend, np.random.default_rng(10)
    x = _views(xp, xp.asarray(rng.standard_normal((3, 4, 5, 6)) * 2 + 0.5, dtype=dtype))[layout]
    gamma = xp.asarray(rng.standard_normal(4), dtype=dtype)
    beta = xp.asarray(rng.standard_normal(4), dtype=dtype)
    fused_param, plain_param = {"mode": "train"}, {"mode": "train"}
    out, cache = _fused(activation, "forward")(x, gamma, beta, fused_param)
    out_plain, (bn_cache, act_cache) = _bn_act_naive(x, gamma, beta, plain_param, activation)
    assert out.dtype == dtype
    _close(out, out_plain, dtype)
    for key in ("running_mean", "running_var"):
        _close(fused_param[key], plain_param[key], dtype)
    dout = _views(xp, xp.asarray(rng.standard_normal(x.shape), dtype=dtype))[layout]
    dnormed = getattr(layers, f"{activation}_backward")(dout, act_cache)
    expected = layers.spatial_batchnorm_backward(dnormed, bn_cache)
    for got, want in zip(_fused(activation, "backward")(dout, cache), expected):
        assert got.dtype == dtype and got.shape == want.shape
        _close(got, want, dtype)
    for param in (fused_param, plain_param):
        param["mode"] = "test"
    test_out, test_cache = _fused(activation, "forward")(x, gamma, beta, fused_param)
    assert test_cache is None
    _close(test_out, _bn_act_naive(x, gamma, beta, plain_param, activation)[0], dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_spatial_batchnorm_act_backward_matches_numerical(backend, activation):
    xp, rng = backend, np.random.default_rng(11)
    x = xp.asarray(rng.standard_normal((2, 3, 4, 3)))
    gamma, beta = xp.asarray(rng.standard_normal(3)), xp.asarray(rng.standard_normal(3))
    dout = xp.asarray(rng.standard_normal(x.shape))
    _, cache = _fused(activation, "forward")(x, gamma, beta, {"mode": "train"})
    grads = _fused(activation, "backward")(dout, cache)
    inputs = [x, gamma, beta]
    for i, grad in enumerate(grads):
        def f(_):
            return _fused(activation, "forward")(*inputs, {"mode": "train"})[0]
        assert rel_error(eval_numerical_gradient_array(f, inputs[i], dout), grad) < 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_spatial_batchnorm_act_rejects_bad_input(activation):
    with pytest.raises(ValueError, match=f"spatial_batchnorm_{activation}_forward: x .* gamma "
                                         "and beta of shape"):
        _fused(activation, "forward")(np.zeros((2, 3, 2, 2)), np.ones(4), np.zeros(4),
                                      {"mode": "train"})
    with pytest.raises(ValueError, match=f"spatial_batchnorm_{activation}_backward needs .* "
                                         "train-mode forward"):
        _fused(activation, "backward")(np.zeros((2, 3, 2, 2)), None)


@pytest.mark.parametrize("shape", [(2, 8, 6, 4), (2, 8, 5, 6), (1, 3, 4, 4)])
def test_conv_pool_is_the_conv_then_the_pool(backend, dtype, shape):
    """conv_pool_forward_fast / backward against the naive conv and pool, forward and
    backward (fused or not, whichever the backend takes for the shape), on every view."""
    xp = backend
    rng = np.random.default_rng(11)
    channels = shape[1]
    w = xp.asarray(rng.standard_normal((8, channels, 3, 3)), dtype=dtype)
    b = xp.asarray(rng.standard_normal(8), dtype=dtype)
    conv_param, pool_param = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2,
                                                       "stride": 2}
    for name, x in _views(xp, xp.asarray(rng.standard_normal(shape), dtype=dtype)).items():
        out, cache = fast_layers.conv_pool_forward_fast(x, w, b, conv_param, pool_param)
        conv_out, conv_cache = layers.conv_forward_naive(x, w, b, conv_param)
        expected, pool_cache = layers.max_pool_forward_naive(conv_out, pool_param)
        _close(out, expected, dtype)
        dout = xp.asarray(rng.standard_normal(out.shape), dtype=dtype)
        got = fast_layers.conv_pool_backward_fast(dout, cache)
        want = layers.conv_backward_naive(
            layers.max_pool_backward_naive(dout, pool_cache), conv_cache)
        for g, e in zip(got, want):
            _close(g, e, dtype)


def test_conv_pool_refuses_a_window_larger_than_the_conv_output():
    x, w = np.zeros((1, 8, 2, 2)), np.zeros((8, 8, 3, 3))
    with pytest.raises(ValueError, match="3x3 window is larger than the 2x2 input"):
        fast_layers.conv_pool_forward_fast(x, w, None, {"stride": 1, "pad": 1},
                                           {"pool_height": 3, "pool_width": 3, "stride": 1})
