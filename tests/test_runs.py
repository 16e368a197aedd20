"""fastnn.runs: config checks, what applies to which model and rule, building a run."""
import numpy as np
import pytest

from fastnn.runs import (DEFAULTS, MODEL_OPTIONS, RULE_OPTIONS, build_model, build_solver,
                         check_config, not_applicable, optim_config, predict, recorded)


def test_the_defaults_are_valid():
    check_config(DEFAULTS)
    for model in MODEL_OPTIONS:
        for rule in RULE_OPTIONS:
            check_config({"model": model, "update_rule": rule})


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, r"--batch-size must be in \[1, inf\], got 0"),
    ("dropout", 1.5, r"--dropout must be in \[0, 1\), got 1.5"),
    ("dropout", 1.0, r"--dropout must be in \[0, 1\)"),
    ("epochs", -1, r"--epochs must be in \[1, inf\], got -1"),
    ("epochs", 0, "--epochs"),
    ("num_validation", 0, "--num-validation"),
    ("num_test", 0, "--num-test"),
    ("learning_rate", -1.0, r"--lr must be in \(0, inf\], got -1.0"),
    ("learning_rate", float("nan"), "--lr"),
    ("hidden_dims", [0], r"--hidden-dims must be one or more sizes >= 1, got \[0\]"),
    ("hidden_dims", [], "--hidden-dims"),
    ("batch_size", 2.5, "--batch-size must be an integer, got 2.5"),
    ("num_training", 49500, "at most CIFAR-10's 50000"),
    ("num_test", 10001, "10000 test images"),
    ("backend", "torch", "--backend must be one of"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_config({key: value})


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
    config = recorded({**DEFAULTS, "update_rule": "sgd_momentum", "momentum": 0.8})
    assert config["momentum"] == 0.8
    assert not {"beta1", "beta2", "epsilon", "weight_decay", "crop_padding",
                "hidden_dim"} & config.keys()
    assert {k: v for k, v in {**DEFAULTS, **config}.items()} == \
        {**DEFAULTS, "update_rule": "sgd_momentum", "momentum": 0.8}


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
