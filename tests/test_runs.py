"""fastnn.runs: config checks, what applies to which model and rule, building a run."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastnn

from fastnn.runs import (DEFAULTS, LEGACY_DEFAULTS, MODEL_OPTIONS, RECIPES, RULE_OPTIONS,
                         build_model, build_solver, changed_options, check_config, complete,
                         defaults_for, new_config, not_applicable, optim_config, predict,
                         recorded)


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
    ("augment", "false", "--augment must be true or false, got 'false'"),
    ("batchnorm", 0, "--batchnorm must be true or false, got 0"),
    ("dropout", None, "--dropout must be a number, got None"),
    ("epochs", None, "--epochs must be an integer, got None"),
    ("seed", "0", "--seed must be an integer, got '0'"),
    ("model_seed", None, "--model-seed must be an integer, got None"),
    ("data", 5, r"--data must be a folder \(a path\), got 5"),
    ("model", ["fc"], r"--model must be one of .*got \['fc'\]"),
    ("update_rule", None, "--update-rule must be one of .*got None"),
    ("hidden_dims", "24", "--hidden-dims must be one or more sizes"),
    ("colour", "red", r"keys fastnn train does not know: \['colour'\]"),
])
def test_every_key_of_a_stored_config_is_checked(key, value, message):
    """What a hand-edited config.json may hold: each key of its type, no unknown key."""
    with pytest.raises(ValueError, match=message):
        check_config({"model": "fc", key: value})


def test_none_means_a_default_only_where_a_key_has_one():
    check_config({"model": "fc", "update_rule": "sgd_momentum", "momentum": None,
                  "threads": None, "data": None, "lr_schedule": None})
    check_config({"model": "convnet", "dropout": None})  # fc's option: convnet ignores it


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
    # (a new run also records its recipe's name)
    # no --model or --recipe: the main job (airbench_muon); --model convnet: its own recipe
    from fastnn import models

    assert new_config({}) == {**LEGACY_DEFAULTS, **models.RECIPES["airbench_muon"].settings,
                              "model": "convnet", "recipe": "airbench_muon"} == DEFAULTS
    assert new_config({"model": "convnet"}) == {**LEGACY_DEFAULTS, **RECIPES["convnet"],
                                                "model": "convnet", "recipe": "convnet"}
    assert new_config({"epochs": 3})["epochs"] == 3
    assert new_config({"model": "fc"}) == {**LEGACY_DEFAULTS, "model": "fc", "recipe": "fc"}
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
    recipe = defaults_for("convnet")
    convnet = build_model({**recipe, "widths": [4, 8], "stem_width": 4, "seed": 3})
    assert convnet.label_smoothing == recipe["label_smoothing"]
    assert convnet.params["W1"].shape == (4, 3, 3, 3)
    again = build_model({**recipe, "widths": [4, 8], "stem_width": 4, "seed": 3})
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


def test_changed_options_are_those_a_resumed_run_may_not_change():
    old = recorded(defaults_for("fc"))
    assert changed_options(old, {**old, "epochs": 99, "threads": 1, "data": "/x"}) == {}
    assert changed_options(old, {**old, "batch_size": 32, "augment": True}) == {
        "augment": (False, True), "batch_size": (256, 32)}
    # a key left out means its old default, the same as writing it
    assert changed_options({k: v for k, v in old.items() if k != "reg"}, old) == {}


def test_a_checkpoint_refuses_a_solver_of_another_configuration(tmp_path):
    """build_solver's checkpoints record the configuration; one trained under another
    (a hand-edited config.json) is refused, naming what differs."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    data = {"X_train": X, "y_train": np.arange(32) % 10, "X_val": X, "y_val": np.arange(32) % 10}
    config = {"hidden_dims": [8], "epochs": 1, "batch_size": 8, "num_training": 32}
    path = tmp_path / "checkpoint.npz"
    solver = build_solver(build_model(config), data, config, verbose=False)
    solver.checkpoint_path = path
    solver.train()
    again = build_solver(build_model(config), data, {**config, "epochs": 3}, verbose=False)
    again.load_checkpoint(path)
    assert again.epoch == 1
    edited = {**config, "batch_size": 16}
    other = build_solver(build_model(edited), data, edited, verbose=False)
    with pytest.raises(ValueError, match="checkpoint.npz was trained with --batch-size 8, not 16; "
                                         "a resumed run may change only --backend"):
        other.load_checkpoint(path)
    # a checkpoint written before they recorded the configuration shows its epoch length
    from fastnn.serialization import read_checkpoint, write_npz

    arrays, meta = read_checkpoint(path)
    meta.pop("run_config", None)  # as fastnn wrote checkpoints before
    write_npz(path, arrays, meta)
    with pytest.raises(ValueError, match="another --batch-size or --num-training: it stopped at "
                                         "iteration 4, after epoch 1, but 2 iterations make"):
        other.load_checkpoint(path)
    again.load_checkpoint(path)


NEW_MODEL = """
import sys
from fastnn import models
# a new model: one registry entry (here TwoLayerNet under another name), its recipe, its search
models.MODELS["wide_two_layer"] = models.MODELS["two_layer"]._replace(
    about="wide_two_layer (a wide TwoLayerNet)", recipe="wide",
    search=models.Search("wide_two_layer: learning rates",
                         {"learning_rate": ("float", 1e-3, 1e-2, True)},
                         {"learning_rate": 5e-3}, stacked=False, parallel=1, epochs=1,
                         crop_padding=0, summary=lambda c: f"lr {c['learning_rate']:.2e}"))
models.RECIPES["wide"] = ("wide_two_layer", {"hidden_dim": 24, "update_rule": "sgd_momentum",
                                             "learning_rate": 1e-2})
models.TUNABLE.append("wide_two_layer")
from fastnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_new_model_with_its_recipe_and_search_is_one_registry_entry(cifar_root, tmp_path):
    """runs, the CLI and tune take a model from fastnn.models alone: train, its --help, tune."""
    data = ["--data", cifar_root, "--num-training", "64", "--num-validation", "16",
            "--num-test", "16"]
    run = [sys.executable, "-c", NEW_MODEL]
    train = subprocess.run([*run, "train", "--model", "wide_two_layer", "--out",
                            str(tmp_path / "run"), *data, "--epochs", "1", "--batch-size", "16"],
                           capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"], config["hidden_dim"], config["update_rule"]) == \
        ("wide_two_layer", 24, "sgd_momentum")
    refused = subprocess.run([*run, "train", "--model", "wide_two_layer", "--dropout", "0.1",
                              "--out", str(tmp_path / "no"), *data], capture_output=True, text=True)
    assert refused.returncode == 2 and "applies to --model fc, not wide_two_layer" in refused.stderr
    helps = subprocess.run([*run, "tune", "--help"], capture_output=True, text=True, check=True)
    assert "wide_two_layer: learning rates" in helps.stdout
    tune = subprocess.run([*run, "tune", "--model", "wide_two_layer", "--trials", "1", "--out",
                           str(tmp_path / "tune"), *data], capture_output=True, text=True)
    assert tune.returncode == 0, tune.stderr
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["config"]["model"] == "wide_two_layer" and best["config"]["hidden_dim"] == 24
    assert best["config"]["learning_rate"] == 5e-3  # the search's baseline, its first trial


def test_no_module_but_the_registries_names_a_model_or_rule():
    """Model and rule behaviour comes from fastnn.models and fastnn.optim, not name checks."""
    root = os.path.dirname(fastnn.__file__)
    names = "|".join(["adamw", "adam", "convnet", "fc", "two_layer", "three_layer_conv"])
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']""")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as fh:
                    found += [f"{os.path.relpath(path, root)}:{i}" for i, line in enumerate(fh, 1)
                              if pattern.search(line)]
    assert not found, found


NEW_RULE = """
import sys
from fastnn import optim
# a new rule with a new hyperparameter, declared in fastnn.optim alone (its op: sgd_momentum's)
optim.SPECS["heavy_ball"] = optim.Rule({"learning_rate": 1e-2, "momentum": 0.9, "damping": 0.0},
                                       ("velocity",), "sgd_momentum_",
                                       lambda c: (c["learning_rate"], c["momentum"]))
optim.DEFAULTS["heavy_ball"] = optim.SPECS["heavy_ball"].defaults
optim.RULES["heavy_ball"] = optim.sgd_momentum
optim.RANGES["damping"] = (0, 1, False, True)
from fastnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_new_update_rule_and_its_hyperparameters_need_only_fastnn_optim(cifar_root, tmp_path):
    """--update-rule, its hyperparameters' flags, their checks and the recorded config all come
    from fastnn.optim's tables."""
    run = [sys.executable, "-c", NEW_RULE, "train", "--data", cifar_root, "--num-training", "64",
           "--num-validation", "16", "--num-test", "16", "--model", "two_layer",
           "--hidden-dim", "8", "--epochs", "1", "--batch-size", "16", "--update-rule",
           "heavy_ball"]
    bad = subprocess.run([*run, "--damping", "2", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--damping must be in [0, 1), got 2.0" in bad.stderr
    helps = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    assert "heavy_ball damping (0)" in helps.stdout
    good = subprocess.run([*run, "--damping", "0.5", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["update_rule"], config["damping"]) == ("heavy_ball", 0.5)


def test_a_registry_entry_that_does_not_fit_fails_loudly(monkeypatch):
    from fastnn import models

    monkeypatch.setitem(models.MODELS, "typo", models.MODELS["fc"]._replace(
        options=("hiden_dims",), recipe="typo"))
    with pytest.raises(ValueError, match=r"undeclared options \['hiden_dims'\]"):
        models.check_tables()
    monkeypatch.setitem(models.MODELS, "typo", models.MODELS["fc"]._replace(recipe="typo"))
    monkeypatch.setitem(models.RECIPES, "typo", ("fc", {}))
    with pytest.raises(ValueError, match="recipe 'typo'"):
        models.check_tables()


def test_a_recipe_names_a_run_and_a_model_that_disagrees_is_refused(monkeypatch):
    from fastnn import models

    monkeypatch.setitem(models.RECIPES, "slow_fc", models.Recipe(
        "fc", {"epochs": 40, "dropout": 0.5}, "fc, longer"))
    config = new_config({"recipe": "slow_fc", "dropout": 0.1})
    assert (config["model"], config["recipe"], config["epochs"], config["dropout"]) == \
        ("fc", "slow_fc", 40, 0.1)  # a flag replaces one value of the recipe
    assert new_config({"model": "fc"})["recipe"] == "fc"  # --model alone: its default recipe
    assert new_config({"recipe": "slow_fc", "model": "fc"})["epochs"] == 40
    assert models.recipes_of("fc") == ["fc", "slow_fc"]
    with pytest.raises(ValueError, match=r"^--recipe slow_fc trains --model fc, not convnet: "
                                         r"drop --model, or pick a recipe of convnet \(convnet, "
                                         r"airbench_muon, airbench94_muon, airbench_small, "
                                         r"airbench94\)$"):
        new_config({"recipe": "slow_fc", "model": "convnet"})
    with pytest.raises(ValueError, match=r"--recipe must be one of \[.*\], got 'slow'"):
        new_config({"recipe": "slow"})
    with pytest.raises(ValueError, match="--model must be one of"):
        new_config({"recipe": "slow_fc", "model": "resnet"})
    # a run folder's recipe is a label: one no longer in the registry still loads
    check_config({**config, "recipe": "gone"})
    with pytest.raises(ValueError, match="--recipe must be a recipe's name, got 3"):
        check_config({"recipe": 3})
    assert changed_options({**config, "recipe": None}, config) == {}


def test_tta_is_flip_test_extended_and_old_configs_mean_what_they_said():
    assert complete({"model": "convnet", "flip_test": True})["tta"] == 1  # before tta existed
    assert complete({"model": "fc"})["tta"] == 0
    assert (DEFAULTS["tta"], DEFAULTS["flip_test"]) == (2, True)
    assert (defaults_for("convnet")["tta"], defaults_for("convnet")["flip_test"]) == (1, True)
    for given, want in (({"flip_test": False}, (0, False)), ({"flip_test": True}, (1, True)),
                        ({"tta": 2}, (2, True)), ({"tta": 0}, (0, False))):
        config = new_config(given)
        assert (config["tta"], config["flip_test"]) == want, given
        check_config(config)
    with pytest.raises(ValueError, match=r"--tta 2 and --no-flip-test disagree"):
        check_config(new_config({"tta": 2, "flip_test": False}))
    with pytest.raises(ValueError, match=r"--tta must be in \[0, 2\], got 3"):
        check_config({"tta": 3, "flip_test": True})
    with pytest.raises(ValueError, match="--tta must be an integer, got True"):
        check_config({"tta": True, "flip_test": True})


def test_augment_options_carry_the_flips_and_the_padding_mode():
    from fastnn.runs import augment_options

    config = new_config({"model": "fc", "augment": True, "crop_padding": 2, "flip": "alternate",
                         "padding_mode": "reflect"})
    check_config(config)
    assert augment_options(config) == {"flip": "alternate", "crop_padding": 2,
                                       "padding_mode": "reflect"}
    assert augment_options(DEFAULTS) == {"flip": "alternate", "crop_padding": 2,
                                         "padding_mode": "reflect"}
    assert augment_options(defaults_for("convnet")) == {"flip": True, "crop_padding": 2,
                                                        "padding_mode": "zeros"}
    assert recorded(config)["flip"] == "alternate"
    off = {**config, "augment": False}
    assert set(not_applicable(off, {"flip": 0, "padding_mode": 0})) == {"flip", "padding_mode"}
    assert "--augment is off" in not_applicable(off, {"flip": 0})["flip"]
    assert not {"flip", "padding_mode"} & recorded(off).keys()
    with pytest.raises(ValueError, match=r"--padding-mode must be one of \['zeros', 'reflect'\]"):
        check_config({**config, "padding_mode": "edge"})
    with pytest.raises(ValueError, match=r"--flip must be one of \['random', 'alternate'\]"):
        check_config({**config, "flip": True})


def test_a_search_moves_to_the_recipe_it_starts_from(monkeypatch):
    from fastnn import models

    assert models.search_for("convnet") is models.MODELS["convnet"].search
    monkeypatch.setitem(models.RECIPES, "slow", models.Recipe("convnet", {
        "learning_rate": 0.02, "momentum": 0.99, "epochs": 30}))
    search, declared = models.search_for("convnet", "slow"), models.MODELS["convnet"].search
    assert search.baseline == {**declared.baseline, "learning_rate": 0.02, "momentum": 0.99}
    assert search.space["learning_rate"] == (  # scaled by 0.02 / 0.2
        "float", pytest.approx(0.005), pytest.approx(0.05), True)
    assert search.space["momentum"] == ("float", 0.8, 0.99, False)  # widened to hold it
    assert search.space["reg"] == declared.space["reg"] and search.epochs == 30


def test_a_search_around_an_airbench_recipe_drops_reg_and_searches_its_decay():
    """The airbench recipes set reg 0 (their weight decay does its work): reg is not searched
    (a log range around 0 is empty); their weight decay, muon's learning rate and their
    schedule are the search's."""
    from fastnn import models

    for name in ("airbench_muon", "airbench94"):
        settings = models.RECIPES[name].settings
        search = models.search_for("convnet", name)
        assert "reg" not in search.space and "reg" not in search.baseline
        assert search.baseline["weight_decay"] == settings["weight_decay"]
        kind, low, high, log = search.space["weight_decay"]
        assert log and low < settings["weight_decay"] < high
        assert search.lr_schedule == settings["lr_schedule"]
        assert all(low <= search.baseline[k] <= high for k, (_, low, high, _) in
                   search.space.items())
    assert models.search_for("convnet", "airbench_muon").baseline["muon_learning_rate"] == 0.24
    assert "muon_learning_rate" not in models.search_for("convnet", "airbench94").space
    assert models.search_for("convnet").lr_schedule == "onecycle"  # the convnet recipe's


NEW_SOLVER_OPTION = """
import sys
from fastnn import models
# a new Solver option (here the existing `sampling`), declared once: its flag, check, legacy
# value (a config written before it: the Solver's default) and keyword come from this entry
models.OPTIONS["sampling"] = models.Option("choice", "epoch", "how batches are drawn (epoch)",
                                           choices=("epoch", "replacement"), solver="sampling")
import numpy as np
from fastnn import runs
from fastnn.cli.parser import build_parser
config = runs.new_config({"model": "two_layer", "hidden_dim": 4, "sampling": "replacement"})
runs.check_config(config)
try:
    runs.check_config({**config, "sampling": "shuffle"})
except ValueError as exc:
    print(exc)
data = {k: np.zeros((4, 3, 32, 32), np.float32) for k in ("X_train", "X_val")}
data.update({k: np.zeros(4, np.int64) for k in ("y_train", "y_val")})
solver = runs.build_solver(runs.build_model(config), data, config, verbose=False)
print(solver.sampling, runs.complete({})["sampling"])
print(build_parser().parse_args(["train", "--sampling", "replacement"]).sampling)
"""


def test_a_solver_option_is_one_registry_entry():
    result = subprocess.run([sys.executable, "-c", NEW_SOLVER_OPTION], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "--sampling must be one of ['epoch', 'replacement'], got 'shuffle'",
        "replacement epoch", "replacement"]


def tiny_images(n, seed=0):
    """n random CIFAR-shaped images and labels as a data dict's train and val splits."""
    rng = np.random.default_rng(seed)
    return {"X_train": rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
            "y_train": rng.integers(0, 10, n), "X_val": rng.standard_normal(
                (8, 3, 32, 32)).astype(np.float32), "y_val": rng.integers(0, 10, 8)}


def test_the_airbench94_recipe_builds_airbenchs_convnet_and_solver():
    from fastnn.classifiers.base import ROLES
    from fastnn.init import whitening_filters

    config = new_config({"recipe": "airbench94", "widths": [4, 8, 8], "batch_size": 16})
    check_config(config)
    assert (config["epochs"], config["tta"], config["label_smoothing"], config["reg"]) == (
        10, 2, 0.2, 0.0)  # airbench's 9.9 epochs rounded
    data = tiny_images(64)
    model = build_model(config, data)
    assert model.widths == [4, 8, 8] and model.stem_width == 24
    assert model.options == dict(activation="gelu", bn_scale="frozen", bn_eps=1e-12,
                                 bn_momentum=0.6, logit_scale=1 / 9, head_bias=False,
                                 dirac_init=True, stem="whiten")
    # the stem whitens the new run's training images (all 64 of them: fewer than 5000)
    np.testing.assert_allclose(model.buffers["W1"], whitening_filters(data["X_train"], relative=True),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(build_model(config).buffers["W1"], model.buffers["W1"])  # as drawn
    solver = build_solver(model, data, config, verbose=False)
    # fastnn.optim's docstring: airbench's lr 11.5 and weight decay 0.0153 per 1024 examples
    # at momentum 0.85, in fastnn's terms for batch 1024
    assert solver.optim_config == {"learning_rate": pytest.approx(1.5), "momentum": 0.85,
                                   "weight_decay": pytest.approx(0.0153 / 11.5)}
    assert (solver.update_rule, solver.batch_size, solver.lr_schedule) == (
        "sgd_nesterov", 16, "triangle")
    assert solver.lr_multipliers == {"shift": 64.0} and solver.decayed_roles == ROLES
    assert solver.lookahead == {"every": 5, "base": 0.95 ** 5, "power": 3.0}
    assert solver.train_epochs == {"b1": 3}
    assert solver.augment == {"flip": "alternate", "crop_padding": 2, "padding_mode": "reflect"}
    assert solver.lr_schedule_config["min_iterations"] == 0
    # the shifts' learning rate is 64x, their decay step lr * weight_decay the weights'
    configs = solver.optim_configs
    assert configs["beta2"]["learning_rate"] == pytest.approx(64 * 1.5)
    assert configs["beta2"]["learning_rate"] * configs["beta2"]["weight_decay"] == \
        pytest.approx(configs["W2"]["learning_rate"] * configs["W2"]["weight_decay"])
    assert configs["b1"]["weight_decay"] == configs["W2"]["weight_decay"]


def test_the_airbench_muon_recipes_are_airbench94_muons_optimizer():
    """airbench94_muon.py's hyperparameters (batch 2000: bias_lr 0.053, head_lr 0.67, wd 2e-6 *
    2000 as wd / lr per group, SGD momentum 0.85; Muon lr 0.24, momentum 0.6; lr straight down
    to 0) in fastnn's terms (a mean loss: torch's rates times the batch size; the head's over
    the last width, whose square root scales the scores)."""
    for name, widths, epochs in (("airbench_muon", [32, 112, 176], 8),
                                 ("airbench94_muon", [64, 256, 256], 8)):
        config = new_config({"recipe": name})
        check_config(config)
        width, head_lr = widths[-1], 0.67 * 2000 / widths[-1]
        assert (config["widths"], config["epochs"], config["batch_size"]) == (widths, epochs, 2000)
        assert config["logit_scale"] == pytest.approx(width ** -0.5)
        solver = build_solver(build_model({**config, "widths": [4, 8, 8]}), tiny_images(64),
                              {**config, "widths": [4, 8, 8], "batch_size": 16}, verbose=False)
        assert solver.update_rule == "muon" and solver.lookahead is None
        assert (solver.lr_schedule, solver.lr_schedule_config) == ("linear", {"end_factor": 0.0})
        configs = solver.optim_configs
        assert configs["W2"]["muon_learning_rate"] == 0.24
        assert configs["W2"]["muon_momentum"] == 0.6 and configs["W8"]["momentum"] == 0.85
        assert configs["W8"]["learning_rate"] == pytest.approx(head_lr)         # the head
        for bias in ("beta2", "b1"):  # the batchnorm shifts and the stem's bias
            assert configs[bias]["learning_rate"] == pytest.approx(0.053 * 2000)
        for name_ in ("W8", "beta2", "b1"):  # torch's wd / lr per group: a step's decay 0.004
            assert configs[name_]["learning_rate"] * configs[name_]["weight_decay"] == \
                pytest.approx(2e-6 * 2000)


def schedule_factors(config, num_training):
    """The learning-rate factor of each iteration of a run of `config` on `num_training`
    images (config -> Solver -> fastnn.schedules)."""
    from fastnn import schedules

    solver = build_solver(build_model(config), tiny_images(num_training), config, verbose=False)
    total = solver.num_epochs * solver.iterations_per_epoch
    return [schedules.lr_factor(solver.lr_schedule, t, total, solver.iterations_per_epoch,
                                solver.lr_schedule_config) for t in range(total)]


def test_a_shortened_default_run_peaks_lower_and_a_full_one_as_before():
    # the main job's recipe, tiny widths, batch 16: 19 iterations, as --epochs 1
    # --num-training 5000 at batch 256 (which warmed up to lr 0.2 and diverged)
    tiny = {"model": "convnet", "widths": [4], "stem_width": 4, "batch_size": 16}
    short = new_config({**tiny, "epochs": 1})
    assert short["lr_min_iterations"] == 200 and short["lr_schedule"] == "onecycle"
    factors = schedule_factors(short, 19 * 16)
    unscaled = schedule_factors({**short, "lr_min_iterations": 0}, 19 * 16)
    assert len(factors) == 19 and max(unscaled) > 0.99
    assert factors == pytest.approx([f * 19 / 200 for f in unscaled])  # peaks at lr 0.019
    # 11 epochs of 19 = 209 iterations >= 200: the full cycle, bit for bit as without the key
    full = new_config({**tiny, "epochs": 11})
    assert schedule_factors(full, 19 * 16) == schedule_factors(
        {**full, "lr_min_iterations": 0}, 19 * 16)
    # a schedule without a cycle ignores the recipe's value
    assert new_config({**tiny, "lr_schedule": "cosine"})["lr_min_iterations"] == 200
    assert schedule_factors(new_config({**tiny, "epochs": 1, "lr_schedule": "cosine"}),
                            19 * 16)[0] == 1.0


def test_a_config_written_before_the_airbench_keys_loads_with_them_off():
    from fastnn import models
    from fastnn.runs import solver_options

    new_keys = ("activation", "bn_scale", "bn_eps", "bn_momentum", "logit_scale", "head_bias",
                "dirac_init", "stem", "stem_bias_epochs", "shift_lr_multiplier",
                "decay_all_roles", "lookahead", "lr_min_iterations", "bias_lr_multiplier")
    old = {k: v for k, v in recorded(new_config({"widths": [4], "stem_width": 4})).items()
           if k not in new_keys}  # a convnet config.json as written before these keys
    check_config(old)
    full = complete(old)
    assert {k: full[k] for k in new_keys} == {k: models.OPTIONS[k].legacy for k in new_keys}
    assert {k: full[k] for k in new_keys} == dict(
        activation="relu", bn_scale="learned", bn_eps=1e-5, bn_momentum=0.9, logit_scale=1.0,
        head_bias=True, dirac_init=False, stem="conv", stem_bias_epochs=0,
        shift_lr_multiplier=1.0, decay_all_roles=False, lookahead=False, lr_min_iterations=0,
        bias_lr_multiplier=1.0)
    assert set(solver_options(old).values()) == {None}  # the Solver's own defaults
    model = build_model(old, tiny_images(16))
    assert set(model.init_args) == {"widths", "stem_width", "input_dim", "num_classes", "reg",
                                    "dtype", "seed", "label_smoothing"}  # as before
    assert changed_options(old, {**old, **{k: full[k] for k in new_keys}}) == {}
