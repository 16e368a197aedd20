"""Tests for fastnn.layers: backward passes against numerical gradients, dtypes, contract details.

Gradient checks run in float64 on tiny shapes with central differences
(fastnn.gradient_check); every test body runs on each backend.
"""
import numpy as np
import pytest

import fastnn
from fastnn import layers
from fastnn.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array, rel_error
from helpers import is_0d_array

GRAD_TOL = 1e-7


def _rng(seed=0):
    return np.random.default_rng(seed)


def _away_from_zero(rng, shape, margin=1e-2):
    """Standard normals with every entry at least `margin` from 0 (no relu kink in reach of h)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, margin + np.abs(x), x)


# -- affine ------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(4, 6), (3, 2, 4), (2, 3, 2, 2)])
def test_affine_backward_matches_numerical(backend, x_shape):
    xp, rng = backend, _rng(1)
    D, M = int(np.prod(x_shape[1:])), 5
    x = xp.asarray(rng.standard_normal(x_shape))
    w = xp.asarray(rng.standard_normal((D, M)))
    b = xp.asarray(rng.standard_normal(M))
    dout = xp.asarray(rng.standard_normal((x_shape[0], M)))

    out, cache = layers.affine_forward(x, w, b)
    dx, dw, db = layers.affine_backward(dout, cache)

    expected = fastnn.to_numpy(x).reshape(x_shape[0], D) @ fastnn.to_numpy(w) + fastnn.to_numpy(b)
    np.testing.assert_allclose(fastnn.to_numpy(out), expected, rtol=1e-12)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    dx_num = eval_numerical_gradient_array(lambda v: layers.affine_forward(v, w, b)[0], x, dout)
    dw_num = eval_numerical_gradient_array(lambda v: layers.affine_forward(x, v, b)[0], w, dout)
    db_num = eval_numerical_gradient_array(lambda v: layers.affine_forward(x, w, v)[0], b, dout)
    assert rel_error(dx, dx_num) < GRAD_TOL
    assert rel_error(dw, dw_num) < GRAD_TOL
    assert rel_error(db, db_num) < GRAD_TOL


def test_affine_keeps_dtype(backend, dtype):
    xp, rng = backend, _rng(2)
    x = xp.asarray(rng.standard_normal((3, 2, 2)), dtype=dtype)
    w = xp.asarray(rng.standard_normal((4, 5)), dtype=dtype)
    b = xp.asarray(rng.standard_normal(5), dtype=dtype)
    out, cache = layers.affine_forward(x, w, b)
    dx, dw, db = layers.affine_backward(xp.ones_like(out), cache)
    assert isinstance(out, xp.ndarray) and out.shape == (3, 5)
    for a in (out, dx, dw, db):
        assert a.dtype == dtype


def test_affine_shape_mismatch_names_both_shapes(backend):
    xp = backend
    x = xp.zeros((2, 3072))
    w = xp.zeros((3000, 10))
    b = xp.zeros(10)
    with pytest.raises(ValueError) as info:
        layers.affine_forward(x, w, b)
    message = str(info.value)
    assert str((2, 3072)) in message and str((3000, 10)) in message


# -- relu ----------------------------------------------------------------------
def test_relu_forward_backward(backend):
    xp, rng = backend, _rng(3)
    x_host = _away_from_zero(rng, (4, 5))
    x = xp.asarray(x_host)
    dout = xp.asarray(rng.standard_normal((4, 5)))
    out, cache = layers.relu_forward(x)
    np.testing.assert_array_equal(fastnn.to_numpy(out), np.maximum(x_host, 0))
    dx = layers.relu_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(lambda v: layers.relu_forward(v)[0], x, dout)
    assert rel_error(dx, dx_num) < GRAD_TOL
    np.testing.assert_array_equal(fastnn.to_numpy(dx), np.where(x_host > 0, fastnn.to_numpy(dout), 0))


def test_relu_keeps_dtype_and_shape(backend, dtype):
    xp = backend
    x = xp.asarray(_rng(4).standard_normal((2, 3, 4)), dtype=dtype)
    out, cache = layers.relu_forward(x)
    dx = layers.relu_backward(xp.ones_like(x), cache)
    assert out.dtype == dtype and dx.dtype == dtype
    assert out.shape == x.shape and dx.shape == x.shape


# -- gelu ----------------------------------------------------------------------
def test_gelu_backward_matches_numerical(backend):
    xp, rng = backend, _rng(40)
    x = xp.asarray(rng.standard_normal((4, 5)) * 2)
    dout = xp.asarray(rng.standard_normal((4, 5)))
    out, cache = layers.gelu_forward(x)
    dx = layers.gelu_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(lambda v: layers.gelu_forward(v)[0], x, dout)
    assert rel_error(dx, dx_num) < GRAD_TOL


@pytest.mark.parametrize("value, expected", [
    (0.0, 0.0), (1.0, 0.8413447460685429), (-1.0, -0.15865525393145707),
    (3.0, 2.9959503059051097), (-6.0, -5.919525870226e-09)])
def test_gelu_is_x_times_the_normal_cdf(backend, value, expected):
    """gelu(x) = x Phi(x), exact (Phi(1) = 0.8413447460685429, Phi(3) = 0.9986501019683699),
    not the tanh approximation (0.841192 at 1)."""
    out, _ = layers.gelu_forward(backend.asarray([value]))
    # at -6, 1 + erf(x / sqrt 2) cancels ~8 digits: a looser bound there
    np.testing.assert_allclose(fastnn.to_numpy(out), [expected],
                               rtol=1e-6 if value == -6 else 1e-14, atol=0)


def test_gelu_keeps_dtype_and_shape(backend, dtype):
    xp = backend
    x = xp.asarray(_rng(41).standard_normal((2, 3, 4)), dtype=dtype)
    out, cache = layers.gelu_forward(x)
    dx = layers.gelu_backward(xp.ones_like(x), cache)
    assert out.dtype == dtype and dx.dtype == dtype
    assert out.shape == x.shape and dx.shape == x.shape


# -- batchnorm -----------------------------------------------------------------
def _bn_inputs(xp, rng, N=6, D=4, dtype=np.float64):
    x = xp.asarray(3.0 * rng.standard_normal((N, D)) + 2.0, dtype=dtype)
    gamma = xp.asarray(rng.standard_normal(D) + 1.0, dtype=dtype)
    beta = xp.asarray(rng.standard_normal(D), dtype=dtype)
    return x, gamma, beta


def test_batchnorm_backward_matches_numerical(backend):
    xp, rng = backend, _rng(5)
    x, gamma, beta = _bn_inputs(xp, rng)
    dout = xp.asarray(rng.standard_normal(x.shape))
    bn_param = {"mode": "train"}

    _, cache = layers.batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = layers.batchnorm_backward(dout, cache)

    def f(x_, g_, b_):
        return layers.batchnorm_forward(x_, g_, b_, {"mode": "train"})[0]

    dx_num = eval_numerical_gradient_array(lambda v: f(v, gamma, beta), x, dout)
    dgamma_num = eval_numerical_gradient_array(lambda v: f(x, v, beta), gamma, dout)
    dbeta_num = eval_numerical_gradient_array(lambda v: f(x, gamma, v), beta, dout)
    assert rel_error(dx, dx_num) < GRAD_TOL
    assert rel_error(dgamma, dgamma_num) < GRAD_TOL
    assert rel_error(dbeta, dbeta_num) < GRAD_TOL


def test_batchnorm_train_normalises_columns(backend):
    xp, rng = backend, _rng(6)
    x, _, _ = _bn_inputs(xp, rng, N=200, D=3)
    D = x.shape[1]
    out, _ = layers.batchnorm_forward(x, xp.ones(D), xp.zeros(D), {"mode": "train"})
    out = fastnn.to_numpy(out)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-5)

    gamma, beta = np.array([2.0, 0.5, 3.0]), np.array([-1.0, 0.0, 4.0])
    out, _ = layers.batchnorm_forward(x, xp.asarray(gamma), xp.asarray(beta), {"mode": "train"})
    out = fastnn.to_numpy(out)
    np.testing.assert_allclose(out.mean(axis=0), beta, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), gamma, rtol=1e-5)


def test_batchnorm_running_statistics(backend):
    xp, rng = backend, _rng(7)
    D = 3
    gamma, beta = xp.ones(D), xp.zeros(D)
    batches = [3.0 * rng.standard_normal((10, D)) + 5.0 for _ in range(3)]
    bn_param = {"mode": "train"}
    expect_mean, expect_var = np.zeros(D), np.zeros(D)  # zeros on first use
    for batch in batches:
        layers.batchnorm_forward(xp.asarray(batch), gamma, beta, bn_param)
        expect_mean = 0.9 * expect_mean + 0.1 * batch.mean(axis=0)
        expect_var = 0.9 * expect_var + 0.1 * batch.var(axis=0)  # biased variance
        np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_mean"]), expect_mean, rtol=1e-12)
        np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_var"]), expect_var, rtol=1e-12)
        assert isinstance(bn_param["running_mean"], xp.ndarray)

    # momentum and eps are honoured
    bn_param = {"mode": "train", "momentum": 0.5, "eps": 1e-3}
    out, _ = layers.batchnorm_forward(xp.asarray(batches[0]), gamma, beta, bn_param)
    np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_mean"]), 0.5 * batches[0].mean(axis=0),
                               rtol=1e-12)
    expected = (batches[0] - batches[0].mean(0)) / np.sqrt(batches[0].var(0) + 1e-3)
    np.testing.assert_allclose(fastnn.to_numpy(out), expected, rtol=1e-10)


def test_batchnorm_test_mode_uses_running_statistics(backend):
    xp, rng = backend, _rng(8)
    x, gamma, beta = _bn_inputs(xp, rng, N=5, D=4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    bn_param = {"mode": "test", "running_mean": xp.asarray(mean), "running_var": xp.asarray(var)}
    out, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    expected = (fastnn.to_numpy(gamma) * (fastnn.to_numpy(x) - mean) / np.sqrt(var + 1e-5)
                + fastnn.to_numpy(beta))
    np.testing.assert_allclose(fastnn.to_numpy(out), expected, rtol=1e-10)
    # test mode leaves the running statistics alone
    np.testing.assert_array_equal(fastnn.to_numpy(bn_param["running_mean"]), mean)
    np.testing.assert_array_equal(fastnn.to_numpy(bn_param["running_var"]), var)
    # a train pass then test pass: test output depends only on the running values
    bn_param = {"mode": "train"}
    layers.batchnorm_forward(x, gamma, beta, bn_param)
    bn_param["mode"] = "test"
    one_row, _ = layers.batchnorm_forward(x[:1], gamma, beta, bn_param)
    all_rows, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(fastnn.to_numpy(one_row), fastnn.to_numpy(all_rows)[:1], rtol=1e-12)


def test_batchnorm_keeps_dtype(backend, dtype):
    xp, rng = backend, _rng(9)
    x, gamma, beta = _bn_inputs(xp, rng, dtype=dtype)
    bn_param = {"mode": "train"}
    out, cache = layers.batchnorm_forward(x, gamma, beta, bn_param)
    grads = layers.batchnorm_backward(xp.ones_like(out), cache)
    for a in (out, *grads, bn_param["running_mean"], bn_param["running_var"]):
        assert a.dtype == dtype
    bn_param["mode"] = "test"
    out, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    assert out.dtype == dtype


# -- dropout -------------------------------------------------------------------
def test_dropout_backward_matches_numerical(backend):
    xp, rng = backend, _rng(10)
    x = xp.asarray(rng.standard_normal((5, 6)))
    dout = xp.asarray(rng.standard_normal((5, 6)))
    param = {"mode": "train", "p": 0.3, "seed": 123}
    _, cache = layers.dropout_forward(x, param)
    dx = layers.dropout_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(lambda v: layers.dropout_forward(v, param)[0], x, dout)
    assert rel_error(dx, dx_num) < GRAD_TOL


def _mask(xp, shape, **param):
    out, _ = layers.dropout_forward(xp.ones(shape), {"mode": "train", **param})
    return fastnn.to_numpy(out) != 0


def test_dropout_mask_is_a_function_of_seed_and_step(backend):
    xp, shape = backend, (40, 50)
    first = _mask(xp, shape, p=0.5, seed=7)
    np.testing.assert_array_equal(first, _mask(xp, shape, p=0.5, seed=7))
    np.testing.assert_array_equal(first, _mask(xp, shape, p=0.5, seed=7, step=0))
    np.testing.assert_array_equal(_mask(xp, shape, p=0.5, seed=7, step=3),
                                  _mask(xp, shape, p=0.5, seed=7, step=3))
    assert (first != _mask(xp, shape, p=0.5, seed=7, step=1)).mean() > 0.3
    assert (first != _mask(xp, shape, p=0.5, seed=8)).mean() > 0.3


def test_dropout_step_may_be_a_0d_array(backend):
    """dropout_param["step"] as a 0-d integer array (Solver's counter): the int's mask, the
    value read at each call (cache included); other arrays are refused with a ValueError."""
    xp = backend
    x = xp.asarray(np.random.default_rng(2).standard_normal((6, 9)) + 4, dtype=np.float32)
    counter = xp.zeros((), dtype=np.int64)
    param = {"p": 0.5, "mode": "train", "seed": 7, "step": counter}
    for step in (0, 3):
        counter[...] = step
        out, cache = layers.dropout_forward(x, param)
        expected, _ = layers.dropout_forward(x, {**param, "step": step})
        np.testing.assert_array_equal(fastnn.to_numpy(out), fastnn.to_numpy(expected))
        np.testing.assert_array_equal(fastnn.to_numpy(layers.dropout_backward(x, cache)),
                                      fastnn.to_numpy(expected))
    for bad in (xp.zeros(2, dtype=np.int64), xp.zeros((), dtype=np.float32)):
        with pytest.raises(ValueError, match="0-d integer array"):
            layers.dropout_forward(x, {**param, "step": bad})


def test_dropout_keeps_one_minus_p_and_scales(backend, dtype):
    xp, rng = backend, _rng(11)
    p = 0.3
    x_host = rng.uniform(1.0, 2.0, (200, 250)).astype(dtype)
    out, cache = layers.dropout_forward(xp.asarray(x_host), {"mode": "train", "p": p, "seed": 1})
    assert out.dtype == dtype
    out = fastnn.to_numpy(out)
    kept = out != 0
    assert abs(kept.mean() - (1 - p)) < 0.01
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out[kept], x_host[kept] / (1 - p), rtol=rtol)
    dout = rng.standard_normal(x_host.shape).astype(dtype)
    dx = layers.dropout_backward(xp.asarray(dout), cache)
    assert dx.dtype == dtype
    dx = fastnn.to_numpy(dx)
    np.testing.assert_array_equal(dx[~kept], 0)
    np.testing.assert_allclose(dx[kept], dout[kept] / (1 - p), rtol=rtol)


def test_dropout_test_mode_is_identity(backend, dtype):
    xp, rng = backend, _rng(12)
    x_host = rng.standard_normal((4, 5)).astype(dtype)
    out, cache = layers.dropout_forward(xp.asarray(x_host), {"mode": "test", "p": 0.5, "seed": 3})
    assert out.dtype == dtype
    np.testing.assert_array_equal(fastnn.to_numpy(out), x_host)
    dout = rng.standard_normal((4, 5)).astype(dtype)
    np.testing.assert_array_equal(fastnn.to_numpy(layers.dropout_backward(xp.asarray(dout), cache)),
                                  dout)


def test_dropout_without_seed_uses_the_backend_generator(backend):
    xp, shape = backend, (30, 40)
    first, second = _mask(xp, shape, p=0.5), _mask(xp, shape, p=0.5)
    assert (first != second).mean() > 0.3  # fresh masks each call
    xp.random.seed(2024)
    again = _mask(xp, shape, p=0.5)
    xp.random.seed(2024)
    np.testing.assert_array_equal(again, _mask(xp, shape, p=0.5))


# -- losses --------------------------------------------------------------------
def _softmax_loss_reference(x, y):
    loss = 0.0
    for scores, label in zip(x, y):
        shifted = scores - scores.max()
        loss += np.log(np.exp(shifted).sum()) - shifted[label]
    return loss / len(y)


def _svm_loss_reference(x, y):
    loss = 0.0
    for scores, label in zip(x, y):
        for j, s in enumerate(scores):
            if j != label:
                loss += max(0.0, s - scores[label] + 1.0)
    return loss / len(y)


LOSSES = {"softmax": (layers.softmax_loss, _softmax_loss_reference),
          "svm": (layers.svm_loss, _svm_loss_reference)}


def _scores_off_hinge(rng, N, C, y):
    """Scores whose hinge margins x_ij - x_iy + 1 are all at least 1e-3 from 0.

    Unit scale keeps every softmax probability well above the float64 noise
    of the central differences (h = 1e-5).
    """
    while True:
        x = rng.standard_normal((N, C))
        margins = x - x[np.arange(N), y][:, None] + 1
        margins[np.arange(N), y] = 1.0
        if np.abs(margins).min() > 1e-3:
            return x


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradient_matches_numerical(backend, name):
    xp, rng = backend, _rng(13)
    N, C = 6, 5
    y_host = rng.integers(0, C, N)
    x_host = _scores_off_hinge(rng, N, C, y_host)
    loss_fn, _ = LOSSES[name]
    x, y = xp.asarray(x_host), xp.asarray(y_host)
    loss, dx = loss_fn(x, y)
    dx_num = eval_numerical_gradient(lambda v: loss_fn(v, y)[0], x, verbose=False)
    assert rel_error(dx, dx_num) < GRAD_TOL
    assert dx.shape == (N, C)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_value_matches_plain_formula(backend, name, dtype):
    xp, rng = backend, _rng(14)
    N, C = 7, 4
    y_host = rng.integers(0, C, N)
    y_host[:2] = (0, C - 1)
    x_host = rng.standard_normal((N, C)).astype(dtype)
    x_host[2] = 0.5  # ties: every class scores the same
    loss_fn, reference = LOSSES[name]
    loss, dx = loss_fn(xp.asarray(x_host), xp.asarray(y_host))
    assert is_0d_array(loss, xp)
    assert isinstance(float(loss), float)
    assert loss.dtype == dtype and dx.dtype == dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(float(loss), reference(x_host.astype(np.float64), y_host), rtol=rtol)


def test_svm_excludes_the_correct_class():
    # all scores equal: each of the C - 1 wrong classes contributes margin 1; the correct one nothing
    x = np.zeros((3, 5))
    loss, dx = layers.svm_loss(x, np.array([0, 2, 4]))
    assert float(loss) == pytest.approx(4.0, abs=1e-12)
    # correct class far ahead: zero loss and zero gradient
    x = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    loss, dx = layers.svm_loss(x, np.array([0, 2]))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [[0, 1, 5], [0, -1, 2], [7, 7, 7]])
def test_loss_rejects_labels_out_of_range(backend, name, bad):
    xp = backend
    with pytest.raises(ValueError):
        LOSSES[name][0](xp.zeros((3, 5)), xp.asarray(np.array(bad)))


@pytest.mark.parametrize("name", LOSSES)
def test_loss_rejects_non_integer_labels(backend, name):
    xp = backend
    with pytest.raises(ValueError):
        LOSSES[name][0](xp.zeros((3, 5)), xp.asarray(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError):
        LOSSES[name][0](xp.zeros((3, 5)), xp.asarray(np.array([0.5, 1.0, 2.0])))


@pytest.mark.parametrize("name", LOSSES)
def test_loss_accepts_labels_at_both_ends(backend, name):
    xp = backend
    loss, _ = LOSSES[name][0](xp.zeros((2, 5)), xp.asarray(np.array([0, 4])))
    assert np.isfinite(float(loss))


# -- norms: layernorm and spatial groupnorm ------------------------------------
def _ln_inputs(xp, rng, N=4, D=5, dtype=np.float64):
    x = xp.asarray(3.0 * rng.standard_normal((N, D)) + 2.0, dtype=dtype)
    gamma = xp.asarray(rng.standard_normal(D) + 1.0, dtype=dtype)
    beta = xp.asarray(rng.standard_normal(D), dtype=dtype)
    return x, gamma, beta


def _gn_inputs(xp, rng, shape=(2, 6, 3, 4), dtype=np.float64):
    C = shape[1]
    x = xp.asarray(3.0 * rng.standard_normal(shape) + 2.0, dtype=dtype)
    gamma = xp.asarray(rng.standard_normal((1, C, 1, 1)) + 1.0, dtype=dtype)
    beta = xp.asarray(rng.standard_normal((1, C, 1, 1)), dtype=dtype)
    return x, gamma, beta


def _check_norm_gradients(forward, backward, x, params, dout):
    """dx and each parameter's gradient against central differences."""
    _, cache = forward(x, *params)
    grads = backward(dout, cache)
    arrays = [x, *params[:2]]
    for index, (grad, array) in enumerate(zip(grads, arrays)):
        def f(v, index=index):
            args = list(arrays)
            args[index] = v
            return forward(args[0], args[1], args[2], *params[2:])[0]

        assert grad.shape == array.shape
        assert rel_error(grad, eval_numerical_gradient_array(f, array, dout)) < GRAD_TOL, index


def test_layernorm_backward_matches_numerical(backend):
    xp, rng = backend, _rng(30)
    x, gamma, beta = _ln_inputs(xp, rng)
    dout = xp.asarray(rng.standard_normal(x.shape))
    _check_norm_gradients(layers.layernorm_forward, layers.layernorm_backward, x,
                          (gamma, beta, {}), dout)


def test_layernorm_normalises_rows_the_same_in_train_and_test(backend):
    xp, rng = backend, _rng(31)
    x, _, _ = _ln_inputs(xp, rng, N=3, D=200)
    D = x.shape[1]
    out, _ = layers.layernorm_forward(x, xp.ones(D), xp.zeros(D), {})
    out = fastnn.to_numpy(out)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-4)  # eps 1e-5 against var ~9
    x_host = fastnn.to_numpy(x)
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    for ln_param in ({"mode": "train"}, {"mode": "test"}, {"eps": 1e-3}):
        eps = ln_param.get("eps", 1e-5)
        out, _ = layers.layernorm_forward(x, xp.asarray(gamma), xp.asarray(beta), ln_param)
        centered = x_host - x_host.mean(axis=1, keepdims=True)
        expected = gamma * centered / np.sqrt(x_host.var(axis=1, keepdims=True) + eps) + beta
        np.testing.assert_allclose(fastnn.to_numpy(out), expected, rtol=1e-10, atol=1e-12)
    # a row alone gives what it gives in the batch: no statistics across rows
    one_row, _ = layers.layernorm_forward(x[1:2], xp.asarray(gamma), xp.asarray(beta), ln_param)
    np.testing.assert_allclose(fastnn.to_numpy(one_row)[0], expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,G", [((2, 6, 3, 4), 1), ((2, 6, 3, 4), 2), ((3, 6, 2, 5), 6),
                                     ((2, 4, 1, 1), 1)])
def test_spatial_groupnorm_backward_matches_numerical(backend, shape, G):
    xp, rng = backend, _rng(32)
    x, gamma, beta = _gn_inputs(xp, rng, shape)
    dout = xp.asarray(rng.standard_normal(shape))
    _check_norm_gradients(layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward,
                          x, (gamma, beta, G, {}), dout)


def test_spatial_groupnorm_normalises_groups(backend):
    xp, rng = backend, _rng(33)
    N, C, H, W, G = 2, 6, 5, 7, 3
    x, gamma, beta = _gn_inputs(xp, rng, (N, C, H, W))
    out, _ = layers.spatial_groupnorm_forward(x, gamma, beta, G, {"eps": 1e-4})
    x_host, g, b = (fastnn.to_numpy(a) for a in (x, gamma, beta))
    groups = x_host.reshape(N, G, -1)
    normed = (groups - groups.mean(axis=2, keepdims=True)) / np.sqrt(
        groups.var(axis=2, keepdims=True) + 1e-4)
    np.testing.assert_allclose(fastnn.to_numpy(out), normed.reshape(x_host.shape) * g + b,
                               rtol=1e-10, atol=1e-12)
    # a channels-last array seen as NCHW gives the same result
    strided = xp.asarray(np.ascontiguousarray(x_host.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    out_strided, _ = layers.spatial_groupnorm_forward(strided, gamma, beta, G, {"eps": 1e-4})
    np.testing.assert_allclose(fastnn.to_numpy(out_strided), fastnn.to_numpy(out), rtol=1e-12)


def test_norms_keep_dtype(backend, dtype):
    xp, rng = backend, _rng(34)
    x, gamma, beta = _ln_inputs(xp, rng, dtype=dtype)
    out, cache = layers.layernorm_forward(x, gamma, beta, {})
    for a in (out, *layers.layernorm_backward(xp.ones_like(out), cache)):
        assert a.dtype == dtype
    x, gamma, beta = _gn_inputs(xp, rng, dtype=dtype)
    out, cache = layers.spatial_groupnorm_forward(x, gamma, beta, 3, {})
    dx, dgamma, dbeta = layers.spatial_groupnorm_backward(xp.ones_like(out), cache)
    for a in (out, dx, dgamma, dbeta):
        assert a.dtype == dtype
    assert dgamma.shape == dbeta.shape == (1, 6, 1, 1)


@pytest.mark.parametrize("G", [4, 0, -2, 2.5, 7])
def test_spatial_groupnorm_rejects_groups_that_do_not_divide_channels(backend, G):
    xp, rng = backend, _rng(35)
    x, gamma, beta = _gn_inputs(xp, rng, (2, 6, 3, 3))
    with pytest.raises(ValueError, match=rf"G={G}.*C=6"):
        layers.spatial_groupnorm_forward(x, gamma, beta, G, {})


def test_norms_reject_bad_shapes(backend):
    xp = backend
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        layers.layernorm_forward(xp.zeros((2, 3, 4)), xp.ones(4), xp.zeros(4), {})
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(4,\)"):
        layers.layernorm_forward(xp.zeros((2, 5)), xp.ones(4), xp.zeros(4), {})
    with pytest.raises(ValueError, match=r"\(2, 6, 3\)"):
        layers.spatial_groupnorm_forward(xp.zeros((2, 6, 3)), xp.ones((1, 6, 1, 1)),
                                         xp.zeros((1, 6, 1, 1)), 2, {})
    with pytest.raises(ValueError, match=r"\(1, 6, 1, 1\).*\(6,\)"):
        layers.spatial_groupnorm_forward(xp.zeros((2, 6, 3, 3)), xp.ones(6), xp.zeros(6), 2, {})
    with pytest.raises(ValueError, match="layernorm_forward: x must be a floating array"):
        layers.layernorm_forward(xp.ones((2, 4), dtype=np.int64), xp.ones(4), xp.zeros(4), {})
    with pytest.raises(ValueError, match="groupnorm_forward: x must be a floating array"):
        layers.spatial_groupnorm_forward(xp.ones((2, 6, 3, 3), dtype=np.int32),
                                         xp.ones((1, 6, 1, 1)), xp.zeros((1, 6, 1, 1)), 2, {})


# PyTorch as an optional oracle, forward and backward, in float64 on the host
def _torch_grads(torch_forward, arrays, dout):
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = torch_forward(*tensors)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def test_layernorm_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = _rng(36)
    x, gamma, beta = (fastnn.to_numpy(a) for a in _ln_inputs(np, rng, N=6, D=9))
    dout = rng.standard_normal(x.shape)
    expected, expected_grads = _torch_grads(
        lambda x_, g_, b_: torch.nn.functional.layer_norm(x_, (9,), g_, b_, eps=1e-5),
        (x, gamma, beta), dout)
    out, cache = layers.layernorm_forward(x, gamma, beta, {})
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(layers.layernorm_backward(dout, cache), expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


def test_gelu_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = _rng(42)
    x = rng.standard_normal((5, 7)) * 3
    dout = rng.standard_normal(x.shape)
    expected, (expected_dx,) = _torch_grads(torch.nn.functional.gelu, (x,), dout)
    out, cache = layers.gelu_forward(x)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layers.gelu_backward(dout, cache), expected_dx, rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("G", [1, 2, 6])
def test_spatial_groupnorm_matches_pytorch(G):
    torch = pytest.importorskip("torch")
    rng = _rng(37)
    x, gamma, beta = (fastnn.to_numpy(a) for a in _gn_inputs(np, rng, (3, 6, 4, 5)))
    dout = rng.standard_normal(x.shape)
    expected, (dx_t, dgamma_t, dbeta_t) = _torch_grads(
        lambda x_, g_, b_: torch.nn.functional.group_norm(x_, G, g_, b_, eps=1e-5),
        (x, gamma.reshape(6), beta.reshape(6)), dout)
    out, cache = layers.spatial_groupnorm_forward(x, gamma, beta, G, {})
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    dx, dgamma, dbeta = layers.spatial_groupnorm_backward(dout, cache)
    np.testing.assert_allclose(dx, dx_t, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma.reshape(6), dgamma_t, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dbeta.reshape(6), dbeta_t, rtol=1e-9, atol=1e-11)


def test_bad_inputs_get_value_errors_naming_the_array():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"x must be 2-D \(N, D\), got shape \(4, 3, 1\)") as info:
        layers.batchnorm_forward(x[:, :, None], gamma, beta, {"mode": "train"})
    assert "gamma" not in str(info.value)  # the shape of x is what is wrong
    with pytest.raises(ValueError, match="x must be a floating array, got dtype int64"):
        layers.batchnorm_forward(np.ones((4, 3), np.int64), gamma, beta, {"mode": "train"})
    with pytest.raises(ValueError, match="x is an empty batch"):
        layers.batchnorm_forward(x[:0], gamma, beta, {"mode": "train"})
    for loss in (layers.softmax_loss, layers.svm_loss):
        with pytest.raises(ValueError, match=r"scores x is an empty batch \(shape \(0, 3\)\)"):
            loss(x[:0], np.zeros(0, np.int64))
        with pytest.raises(ValueError, match="scores x must be a floating array, got dtype int32"):
            loss(np.ones((2, 3), np.int32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="dropout_forward: x must be a floating array"):
        layers.dropout_forward(np.ones((4, 3), np.int64), {"p": 0.3, "mode": "train", "seed": 0})


# -- convolution, max pooling, spatial batchnorm -------------------------------
# (x shape, w shape, stride, pad): stride 1 and 2, pad 0-2, non-square images and filters
CONV_CASES = [((2, 3, 5, 5), (2, 3, 3, 3), 1, 1), ((2, 2, 7, 5), (3, 2, 3, 1), 2, 1),
              ((1, 2, 4, 7), (2, 2, 2, 3), 2, 2), ((2, 3, 4, 3), (2, 3, 1, 1), 1, 0),
              ((1, 2, 6, 4), (2, 2, 4, 2), 2, 0)]


def _conv_out_shape(x_shape, w_shape, stride, pad):
    n, _, h, w = x_shape
    f, _, hh, ww = w_shape
    return (n, f, 1 + (h + 2 * pad - hh) // stride, 1 + (w + 2 * pad - ww) // stride)


def _check_grads(forward, backward, inputs, dout, tol=GRAD_TOL):
    """Analytic gradients of sum(forward(*inputs) * dout) against central differences."""
    analytic = backward(dout)
    for i, (value, grad) in enumerate(zip(inputs, analytic)):
        def f(_, i=i):
            args = list(inputs)
            return forward(*args)
        numerical = eval_numerical_gradient_array(f, value, dout)
        assert rel_error(numerical, grad) < tol, f"input {i}: {rel_error(numerical, grad)}"


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_naive_backward_matches_numerical(backend, case):
    xp, rng = backend, _rng(10)
    x_shape, w_shape, stride, pad = case
    x = xp.asarray(rng.standard_normal(x_shape))
    w = xp.asarray(rng.standard_normal(w_shape))
    b = xp.asarray(rng.standard_normal(w_shape[0]))
    conv_param = {"stride": stride, "pad": pad}
    out, cache = layers.conv_forward_naive(x, w, b, conv_param)
    assert out.shape == _conv_out_shape(x_shape, w_shape, stride, pad)
    dout = xp.asarray(rng.standard_normal(out.shape))
    _check_grads(lambda x_, w_, b_: layers.conv_forward_naive(x_, w_, b_, conv_param)[0],
                 lambda d: layers.conv_backward_naive(d, cache), [x, w, b], dout)


def test_conv_naive_matches_a_plain_loop(backend):
    """The definition itself: out[n, f, i, j] = sum(x_padded window * w[f]) + b[f]."""
    xp, rng = backend, _rng(11)
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    out, _ = layers.conv_forward_naive(xp.asarray(x), xp.asarray(w), xp.asarray(b),
                                       {"stride": 2, "pad": 1})
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.empty((2, 4, 3, 4))
    for n, f, i, j in np.ndindex(*expected.shape):
        expected[n, f, i, j] = np.sum(padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2] * w[f]) + b[f]
    np.testing.assert_allclose(fastnn.to_numpy(out), expected, rtol=1e-12, atol=1e-12)


def test_conv_does_not_modify_x_and_keeps_dtype(backend, dtype):
    xp, rng = backend, _rng(12)
    x = xp.asarray(rng.standard_normal((2, 3, 4, 4)), dtype=dtype)
    x_before = fastnn.to_numpy(x).copy()
    w = xp.asarray(rng.standard_normal((2, 3, 3, 3)), dtype=dtype)
    b = xp.asarray(rng.standard_normal(2), dtype=dtype)
    out, cache = layers.conv_forward_naive(x, w, b, {"stride": 1, "pad": 2})
    grads = layers.conv_backward_naive(xp.ones(out.shape, dtype=dtype), cache)
    np.testing.assert_array_equal(fastnn.to_numpy(x), x_before)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]


@pytest.mark.parametrize("forward", ["conv_forward_naive", "conv_forward_fast"])
def test_conv_rejects_bad_sizes(forward):
    from fastnn import fast_layers

    conv = getattr(layers, forward, None) or getattr(fast_layers, forward)
    x, w, b = np.zeros((1, 3, 5, 5)), np.zeros((2, 3, 3, 3)), np.zeros(2)
    with pytest.raises(ValueError, match=r"5 \+ 2\*0 - 3 = 2 is not divisible by the stride 3"):
        conv(x, w, b, {"stride": 3, "pad": 0})
    with pytest.raises(ValueError, match=r"filter \(H 9\) is larger than the padded input"):
        conv(x, np.zeros((2, 3, 9, 3)), b, {"stride": 1, "pad": 1})
    with pytest.raises(ValueError, match=r"must be 4-D .*\(3, 5, 5\)"):
        conv(x[0], w, b, {"stride": 1, "pad": 1})
    with pytest.raises(ValueError, match=r"w of shape \(F, 3, HH, WW\)"):
        conv(x, np.zeros((2, 4, 3, 3)), b, {"stride": 1, "pad": 1})


@pytest.mark.parametrize("layer", ["conv_forward_naive", "conv_forward_fast",
                                   "max_pool_forward_naive", "max_pool_forward_fast"])
def test_conv_and_pool_params_are_integers(layer):
    """A stride of 1.5 was floored to 1 without a word; numpy integers are taken exactly."""
    from fastnn import fast_layers

    forward = getattr(layers, layer, None) or getattr(fast_layers, layer)
    x, w = np.random.default_rng(16).standard_normal((1, 2, 5, 5)), np.ones((1, 2, 3, 3))
    if layer.startswith("conv"):
        key, param = "stride", {"stride": 2, "pad": 1}
        run = lambda p: forward(x, w, np.zeros(1), p)[0]  # noqa: E731
    else:
        key, param = "pool_width", {"pool_height": 2, "pool_width": 2, "stride": 1}
        run = lambda p: forward(x, p)[0]  # noqa: E731
    expected = run(param)
    np.testing.assert_array_equal(run({k: np.int8(v) for k, v in param.items()}), expected)
    for bad in (1.5, 2.0, "2", True):
        with pytest.raises(TypeError, match=rf"{layer}: \w+_param\['{key}'\] must be an "
                                            f"integer, got {bad!r}"):
            run({**param, key: bad})
    with pytest.raises(ValueError, match=rf"\['{key}'\] must be an integer >= 1, got 0"):
        run({**param, key: 0})


POOL_CASES = [((2, 3, 4, 4), 2, 2, 2), ((1, 2, 5, 7), 2, 3, 2), ((2, 2, 5, 5), 3, 3, 1)]


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_naive_backward_matches_numerical(backend, case):
    xp, rng = backend, _rng(13)
    x_shape, pool_height, pool_width, stride = case
    # distinct values far apart (no ties, no argmax change within h)
    x = xp.asarray(rng.permutation(np.prod(x_shape)).reshape(x_shape) * 0.1)
    pool_param = {"pool_height": pool_height, "pool_width": pool_width, "stride": stride}
    out, cache = layers.max_pool_forward_naive(x, pool_param)
    assert out.shape == x_shape[:2] + (1 + (x_shape[2] - pool_height) // stride,
                                       1 + (x_shape[3] - pool_width) // stride)
    dout = xp.asarray(rng.standard_normal(out.shape))
    dx = layers.max_pool_backward_naive(dout, cache)
    numerical = eval_numerical_gradient_array(
        lambda x_: layers.max_pool_forward_naive(x_, pool_param)[0], x, dout)
    assert rel_error(numerical, dx) < GRAD_TOL


def test_max_pool_floors_and_gives_uncovered_pixels_no_gradient(backend):
    """A 5x5 input with 2x2 windows of stride 2: the last row and column get no gradient."""
    xp = backend
    x = xp.asarray(_rng(14).standard_normal((1, 1, 5, 5)))
    out, cache = layers.max_pool_forward_naive(x, {"pool_height": 2, "pool_width": 2, "stride": 2})
    assert out.shape == (1, 1, 2, 2)
    dx = fastnn.to_numpy(layers.max_pool_backward_naive(xp.ones(out.shape), cache))
    assert dx[0, 0, 4].sum() == 0 and dx[0, 0, :, 4].sum() == 0 and dx.sum() == 4


def test_max_pool_ties_go_to_the_first_maximum_in_row_major_order(backend):
    xp = backend
    x = np.array([[[[1.0, 2.0, 0.0, 0.0],
                    [2.0, 2.0, 0.0, 0.0],
                    [5.0, 4.0, 7.0, 1.0],
                    [3.0, 5.0, 1.0, 7.0]]]])
    out, cache = layers.max_pool_forward_naive(
        xp.asarray(x), {"pool_height": 2, "pool_width": 2, "stride": 2})
    np.testing.assert_array_equal(fastnn.to_numpy(out), [[[[2.0, 0.0], [5.0, 7.0]]]])
    dx = fastnn.to_numpy(layers.max_pool_backward_naive(xp.asarray([[[[1.0, 2.0], [3.0, 4.0]]]]),
                                                        cache))
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 0, 1], expected[0, 0, 0, 2] = 1, 2
    expected[0, 0, 2, 0], expected[0, 0, 2, 2] = 3, 4
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_rejects_a_window_larger_than_the_input():
    with pytest.raises(ValueError, match=r"3x3 window is larger than the 2x5 input"):
        layers.max_pool_forward_naive(np.zeros((1, 1, 2, 5)),
                                      {"pool_height": 3, "pool_width": 3, "stride": 1})
    with pytest.raises(ValueError, match="4-D"):
        layers.max_pool_forward_naive(np.zeros((2, 5, 5)),
                                      {"pool_height": 2, "pool_width": 2, "stride": 2})


def test_spatial_batchnorm_backward_matches_numerical(backend):
    xp, rng = backend, _rng(15)
    x = xp.asarray(3 * rng.standard_normal((2, 3, 4, 5)) + 1)
    gamma, beta = xp.asarray(rng.standard_normal(3)), xp.asarray(rng.standard_normal(3))
    dout = xp.asarray(rng.standard_normal(x.shape))

    def forward(x_, gamma_, beta_):
        return layers.spatial_batchnorm_forward(x_, gamma_, beta_, {"mode": "train"})[0]

    out, cache = layers.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    _check_grads(forward, lambda d: layers.spatial_batchnorm_backward(d, cache),
                 [x, gamma, beta], dout)


def test_spatial_batchnorm_normalises_each_channel_and_keeps_running_statistics(backend, dtype):
    xp, rng = backend, _rng(16)
    x_host = rng.standard_normal((4, 3, 5, 2)) * np.array([1, 2, 3])[None, :, None, None] + 5
    x = xp.asarray(x_host, dtype=dtype)
    gamma, beta = xp.asarray([1.0, 2.0, 3.0], dtype=dtype), xp.asarray([0.0, -1.0, 1.0], dtype=dtype)
    bn_param = {"mode": "train", "momentum": 0.8}
    out, _ = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    out = fastnn.to_numpy(out)
    assert out.dtype == dtype and out.shape == x.shape
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    mean, var = x_host.mean(axis=(0, 2, 3)), x_host.var(axis=(0, 2, 3))
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), [0, -1, 1], atol=10 * rtol)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), [1, 2, 3] * np.sqrt(var / (var + 1e-5)),
                               rtol=10 * rtol)
    np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_mean"]), 0.2 * mean, rtol=rtol)
    np.testing.assert_allclose(fastnn.to_numpy(bn_param["running_var"]), 0.2 * var, rtol=rtol)
    bn_param["mode"] = "test"
    test_out, test_cache = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    expected = ((x_host - 0.2 * mean[None, :, None, None])
                / np.sqrt(0.2 * var[None, :, None, None] + 1e-5)
                * np.array([1, 2, 3])[None, :, None, None] + np.array([0, -1, 1])[None, :, None, None])
    np.testing.assert_allclose(fastnn.to_numpy(test_out), expected, rtol=10 * rtol, atol=10 * rtol)
    assert test_cache is None


# -- PyTorch as an optional oracle ---------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_conv_and_pool_match_torch(case):
    torch = pytest.importorskip("torch")
    from fastnn import fast_layers

    x_shape, w_shape, stride, pad = case
    rng = _rng(17)
    x, w, b = (rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[:1]))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    t_out = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=pad)
    dout = rng.standard_normal(tuple(t_out.shape))
    t_out.backward(torch.tensor(dout))
    expected = [t.grad.numpy() for t in (tx, tw, tb)]
    conv_param = {"stride": stride, "pad": pad}
    for forward, backward in ((layers.conv_forward_naive, layers.conv_backward_naive),
                              (fast_layers.conv_forward_fast, fast_layers.conv_backward_fast)):
        out, cache = forward(x, w, b, conv_param)
        np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-10, atol=1e-10)
        for got, want in zip(backward(dout, cache), expected):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

    tx = torch.tensor(x, requires_grad=True)
    t_pool = torch.nn.functional.max_pool2d(tx, (2, 1), stride=1)
    pool_param = {"pool_height": 2, "pool_width": 1, "stride": 1}
    dpool = rng.standard_normal(tuple(t_pool.shape))
    t_pool.backward(torch.tensor(dpool))
    for forward, backward in ((layers.max_pool_forward_naive, layers.max_pool_backward_naive),
                              (fast_layers.max_pool_forward_fast,
                               fast_layers.max_pool_backward_fast)):
        out, cache = forward(x, pool_param)
        np.testing.assert_array_equal(out, t_pool.detach().numpy())
        np.testing.assert_allclose(backward(dpool, cache), tx.grad.numpy(), rtol=1e-12)


def test_spatial_batchnorm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = _rng(18)
    x = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    bn = torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    tx = torch.tensor(x, requires_grad=True)
    t_out = bn(tx)
    dout = rng.standard_normal(x.shape)
    t_out.backward(torch.tensor(dout))
    bn_param = {"mode": "train"}
    out, cache = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-9, atol=1e-10)
    dx, dgamma, dbeta = layers.spatial_batchnorm_backward(dout, cache)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dgamma, bn.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(dbeta, bn.bias.grad.numpy(), rtol=1e-9)
    # torch keeps the unbiased variance, the contract the biased one
    np.testing.assert_allclose(bn_param["running_mean"], bn.running_mean.numpy(), rtol=1e-9)
    n = x.size / 4
    np.testing.assert_allclose(bn_param["running_var"],
                               (bn.running_var.numpy() - 0.9) * (n - 1) / n, rtol=1e-9)
