"""`fastnn train` / `fastnn evaluate`: run folders, resume bit for bit, Ctrl-C, errors."""
import json
import os
import re
import shlex
import shutil
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
    """A tiny run (fc 24-16 unless extra picks another --model)."""
    model = () if "--model" in extra else ("--model", "fc", "--hidden-dims", "24", "16")
    return ["train", "--out", str(out), "--data", root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", *model,
            "--batch-size", "16", "--print-every", "5", *extra]


# Tiny nets of each model, for small_args.
TINY_MODELS = {
    "fc": ("--model", "fc", "--hidden-dims", "24", "16"),
    "two_layer": ("--model", "two_layer", "--hidden-dim", "20"),
    "three_layer_conv": ("--model", "three_layer_conv", "--num-filters", "4",
                         "--filter-size", "3", "--hidden-dim", "16"),
    "convnet": ("--model", "convnet", "--widths", "4", "8", "--stem-width", "4"),
}


def convnet_args(root, out, *extra):
    """A tiny run of --model convnet with its own recipe (convnet), tiny widths."""
    return ["train", "--out", str(out), "--data", root, "--model", "convnet",
            "--num-training", "160", "--num-validation", "40", "--num-test", "50",
            "--widths", "4", "8", "--stem-width", "4", "--batch-size", "16", "--print-every", "5",
            *extra]


def train_stopped_after_epoch_1(monkeypatch, args):
    """`fastnn train ARGS` stopped right after its first epoch's checkpoint, as a second Ctrl-C
    stops it; returns its exit code."""
    from fastnn.solver import Solver

    write_checkpoints = Solver._write_checkpoints

    def stop_after_epoch_1(self):
        write_checkpoints(self)
        if self.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Solver, "_write_checkpoints", stop_after_epoch_1)
    try:
        return main(["train", *args])
    finally:
        monkeypatch.undo()


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


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def last_error(capsys):
    """The command's error line, checked to be the only line of stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_resume_refuses_to_change_the_model(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--hidden-dims", "8"]) == 2
    assert "cannot change --hidden-dims" in last_error(capsys)
    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "--out does not apply with --resume" in last_error(capsys)
    assert main(["train", "--resume", str(out), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in last_error(capsys)
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 1
    assert "no folder" in last_error(capsys)
    assert folder_bytes(out) == before and not (tmp_path / "other").exists()


def test_train_refuses_a_folder_that_holds_a_run(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(small_args(cifar_root, out, "--epochs", "2")) == 1
    assert re.search("already holds a run.*--resume", last_error(capsys))
    assert folder_bytes(out) == before


def test_a_failed_resume_changes_no_file(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    path = out / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:200])
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 1
    assert re.search("cannot resume: .*checkpoint.npz is corrupt.*nothing in .* was changed",
                     last_error(capsys))
    assert folder_bytes(out) == before  # config.json still says "epochs": 1


def test_a_run_stopped_in_its_first_epoch_resumes_from_the_start(cifar_root, tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(small_args(cifar_root, whole, "--epochs", "1")) == 0
    assert main(small_args(cifar_root, crashed, "--epochs", "1")) == 0
    for p in crashed.iterdir():  # what a process killed in its first epoch leaves
        if p.name not in ("config.json", ".lock"):
            p.unlink()
    assert main(["train", "--resume", str(crashed)]) == 0
    assert (json.loads((crashed / "metrics.json").read_text())["test_acc"] ==
            json.loads((whole / "metrics.json").read_text())["test_acc"])


@pytest.mark.parametrize("flags, message", [
    (("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (("--dropout", "1.5"), r"--dropout must be in \[0, 1\), got 1.5"),
    (("--epochs", "-1"), "--epochs must be >= 1"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--num-validation", "0"), "--num-validation must be >= 1"),
    (("--num-test", "0"), "--num-test must be >= 1"),
    (("--lr", "-1"), "--lr must be > 0"),
    (("--hidden-dims", "0"), "--hidden-dims must be one or more sizes >= 1"),
    (("--momentum", "0.9"), r"--momentum does not apply \(it applies to --update-rule "
                            r"sgd_momentum/sgd_nesterov/muon, not adam\); drop it"),
    (("--update-rule", "adam", "--weight-decay", "0.1"), "--weight-decay does not apply"),
    (("--crop-padding", "4"), "--crop-padding does not apply.*--augment is off"),
    (("--model", "two_layer", "--dropout", "0.1"),
     r"--dropout does not apply \(it applies to --model fc, not two_layer\)"),
])
def test_usage_errors_are_one_line_exit_2_and_claim_nothing(cifar_root, tmp_path, capsys,
                                                            flags, message):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, *flags)) == 2
    assert re.search(message, last_error(capsys))
    assert not out.exists()


def test_a_failed_start_leaves_nothing_and_the_same_command_then_works(cifar_root, tmp_path,
                                                                       capsys):
    root = tmp_path / "data"
    shutil.copytree(cifar_root, root)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    good = batch.read_bytes()
    batch.write_bytes(good[:100])
    out = tmp_path / "runs" / "main"
    args = small_args(str(root), out, "--epochs", "1")
    assert main(args) == 1
    error = last_error(capsys)
    assert "data_batch_2 is truncated or corrupt" in error and "official archive" in error
    assert not (tmp_path / "runs").exists()
    batch.write_bytes(good)
    assert main(args) == 0


def test_out_paths_that_cannot_be_a_folder_are_one_line(cifar_root, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(small_args(cifar_root, afile)) == 1
    assert "is a file, not a folder" in last_error(capsys)
    assert main(small_args(cifar_root, afile / "run")) == 1
    assert "is a file, not a folder" in last_error(capsys)
    assert afile.read_text() == "keep me"
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(small_args(cifar_root, locked / "run")) == 1
        assert "permission denied" in last_error(capsys)


def test_a_folder_held_by_another_process_is_refused(cifar_root, tmp_path, capsys):
    from fastnn.files import lock_folder

    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    before = folder_bytes(out)
    capsys.readouterr()
    with lock_folder(out):
        assert main(["train", "--resume", str(out), "--epochs", "2"]) == 1
        assert "in use by another fastnn process" in last_error(capsys)
    assert folder_bytes(out) == before


def test_flags_that_apply_are_recorded_and_nothing_else(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1", "--update-rule", "sgd_momentum",
                           "--momentum", "0.8")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "fastnn-run-config" and config["format_version"] == 1
    assert config["momentum"] == 0.8 and config["update_rule"] == "sgd_momentum"
    assert not {"beta1", "beta2", "epsilon", "weight_decay", "crop_padding",
                "hidden_dim"} & config.keys()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format"] == "fastnn-run-metrics" and metrics["status"] == "finished"


def test_a_newer_config_version_is_refused_in_one_line(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 1
    assert "format version 99, newer than this fastnn reads (1)" in last_error(capsys)
    old = {k: v for k, v in config.items() if not k.startswith("format")}
    (out / "config.json").write_text(json.dumps(old))  # written before versions: still loads
    assert main(["evaluate", str(out)]) == 0


def test_config_file_starts_a_run_like_the_flags(cifar_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(small_args(cifar_root, first, "--epochs", "1", "--dropout", "0.1")) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    assert (json.loads((second / "metrics.json").read_text())["epochs"] ==
            json.loads((first / "metrics.json").read_text())["epochs"])


def test_a_diverging_run_saves_the_best_model_and_the_failure(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(small_args(cifar_root, out, "--epochs", "3", "--no-batchnorm", "--update-rule",
                           "sgd", "--lr", "1e3"))
    assert code == 1
    error = last_error(capsys)
    assert "diverged" in error and str(out / "model.npz") in error
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and "became" in metrics["failure"]
    model = fastnn.load(out / "model.npz")
    assert all(np.isfinite(w).all() for w in model.params.values())


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


def test_evaluate_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 1
    assert "holds no run" in last_error(capsys)
    assert main(["evaluate", str(tmp_path / "nothing")]) == 1
    assert "no folder" in last_error(capsys)


def run_cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "fastnn", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def test_errors_are_one_line_without_a_traceback_unless_debugging(cifar_root, tmp_path):
    args = small_args(cifar_root, tmp_path / "run", "--backend", "cupy")
    result = run_cli(*args)
    if result.returncode == 0:
        pytest.skip("CuPy and a GPU are present: the backend check passes")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "backend: the 'cupy' backend needs" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli(*args, env={"FASTNN_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    usage = run_cli(*small_args(cifar_root, tmp_path / "run", "--batch-size", "0"))
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_runs_started_at_the_same_instant_get_one_folder_each_or_are_refused(cifar_root,
                                                                            tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastnn", *small_args(cifar_root, out, "--epochs", "1")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    for code, err in results:
        if code:
            assert re.search("in use by another fastnn process|already holds a run", err), err
            assert "Traceback" not in err
    assert json.loads((out / "metrics.json").read_text())["status"] == "finished"


def test_sigterm_saves_a_checkpoint_like_ctrl_c(cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastnn",
                             *small_args(cifar_root, out, "--epochs", "40")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.npz").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert f"SIGTERM" in stderr and f"fastnn train --resume {out}" in stderr
    _, meta = checkpoint_params(out)
    assert 0 < meta["t"] < 40 * 10


def test_python_dash_m_fastnn_shows_help():
    result = subprocess.run([sys.executable, "-m", "fastnn", "train", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--resume" in result.stdout and "--lr-schedule" in result.stdout


def test_train_without_model_or_recipe_is_the_main_job(cifar_root, tmp_path):
    """No --model or --recipe: the main job's recipe (airbench_muon), its whitening stem,
    GELU and lookahead, tta 2; it trains."""
    from fastnn import models
    from fastnn.classifiers import ConvNet

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", cifar_root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", "--widths", "4", "8",
            "--batch-size", "16", "--epochs", "2", "--print-every", "5"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == models.DEFAULT_RECIPE == "airbench_muon"
    assert config["update_rule"] == "muon"
    for key, value in models.RECIPES["airbench_muon"].settings.items():
        if key not in ("epochs", "batch_size", "widths"):
            assert config[key] == value, key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] == 2 and metrics["test_acc"] == metrics["test_acc_tta"]
    model = fastnn.load(out / "model.npz")
    assert isinstance(model, ConvNet) and model.options["stem"] == "whiten"
    assert model.buffers["W1"].shape == (24, 3, 2, 2)
    loss = metrics["loss_history"]
    assert np.isfinite(loss).all() and np.mean(loss[-5:]) < np.mean(loss[:3])


def test_model_convnet_alone_trains_the_convnet_recipe(cifar_root, tmp_path):
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
    loss = metrics["loss_history"]
    assert np.mean(loss[-5:]) < np.mean(loss[:3])  # it trains (40 val images are too few to say)


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
    old = {key: config.get(key, LEGACY_DEFAULTS[key]) for key in old_keys}  # every old key
    assert old["model"] == "fc" and set(LEGACY_DEFAULTS) > set(old)
    (part / "config.json").write_text(json.dumps(old, indent=2))
    assert main(["train", "--resume", str(part), "--epochs", "2"]) == 0
    want, _ = checkpoint_params(whole)
    got, _ = checkpoint_params(part)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    resumed = json.loads((part / "config.json").read_text())
    assert resumed["model"] == "fc" and resumed["flip_test"] is False
    assert resumed["update_rule"] == "adam" and "label_smoothing" not in resumed
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


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)  # the numpy runs are the tests above
def test_train_resume_and_evaluate_on_cupy(backend, cifar_root, tmp_path, capsys):
    """What a GPU user runs: train and resume with --backend cupy (bit for bit, as on the
    CPU), evaluate on the GPU, and the saved model loads on the CPU."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    options = ("--backend", "cupy", "--dropout", "0.2", "--augment", "--batchnorm")
    assert main(small_args(cifar_root, whole, "--epochs", "2", *options)) == 0
    assert main(small_args(cifar_root, part, "--epochs", "1", *options)) == 0
    assert main(["train", "--resume", str(part), "--epochs", "2"]) == 0
    assert json.loads((part / "config.json").read_text())["backend"] == "cupy"
    want, want_meta = checkpoint_params(whole)
    got, got_meta = checkpoint_params(part)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got_meta["loss_history"] == want_meta["loss_history"]
    capsys.readouterr()
    assert main(["evaluate", str(whole), "--backend", "cupy"]) == 0
    test_acc = json.loads((whole / "metrics.json").read_text())["test_acc"]
    assert f"test accuracy {test_acc:.4f} on 50 images" in capsys.readouterr().out
    with fastnn.use_backend("numpy"):
        model = fastnn.load(whole / "model.npz")
        assert isinstance(model.params["W1"], np.ndarray)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(cifar_root, tmp_path, capsys,
                                                               monkeypatch):
    import errno

    from fastnn import solver as solver_module

    out = tmp_path / "run"
    real_write, calls = solver_module.write_checkpoint, []

    def write_until_full(path, arrays, meta):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, arrays, meta)

    monkeypatch.setattr(solver_module, "write_checkpoint", write_until_full)
    assert main(small_args(cifar_root, out, "--epochs", "3")) == 1
    error = last_error(capsys)
    assert "No space left on device" in error and f"fastnn train --resume {out}" in error
    _, meta = checkpoint_params(out)  # the first epoch's checkpoint is whole
    assert meta["epoch"] == 1
    monkeypatch.setattr(solver_module, "write_checkpoint", real_write)
    assert main(["train", "--resume", str(out)]) == 0


def test_a_double_ctrl_c_stops_at_once_without_a_traceback(cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastnn",
                             *small_args(cifar_root, out, "--epochs", "40")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.npz").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"fastnn train --resume {out}" in stderr
    checkpoint_params(out)  # whole: an interrupted write never replaces it


# -- a finished run's folder, edited, extended, resumed ------------------------------------
@pytest.fixture(scope="module")
def finished_run(cifar_root, tmp_path_factory):
    """A finished 1-epoch tiny fc run, trained once: tests copy it (copy_run)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1")) == 0
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def folder_state(folder):
    """Each file's bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    before = folder_state(out)
    for extra in ((), ("--epochs", "1"), ("--threads", "1")):
        assert main(["train", "--resume", str(out), *extra]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed == [f"{out} has finished (1 of 1 epochs, test acc "
                           f"{metrics['test_acc']:.4f}, best val acc "
                           f"{metrics['best_val_acc']:.4f}); nothing to do, "
                           f"nothing changed. To train it longer: fastnn train --resume {out} "
                           "--epochs N (N > 1)"], printed
        assert folder_state(out) == before
    assert main(["train", "--resume", str(out), "--epochs", "0"]) == 2
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0  # extending still works
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3


@pytest.mark.parametrize("edit, message", [
    ({"augment": "false"}, "--augment must be true or false, got 'false'"),
    ({"dropout": None}, "--dropout must be a number, got None"),
    ({"data": 5}, r"--data must be a folder \(a path\), got 5"),
    ({"colour": "red"}, r"keys fastnn train does not know: \['colour'\]; remove them"),
    ({"batch_size": 32}, "checkpoint.npz was trained with --batch-size 16, not 32; a resumed "
                         "run may change only --backend, --data, --epochs, --print-every, "
                         "--threads"),
    ({"num_training": 120}, "trained with --num-training 160, not 120"),
    ({"learning_rate": 0.5, "augment": True}, "trained with --augment false, not true, "
                                              "--lr 0.001, not 0.5"),
])
def test_a_hand_edited_config_is_checked_on_resume_as_a_new_one(finished_run, tmp_path, capsys,
                                                                 edit, message):
    """config.json edited by hand: each key of its type, no unknown key, nothing changed but
    what --resume may change; refused in one line, the folder as it was."""
    out = copy_run(finished_run, tmp_path)
    edit_json(out / "config.json", **edit)
    before = folder_state(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 1
    error = last_error(capsys)
    assert error.startswith("fastnn train: cannot resume: ") and re.search(message, error), error
    assert error.endswith(f"(nothing in {out} was changed)")
    assert folder_state(out) == before


def test_a_config_edit_that_resume_may_make_is_taken(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    edit_json(out / "config.json", epochs=2, print_every=3)
    assert main(["train", "--resume", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3


def test_a_checkpoint_from_before_checkpoints_recorded_the_config_still_guards_resume(
        finished_run, tmp_path, capsys):
    """A changed --batch-size at a later epoch used to end the run at once, exit 0."""
    from fastnn.serialization import read_checkpoint, write_npz

    out = copy_run(finished_run, tmp_path)
    arrays, meta = read_checkpoint(out / "checkpoint.npz")
    meta.pop("run_config", None)  # as fastnn wrote checkpoints before
    write_npz(out / "checkpoint.npz", arrays, meta)
    edit_json(out / "config.json", batch_size=32)
    before = folder_state(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 1
    assert ("was trained with another --batch-size or --num-training: it stopped at iteration "
            "10, after epoch 1, but 5 iterations make an epoch now") in last_error(capsys)
    assert folder_state(out) == before


def test_evaluate_checks_the_config_too(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    edit_json(out / "config.json", flip_test="false")
    assert main(["evaluate", str(out)]) == 1
    assert re.search(r"cannot evaluate: .*config.json: --flip-test must be true or false, "
                     "got 'false'", last_error(capsys))


def test_resume_removes_the_temporaries_of_a_killed_write(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    stale = [out / ".checkpoint.npz.k2_8fj3a.tmp", out / ".loss.png.0abcdefz.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    before = folder_bytes(out)
    assert main(["train", "--resume", str(out)]) == 0  # finished: only the stale files go
    after = folder_bytes(out)
    assert after == {k: v for k, v in before.items() if k not in {p.name for p in stale}}


def test_a_killed_extension_is_named_by_evaluate_and_resume(finished_run, tmp_path, capsys):
    """`--resume --epochs 40` of a finished 1-epoch run, killed (kill -9) at a later epoch:
    model.npz and metrics.json still hold the 1-epoch run, and evaluate and resume say so."""
    from fastnn.files import remove_temporaries

    out = copy_run(finished_run, tmp_path)
    first = (out / "checkpoint.npz").stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, "-m", "fastnn", "train", "--resume", str(out),
                             "--epochs", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while (out / "checkpoint.npz").stat().st_mtime_ns == first:  # the extension's first epoch
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    _, meta = checkpoint_params(out)
    stopped = meta["epoch"]
    assert 1 < stopped < 40, "the extension should have stopped mid-way"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2  # still the finished 1-epoch run's
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"note: {out / 'model.npz'} is from the finished 1-epoch run (test acc "
            f"{metrics['test_acc']:.4f}); the folder's extension to 40 epochs has not finished "
            f"(its checkpoint is at epoch {stopped}): if it stopped, resume it with fastnn train "
            f"--resume {out}") in printed
    assert f"test accuracy {metrics['test_acc']:.4f} on 50 images" in printed
    remove_temporaries(out)  # the kill may have come mid-write: locking removes those
    before = folder_state(out)
    assert main(["train", "--resume", str(out), "--epochs", "1"]) == 0  # the finished run's
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{out} has finished (1 of 1 epochs")
    assert printed[1].startswith(f"note: {out / 'model.npz'} is from the finished 1-epoch run")
    assert folder_state(out) == before
    assert main(["train", "--resume", str(out)]) == 0
    assert (f"resuming {out} at epoch {stopped} of 40, extending the finished 1-epoch run "
            f"(test acc {metrics['test_acc']:.4f})") in capsys.readouterr().out
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 41
    assert main(["evaluate", str(out)]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_crafted_model_file_is_one_line_in_evaluate(finished_run, tmp_path, capsys):
    from fastnn.serialization import MODEL_FORMAT, write_npz

    out = copy_run(finished_run, tmp_path)
    arrays, meta = read_npz(out / "model.npz", MODEL_FORMAT)
    meta["init_args"]["hidden_dims"] = [1e7, 1e7]
    write_npz(out / "model.npz", arrays, meta)
    assert main(["evaluate", str(out)]) == 1
    assert re.search(r"cannot evaluate: .*model.npz is incompatible: its init_args hidden_dims "
                     r"\[10000000.0, 10000000.0\] exceed", last_error(capsys))


def test_a_model_file_with_nan_parameters_is_one_line_in_evaluate(finished_run, tmp_path, capsys):
    from fastnn.serialization import MODEL_FORMAT, write_npz

    out = copy_run(finished_run, tmp_path)
    arrays, meta = read_npz(out / "model.npz", MODEL_FORMAT)
    name = next(k for k, v in arrays.items() if v.ndim == 2)
    arrays[name] = np.full_like(arrays[name], np.nan)
    write_npz(out / "model.npz", arrays, meta)
    assert main(["evaluate", str(out)]) == 1
    assert re.search(r"cannot evaluate .*model.npz: the scores of 50 of 50 images are NaN",
                     last_error(capsys))


def test_evaluate_into_a_closed_pipe_is_quiet(finished_run, tmp_path):
    """`fastnn evaluate DIR | head -1`: no 'Broken pipe' message once the reader is done."""
    out = copy_run(finished_run, tmp_path)  # evaluate writes confusion.png into it
    command = f"{shlex.quote(sys.executable)} -m fastnn evaluate {shlex.quote(str(out))}"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -c 1 >/dev/null"],
                            capture_output=True, text=True, timeout=120)
    assert result.stderr == "", result.stderr


def test_a_run_that_ends_at_chance_says_so_in_its_last_line(cifar_root, tmp_path, capsys):
    assert main(small_args(cifar_root, tmp_path / "stuck", "--epochs", "1", "--lr", "1e-9")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"test acc 0\.[01]\d+ on 50 images .*; that is chance level \(1/10 for 10 "
                     r"classes\): the run learned nothing measurable; train it longer "
                     r"\(--epochs\) or on more images \(--num-training\)$", last), last
    assert main(small_args(cifar_root, tmp_path / "learns", "--epochs", "2")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best val acc") and "chance level" not in last


def test_at_chance_allows_for_the_number_of_test_images():
    from fastnn.cli import at_chance

    assert at_chance(0.11, 10000, 10) and not at_chance(0.13, 10000, 10)
    assert at_chance(0.2, 50, 10) and not at_chance(0.3, 50, 10)  # 50 images: +-0.04 each
    assert at_chance(0.05, 10000, 10)


def test_a_read_only_file_system_is_named_as_such(cifar_root, tmp_path, capsys, monkeypatch):
    import types

    readonly = tmp_path / "mnt"
    readonly.mkdir()
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if os.fspath(path) == str(readonly) else real_access(path, mode, **kw)))
    monkeypatch.setattr(os, "statvfs", lambda path: (
        types.SimpleNamespace(f_flag=os.ST_RDONLY) if os.fspath(path) == str(readonly)
        else real_statvfs(path)))
    assert main(small_args(cifar_root, readonly / "run")) == 1
    assert last_error(capsys) == (f"fastnn train: cannot write in {readonly} (read-only file "
                                  "system); choose another --out")


def test_a_config_file_that_is_not_json_says_so(cifar_root, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# fastnn\n\nTrain with `fastnn train`.\n")
    assert main(["train", "--config", str(readme), "--out", str(tmp_path / "run")]) == 2
    assert last_error(capsys) == (
        f"fastnn train: error: --config {readme} is not a fastnn configuration: it is not JSON "
        "(Expecting value at line 1); pass a run's config.json or a tune folder's best.json")
    assert not (tmp_path / "run").exists()


def test_a_named_recipe_trains_records_itself_and_resumes_as_it_was(cifar_root, tmp_path,
                                                                    capsys, monkeypatch):
    from fastnn import models

    # a second convnet recipe, tiny, with the airbench pieces the CLI passes on: alternating
    # flips, reflected crops, tta 2
    monkeypatch.setitem(models.RECIPES, "tiny", models.Recipe("convnet", {
        "widths": [4, 8], "stem_width": 4, "update_rule": "sgd_momentum", "learning_rate": 0.05,
        "momentum": 0.8, "augment": True, "crop_padding": 1, "flip": "alternate",
        "padding_mode": "reflect", "flip_test": True, "tta": 2, "batch_size": 16},
        "a tiny test recipe"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helps = capsys.readouterr().out
    assert "  tiny (--model convnet): a tiny test recipe" in helps
    assert "  fc: the earlier main job" in helps
    data = ["--data", cifar_root, "--num-training", "160", "--num-validation", "40",
            "--num-test", "50", "--print-every", "5"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out, epochs in ((whole, "2"), (part, "1")):
        assert main(["train", "--recipe", "tiny", "--lr", "0.04", "--out", str(out),
                     "--epochs", epochs, *data]) == 0
    config = json.loads((part / "config.json").read_text())
    assert config["recipe"] == "tiny" and config["learning_rate"] == 0.04  # a flag replaces one
    for key in ("widths", "update_rule", "momentum", "flip", "padding_mode", "tta"):
        assert config[key] == models.RECIPES["tiny"].settings[key], key
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["tta"] == 2 and metrics["test_acc"] == metrics["test_acc_tta"]
    assert {"test_acc_plain", "test_acc_flip"} <= metrics.keys()
    capsys.readouterr()
    assert main(["evaluate", str(part)]) == 0
    assert (f"test accuracy {metrics['test_acc']:.4f} on 50 images (tta 2"
            in capsys.readouterr().out)
    for flag, key in (("0", "test_acc_plain"), ("1", "test_acc_flip")):
        assert main(["evaluate", str(part), "--tta", flag]) == 0
        assert f"test accuracy {metrics[key]:.4f} on 50 images" in capsys.readouterr().out
    assert main(["evaluate", str(part), "--tta", "2", "--no-flip-test"]) == 2
    assert "--tta 2 and --no-flip-test disagree" in last_error(capsys)
    # the recipe's settings live in the run folder: resuming needs no registry entry
    monkeypatch.delitem(models.RECIPES, "tiny")
    assert main(["train", "--resume", str(part), "--epochs", "2"]) == 0
    want, _ = checkpoint_params(whole)
    got, _ = checkpoint_params(part)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert json.loads((part / "config.json").read_text())["recipe"] == "tiny"


@pytest.mark.parametrize("flags, message", [
    (["--recipe", "fc", "--model", "convnet"],
     "--recipe fc trains --model fc, not convnet: drop --model, or pick a recipe of convnet "
     "(convnet, airbench_muon, airbench94_muon, airbench_small, airbench94)"),
    (["--model", "fc", "--flip", "alternate"], "--flip does not apply (--augment is off"),
    (["--model", "fc", "--padding-mode", "reflect"],
     "--padding-mode does not apply (--augment is off"),
    (["--tta", "2", "--no-flip-test"], "--tta 2 and --no-flip-test disagree"),
])
def test_recipe_tta_and_augment_flags_that_do_not_fit_are_one_line(cifar_root, tmp_path, capsys,
                                                                   flags, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", cifar_root, *flags]) == 2
    error = last_error(capsys)
    assert message in error and "\n" not in error.strip()
    assert not out.exists()


def test_flags_replace_the_tta_of_a_config_file(cifar_root, tmp_path):
    """--no-flip-test on a --config whose run tested with tta 2 means tta 0, not a conflict;
    --model fc alone picks fc's recipe; the augment flags reach the run."""
    out = tmp_path / "run"
    assert main(small_args(cifar_root, out, "--epochs", "1", "--tta", "2", "--augment",
                           "--flip", "alternate", "--padding-mode", "reflect",
                           "--crop-padding", "1")) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["tta"], config["flip_test"]) == ("fc", 2, True)
    assert (config["flip"], config["padding_mode"]) == ("alternate", "reflect")
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(again),
                 "--no-flip-test"]) == 0
    config = json.loads((again / "config.json").read_text())
    assert (config["tta"], config["flip_test"]) == (0, False)
    metrics = json.loads((again / "metrics.json").read_text())
    assert metrics["test_acc"] == metrics["test_acc_plain"] == metrics["test_acc_tta"]


def test_tune_convnet_searches_around_the_chosen_recipe(cifar_root, tmp_path, capsys,
                                                        monkeypatch):
    import optuna

    from fastnn import models

    monkeypatch.setitem(models.RECIPES, "slow", models.Recipe("convnet", {
        **models.RECIPES["convnet"].settings, "learning_rate": 0.02, "momentum": 0.7,
        "epochs": 1, "tta": 2}, "a test recipe"))
    out = tmp_path / "tune"
    args = ["tune", "--out", str(out), "--data", cifar_root, "--num-training", "64",
            "--num-validation", "16", "--num-test", "16", "--model", "convnet", "--widths", "4",
            "8", "--stem-width", "4", "--trials", "1"]
    assert main([*args, "--recipe", "fc"]) == 2
    assert "--recipe fc trains --model fc, not convnet" in last_error(capsys)
    assert main([*args, "--recipe", "slow"]) == 0
    config = json.loads((out / "best.json").read_text())["config"]
    # the first trial is the recipe, trained for its epochs
    assert (config["recipe"], config["learning_rate"], config["momentum"], config["epochs"],
            config["tta"]) == ("slow", 0.02, 0.7, 1, 2)
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    low, high = study.user_attrs["fastnn_search_space"]["learning_rate"][1:3]
    assert low < 0.02 < high < 0.2  # the learning rate's range moved to the recipe's
    assert study.user_attrs["fastnn_search_space"]["momentum"][1] == 0.7


def test_the_main_job_resumes_bit_for_bit_with_muons_state(cifar_root, tmp_path, monkeypatch):
    """The main job (update rule muon, linear schedule) stopped after its first epoch and
    resumed ends with the parameters and optimizer state of the run that never stopped."""
    from fastnn.serialization import read_npz

    tiny = ["--widths", "4", "8", "8", "--batch-size", "16", "--stem-bias-epochs", "1",
            "--epochs", "2", "--data", cifar_root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", "--print-every", "5"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", *tiny, "--out", str(whole)]) == 0
    assert train_stopped_after_epoch_1(monkeypatch, [*tiny, "--out", str(part)]) == 130
    assert json.loads((part / "config.json").read_text())["update_rule"] == "muon"
    assert main(["train", "--resume", str(part)]) == 0
    want, _ = read_npz(os.path.join(whole, "checkpoint.npz"), "fastnn-checkpoint")
    got, meta = read_npz(os.path.join(part, "checkpoint.npz"), "fastnn-checkpoint")
    assert meta["epoch"] == 2 and meta["update_rule"] == "muon"
    assert {k for k in want if k.startswith("optim/W2/")} == {"optim/W2/velocity"}
    assert want.keys() == got.keys()
    for name in want:
        if name.startswith(("model/", "optim/")):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_tune_convnet_around_the_main_jobs_recipe(cifar_root, tmp_path):
    """--recipe airbench_muon: the first trial is the recipe (muon, its weight decay, its linear
    schedule), and the search draws no reg (the recipe's 0 leaves no log range)."""
    import optuna

    from fastnn import models

    out = tmp_path / "tune"
    assert main(["tune", "--out", str(out), "--data", cifar_root, "--num-training", "64",
                 "--num-validation", "16", "--num-test", "16", "--model", "convnet",
                 "--widths", "4", "8", "--trials", "1", "--epochs", "1",
                 "--recipe", "airbench_muon"]) == 0
    config = json.loads((out / "best.json").read_text())["config"]
    settings = models.RECIPES["airbench_muon"].settings
    for key in ("update_rule", "weight_decay", "learning_rate", "lr_schedule", "batch_size"):
        assert config[key] == settings[key], key
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    assert set(study.user_attrs["fastnn_search_space"]) == {
        "learning_rate", "momentum", "label_smoothing", "weight_decay", "muon_learning_rate"}


def test_the_airbench94_recipe_trains_resumes_bit_for_bit_and_evaluates_with_tta_2(
        cifar_root, tmp_path, capsys, monkeypatch):
    from fastnn.init import whitening_filters
    from fastnn.runs import load_data

    # tiny widths and batches (the lr scaled to batch 16 as the recipe's comment says); the
    # stem's bias trained 1 epoch, so the resumed epoch has it frozen
    tiny = ["--recipe", "airbench94", "--widths", "4", "8", "8", "--batch-size", "16",
            "--lr", str(1.5 * 16 / 1024), "--stem-bias-epochs", "1", "--epochs", "2",
            "--data", cifar_root, "--num-training", "160", "--num-validation", "40",
            "--num-test", "50", "--print-every", "5"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", *tiny, "--out", str(whole)]) == 0
    loss = json.loads((whole / "metrics.json").read_text())["loss_history"]
    assert np.mean(loss[-5:]) < np.mean(loss[:3])  # it trains
    # the same run stopped after its first epoch's checkpoint (as a second Ctrl-C does)
    assert train_stopped_after_epoch_1(monkeypatch, [*tiny, "--out", str(part)]) == 130
    after_one, meta = checkpoint_params(part)
    assert meta["epoch"] == 1
    config = json.loads((part / "config.json").read_text())
    assert (config["recipe"], config["stem"], config["lookahead"], config["tta"]) == (
        "airbench94", "whiten", True, 2)
    # the stem whitens the training images as the Solver sees them, set once, when the run
    # started: the resumed run keeps its checkpoint's
    filters = whitening_filters(load_data(config)["X_train"][:5000], relative=True)
    np.testing.assert_allclose(after_one["model/buffer/W1"], filters, rtol=1e-5, atol=1e-6)
    assert main(["train", "--resume", str(part)]) == 0
    want, _ = checkpoint_params(whole)
    got, meta = checkpoint_params(part)
    assert want.keys() == got.keys() and meta["epoch"] == 2
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got["model/param/W2"], after_one["model/param/W2"])
    np.testing.assert_array_equal(got["model/param/b1"], after_one["model/param/b1"])  # frozen
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["tta"] == 2 and metrics["test_acc"] == metrics["test_acc_tta"]
    assert metrics["test_acc"] == json.loads((whole / "metrics.json").read_text())["test_acc"]
    capsys.readouterr()
    assert main(["evaluate", str(part)]) == 0
    assert (f"test accuracy {metrics['test_acc']:.4f} on 50 images (tta 2"
            in capsys.readouterr().out)
