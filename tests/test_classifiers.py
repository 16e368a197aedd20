"""Tests for fastnn.classifiers: parameters, dtypes, scores, and whole-net gradient checks."""
import numpy as np
import pytest

import fastnn
from fastnn import kernels, layers
from fastnn.classifiers import ConvNet, FullyConnectedNet, ThreeLayerConvNet, TwoLayerNet
from fastnn.classifiers import conv_net
from fastnn.classifiers.base import Classifier
from fastnn.gradient_check import eval_numerical_gradient, rel_error
from fastnn.init import whitening_filters
from fastnn.layers import (conv_forward_naive, gelu_forward, max_pool_forward_naive,
                           spatial_batchnorm_forward)
from fastnn.solver import Solver

GRAD_TOL = 1e-6
N, D, C = 3, 5, 4


def _data(seed=0, n=N, d=D, c=C):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


def _check_model_gradients(model, X, y, zero=()):
    """Every parameter's analytic gradient against central differences of the loss.

    `zero` names parameters whose true gradient is 0 (a bias feeding a
    batchnorm layer, which subtracts it again): both gradients must be ~0 in
    absolute terms, since a relative error between round-off values means nothing.
    """
    loss, grads = model.loss(X, y)
    assert np.isfinite(float(loss))
    assert set(grads) == set(model.params)
    for name in model.params:
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name],
                                          verbose=False, h=1e-5)
        assert grads[name].shape == model.params[name].shape, name
        if name in zero:
            np.testing.assert_allclose(fastnn.to_numpy(grads[name]), 0, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(numeric, 0, atol=1e-8, err_msg=name)
            continue
        err = rel_error(grads[name], numeric)
        assert err < GRAD_TOL, f"{name}: relative error {err:.2e}"


# -- parameters --------------------------------------------------------------------
def test_two_layer_net_params(backend):
    xp = backend
    np.random.seed(0)
    model = TwoLayerNet(input_dim=300, hidden_dim=200, num_classes=7, weight_scale=0.05)
    shapes = {"W1": (300, 200), "b1": (200,), "W2": (200, 7), "b2": (7,)}
    assert {k: tuple(v.shape) for k, v in model.params.items()} == shapes
    for name, value in model.params.items():
        assert isinstance(value, xp.ndarray) and value.dtype == np.float32, name
    for b in ("b1", "b2"):
        np.testing.assert_array_equal(fastnn.to_numpy(model.params[b]), 0)
    w1 = fastnn.to_numpy(model.params["W1"])
    assert abs(w1.std() - 0.05) < 0.05 * 0.03
    assert abs(w1.mean()) < 0.05 * 0.02


@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_fully_connected_net_params(backend, use_batchnorm):
    xp = backend
    model = FullyConnectedNet([150, 120, 9], input_dim=200, num_classes=6, weight_scale=0.02,
                              use_batchnorm=use_batchnorm, seed=0)
    dims = [200, 150, 120, 9, 6]
    expected = {}
    for i in range(1, 5):
        expected[f"W{i}"] = (dims[i - 1], dims[i])
        expected[f"b{i}"] = (dims[i],)
        if use_batchnorm and i < 4:
            expected[f"gamma{i}"] = (dims[i],)
            expected[f"beta{i}"] = (dims[i],)
    assert {k: tuple(v.shape) for k, v in model.params.items()} == expected
    for name, value in model.params.items():
        assert isinstance(value, xp.ndarray) and value.dtype == np.float32, name
        host = fastnn.to_numpy(value)
        if name.startswith(("b", "beta")):
            np.testing.assert_array_equal(host, 0, err_msg=name)
        elif name.startswith("gamma"):
            np.testing.assert_array_equal(host, 1, err_msg=name)
    for name in ("W1", "W2"):
        w = fastnn.to_numpy(model.params[name])
        assert abs(w.std() - 0.02) < 0.02 * 0.03, name
        assert abs(w.mean()) < 0.02 * 0.02, name


@pytest.mark.parametrize("make", [
    lambda dtype: TwoLayerNet(input_dim=D, hidden_dim=6, num_classes=C, dtype=dtype),
    lambda dtype: FullyConnectedNet([6, 5], input_dim=D, num_classes=C, dtype=dtype,
                                    use_batchnorm=True, dropout=0.2, seed=1),
], ids=["two_layer", "fc"])
def test_dtype_everywhere(backend, make, dtype):
    xp = backend
    model = make(dtype)
    for name, value in model.params.items():
        assert value.dtype == dtype, name
    X, y = _data()
    scores = model.loss(xp.asarray(X, dtype=dtype))
    assert isinstance(scores, xp.ndarray) and scores.shape == (N, C) and scores.dtype == dtype
    loss, grads = model.loss(xp.asarray(X, dtype=dtype), xp.asarray(y))
    assert np.isfinite(float(loss))
    assert set(grads) == set(model.params)
    for name, g in grads.items():
        assert isinstance(g, xp.ndarray) and g.dtype == dtype and g.shape == model.params[name].shape


def test_default_dtype_is_float32():
    assert TwoLayerNet(input_dim=4, hidden_dim=3, num_classes=2).params["W1"].dtype == np.float32
    assert FullyConnectedNet([3], input_dim=4, num_classes=2).params["W1"].dtype == np.float32


def test_two_layer_net_scores_by_hand():
    model = TwoLayerNet(input_dim=D, hidden_dim=6, num_classes=C, dtype=np.float64)
    rng = np.random.default_rng(3)
    for name in model.params:
        model.params[name] = rng.standard_normal(model.params[name].shape)
    X, _ = _data()
    p = model.params
    expected = np.maximum(X @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]
    np.testing.assert_allclose(model.loss(X), expected, rtol=1e-12)
    # image-shaped input is flattened per example
    np.testing.assert_allclose(model.loss(X.reshape(N, 1, D)), expected, rtol=1e-12)


def test_fully_connected_scores_use_test_mode():
    """loss(X) uses batchnorm running statistics and no dropout: deterministic, row-independent."""
    model = FullyConnectedNet([6, 5], input_dim=D, num_classes=C, dtype=np.float64,
                              use_batchnorm=True, dropout=0.5, seed=2)
    X, y = _data(n=8)
    model.loss(X, y)  # one training pass sets running statistics
    scores = model.loss(X)
    np.testing.assert_array_equal(model.loss(X), scores)
    np.testing.assert_allclose(model.loss(X[:1]), scores[:1], rtol=1e-12)


# -- gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("reg", [0.0, 0.7])
def test_two_layer_net_gradients(backend, reg):
    xp = backend
    np.random.seed(0)
    model = TwoLayerNet(input_dim=D, hidden_dim=6, num_classes=C, weight_scale=0.5, reg=reg,
                        dtype=np.float64)
    _perturb_non_weights(model, seed=1)
    X, y = _data(1, n=10)
    _check_model_gradients(model, xp.asarray(X), xp.asarray(y))


def _perturb_non_weights(model, seed):
    """Random biases, gammas and betas instead of the initial 0 / 1.

    With zero biases an example whose hidden units are all off feeds exactly 0
    into the next relu, right on its kink, where the central difference sees
    half a slope; random biases keep pre-activations off 0 (and check the
    gradients at general values).
    """
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        if not name.startswith("W"):
            host = fastnn.to_numpy(value) + 0.3 * rng.standard_normal(value.shape)
            model.params[name] = fastnn.xp().asarray(host, dtype=value.dtype)


FC_CASES = {
    "plain": dict(),
    "batchnorm": dict(use_batchnorm=True),
    "dropout": dict(dropout=0.25),
    "batchnorm_dropout": dict(use_batchnorm=True, dropout=0.25),
    "layernorm": dict(normalization="layernorm"),
    "layernorm_keep_ratio": dict(normalization="layernorm", dropout_keep_ratio=0.75),
}


@pytest.mark.parametrize("case", FC_CASES)
@pytest.mark.parametrize("reg", [0.0, 3.14])
def test_fully_connected_net_gradients(backend, case, reg):
    # 10 examples: with fewer, batchnorm statistics of near-constant columns make
    # some gradient entries tiny, and the relative error of those measures only
    # the round-off of the central difference (~1e-11 absolute)
    xp = backend
    options = FC_CASES[case]
    model = FullyConnectedNet([6, 5], input_dim=D, num_classes=C, reg=reg, weight_scale=5e-1,
                              dtype=np.float64, seed=123, **options)
    _perturb_non_weights(model, seed=3)
    X, y = _data(2, n=10)
    zero = ("b1", "b2") if options.get("use_batchnorm") else ()
    _check_model_gradients(model, xp.asarray(X), xp.asarray(y), zero=zero)


# -- regularisation ------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda reg: TwoLayerNet(input_dim=D, hidden_dim=6, num_classes=C, weight_scale=0.3, reg=reg,
                            dtype=np.float64),
    lambda reg: FullyConnectedNet([6, 5], input_dim=D, num_classes=C, weight_scale=0.3, reg=reg,
                                  use_batchnorm=True, dtype=np.float64, seed=4),
], ids=["two_layer", "fc_batchnorm"])
def test_l2_is_half_reg_sum_of_squared_weights(backend, make):
    xp = backend
    reg = 2.5
    plain, regularised = make(0.0), make(reg)
    for name, value in plain.params.items():  # same weights in both, biases non-zero too
        value = value + (0.1 if not name.startswith("W") else 0.0)
        plain.params[name] = value
        regularised.params[name] = value.copy()
    X, y = (xp.asarray(a) for a in _data(5))
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = regularised.loss(X, y)
    weights = [k for k in plain.params if k.startswith("W")]
    penalty = 0.5 * reg * sum(float((fastnn.to_numpy(plain.params[k]) ** 2).sum()) for k in weights)
    assert float(loss1) - float(loss0) == pytest.approx(penalty, rel=1e-10)
    for name in plain.params:
        diff = fastnn.to_numpy(grads1[name]) - fastnn.to_numpy(grads0[name])
        expected = reg * fastnn.to_numpy(plain.params[name]) if name.startswith("W") else 0
        np.testing.assert_allclose(diff, expected, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("make", [
    lambda: TwoLayerNet(input_dim=D, hidden_dim=7, num_classes=C),
    lambda: FullyConnectedNet([6, 5], input_dim=D, num_classes=C, use_batchnorm=True, seed=1),
    lambda: FullyConnectedNet([6], input_dim=D, num_classes=C, seed=1),
], ids=["two_layer", "fc_batchnorm", "fc"])
def test_declared_roles(make):
    """Every parameter has a declared role; each norm layer is keyed by its gamma's suffix."""
    from fastnn.classifiers.base import check_roles

    model = make()
    roles = check_roles(model)
    for name, role in roles.items():  # the contract's names, written out
        prefix = name.rstrip("0123456789")
        assert role == {"W": "weight", "b": "bias", "gamma": "scale", "beta": "shift"}[prefix]
    gammas = sorted(name[len("gamma"):] for name, role in roles.items() if role == "scale")
    assert sorted(model.norm_params) == gammas
    for key, bn_param in model.norm_params.items():
        assert bn_param["running_mean"].shape == model.params[f"gamma{key}"].shape
    assert [id(p) for p in model.bn_params] == [id(model.norm_params[k]) for k in gammas]


def test_l2_follows_the_declared_roles_not_the_names():
    """Declaring b1 a weight puts it under L2: no code reads the role from the name."""
    model = FullyConnectedNet([6], input_dim=D, num_classes=C, reg=1.5, dtype=np.float64, seed=2)
    model.params["b1"] = model.params["b1"] + 0.3
    X, y = _data(5)
    loss0, grads0 = model.loss(X, y)
    model.param_roles["b1"] = "weight"
    loss1, grads1 = model.loss(X, y)
    assert float(loss1) - float(loss0) == pytest.approx(0.5 * 1.5 * float((model.params["b1"] ** 2).sum()))
    np.testing.assert_allclose(grads1["b1"] - grads0["b1"], 1.5 * model.params["b1"], atol=1e-12)


# -- reproducibility -----------------------------------------------------------------------
def test_seed_none_follows_np_random_seed():
    np.random.seed(42)
    a = FullyConnectedNet([5, 4], input_dim=D, num_classes=C)
    np.random.seed(42)
    b = FullyConnectedNet([5, 4], input_dim=D, num_classes=C)
    c = FullyConnectedNet([5, 4], input_dim=D, num_classes=C)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    np.random.seed(7)
    d = TwoLayerNet(input_dim=D, hidden_dim=5, num_classes=C)
    np.random.seed(7)
    e = TwoLayerNet(input_dim=D, hidden_dim=5, num_classes=C)
    np.testing.assert_array_equal(d.params["W1"], e.params["W1"])


def test_same_seed_same_weights_and_masks():
    a = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, dropout=0.5, seed=9)
    np.random.seed(1)  # the global generator does not matter when a seed is given
    b = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, dropout=0.5, seed=9)
    other = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, dropout=0.5, seed=10)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["W1"], other.params["W1"])
    X, y = _data(6)
    loss_a, grads_a = a.loss(X.astype(np.float32), y)
    loss_b, grads_b = b.loss(X.astype(np.float32), y)
    assert float(loss_a) == float(loss_b)
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name])


def test_dropout_masks_follow_step():
    model = FullyConnectedNet([50], input_dim=D, num_classes=C, dropout=0.5, seed=3,
                              dtype=np.float64)
    X, y = _data(7, n=20)
    first = model.loss(X, y)[1]["W1"]
    np.testing.assert_array_equal(model.loss(X, y)[1]["W1"], first)
    model.dropout_param["step"] = 1
    assert not np.array_equal(model.loss(X, y)[1]["W1"], first)


def test_fully_connected_rejects_bad_dropout():
    with pytest.raises(ValueError):
        FullyConnectedNet([3], input_dim=D, num_classes=C, dropout=1.0)


# -- normalization and dropout_keep_ratio (the later course's arguments) -------------------
def test_layernorm_net_params_and_roles(backend):
    xp = backend
    model = FullyConnectedNet([7, 6], input_dim=D, num_classes=C, normalization="layernorm",
                              seed=0)
    assert sorted(model.params) == sorted(["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2",
                                           "beta2", "W3", "b3"])
    assert model.params["gamma2"].shape == (6,) and isinstance(model.params["beta1"], xp.ndarray)
    np.testing.assert_array_equal(fastnn.to_numpy(model.params["gamma1"]), 1)
    np.testing.assert_array_equal(fastnn.to_numpy(model.params["beta2"]), 0)
    assert model.param_roles == {"W1": "weight", "b1": "bias", "gamma1": "scale",
                                 "beta1": "shift", "W2": "weight", "b2": "bias",
                                 "gamma2": "scale", "beta2": "shift", "W3": "weight",
                                 "b3": "bias"}
    # layernorm keeps no running statistics
    assert model.norm_params == {} and model.bn_params == []
    batchnorm = FullyConnectedNet([7, 6], input_dim=D, num_classes=C, use_batchnorm=True, seed=0)
    assert batchnorm.param_roles == model.param_roles
    assert batchnorm.norm_params == {"1": batchnorm.bn_params[0], "2": batchnorm.bn_params[1]}
    plain = FullyConnectedNet([7], input_dim=D, num_classes=C, seed=0)
    assert plain.param_roles == {"W1": "weight", "b1": "bias", "W2": "weight", "b2": "bias"}
    assert plain.norm_params == {}


def test_layernorm_net_is_the_same_in_train_and_test(backend):
    """Scores of a row do not depend on the batch, and a train pass leaves no state."""
    xp = backend
    model = FullyConnectedNet([6, 5], input_dim=D, num_classes=C, normalization="layernorm",
                              dtype=np.float64, seed=2)
    _perturb_non_weights(model, seed=4)
    X, y = (xp.asarray(a) for a in _data(n=8))
    scores = fastnn.to_numpy(model.loss(X))
    np.testing.assert_allclose(fastnn.to_numpy(model.loss(X[:1])), scores[:1], rtol=1e-12)
    model.loss(X, y)
    np.testing.assert_array_equal(fastnn.to_numpy(model.loss(X)), scores)
    # by hand: affine - layernorm - relu, twice, then affine
    p = {k: fastnn.to_numpy(v) for k, v in model.params.items()}
    hidden = fastnn.to_numpy(X)
    for i in (1, 2):
        a = hidden @ p[f"W{i}"] + p[f"b{i}"]
        normed = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)
        hidden = np.maximum(p[f"gamma{i}"] * normed + p[f"beta{i}"], 0)
    np.testing.assert_allclose(scores, hidden @ p["W3"] + p["b3"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("given, same_as", [
    (dict(normalization="batchnorm"), dict(use_batchnorm=True)),
    (dict(normalization="batchnorm", use_batchnorm=True), dict(use_batchnorm=True)),
    (dict(normalization=None), dict()),
    (dict(dropout_keep_ratio=0.75), dict(dropout=0.25)),
    (dict(dropout=0.25, dropout_keep_ratio=0.75), dict(dropout=0.25)),
    (dict(dropout=0.1, dropout_keep_ratio=0.9), dict(dropout=0.1)),  # 1 - 0.9 != 0.1 exactly
    (dict(dropout_keep_ratio=1.0), dict()),
    (dict(dropout_keep_ratio=1), dict(dropout=0)),
])
def test_agreeing_forms_build_the_same_net(given, same_as):
    a = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, seed=3, **given)
    b = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, seed=3, **same_as)
    assert a.init_args == b.init_args
    assert a.dropout_param == b.dropout_param and a.use_batchnorm == b.use_batchnorm
    X, y = _data(8)
    loss_a, grads_a = a.loss(X.astype(np.float32), y)
    loss_b, grads_b = b.loss(X.astype(np.float32), y)
    assert float(loss_a) == float(loss_b)
    for name in grads_b:
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


@pytest.mark.parametrize("given, words", [
    (dict(use_batchnorm=True, normalization="layernorm"), ["use_batchnorm=True", "'layernorm'"]),
    (dict(normalization="groupnorm"), ["'groupnorm'", "'layernorm'"]),
    (dict(normalization="LayerNorm"), ["'LayerNorm'"]),
    (dict(dropout=0.5, dropout_keep_ratio=0.75), ["dropout=0.5", "dropout_keep_ratio=0.75"]),
    (dict(dropout_keep_ratio=0.0), ["(0, 1]", "0.0"]),
    (dict(dropout_keep_ratio=1.5), ["(0, 1]", "1.5"]),
    (dict(dropout=1.0), ["[0, 1)", "1.0"]),
])
def test_disagreeing_or_bad_forms_are_value_errors(given, words):
    with pytest.raises(ValueError) as info:
        FullyConnectedNet([5], input_dim=D, num_classes=C, **given)
    for word in words:
        assert word in str(info.value)


def test_init_args_keep_the_form_earlier_versions_wrote():
    """Plain and batchnorm nets write exactly the init_args they wrote before these options
    existed (so their saved files and Solver checkpoints still match); only layernorm adds one."""
    old_keys = {"hidden_dims", "input_dim", "num_classes", "dropout", "use_batchnorm", "reg",
                "weight_scale", "dtype", "seed"}
    for options in (dict(), dict(normalization="batchnorm"), dict(dropout_keep_ratio=0.5)):
        model = FullyConnectedNet([5], input_dim=D, num_classes=C, **options)
        assert set(model.init_args) == old_keys, options
    model = FullyConnectedNet([5], input_dim=D, num_classes=C, normalization="layernorm",
                              dropout_keep_ratio=0.5)
    assert set(model.init_args) == old_keys | {"normalization"}
    assert model.init_args["normalization"] == "layernorm" and model.init_args["dropout"] == 0.5
    assert FullyConnectedNet(**model.init_args).init_args == model.init_args


def test_a_file_written_before_these_options_loads(tmp_path):
    """A model file whose init_args predate normalization / dropout_keep_ratio."""
    from fastnn.serialization import MODEL_FORMAT, model_state, write_npz

    model = FullyConnectedNet([5, 4], input_dim=D, num_classes=C, use_batchnorm=True,
                              dropout=0.2, seed=5)
    X, y = _data(9, n=8)
    model.loss(X.astype(np.float32), y)  # running statistics
    old_args = dict(hidden_dims=[5, 4], input_dim=D, num_classes=C, dropout=0.2,
                    use_batchnorm=True, reg=0.0, weight_scale=1e-2, dtype="float32", seed=5)
    write_npz(tmp_path / "old.npz", model_state(model),
              {"format": MODEL_FORMAT, "format_version": 1, "class": "FullyConnectedNet",
               "init_args": old_args, "dtype": "float32", "fastnn_version": "0.1.0"})
    loaded = fastnn.load(tmp_path / "old.npz")
    assert loaded.init_args == old_args == model.init_args
    np.testing.assert_array_equal(loaded.loss(X.astype(np.float32)), model.loss(X.astype(np.float32)))


def test_layernorm_net_save_load_round_trip(backend, tmp_path):
    xp = backend
    model = FullyConnectedNet([6, 5], input_dim=D, num_classes=C, normalization="layernorm",
                              dropout_keep_ratio=0.8, dtype=np.float64, seed=6)
    _perturb_non_weights(model, seed=7)
    fastnn.save(model, tmp_path / "ln.npz")
    loaded = fastnn.load(tmp_path / "ln.npz")
    assert loaded.normalization == "layernorm" and loaded.init_args == model.init_args
    assert loaded.param_roles == model.param_roles and loaded.norm_params == {}
    X, y = (xp.asarray(a) for a in _data(10, n=6))
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.loss(X)), fastnn.to_numpy(model.loss(X)))
    loss_a, grads_a = model.loss(X, y)  # the same dropout masks too
    loss_b, grads_b = loaded.loss(X, y)
    assert float(loss_a) == float(loss_b)


def test_layernorm_net_trains_with_solver(backend):
    from fastnn.solver import Solver

    rng = np.random.default_rng(11)
    data = dict(X_train=rng.standard_normal((50, 3, 4, 4)).astype(np.float32),
                y_train=rng.integers(0, 10, 50),
                X_val=rng.standard_normal((20, 3, 4, 4)).astype(np.float32),
                y_val=rng.integers(0, 10, 20))
    model = FullyConnectedNet([60, 60], input_dim=48, normalization="layernorm",
                              weight_scale=0.1, seed=0)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 5e-3},
                    num_epochs=15, batch_size=25, verbose=False, seed=0)
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.loss_history[-1] < 0.2 * solver.loss_history[0]
    assert float(fastnn.to_numpy(model.params["gamma1"]).std()) > 0  # the scales were trained


@pytest.mark.parametrize("bad", [-1, C, 1000])
def test_out_of_range_labels_give_a_nan_loss_on_every_backend(backend, bad):
    """model.loss skips the label check: a bad label is a NaN loss, not a wrapped-around class
    (CuPy's fancy indexing wraps) and not an exception or a sync."""
    xp = backend
    model = FullyConnectedNet([6], input_dim=D, num_classes=C, seed=0)
    X, y = _data(12)
    y[1] = bad
    loss, grads = model.loss(xp.asarray(X, dtype=np.float32), xp.asarray(y))
    assert np.isnan(float(loss))
    two_layer = TwoLayerNet(input_dim=D, hidden_dim=6, num_classes=C)
    assert np.isnan(float(two_layer.loss(xp.asarray(X, dtype=np.float32), xp.asarray(y))[0]))


def test_zero_width_layers_are_refused():
    with pytest.raises(ValueError, match=r"hidden_dims\[1\] must be an integer >= 1, got 0"):
        FullyConnectedNet([8, 0])
    with pytest.raises(ValueError, match="hidden_dim must be an integer >= 1, got 0"):
        TwoLayerNet(hidden_dim=0)


@pytest.mark.parametrize("make, name", [
    (lambda v: TwoLayerNet(input_dim=12, hidden_dim=v), "hidden_dim"),
    (lambda v: TwoLayerNet(input_dim=v), "input_dim"),
    (lambda v: FullyConnectedNet([4, v], input_dim=12), r"hidden_dims\[1\]"),
    (lambda v: FullyConnectedNet([4], input_dim=12, num_classes=v), "num_classes"),
    (lambda v: ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=v), "num_filters"),
    (lambda v: ThreeLayerConvNet(input_dim=(3, 8, 8), filter_size=v), "filter_size"),
    (lambda v: ThreeLayerConvNet(input_dim=(3, 8, v)), r"input_dim\[2\]"),
    (lambda v: ConvNet(widths=(4, v), stem_width=2, input_dim=(3, 8, 8)), r"widths\[1\]"),
    (lambda v: ConvNet(widths=(4,), stem_width=v, input_dim=(3, 8, 8)), "stem_width"),
])
def test_sizes_are_integers(make, name):
    """Numpy integers are taken exactly (the init_args hold Python ints, as fastnn.save needs);
    floats, even integral ones, strings and booleans are refused, naming the argument."""
    model = make(np.int16(3))
    assert all(type(v) is int for v in _ints_in(model.init_args))
    for bad in (2.5, 3.0, "3", True):
        with pytest.raises(TypeError, match=f"{name} must be an integer, got {bad!r}"):
            make(bad)


def _ints_in(args):
    """The integers of init_args (in lists too), numpy ones included."""
    values = [v for value in args.values() for v in (value if isinstance(value, list) else [value])]
    return [v for v in values if isinstance(v, (int, np.integer)) and not isinstance(v, bool)]


# -- ConvNet --------------------------------------------------------------------------------
def _tiny_conv_net(**options):
    kwargs = dict(widths=(3, 4), stem_width=2, input_dim=(2, 6, 5), num_classes=3,
                  dtype=np.float64, seed=0)
    kwargs.update(options)
    return ConvNet(**kwargs)


def test_conv_net_structure_and_roles(backend):
    model = ConvNet(widths=(4, 6), stem_width=3, input_dim=(3, 8, 8), num_classes=5)
    shapes = {name: tuple(value.shape) for name, value in model.params.items()}
    assert shapes == {
        "W1": (3, 3, 3, 3), "gamma1": (3,), "beta1": (3,),
        "W2": (4, 3, 3, 3), "gamma2": (4,), "beta2": (4,),
        "W3": (4, 4, 3, 3), "gamma3": (4,), "beta3": (4,),
        "W4": (6, 4, 3, 3), "gamma4": (6,), "beta4": (6,),
        "W5": (6, 6, 3, 3), "gamma5": (6,), "beta5": (6,),
        "W6": (6, 5), "b6": (5,)}
    assert all(isinstance(v, backend.ndarray) and v.dtype == np.float32
               for v in model.params.values())
    roles = {name: role for name, role in model.param_roles.items()}
    assert {n for n, r in roles.items() if r == "weight"} == {f"W{i}" for i in range(1, 7)}
    assert roles["b6"] == "bias" and roles["gamma3"] == "scale" and roles["beta3"] == "shift"
    assert set(model.norm_params) == {str(i) for i in range(1, 6)}
    for i in range(1, 6):
        np.testing.assert_array_equal(fastnn.to_numpy(model.params[f"gamma{i}"]), 1)
        np.testing.assert_array_equal(fastnn.to_numpy(model.params[f"beta{i}"]), 0)
    np.testing.assert_array_equal(fastnn.to_numpy(model.params["b6"]), 0)
    X = backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), dtype=np.float32)
    assert model.loss(X).shape == (2, 5)
    assert model.init_args["widths"] == [4, 6] and model.init_args["label_smoothing"] == 0.0
    # registered through Classifier, as the other models: L2 and decay read weight_names()
    assert isinstance(model, Classifier)
    assert model.weight_names() == [f"W{i}" for i in range(1, 7)]
    assert model.bn_params == list(model.norm_params.values())


def test_conv_net_default_is_the_reference_net():
    model = ConvNet()
    assert [tuple(model.params[f"W{i}"].shape[:2]) for i in range(1, 8)] == [
        (24, 3), (32, 24), (32, 32), (64, 32), (64, 64), (128, 64), (128, 128)]


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_conv_net_gradients(backend, smoothing):
    """Every parameter, in float64, with and without label smoothing."""
    xp = backend
    model = _tiny_conv_net(reg=0.7, widths=(2, 2), label_smoothing=smoothing)
    _perturb_non_weights(model, seed=1)
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((4, 2, 6, 5)), rng.integers(0, 3, 4)
    _check_model_gradients(model, xp.asarray(X), xp.asarray(y))


def test_conv_net_l2_covers_every_filter_and_the_affine_weight(backend):
    xp = backend
    plain, regularised = _tiny_conv_net(), _tiny_conv_net(reg=1.5)
    rng = np.random.default_rng(3)
    X, y = xp.asarray(rng.standard_normal((3, 2, 6, 5))), xp.asarray(rng.integers(0, 3, 3))
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = regularised.loss(X, y)
    weights = [f"W{i}" for i in range(1, 7)]
    penalty = 0.75 * sum(float((fastnn.to_numpy(plain.params[k]) ** 2).sum()) for k in weights)
    assert float(loss1) - float(loss0) == pytest.approx(penalty, rel=1e-10)
    for name in plain.params:
        diff = fastnn.to_numpy(grads1[name]) - fastnn.to_numpy(grads0[name])
        expected = 1.5 * fastnn.to_numpy(plain.params[name]) if name in weights else 0
        np.testing.assert_allclose(diff, expected, atol=1e-12, err_msg=name)


def test_conv_net_label_smoothing_is_one_pass_of_the_loss_op(backend, monkeypatch):
    """The op gets the smoothing (no second log-softmax pass); its loss is the by-hand one,
    targets (1 - s) onehot + s / C, plus the L2 term."""
    xp, s, reg = backend, 0.3, 0.2
    ops = kernels.for_module(xp)
    calls = []

    def spy(scores, y, *args, **kwargs):
        calls.append((scores, args, kwargs))
        return softmax_loss(scores, y, *args, **kwargs)

    softmax_loss = ops.softmax_loss
    monkeypatch.setattr(ops, "softmax_loss", spy)
    model = _tiny_conv_net(label_smoothing=s, reg=reg)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((5, 2, 6, 5)), rng.integers(0, 3, 5)
    loss, _ = model.loss(xp.asarray(X), xp.asarray(y))
    assert len(calls) == 1
    scores, args, kwargs = calls[0]
    assert (list(args) + list(kwargs.values())) == [s]
    scores = fastnn.to_numpy(scores)
    log_p = scores - scores.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    target = np.full((5, 3), s / 3)
    target[np.arange(5), y] += 1 - s
    l2 = 0.5 * reg * sum(float((fastnn.to_numpy(model.params[k]) ** 2).sum())
                         for k in model.weight_names())
    assert float(loss) == pytest.approx(-(target * log_p).sum(1).mean() + l2, rel=1e-12)


def test_conv_net_global_max_gradient_goes_to_the_first_maximum():
    """A head whose input is all zeros (relu): every channel's gradient lands at (0, 0)."""
    model = _tiny_conv_net()
    for i in range(1, 6):  # beta = -10: every relu output is 0
        model.params[f"beta{i}"][:] = -10.0
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((2, 2, 6, 5)), np.array([0, 1])
    _, grads = model.loss(X, y)
    np.testing.assert_array_equal(grads["W6"], 0)  # the features are all 0
    assert np.abs(grads["b6"]).sum() > 0


def test_conv_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs at least 8 pixels a side"):
        ConvNet(widths=(2, 2, 2), stem_width=2, input_dim=(3, 6, 6))
    with pytest.raises(ValueError, match="label_smoothing"):
        ConvNet(label_smoothing=1.0)
    with pytest.raises(ValueError, match="at least one group"):
        ConvNet(widths=())


def test_conv_net_seed_reproduces_and_dtype_is_kept(dtype):
    a, b = _tiny_conv_net(seed=7, dtype=dtype), _tiny_conv_net(seed=7, dtype=dtype)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    X = np.random.default_rng(6).standard_normal((2, 2, 6, 5)).astype(dtype)
    loss, grads = a.loss(X, np.array([0, 2]))
    assert a.loss(X).dtype == dtype and all(g.dtype == dtype for g in grads.values())


# -- ConvNet keyword options (airbench's recipe; each off by default) -----------------------
AIRBENCH_OPTIONS = dict(activation="gelu", bn_scale="frozen", bn_eps=1e-12, bn_momentum=0.6,
                        logit_scale=1 / 9, head_bias=False, dirac_init=True, stem="whiten")


def _tiny_whiten_net(**options):
    """A tiny net with every option on; C = 2 makes a whitening stem of 2*2*2*2 = 16."""
    kwargs = dict(AIRBENCH_OPTIONS, stem_width=16, input_dim=(2, 7, 6), widths=(3, 4))
    kwargs.update(options)
    return _tiny_conv_net(**kwargs)


def test_conv_net_default_options_leave_the_net_as_it_was():
    """Passing every option at its default is the net of no options: same init_args (no new
    keys, so files and checkpoints written before still match), parameters and gradients."""
    defaults = dict(activation="relu", bn_scale="learned", bn_eps=1e-5, bn_momentum=0.9,
                    logit_scale=1.0, head_bias=True, dirac_init=False, stem="conv")
    plain, explicit = _tiny_conv_net(), _tiny_conv_net(**defaults)
    assert plain.init_args == explicit.init_args and not set(defaults) & set(plain.init_args)
    assert plain.buffers == {} and list(plain.params) == list(explicit.params)
    rng = np.random.default_rng(8)
    X, y = rng.standard_normal((3, 2, 6, 5)), rng.integers(0, 3, 3)
    (loss0, grads0), (loss1, grads1) = plain.loss(X, y), explicit.loss(X, y)
    assert float(loss0) == float(loss1) and list(grads0) == list(grads1)
    for name in grads0:
        np.testing.assert_array_equal(grads0[name], grads1[name])


@pytest.mark.parametrize("options", [
    dict(AIRBENCH_OPTIONS, stem_width=16),
    dict(stem="whiten", stem_width=16),  # relu after the whitening conv
    dict(activation="gelu"), dict(bn_scale="frozen"), dict(logit_scale=0.25, head_bias=False)],
    ids=["all", "whiten_relu", "gelu", "frozen_scale", "logit_scale_no_head_bias"])
def test_conv_net_option_gradients(backend, options):
    """Every trainable parameter, in float64; the whitening filters have no gradient.

    The filters are perturbed too: dirac's exact zeros would give exact ties (kinks) and
    gradients so small that round-off dominates their relative error."""
    xp = backend
    kwargs = dict(options, input_dim=(2, 7, 6))
    model = _tiny_conv_net(reg=0.3, widths=(2, 3), **kwargs)
    _perturb_non_weights(model, seed=1)
    rng = np.random.default_rng(3)
    for name, value in model.params.items():
        if name.startswith("W"):
            value[...] = value + xp.asarray(0.3 * rng.standard_normal(value.shape))
    # data whose smallest gradients (logits / 9) stay well above round-off at h = 1e-5
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((4, 2, 7, 6)), rng.integers(0, 3, 4)
    if model.buffers:
        model.init_whitening(xp.asarray(X))
    _check_model_gradients(model, xp.asarray(X), xp.asarray(y))


def test_conv_net_all_options_structure(backend):
    model = _tiny_whiten_net(dtype=np.float32)
    assert set(model.params) == {"b1", "W2", "beta2", "W3", "beta3", "W4", "beta4", "W5", "beta5",
                                 "W6"}
    assert model.param_roles["b1"] == "bias" and model.weight_names() == [
        "W2", "W3", "W4", "W5", "W6"]
    # the whitening filters: 2x2, C -> 16, not a parameter (no update rule or L2 sees them)
    assert set(model.buffers) == {"W1"} and model.buffers["W1"].shape == (16, 2, 2, 2)
    assert isinstance(model.buffers["W1"], backend.ndarray)
    assert model.buffers["W1"].dtype == np.float32
    for i in range(2, 6):
        assert model.norm_params[str(i)]["eps"] == 1e-12
        assert model.norm_params[str(i)]["momentum"] == 0.6
    X = backend.asarray(np.random.default_rng(0).standard_normal((2, 2, 7, 6)), dtype=np.float32)
    assert model.loss(X).shape == (2, 3)


def test_conv_net_skips_the_stem_backward_once_its_bias_is_frozen(backend, monkeypatch):
    """With b1 in model.frozen (the Solver's train_epochs passed) the loss leaves b1's
    gradient out and the first group's conv computes no input gradient; every other
    gradient is the same."""
    xp = backend
    model = _tiny_whiten_net()
    rng = np.random.default_rng(5)
    X, y = xp.asarray(rng.standard_normal((4, 2, 7, 6))), xp.asarray(rng.integers(0, 3, 4))
    model.init_whitening(X)
    loss, grads = model.loss(X, y)
    asked = []
    real = conv_net.conv_pool_backward_fast
    monkeypatch.setattr(conv_net, "conv_pool_backward_fast",
                        lambda dout, cache, need_dx=True: asked.append(need_dx) or real(
                            dout, cache, need_dx))
    model.frozen = frozenset({"b1"})
    frozen_loss, frozen_grads = model.loss(X, y)
    assert float(frozen_loss) == float(loss)
    assert set(frozen_grads) == set(grads) - {"b1"}
    for name, grad in frozen_grads.items():
        np.testing.assert_array_equal(fastnn.to_numpy(grad), fastnn.to_numpy(grads[name]))
    assert asked == [True, False]  # the second group's conv, then the first's (no dx)


def test_conv_net_whitening_stem_sizes_and_init():
    # a 2x2 conv without padding loses a pixel a side: 3 groups need 9, not 8
    with pytest.raises(ValueError, match="needs at least 9 pixels a side"):
        ConvNet(widths=(2, 2, 2), input_dim=(3, 8, 8), stem="whiten")
    ConvNet(widths=(2, 2, 2), input_dim=(3, 9, 9), stem="whiten")
    with pytest.raises(ValueError, match="pass stem_width=16"):
        ConvNet(widths=(2,), input_dim=(2, 8, 8), stem="whiten")
    with pytest.raises(ValueError, match="stem='whiten'"):
        _tiny_conv_net().init_whitening(np.zeros((2, 2, 6, 5)))
    model = _tiny_whiten_net()
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        model.init_whitening(np.zeros((2, 3, 7, 6)))
    X = np.random.default_rng(3).standard_normal((5, 2, 7, 6))
    model.init_whitening(X, eps=1e-3)
    np.testing.assert_array_equal(model.buffers["W1"], whitening_filters(X, 2, 1e-3, relative=True))


def test_conv_net_all_options_loss_is_the_layers_by_hand():
    """The loss equals the naive layers composed by hand as airbench's net: 2x2 conv with
    the whitening filters and b1, no padding (7x6 -> 6x5), gelu; per group conv - pool -
    batchnorm (scale 1, eps 1e-12) - gelu - conv - batchnorm - gelu; global max; the
    affine without bias, times 1/9; softmax."""
    model = _tiny_whiten_net()
    _perturb_non_weights(model, seed=5)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((3, 2, 7, 6)), rng.integers(0, 3, 3)
    model.init_whitening(X)
    p = model.params
    hidden, _ = conv_forward_naive(X, model.buffers["W1"], p["b1"], {"stride": 1, "pad": 0})
    hidden, _ = gelu_forward(hidden)
    assert hidden.shape == (3, 16, 6, 5)
    for i in range(2, 6):
        hidden, _ = conv_forward_naive(hidden, p[f"W{i}"], np.zeros(len(p[f"W{i}"])),
                                       {"stride": 1, "pad": 1})
        if i % 2 == 0:
            hidden, _ = max_pool_forward_naive(hidden, {"pool_height": 2, "pool_width": 2,
                                                        "stride": 2})
        ones = np.ones(hidden.shape[1])
        hidden, _ = spatial_batchnorm_forward(hidden, ones, p[f"beta{i}"],
                                              {"mode": "train", "eps": 1e-12})
        hidden, _ = gelu_forward(hidden)
    scores = hidden.max(axis=(2, 3)) @ p["W6"] / 9
    expected, _ = layers.softmax_loss(scores, y)
    assert float(model.loss(X, y)[0]) == pytest.approx(float(expected), rel=1e-12)


def test_conv_net_frozen_scale_is_the_learned_net_at_gamma_one():
    """bn_scale="frozen": no gamma parameters, the scores and the other gradients of the
    learned-scale net at its initial gamma = 1; the ones are made once, not per step."""
    learned, frozen = _tiny_conv_net(), _tiny_conv_net(bn_scale="frozen")
    assert not [name for name in frozen.params if name.startswith("gamma")]
    assert "scale" not in frozen.param_roles.values()
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((4, 2, 6, 5)), rng.integers(0, 3, 4)
    (loss0, grads0), (loss1, grads1) = learned.loss(X, y), frozen.loss(X, y)
    assert float(loss0) == float(loss1) and set(grads1) == set(frozen.params)
    for name in grads1:
        np.testing.assert_array_equal(grads0[name], grads1[name])
    ones = dict(frozen._ones)
    frozen.loss(X, y)
    assert all(frozen._ones[c] is ones[c] for c in ones)


def test_conv_net_bn_momentum_and_eps_reach_the_batchnorms():
    """running = momentum * running + (1 - momentum) * batch: from zero, 0.4 of the batch
    mean at momentum 0.6 against 0.1 at the default 0.9."""
    default, airbench = _tiny_conv_net(), _tiny_conv_net(bn_momentum=0.6, bn_eps=1e-12)
    X = np.random.default_rng(7).standard_normal((4, 2, 6, 5)) + 1
    y = np.array([0, 1, 2, 0])
    default.loss(X, y)
    airbench.loss(X, y)
    mean0, mean1 = default.norm_params["1"]["running_mean"], airbench.norm_params["1"][
        "running_mean"]
    np.testing.assert_allclose(mean1, 4 * mean0, rtol=1e-12)
    assert airbench.norm_params["1"]["eps"] == 1e-12 and default.norm_params["1"]["eps"] == 1e-5


def test_conv_net_logit_scale_and_head_without_bias():
    plain = _tiny_conv_net()
    scaled = _tiny_conv_net(logit_scale=1 / 9, head_bias=False)
    assert "b6" not in scaled.params and "b6" in plain.params
    plain.params["b6"][:] = 0
    X = np.random.default_rng(8).standard_normal((3, 2, 6, 5))
    np.testing.assert_allclose(scaled.loss(X), plain.loss(X) / 9, rtol=1e-12)


def test_conv_net_dirac_init():
    """Each 3x3 conv's first min(F, C) filters are the identity on their input channel; the
    others are the default net's (same seed, same draws)."""
    plain, dirac = _tiny_conv_net(seed=3), _tiny_conv_net(seed=3, dirac_init=True)
    for i in range(1, 6):
        w, w0 = dirac.params[f"W{i}"], plain.params[f"W{i}"]
        m = min(w.shape[:2])
        identity = np.zeros((m,) + w.shape[1:])
        identity[np.arange(m), np.arange(m), 1, 1] = 1
        np.testing.assert_array_equal(w[:m], identity, err_msg=f"W{i}")
        np.testing.assert_array_equal(w[m:], w0[m:], err_msg=f"W{i}")
    np.testing.assert_array_equal(dirac.params["W6"], plain.params["W6"])


def test_conv_net_rejects_bad_options():
    for options, match in [(dict(activation="tanh"), "activation"),
                           (dict(bn_scale="fixed"), "bn_scale"), (dict(stem="patch"), "stem"),
                           (dict(bn_eps=0), "bn_eps"), (dict(bn_momentum=1.5), "bn_momentum"),
                           (dict(logit_scale=-1), "logit_scale"),
                           (dict(head_bias="no"), "head_bias"), (dict(dirac_init=1), "dirac_init")]:
        with pytest.raises(ValueError, match=match):
            _tiny_conv_net(**options)


def test_conv_net_all_options_save_load_and_checkpoint_resume(backend, tmp_path):
    """The whitening filters (not a parameter) travel in model files and Solver checkpoints;
    training moves b1 and the betas but never the filters."""
    xp = backend
    model = _tiny_whiten_net()
    rng = np.random.default_rng(9)
    X, y = rng.standard_normal((8, 2, 7, 6)), rng.integers(0, 3, 8)
    model.init_whitening(xp.asarray(X))
    filters = fastnn.to_numpy(model.buffers["W1"]).copy()
    b1 = fastnn.to_numpy(model.params["b1"]).copy()
    data = dict(X_train=X, y_train=y, X_val=X[:4], y_val=y[:4])
    solver = Solver(model, data, update_rule="sgd_momentum", batch_size=4, num_epochs=1,
                    verbose=False, optim_config={"learning_rate": 0.1},
                    checkpoint_path=str(tmp_path / "ck.npz"))
    solver.train()
    np.testing.assert_array_equal(fastnn.to_numpy(model.buffers["W1"]), filters)
    assert not np.array_equal(fastnn.to_numpy(model.params["b1"]), b1)
    fastnn.save(model, tmp_path / "m.npz")
    loaded = fastnn.load(tmp_path / "m.npz")
    assert loaded.init_args == model.init_args and loaded.options == model.options
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.buffers["W1"]), filters)
    for name in model.params:
        np.testing.assert_array_equal(fastnn.to_numpy(loaded.params[name]),
                                      fastnn.to_numpy(model.params[name]))
    Xt = xp.asarray(X[:3])
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.loss(Xt)), fastnn.to_numpy(model.loss(Xt)))
    fresh = _tiny_whiten_net()  # placeholder filters until the checkpoint's come back
    resumed = Solver(fresh, data, update_rule="sgd_momentum", batch_size=4, num_epochs=1,
                     verbose=False, optim_config={"learning_rate": 0.1})
    resumed.load_checkpoint(str(tmp_path / "ck.npz"))
    np.testing.assert_array_equal(fastnn.to_numpy(fresh.buffers["W1"]), filters)


def test_conv_net_file_without_its_whitening_filters_is_refused(tmp_path):
    from fastnn.serialization import MODEL_FORMAT, read_npz, write_npz

    fastnn.save(_tiny_whiten_net(), tmp_path / "m.npz")
    arrays, meta = read_npz(tmp_path / "m.npz", MODEL_FORMAT)
    del arrays["buffer/W1"]
    write_npz(tmp_path / "cut.npz", arrays, meta)
    with pytest.raises(ValueError, match="has no buffer 'W1'"):
        fastnn.load(tmp_path / "cut.npz")
