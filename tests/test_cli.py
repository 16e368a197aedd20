"""`fastnn train` / `fastnn evaluate`: run folders, resume bit for bit, Ctrl-C, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastnn
from fastnn.cli import main
from fastnn.serialization import read_npz
from helpers import PNG_MAGIC


def small_args(root, out, *extra):
    """A tiny fc run (a later --model in `extra` wins)."""
    return ["train", "--out", str(out), "--data", root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", "--model", "fc", "--hidden-dims",
            "24", "16", "--batch-size", "16", "--print-every", "5", *extra]


# Tiny nets of each model, on small_args's data (options after --model replace fc's).
TINY_MODELS = {
    "fc": ("--model", "fc"),
    "two_layer": ("--model", "two_layer", "--hidden-dim", "20"),
    "three_layer_conv": ("--model", "three_layer_conv", "--num-filters", "4",
                         "--filter-size", "3", "--hidden-dim", "16"),
    "convnet": ("--model", "convnet", "--widths", "4", "8", "--stem-width", "4"),
}


def convnet_args(root, out, *extra):
    """A tiny run with the convnet defaults (the main job's recipe), tiny widths."""
    return ["train", "--out", str(out), "--data", root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", "--widths", "4", "8",
            "--stem-width", "4", "--batch-size", "16", "--print-every", "5", *extra]


def checkpoint_params(run_dir):
    arrays, meta = read_npz(os.path.join(run_dir, "checkpoint.npz"), "fastnn-checkpoint")
    return {k: v for k, v in arrays.items() if k.startswith("model/")}, meta


def test_train_writes_a_complete_run_folder(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "2", "--dropout", "0.1")) == 0
    for name in ("config.json", "metrics.json", "model.npz", "checkpoint.npz"):
        assert (out / name).exists(), name
    for name in ("loss.png", "accuracy.png", "weights.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_test"] == 50
    assert 0 <= metrics["test_acc"] <= 1 and 0 <= metrics["best_val_acc"] <= 1
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    assert len(metrics["loss_history"]) == 2 * (160 // 16)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_dims"] == [24, 16] and config["dropout"] == 0.1
    model = fastnn.load(out / "model.npz")
    assert model.params["W1"].shape == (3072, 24)
    # the class colours make this easy: training must have learned something
    assert metrics["best_val_acc"] > 0.3


def test_resume_equals_an_uninterrupted_run_bit_for_bit(cifar_root, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    options = ("--dropout", "0.2", "--augment")  # no schedule: its shape depends on --epochs
    assert main(small_args(cifar_root, whole, "--epochs", "3", *options)) == 0
    assert main(small_args(cifar_root, part, "--epochs", "1", *options)) == 0
    assert main(["train", "--resume", str(part), "--epochs", "3"]) == 0
    want, want_meta = checkpoint_params(whole)
    got, got_meta = checkpoint_params(part)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got_meta["loss_history"] == want_meta["loss_history"]
    assert json.loads((part / "metrics.json").read_text())["test_acc"] == \
        json.loads((whole / "metrics.json").read_text())["test_acc"]


def test_resume_refuses_to_change_the_model(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    with pytest.raises(SystemExit, match="hidden_dims"):
        main(["train", "--resume", str(out), "--hidden-dims", "8"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", "--resume", str(tmp_path / "nothing")])


def test_train_refuses_a_folder_that_holds_a_run(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds a run.*--resume"):
        main(small_args(cifar_root, out, "--epochs", "2"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_corrupt_checkpoint_is_a_clear_error(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    path = out / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        main(["train", "--resume", str(out), "--epochs", "2"])


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(cifar_root, tmp_path):
    """SIGINT mid-run: exit 130 with a one-line hint; the resumed run equals an uninterrupted one."""
    epochs = "40"
    options = ("--epochs", epochs, "--dropout", "0.1", "--lr-schedule", "onecycle", "--augment")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(small_args(cifar_root, whole, *options)) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastnn",
                             *small_args(cifar_root, stopped, *options)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (stopped / "checkpoint.npz").exists():  # wait for the first epoch to end
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    hint = [line for line in stderr.splitlines() if "--resume" in line]
    assert hint and f"fastnn train --resume {stopped}" in hint[-1]
    _, meta = checkpoint_params(stopped)
    assert 0 < meta["t"] < 40 * 10, "the run should have stopped mid-way"
    assert main(["train", "--resume", str(stopped)]) == 0
    want, _ = checkpoint_params(whole)
    got, _ = checkpoint_params(stopped)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_evaluate_prints_accuracy_and_confusion_matrix(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1", "--model", "two_layer",
                           "--hidden-dim", "20")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    test_acc = json.loads((out / "metrics.json").read_text())["test_acc"]
    assert f"test accuracy {test_acc:.4f} on 50 images" in printed
    rows = [line for line in printed.splitlines() if line.strip().startswith("airplane")]
    assert len(rows) == 1 and len(rows[0].split()) == 11
    assert (out / "confusion.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", str(tmp_path)])


def test_python_dash_m_fastnn_shows_help():
    result = subprocess.run([sys.executable, "-m", "fastnn", "train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--resume" in result.stdout and "--lr-schedule" in result.stdout


def test_train_defaults_to_the_convnet_recipe(cifar_root, tmp_path):
    from fastnn.classifiers import ConvNet
    from fastnn.runs import RECIPES

    out = tmp_path / "run"
    assert main(convnet_args(cifar_root, out, "--epochs", "2")) == 0
    config = json.loads((out / "config.json").read_text())
    for key, value in RECIPES["convnet"].items():
        if key != "epochs":
            assert config[key] == value, key
    assert config["model"] == "convnet" and config["widths"] == [4, 8]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flip_test"] is True and metrics["test_acc"] == metrics["test_acc_flip"]
    assert 0 <= metrics["test_acc_plain"] <= 1
    model = fastnn.load(out / "model.npz")
    assert isinstance(model, ConvNet) and model.params["W1"].shape == (4, 3, 3, 3)
    assert model.label_smoothing == config["label_smoothing"]
    assert (out / "weights.png").read_bytes()[:8] == PNG_MAGIC  # the stem's filters
    assert metrics["best_val_acc"] > 0.2  # the class colours are easy


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_every_model_resumes_bit_for_bit_and_evaluates(cifar_root, tmp_path, model, capsys):
    # no schedule: its shape depends on --epochs
    options = (*TINY_MODELS[model], "--augment", "--lr-schedule", "none")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(small_args(cifar_root, whole, "--epochs", "2", *options)) == 0
    assert main(small_args(cifar_root, part, "--epochs", "1", *options)) == 0
    assert main(["train", "--resume", str(part), "--epochs", "2"]) == 0
    want, _ = checkpoint_params(whole)
    got, _ = checkpoint_params(part)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    capsys.readouterr()
    assert main(["evaluate", str(part)]) == 0
    metrics = json.loads((part / "metrics.json").read_text())
    assert f"test accuracy {metrics['test_acc']:.4f} on 50 images" in capsys.readouterr().out


def test_resuming_a_run_made_before_the_convnet_default_keeps_its_settings(cifar_root, tmp_path):
    """A config.json as the earlier fastnn wrote it (no conv keys, no flip_test, no format
    keys) resumes as the fc run it was, equal to an uninterrupted run of today's fc."""
    from fastnn.runs import LEGACY_DEFAULTS

    old_keys = ["model", "hidden_dims", "hidden_dim", "batchnorm", "dropout", "reg",
                "weight_scale", "update_rule", "learning_rate", "momentum", "beta1", "beta2",
                "decay_rate", "epsilon", "weight_decay", "lr_schedule", "augment",
                "crop_padding", "lr_decay", "epochs", "batch_size", "backend", "seed", "data",
                "num_training", "num_validation", "num_test", "threads", "print_every"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(small_args(cifar_root, whole, "--epochs", "2")) == 0
    assert main(small_args(cifar_root, part, "--epochs", "1")) == 0
    config = json.loads((part / "config.json").read_text())
    old = {key: config[key] for key in old_keys}
    assert old["model"] == "fc" and set(LEGACY_DEFAULTS) > set(old)
    (part / "config.json").write_text(json.dumps(old, indent=2))
    assert main(["train", "--resume", str(part), "--epochs", "2"]) == 0
    want, _ = checkpoint_params(whole)
    got, _ = checkpoint_params(part)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    resumed = json.loads((part / "config.json").read_text())
    assert resumed["model"] == "fc" and resumed["flip_test"] is False
    assert resumed["label_smoothing"] == 0.0 and resumed["update_rule"] == "adam"
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["flip_test"] is False and metrics["test_acc"] == metrics["test_acc_plain"]
    assert metrics["test_acc"] == json.loads((whole / "metrics.json").read_text())["test_acc"]


def test_evaluate_averages_flips_as_the_run_says_unless_told(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(convnet_args(cifar_root, out, "--epochs", "1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"test accuracy {metrics['test_acc_flip']:.4f} on 50 images (flip averaging on)"
            in printed)
    assert main(["evaluate", str(out), "--no-flip-test"]) == 0
    printed = capsys.readouterr().out
    assert (f"test accuracy {metrics['test_acc_plain']:.4f} on 50 images (flip averaging off)"
            in printed)
