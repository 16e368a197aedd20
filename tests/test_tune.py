"""`fastnn tune`: a search that writes its folder, keeps its budget, and shares a study."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna", reason="fastnn tune needs Optuna (a required dependency)")

import fastnn
from fastnn.cli import main
from helpers import PNG_MAGIC


def tune_args(root, out, *extra):
    return ["tune", "--out", str(out), "--data", root, "--num-training", "160",
            "--num-validation", "40", "--num-test", "50", "--epochs", "2", *extra]


def test_tune_writes_best_json_table_model_and_plots(cifar_root, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "6", "--parallel", "3")) == 0
    best = json.loads((out / "best.json").read_text())
    assert {"config", "val_acc", "test_acc"} <= best.keys()
    assert best["num_test"] == 50 and 0 <= best["test_acc"] <= 1
    assert best["config"]["model"] == "fc" and best["config"]["hidden_dims"]
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("rank,number,state,val_acc") and len(rows) == 1 + 6
    assert (out / "best_model.npz").exists()
    assert (out / "trials.png").read_bytes()[:8] == PNG_MAGIC
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 6
    assert abs(study.best_value - max(t.value for t in study.trials if t.value is not None)) < 1e-12


def test_stack_members_share_structure_and_differ_in_the_rest(cifar_root, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "4", "--parallel", "4")) == 0
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    params = [t.params for t in study.trials]
    for name in ("num_hidden", "hidden_width", "log2_batch_size", "update_rule_id"):
        assert len({p[name] for p in params}) == 1, name
    assert len({p["learning_rate"] for p in params}) == 4


def test_resume_continues_the_study(cifar_root, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2")) == 0
    assert main(tune_args(cifar_root, out, "--trials", "4", "--parallel", "2")) == 1
    assert f"fastnn tune --resume --out {out}" in capsys.readouterr().err
    assert main(tune_args(cifar_root, out, "--trials", "4", "--parallel", "2", "--resume")) == 0
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]


def test_resume_keeps_the_earlier_best_unless_beaten(cifar_root, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2")) == 0
    first = json.loads((out / "best.json").read_text())
    first["val_acc"] = 2.0  # no trial of the resumed session can beat this
    (out / "best.json").write_text(json.dumps(first))
    model_bytes = (out / "best_model.npz").read_bytes()
    assert main(tune_args(cifar_root, out, "--trials", "4", "--parallel", "2", "--resume")) == 0
    resumed = json.loads((out / "best.json").read_text())
    assert (resumed["val_acc"], resumed["trial"], resumed["config"]) == \
        (2.0, first["trial"], first["config"])
    assert resumed["trials_started"] == 4
    assert (out / "best_model.npz").read_bytes() == model_bytes


def test_budget_bounds_the_whole_command(cifar_root, tmp_path):
    start = time.perf_counter()
    assert main(tune_args(cifar_root, tmp_path / "tune", "--trials", "1000", "--parallel", "2",
                          "--budget-minutes", "0.75")) == 0
    assert time.perf_counter() - start < 0.75 * 60 + 15
    assert json.loads((tmp_path / "tune" / "best.json").read_text())["trials_started"] < 1000


def test_two_workers_share_one_study_without_losing_or_repeating_trials(cifar_root, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    trials = 8
    procs = [subprocess.Popen([sys.executable, "-m", "fastnn",
                               *tune_args(cifar_root, tmp_path / f"worker{i}", "--trials", str(trials),
                                          "--parallel", "2", "--storage", storage, "--seed", str(i))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    trained = [int(n) for stdout, _ in outputs for n in re.findall(r"^trial (\d+):", stdout, re.M)]
    assert sorted(trained) == list(range(trials)), "each trial trained exactly once"
    study = optuna.load_study(study_name="fastnn", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(t.number for t in finished) == list(range(trials))
    others = [t for t in study.trials if t.number >= trials]
    assert all(t.state.name == "FAIL" and "skipped" in t.user_attrs for t in others)
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2, "both workers took part"


def test_a_trials_config_reproduces_it_with_fastnn_train(cifar_root, tmp_path):
    """A trial's recorded config (model_seed included), given to `fastnn train --config`,
    retrains to the same per-epoch val acc; it records only what applies."""
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2",
                          "--crop-padding", "2")) == 0
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    for trial in study.trials:
        config = trial.user_attrs["config"]
        assert ("crop_padding" in config) == config["augment"]  # only when it applies
        assert not set(config) & {"hidden_dim", "momentum", "beta1", "weight_decay"} - \
            {k for k in ("momentum",) if config["update_rule"] == "sgd_momentum"}
    trial = study.trials[1]  # its model seed differs from the batch seed
    assert trial.user_attrs["config"]["model_seed"] == trial.user_attrs["config"]["seed"] + 1
    config_file = tmp_path / "trial.json"
    config_file.write_text(json.dumps(trial.user_attrs["config"]))
    run = tmp_path / "retrain"
    assert main(["train", "--config", str(config_file), "--out", str(run), "--data", cifar_root,
                 "--num-training", "160", "--num-validation", "40", "--num-test", "50"]) == 0
    reported = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    assert [e["val_acc"] for e in epochs][-len(reported):] == reported  # the epoch-end entries


def test_evaluate_reads_a_tune_folder_and_no_budget_prints_none_left(cifar_root, tmp_path,
                                                                     capsys):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2")) == 0
    printed = capsys.readouterr().out
    assert "round of 2 took" in printed and "budget left" not in printed
    best = json.loads((out / "best.json").read_text())
    assert best["format"] == "fastnn-tune-best" and best["format_version"] == 1
    assert main(["evaluate", str(out)]) == 0
    assert f"test accuracy {best['test_acc']:.4f} on 50 images" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (("--trials", "0"), "--trials must be >= 1, got 0"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--num-validation", "0"), "--num-validation must be >= 1"),
    (("--budget-minutes", "-1"), "--budget-minutes must be a positive number"),
    (("--crop-padding", "40"), "--crop-padding must be below the image size 32"),
])
def test_tune_usage_errors_are_one_line_exit_2(cifar_root, tmp_path, capsys, flags, message):
    assert main(tune_args(cifar_root, tmp_path / "tune", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "tune").exists()


def test_every_tune_flag_has_help_text():
    from fastnn.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        undocumented = [a.option_strings for a in sub._actions if not a.help]
        assert not undocumented, (name, undocumented)
    assert "tune" in parser.description
    result = subprocess.run([sys.executable, "-m", "fastnn", "tune", "--help"],
                            capture_output=True, text=True, check=True)
    assert "validation images that score the trials" in result.stdout


def test_final_epochs_retrains_within_the_budget(cifar_root, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2",
                          "--final-epochs", "3")) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["config"]["epochs"] in (2, 3)  # 3 when the retrain beat the trials
    assert (out / "best_model.npz").exists()


def test_tune_model_convnet_starts_from_the_recipe_one_trial_at_a_time(cifar_root, tmp_path):
    from fastnn.classifiers import ConvNet
    from fastnn.runs import RECIPES
    from fastnn.tune import CONV_SPACE

    out = tmp_path / "tune"
    conv = ("--model", "convnet", "--widths", "4", "8", "--stem-width", "4", "--epochs", "1")
    assert main(tune_args(cifar_root, out, *conv, "--trials", "1")) == 0
    best = json.loads((out / "best.json").read_text())
    config = best["config"]
    assert config["model"] == "convnet" and config["widths"] == [4, 8] and config["epochs"] == 1
    for name in CONV_SPACE:  # the first trial of a new study is the main job's recipe
        assert config[name] == RECIPES["convnet"][name], name
    assert config["update_rule"] == "sgd_nesterov" and config["flip_test"] is True
    assert 0 <= best["test_acc"] <= 1 and best["num_test"] == 50
    assert isinstance(fastnn.load(out / "best_model.npz"), ConvNet)
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert list(study.trials[0].intermediate_values) == [1]  # per-epoch val acc reported


def test_tune_refuses_options_of_the_other_model(cifar_root, tmp_path, capsys):
    conv = ("--model", "convnet", "--widths", "4", "8", "--stem-width", "4")
    assert main(tune_args(cifar_root, tmp_path / "a", *conv, "--parallel", "2")) == 2
    assert "one at a time" in capsys.readouterr().err
    assert main(tune_args(cifar_root, tmp_path / "b", "--widths", "4")) == 2
    assert "--widths applies to tune --model convnet" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
