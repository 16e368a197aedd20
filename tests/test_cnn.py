"""Tests for fastnn.classifiers.cnn (ThreeLayerConvNet): shapes, gradients, loss, training, save/load."""
import math

import numpy as np
import pytest

import fastnn
from fastnn.classifiers import ThreeLayerConvNet
from fastnn.gradient_check import eval_numerical_gradient, rel_error
from fastnn.solver import Solver

GRAD_TOL = 1e-6


def _images(n, shape, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)), rng.integers(0, classes, n)


def _tiny(dtype=np.float64, **kwargs):
    """Non-square images (2, 6, 5), 3 filters of 3x3, 4 hidden units, 3 classes."""
    options = dict(input_dim=(2, 6, 5), num_filters=3, filter_size=3, hidden_dim=4,
                   num_classes=3, weight_scale=0.5, dtype=dtype)
    options.update(kwargs)
    return ThreeLayerConvNet(**options)


def _perturb_biases(model, seed):
    """Random biases, so no pre-activation sits on relu's kink at 0 (see test_classifiers)."""
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        if model.param_roles[name] == "bias":
            host = fastnn.to_numpy(value) + 0.3 * rng.standard_normal(value.shape)
            model.params[name] = fastnn.xp().asarray(host, dtype=value.dtype)


# -- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("filter_size, pooled", [(7, 32 * 16 * 16), (4, 32 * 15 * 15)])
def test_param_shapes_roles_and_init(backend, filter_size, pooled):
    xp = backend
    np.random.seed(0)
    model = ThreeLayerConvNet(filter_size=filter_size, hidden_dim=50, weight_scale=0.02)
    # an even filter (pad 1) makes a 31x31 conv output, pooled (floored) to 15x15
    shapes = {"W1": (32, 3, filter_size, filter_size), "b1": (32,), "W2": (pooled, 50),
              "b2": (50,), "W3": (50, 10), "b3": (10,)}
    assert {k: tuple(v.shape) for k, v in model.params.items()} == shapes
    assert model.param_roles == {"W1": "weight", "b1": "bias", "W2": "weight", "b2": "bias",
                                 "W3": "weight", "b3": "bias"}
    assert model.norm_params == {}
    for name, value in model.params.items():
        assert isinstance(value, xp.ndarray) and value.dtype == np.float32, name
        host = fastnn.to_numpy(value)
        if name.startswith("b"):
            np.testing.assert_array_equal(host, 0, err_msg=name)
        else:
            assert abs(host.std() - 0.02) < 0.02 * 0.05, name
    assert model.conv_param == {"stride": 1, "pad": (filter_size - 1) // 2}
    assert model.pool_param == {"pool_height": 2, "pool_width": 2, "stride": 2}


def test_weights_follow_np_random_seed():
    np.random.seed(3)
    a = _tiny()
    np.random.seed(3)
    b = _tiny()
    c = _tiny()
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["W1"], c.params["W1"])


def test_init_args_are_json_values_that_rebuild_the_model():
    import json

    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=np.int64(4), filter_size=3,
                              hidden_dim=6, reg=np.float32(0.5), dtype=np.float64)
    args = json.loads(json.dumps(model.init_args))
    rebuilt = ThreeLayerConvNet(**args)
    assert rebuilt.init_args == model.init_args
    assert {k: v.shape for k, v in rebuilt.params.items()} == \
        {k: v.shape for k, v in model.params.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_everywhere(backend, dtype):
    xp = backend
    model = _tiny(dtype)
    X, y = _images(4, (2, 6, 5))
    scores = model.loss(xp.asarray(X, dtype=dtype))
    assert isinstance(scores, xp.ndarray) and scores.shape == (4, 3) and scores.dtype == dtype
    loss, grads = model.loss(xp.asarray(X, dtype=dtype), xp.asarray(y))
    assert np.isfinite(float(loss))
    assert set(grads) == set(model.params)
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == model.params[name].shape, name


# -- loss and gradients ----------------------------------------------------------------------
def test_scores_by_hand():
    """conv (stride 1, pad 1) - relu - 2x2 pool - affine - relu - affine, written out."""
    np.random.seed(1)
    model = _tiny()
    _perturb_biases(model, 2)
    X, _ = _images(3, (2, 6, 5), seed=4)
    p = model.params
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((3, 3, 6, 5))
    for i in range(6):
        for j in range(5):
            patch = padded[:, :, i:i + 3, j:j + 3]
            conv[:, :, i, j] = np.einsum("ncij,fcij->nf", patch, p["W1"]) + p["b1"]
    relu = np.maximum(conv, 0)
    pooled = relu[:, :, :6, :4].reshape(3, 3, 3, 2, 2, 2).max(axis=(3, 5))  # 6x5 -> 3x2
    hidden = np.maximum(pooled.reshape(3, -1) @ p["W2"] + p["b2"], 0)
    np.testing.assert_allclose(model.loss(X), hidden @ p["W3"] + p["b3"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", [0.0, 0.7])
def test_gradients(backend, reg):
    xp = backend
    np.random.seed(0)
    model = _tiny(reg=reg)
    _perturb_biases(model, 1)
    X, y = (xp.asarray(a) for a in _images(3, (2, 6, 5), seed=2))
    loss, grads = model.loss(X, y)
    assert set(grads) == set(model.params)
    for name in model.params:
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name],
                                          verbose=False, h=1e-5)
        err = rel_error(grads[name], numeric)
        assert err < GRAD_TOL, f"{name}: relative error {err:.2e}"


def test_initial_loss_is_log_num_classes():
    """Tiny weights give near-uniform scores: loss ~ log(C); reg adds 0.5 * reg * sum(W**2)."""
    np.random.seed(0)
    X, y = _images(20, (3, 32, 32), seed=5, classes=10)
    plain = ThreeLayerConvNet(dtype=np.float64)
    loss = float(plain.loss(X, y)[0])
    assert abs(loss - math.log(10)) < 1e-3
    regularised = ThreeLayerConvNet(reg=0.5, dtype=np.float64)
    regularised.params = plain.params
    penalty = 0.5 * 0.5 * sum(float((plain.params[k] ** 2).sum()) for k in ("W1", "W2", "W3"))
    assert float(regularised.loss(X, y)[0]) - loss == pytest.approx(penalty, rel=1e-9)


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match=r"\(N, 2, 6, 5\)"):
        _tiny().loss(np.zeros((2, 2, 5, 6)))
    with pytest.raises(ValueError, match="input_dim"):
        ThreeLayerConvNet(input_dim=(32, 32))
    with pytest.raises(ValueError, match="filter_size 4"):
        ThreeLayerConvNet(input_dim=(3, 2, 2), filter_size=4)


# -- training and saving ----------------------------------------------------------------------
def test_solver_overfits_a_small_batch(backend):
    rng = np.random.default_rng(0)
    data = dict(X_train=rng.standard_normal((20, 3, 8, 8)).astype(np.float32),
                y_train=rng.integers(0, 10, 20),
                X_val=rng.standard_normal((10, 3, 8, 8)).astype(np.float32),
                y_val=rng.integers(0, 10, 10))
    np.random.seed(0)
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=8, filter_size=3, hidden_dim=32,
                              weight_scale=0.1)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2},
                    batch_size=10, num_epochs=15, verbose=False, seed=0)
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.loss_history[-1] < 0.1 * solver.loss_history[0]


def test_save_load_round_trip(backend, tmp_path):
    xp = backend
    np.random.seed(2)
    model = _tiny(np.float32, reg=0.25)
    _perturb_biases(model, 3)
    path = tmp_path / "cnn.npz"
    fastnn.save(model, path)
    loaded = fastnn.load(path)
    assert type(loaded) is ThreeLayerConvNet
    assert loaded.init_args == model.init_args and loaded.reg == 0.25
    for name, value in model.params.items():
        assert isinstance(loaded.params[name], xp.ndarray) and loaded.params[name].dtype == np.float32
        np.testing.assert_array_equal(fastnn.to_numpy(loaded.params[name]), fastnn.to_numpy(value))
    X = xp.asarray(_images(4, (2, 6, 5), seed=7)[0], dtype=np.float32)
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.loss(X)), fastnn.to_numpy(model.loss(X)))
