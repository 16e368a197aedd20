"""fastnn.runs: config checks, what applies to which model and rule, building a run."""
import numpy as np
import pytest

from fastnn.runs import (DEFAULTS, LEGACY_DEFAULTS, MODEL_OPTIONS, RECIPES, RULE_OPTIONS,
                         build_model, build_solver, check_config, complete, defaults_for,
                         new_config, not_applicable, optim_config, predict, recorded)


def test_the_defaults_are_valid():
    check_config(DEFAULTS)
    for model in MODEL_OPTIONS:
        for rule in RULE_OPTIONS:
            check_config({"model": model, "update_rule": rule})


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, r"--batch-size must be >= 1, got 0"),
    ("dropout", 1.5, r"--dropout must be in \[0, 1\), got 1.5"),
    ("dropout", 1.0, r"--dropout must be in \[0, 1\)"),
    ("epochs", -1, r"--epochs must be >= 1, got -1"),
    ("epochs", 0, "--epochs"),
    ("num_validation", 0, "--num-validation"),
    ("num_test", 0, "--num-test"),
    ("learning_rate", -1.0, r"--lr must be > 0, got -1.0"),
    ("learning_rate", float("nan"), "--lr"),
    ("hidden_dims", [0], r"--hidden-dims must be one or more sizes >= 1, got \[0\]"),
    ("hidden_dims", [], "--hidden-dims"),
    ("batch_size", 2.5, "--batch-size must be an integer, got 2.5"),
    ("num_training", 49500, "at most CIFAR-10's 50000"),
    ("num_test", 10001, "10000 test images"),
    ("backend", "torch", "--backend must be one of"),
    ("flip_test", "yes", "--flip-test must be true or false"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_config({key: value})


@pytest.mark.parametrize("key, value, message", [
    ("widths", [], "--widths must be one or more channel counts >= 1, got"),
    ("widths", [8, 0], "--widths"),
    ("widths", [8] * 6, "at most 5 groups fit 32x32 images"),
    ("label_smoothing", 1.0, r"--label-smoothing must be in \[0, 1\), got 1.0"),
    ("stem_width", 0, "--stem-width"),
])
def test_bad_convnet_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_config({"model": "convnet", key: value})


def test_options_that_do_not_apply_are_named_with_the_reason():
    config = {"model": "fc", "update_rule": "adam", "augment": False}
    reasons = not_applicable(config, ["momentum", "weight_decay", "crop_padding", "hidden_dim",
                                      "beta1", "dropout", "reg"])
    assert set(reasons) == {"momentum", "weight_decay", "crop_padding", "hidden_dim"}
    assert "sgd_momentum" in reasons["momentum"] and "adamw" in reasons["weight_decay"]
    assert "--augment is off" in reasons["crop_padding"]
    assert "two_layer" in reasons["hidden_dim"]
    assert set(not_applicable({"model": "two_layer"}, ["dropout", "batchnorm"])) == \
        {"dropout", "batchnorm"}
    assert not not_applicable({"augment": True, "update_rule": "adamw"},
                              ["crop_padding", "weight_decay"])


def test_recorded_keeps_only_what_applies():
    fc = defaults_for("fc")
    config = recorded({**fc, "update_rule": "sgd_momentum", "momentum": 0.8})
    assert config["momentum"] == 0.8
    assert not {"beta1", "beta2", "epsilon", "weight_decay", "crop_padding",
                "hidden_dim", "widths", "label_smoothing"} & config.keys()
    assert {k: v for k, v in {**fc, **config}.items()} == \
        {**fc, "update_rule": "sgd_momentum", "momentum": 0.8}
    convnet = recorded(DEFAULTS)
    assert not {"hidden_dims", "dropout", "weight_scale", "beta1"} & convnet.keys()
    assert complete(convnet) == {**LEGACY_DEFAULTS, **convnet}
    for key in ("model", "widths", "label_smoothing", "flip_test", "momentum", "crop_padding"):
        assert convnet[key] == DEFAULTS[key], key


def test_new_runs_get_their_models_recipe_and_stored_ones_the_old_defaults():
    assert new_config({}) == {**LEGACY_DEFAULTS, **RECIPES["convnet"], "model": "convnet"}
    assert new_config({"epochs": 3})["epochs"] == 3
    assert new_config({"model": "fc"}) == {**LEGACY_DEFAULTS, "model": "fc"}
    # a stored config without a key means the key's value before it existed
    assert complete({}) == LEGACY_DEFAULTS and complete({})["model"] == "fc"
    assert complete({"model": "fc"})["flip_test"] is False
    for model in RECIPES:
        check_config(defaults_for(model))
    with pytest.raises(ValueError, match="--model must be one of .*got 'resnet'"):
        new_config({"model": "resnet"})


def test_build_model_builds_each_model_from_its_recipe():
    from fastnn.classifiers import ConvNet, FullyConnectedNet, ThreeLayerConvNet, TwoLayerNet

    classes = {"convnet": ConvNet, "fc": FullyConnectedNet, "two_layer": TwoLayerNet,
               "three_layer_conv": ThreeLayerConvNet}
    for name, cls in classes.items():
        small = {"widths": [4], "stem_width": 4, "hidden_dims": [8], "hidden_dim": 8,
                 "num_filters": 4, "filter_size": 3}
        model = build_model({**defaults_for(name), **small})
        assert type(model) is cls, name
    convnet = build_model({**DEFAULTS, "widths": [4, 8], "stem_width": 4, "seed": 3})
    assert convnet.label_smoothing == DEFAULTS["label_smoothing"]
    assert convnet.params["W1"].shape == (4, 3, 3, 3)
    again = build_model({**DEFAULTS, "widths": [4, 8], "stem_width": 4, "seed": 3})
    np.testing.assert_array_equal(again.params["W1"], convnet.params["W1"])


def test_optim_config_takes_the_rules_options_that_were_set():
    assert optim_config({"update_rule": "adamw", "weight_decay": 0.1, "momentum": 0.5}) == \
        {"learning_rate": 1e-3, "weight_decay": 0.1}


def test_build_and_predict_in_batches_including_an_empty_batch():
    config = {"hidden_dims": [8], "epochs": 1, "batch_size": 4, "num_training": 8}
    model = build_model(config)
    X = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    labels = predict(model, X, batch_size=3)
    assert labels.shape == (7,)
    np.testing.assert_array_equal(labels, np.argmax(model.loss(X), axis=1))
    assert predict(model, X[:0]).shape == (0,)
    data = {"X_train": X, "y_train": np.arange(7) % 10, "X_val": X, "y_val": np.arange(7) % 10}
    solver = build_solver(model, data, config, verbose=False)
    assert solver.batch_size == 4 and solver.num_epochs == 1 and solver.checkpoint_path is None
