"""`fastnn tune`: a search that writes its folder, keeps its budget, and shares a study."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import optuna  # a required dependency: its absence is a failure, not a skip
import pytest

import fastnn
from fastnn.cli import build_parser, main
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
    assert resumed["study_results"] == 4
    assert (out / "best_model.npz").read_bytes() == model_bytes


def test_budget_bounds_the_whole_command(cifar_root, tmp_path):
    start = time.perf_counter()
    assert main(tune_args(cifar_root, tmp_path / "tune", "--trials", "1000", "--parallel", "2",
                          "--budget-minutes", "0.75")) == 0
    assert time.perf_counter() - start < 0.75 * 60 + 15
    assert json.loads((tmp_path / "tune" / "best.json").read_text())["study_results"] < 1000


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


def test_a_tune_folder_held_by_another_process_is_refused(cifar_root, tmp_path, capsys):
    from fastnn.files import lock_folder

    out = tmp_path / "tune"
    out.mkdir()
    with lock_folder(out):
        assert main(tune_args(cifar_root, out, "--trials", "2")) == 1
    assert "in use by another fastnn process" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lock"]


# -- several workers: the race for the last trials, lost trials, a real server --------------
def worker_options(storage, trials, **extra):
    return {"storage": storage, "study_name": "fastnn", "trials": trials, "seed": 0,
            "resume": False, "shared": True, "heartbeat_seconds": 1, "grace_seconds": 3,
            "worker": "test", **extra}


def test_two_workers_racing_for_the_last_slot_agree_on_who_gets_it(tmp_path, monkeypatch):
    """B sees one free slot, A takes it before B's trial exists: B's trial is skipped."""
    from fastnn import tune

    options = worker_options(f"sqlite:///{tmp_path / 'race.db'}", trials=3)
    worker_a = tune.Worker(tune.create_study(options, tune.open_storage(options)), options, print)
    worker_b = tune.Worker(tune.create_study(options, tune.open_storage(options)), options, print)
    assert [slot for _, slot in worker_a.take(2)] == [0, 1]
    create = worker_b.storage.create_new_trial
    taken_by_a = []

    def create_after_a(study_id, *args):
        taken_by_a.extend(worker_a.take(2))  # A reads the same free slot and wins the race
        return create(study_id, *args)

    monkeypatch.setattr(worker_b.storage, "create_new_trial", create_after_a)
    assert worker_b.take(2) == []
    assert [slot for _, slot in taken_by_a] == [2]
    study = optuna.load_study(study_name="fastnn", storage=options["storage"])
    skipped = [t for t in study.trials if "skipped" in t.user_attrs]
    assert [(t.number, t.state.name) for t in skipped] == [(3, "FAIL")]
    assert worker_b.progress() == (0, {0, 1, 2}, 3)


def test_a_trial_that_fails_by_itself_is_a_result_and_a_lost_one_runs_again(tmp_path):
    from fastnn import tune

    options = worker_options(f"sqlite:///{tmp_path / 'lost.db'}", trials=2)
    worker = tune.Worker(tune.create_study(options, tune.open_storage(options)), options, print)
    (diverged, _), (lost, _) = worker.take(2)
    lost.suggest_float("learning_rate", 1e-3, 1e-3, log=True)
    assert worker.finish(diverged, state=optuna.trial.TrialState.FAIL, failed="non-finite loss")
    worker.hand_back(lost._trial_id)  # what a worker that finds it stale does
    assert worker.progress()[0] == 1  # the diverged trial counts; the lost one does not
    [(retry, slot)] = worker.take(2)  # no room for a new trial: only the retry
    assert slot == lost.number and retry.number == 2
    with pytest.warns(RuntimeWarning, match="Inconsistent parameter values"):  # it keeps 1e-3
        assert retry.suggest_float("learning_rate", 1e-4, 1e-2, log=True) == 1e-3
    assert worker.finish(retry, 0.5)
    assert worker.progress()[0] == 2 and worker.take(2) == []


def wait_for_running_trial(study_name, storage, worker_name, proc, timeout=120):
    """The numbers of `worker_name`'s RUNNING trials, once one has reported an epoch."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the worker ended before it was mid-trial"
        assert time.monotonic() < deadline, "the worker never ran a trial"
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except Exception:  # the worker has not made the study yet
            continue
        running = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                   if t.user_attrs.get("worker") == worker_name and t.intermediate_values]
        if running:
            return running


def test_a_worker_stopped_by_sigterm_hands_its_trials_back_at_once(cifar_root, tmp_path):
    from fastnn import tune

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "fastnn", *tune_args(
        cifar_root, tmp_path / "w", "--trials", "2", "--parallel", "2", "--epochs", "30",
        "--storage", storage, "--threads", "1", "--budget-minutes", "3")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for_running_trial("fastnn", storage, f"{os.uname().nodename}:{proc.pid}",
                                         proc)
        proc.terminate()
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    trials = optuna.load_study(study_name="fastnn", storage=storage).trials
    for number in running:
        assert trials[number].state.name == "FAIL" and not tune.has_result(trials[number])
        assert [t.state.name for t in trials if t.system_attrs.get("failed_trial") == number] \
            == ["WAITING"], "queued again at once, for the next worker"


def test_a_worker_that_finds_the_study_full_waits_for_the_others(cifar_root, tmp_path):
    """tune() with every slot held elsewhere waits, then ends when they have results."""
    from fastnn import tune

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    options = worker_options(storage, trials=2)
    other = tune.Worker(tune.create_study(options, tune.open_storage(options)), options, print)
    held = other.take(2)
    messages = []

    def log(message):  # the other worker finishes its trials while this one waits
        messages.append(message)
        if message.startswith("waiting for 2 trials"):
            for trial, _ in held:
                other.finish(trial, 0.5)

    args = build_parser().parse_args(tune_args(
        cifar_root, tmp_path / "late", "--trials", "2", "--storage", storage,
        "--heartbeat-seconds", "1", "--grace-seconds", "3"))
    late = {**vars(args), "start": time.perf_counter(), "final_seconds": 0, "worker": "late"}
    with pytest.raises(SystemExit, match="already has 2 trials with a result"):
        tune.tune(late, log=log)
    assert any(m.startswith("waiting for 2 trials") for m in messages)


def test_resume_runs_again_the_trials_a_killed_session_left_running(cifar_root, tmp_path):
    from fastnn import tune

    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2", "--parallel", "2")) == 0
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    left = study.ask()  # what a session killed mid-trial leaves: RUNNING for ever
    left.suggest_float("learning_rate", 2e-3, 2e-3, log=True)
    assert main(tune_args(cifar_root, out, "--trials", "3", "--parallel", "2", "--resume")) == 0
    trials = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}").trials
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == left.number]
    assert len(retry) == 1 and tune.has_result(retry[0])
    assert retry[0].params["learning_rate"] == 2e-3  # it ran what the lost trial had drawn
    assert sum(tune.has_result(t) for t in trials) == 3


def test_journal_file_storage_shares_a_study_without_a_server(cifar_root, tmp_path):
    journal = tmp_path / "study.journal"
    assert main(tune_args(cifar_root, tmp_path / "w", "--trials", "2", "--parallel", "2",
                          "--storage", f"journal:{journal}")) == 0
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="fastnn", storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]


@pytest.mark.parametrize("space_change", ["another range", "another parameter", "minimize"])
def test_a_study_name_taken_by_another_search_space_is_refused(cifar_root, tmp_path, capsys,
                                                               space_change):
    from fastnn import tune

    storage = f"sqlite:///{tmp_path / 'other.db'}"
    study = optuna.create_study(study_name="fastnn", storage=storage,
                                direction="minimize" if space_change == "minimize" else "maximize")
    if space_change == "another range":
        space = tune.search_space()
        space["hidden_width"] = ["int", 64, 128, True]
        study.set_user_attr(tune.SEARCH_SPACE_ATTR, space)
    elif space_change == "another parameter":
        trial = study.ask()
        trial.suggest_float("momentum", 0.5, 0.99)
        study.tell(trial, 0.5)
    expected = {"another range": r"another search space \(hidden_width: \[.int., 64, 128",
                "another parameter": r"another search space \(momentum",
                "minimize": "minimizes its objective"}[space_change]
    assert main(tune_args(cifar_root, tmp_path / "w", "--trials", "2", "--storage", storage)) == 1
    error = capsys.readouterr().err
    assert re.search(expected, error) and "choose another --study-name" in error, error
    assert len(error.strip().splitlines()) == 1, error


def fastnn_command(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastnn", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    message = done.stderr.strip()
    assert "Traceback" not in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_an_unreachable_database_server_is_one_line_naming_host_and_port(cifar_root, tmp_path):
    pytest.importorskip("psycopg", reason="needs psycopg: pip install 'fastnn[distributed]'")
    from postgres_server import free_port

    port = free_port()  # nothing listens there
    done = fastnn_command(*tune_args(cifar_root, tmp_path / "w", "--storage",
                                     f"postgresql+psycopg://fastnn:secret@127.0.0.1:{port}/db"))
    assert_one_line_error(done, f"127.0.0.1:{port}", "cannot open the study storage")
    assert "secret" not in done.stderr


# -- a real PostgreSQL server (tests/postgres_server.py) -------------------------------------
@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this module's own; each test makes its own database in it."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg: "
                                          "pip install 'fastnn[distributed]'")
    from postgres_server import PostgresServer, find_binaries

    bindir, reason = find_binaries()
    if bindir is None:
        pytest.skip(reason)
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


def test_wrong_database_credentials_are_one_line_naming_host_and_port(postgres, cifar_root,
                                                                      tmp_path):
    postgres.create_database("credentials")
    done = fastnn_command(*tune_args(cifar_root, tmp_path / "w", "--storage",
                                     postgres.url("credentials", password="wrong")))
    assert_one_line_error(done, f"127.0.0.1:{postgres.port}", "password authentication failed")


@pytest.fixture
def start_workers(cifar_root, tmp_path):
    """start(storage, count, trials, *flags): `count` fastnn tune processes on one study and
    each one's worker name; any still running at the test's end are killed."""
    procs = []

    def start(storage, count, trials, *extra):
        started = [subprocess.Popen(
            [sys.executable, "-m", "fastnn",
             *tune_args(cifar_root, tmp_path / f"worker{i}", "--trials", str(trials),
                        "--parallel", "2", "--storage", storage, "--seed", str(i),
                        "--threads", "1", "--heartbeat-seconds", "1", "--grace-seconds", "4",
                        "--budget-minutes", "4", *extra)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}) for i in range(count)]
        procs.extend(started)
        return started, [f"{os.uname().nodename}:{p.pid}" for p in started]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_three_workers_on_postgresql_train_each_trial_once(postgres, start_workers, tmp_path):
    from fastnn import tune

    storage, trials = postgres.create_database("three"), 6
    procs, names = start_workers(storage, 3, trials)
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    trained = [int(n) for stdout, _ in outputs for n in re.findall(r"^trial (\d+):", stdout, re.M)]
    assert sorted(trained) == list(range(trials)), "each trial trained exactly once"
    study = optuna.load_study(study_name="fastnn", storage=storage)
    results = [t for t in study.trials if tune.has_result(t)]
    assert sorted(t.number for t in results) == list(range(trials))
    assert all(t.state.name == "FAIL" and "skipped" in t.user_attrs
               for t in study.trials if t.number >= trials)
    for i, name in enumerate(names):
        best = json.loads((tmp_path / f"worker{i}" / "best.json").read_text())
        own = {t.number: t.value for t in results if t.user_attrs["worker"] == name}
        assert best["trial"] in own and best["val_acc"] == own[best["trial"]] == max(own.values())
        assert (best["study_best_trial"], best["study_best_val_acc"]) == \
            (study.best_trial.number, study.best_value)
        assert best["study_results"] == trials and best["worker_trials"] == len(own)


def test_a_killed_workers_trials_run_again_on_the_others(postgres, start_workers, tmp_path):
    from fastnn import tune

    storage, trials = postgres.create_database("killed"), 6
    procs, names = start_workers(storage, 3, trials, "--epochs", "8")
    victim, survivors = procs[0], procs[1:]
    caught = wait_for_running_trial("fastnn", storage, names[0], victim)
    victim.kill()  # SIGKILL: no handler runs, its trials stay RUNNING until found lost
    victim.wait()
    for p in survivors:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
    study = optuna.load_study(study_name="fastnn", storage=storage)
    assert not [t.number for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    results = [t for t in study.trials if tune.has_result(t)]
    assert sorted(tune.trial_key(t) for t in results) == list(range(trials)), \
        "one result per trial: none lost, none twice"
    retried = {t.system_attrs["failed_trial"]: t for t in results
               if "failed_trial" in t.system_attrs}
    assert set(caught) <= set(retried), "every trial the victim was training ran again"
    assert all(t.user_attrs["worker"] in names[1:] for t in retried.values())
    for number in caught:
        assert study.trials[number].state.name == "FAIL"
    table = (tmp_path / "worker1" / "trials.csv").read_text()
    assert "lost: its worker stopped" in table and f"retry of {caught[0]}" in table


def test_a_grace_period_not_longer_than_the_heartbeat_is_refused(cifar_root, tmp_path, capsys):
    assert main(tune_args(cifar_root, tmp_path / "w", "--heartbeat-seconds", "5",
                          "--grace-seconds", "5")) == 2
    assert "--grace-seconds (5) must exceed --heartbeat-seconds (5)" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# -- stopping: signals, a database that goes away, storages that cannot be opened ------------
def tune_process(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fastnn", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for_states(storage, proc, *, complete, running, worker=None, timeout=120):
    """Wait until the study has `complete` trials with a value and `running` RUNNING ones
    (of `worker`, when given); returns the study."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the worker ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "the search never got there"
        time.sleep(0.1)
        try:
            trials = optuna.load_study(study_name="fastnn", storage=storage).trials
        except Exception:  # the worker has not made the study yet
            continue
        trials = [t for t in trials if worker is None or t.user_attrs.get("worker") == worker]
        if sum(t.state.name == "COMPLETE" for t in trials) >= complete and \
                sum(t.state.name == "RUNNING" for t in trials) >= running:
            return trials


def stop_line(stderr):
    """The one line a stopped tune prints on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("model", ["fc", "convnet"])
def test_a_signal_stops_tune_writing_what_finished_and_saying_how_to_resume(cifar_root, tmp_path,
                                                                             model, signum):
    from fastnn import tune

    out = tmp_path / "tune"
    # trials enough that the signal comes with more than one round left
    flags = ("--model", "convnet", "--widths", "4", "8", "--stem-width", "4", "--epochs", "4") \
        if model == "convnet" else ("--parallel", "2", "--epochs", "6")
    args = tune_args(cifar_root, out, "--trials", "6", "--threads", "1", *flags)
    storage = f"sqlite:///{out / 'study.db'}"
    proc = tune_process(*args)
    try:
        wait_for_states(storage, proc, complete=1, running=1)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr
    line = stop_line(stderr)
    assert f"stopped by {signum.name}" in line
    resume = line.split("Resume with: ")[1]
    assert resume.startswith(f"fastnn tune --resume --out {out} ")
    trials = optuna.load_study(study_name="fastnn", storage=storage).trials
    assert not [t.number for t in trials if t.state.name == "RUNNING"], "handed back at once"
    finished = {t.number: t.value for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
    best = json.loads((out / "best.json").read_text())
    assert best["worker_trials"] == len(finished) and best["val_acc"] == finished[best["trial"]]
    assert (out / "best_model.npz").exists() and (out / "trials.png").exists()
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + len(trials)
    if signum == signal.SIGTERM:  # the printed command continues the study to its 6 trials
        done = subprocess.run([sys.executable, "-m", "fastnn", *shlex.split(resume)[1:]],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        study = optuna.load_study(study_name="fastnn", storage=storage)
        assert sum(tune.has_result(t) for t in study.trials) == 6


@pytest.mark.parametrize("storage, message", [
    ("sqlite:////nonexistent/x.db", "no folder /nonexistent for the SQLite file"),
    ("journal:/nonexistent/x.journal", "no folder /nonexistent for the journal file"),
    ("postgresql+psycopg://fastnn:secret@127.0.0.1:port/db", "is not a storage URL"),
])
def test_a_storage_that_cannot_be_opened_is_one_line(cifar_root, tmp_path, capsys, storage,
                                                     message):
    assert main(tune_args(cifar_root, tmp_path / "w", "--storage", storage)) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and message in error, error
    assert "secret" not in error
    assert not (tmp_path / "w").exists()


def test_the_resume_command_shows_no_password_and_not_the_environments_url():
    from fastnn.cli import tune_resume_command

    given = vars(build_parser().parse_args(
        ["tune", "--trials", "8", "--storage", "postgresql+psycopg://me:s3cret@db:5432/study"]))
    command = tune_resume_command(given, "runs/x")
    assert command.startswith("fastnn tune --resume --out runs/x --trials 8 --storage "
                              "'postgresql+psycopg://me:***@db:5432/study'")
    assert "s3cret" not in command
    given["storage"] = None  # the URL came from $FASTNN_STORAGE: it will again
    assert tune_resume_command(given, "runs/x") == "fastnn tune --resume --out runs/x --trials 8"


def test_a_resumed_study_keeps_its_epochs_and_refuses_others(cifar_root, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_args(cifar_root, out, "--trials", "2")) == 0  # 2 epochs
    assert main(tune_args(cifar_root, out, "--trials", "4", "--resume", "--epochs", "3")) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert "trains its trials for 2 epochs, not --epochs 3" in error
    no_epochs = tune_args(cifar_root, out)[:-2]
    assert "--epochs" not in no_epochs
    assert main([*no_epochs, "--trials", "3", "--resume"]) == 0  # its own 2 epochs
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.user_attrs["config"]["epochs"] for t in study.trials] == [2, 2, 2]


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of the test's own, to stop and start again."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg: "
                                          "pip install 'fastnn[distributed]'")
    from postgres_server import PostgresServer, find_binaries

    bindir, reason = find_binaries()
    if bindir is None:
        pytest.skip(reason)
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


def outage_worker(cifar_root, out, storage, *extra):
    return tune_process(*tune_args(
        cifar_root, out, "--parallel", "2", "--storage", storage, "--threads", "1",
        "--heartbeat-seconds", "1", "--grace-seconds", "30", "--budget-minutes", "4", *extra))


def test_a_worker_rides_out_a_database_restart(own_postgres, cifar_root, tmp_path):
    """The server stops (its connections cut) for 4 s mid-trial: the worker waits, reconnects
    and finishes every trial itself."""
    storage = own_postgres.create_database("restart")
    proc = outage_worker(cifar_root, tmp_path / "w", storage, "--trials", "4", "--epochs", "30")
    try:
        caught = wait_for_running_trial("fastnn", storage, f"{os.uname().nodename}:{proc.pid}",
                                        proc)
        own_postgres.halt()
        time.sleep(4)
        own_postgres.restart()
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    where = f"postgresql server 127.0.0.1:{own_postgres.port} database restart"
    assert f"the {where} does not answer" in stdout and "answers again" in stdout, stdout
    study = optuna.load_study(study_name="fastnn", storage=storage)
    assert [t.state.name for t in study.trials if t.number in caught] == ["COMPLETE"] * len(caught)
    assert sorted(int(n) for n in re.findall(r"^trial (\d+):", stdout, re.M)) == [0, 1, 2, 3]
    assert (tmp_path / "w" / "best.json").exists()


def test_a_database_that_stays_away_stops_the_worker_keeping_its_results(own_postgres,
                                                                         cifar_root, tmp_path):
    storage = own_postgres.create_database("gone")
    out = tmp_path / "w"
    proc = outage_worker(cifar_root, out, storage, "--trials", "40", "--epochs", "12",
                         "--outage-seconds", "3")
    try:
        wait_for_states(storage, proc, complete=1, running=1)
        own_postgres.halt()
        start = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and time.monotonic() - start < 60, stderr
    line = stop_line(stderr)
    assert f"postgresql server 127.0.0.1:{own_postgres.port} database gone, did not answer" \
        in line and "Resume with: fastnn tune --resume --out" in line
    assert own_postgres.url("gone") not in line and ":***@" in line  # never the password
    finished = {int(n): float(v) for n, v in re.findall(r"^trial (\d+): val ([\d.]+) \(complete",
                                                        stdout, re.M)}
    best = json.loads((out / "best.json").read_text())  # the folder keeps what finished
    assert best["trial"] in finished and best["val_acc"] == max(finished.values())
    assert best["study_results"] is None and (out / "best_model.npz").exists()


@pytest.mark.parametrize("libpq_source", ["PGPASSWORD", "PGPASSFILE"])
def test_a_storage_url_without_password_from_the_environment(postgres, cifar_root, tmp_path,
                                                             libpq_source):
    """$FASTNN_STORAGE holds a URL without the password; libpq finds it (PGPASSWORD or a
    .pgpass file), so no password is on the command line."""
    from postgres_server import PASSWORD, USER

    database = f"nopassword_{libpq_source.lower()}"
    postgres.create_database(database)
    env = {"FASTNN_STORAGE": postgres.url(database, password=None)}
    if libpq_source == "PGPASSWORD":
        env["PGPASSWORD"] = PASSWORD
    else:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{postgres.port}:{database}:{USER}:{PASSWORD}\n")
        passfile.chmod(0o600)
        env["PGPASSFILE"] = str(passfile)
    proc = tune_process(*tune_args(cifar_root, tmp_path / "w", "--trials", "1", "--epochs", "1"),
                        env=env)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    study = optuna.load_study(study_name="fastnn", storage=postgres.url(database))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("stop", ["stopped", "crashed"])
def test_a_workers_folder_is_kept_once_it_holds_results(cifar_root, tmp_path, monkeypatch,
                                                        resume, stop):
    """A worker on a shared storage (--resume or not) that stops after writing its results into
    a folder it created keeps the folder; one that stops before any result removes it."""
    from fastnn import tune

    def tune_then_stop(options, data):
        if options["trials"] == 2:  # this worker had finished trials
            (tmp_path / "w" / "best.json").write_text("{}")
        if stop == "stopped":
            raise tune.TuneStopped("stopped by SIGTERM", 143)
        raise RuntimeError("a bug")

    monkeypatch.setattr(tune, "tune", tune_then_stop)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    for trials, kept in ((1, False), (2, True)):
        args = tune_args(cifar_root, tmp_path / "w", "--trials", str(trials), "--storage", storage,
                         *(["--resume"] if resume else []))
        if stop == "stopped":
            assert main(args) == 143
        else:
            with pytest.raises(RuntimeError):
                main(args)
        assert (tmp_path / "w").exists() == kept


def test_fastnn_storage_names_the_storage_and_storage_wins(cifar_root, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("FASTNN_STORAGE", "sqlite:////nonexistent/env.db")
    assert main(tune_args(cifar_root, tmp_path / "a", "--trials", "1")) == 1
    assert "no folder /nonexistent for the SQLite file /nonexistent/env.db" in \
        capsys.readouterr().err
    storage = f"sqlite:///{tmp_path / 'flag.db'}"
    assert main(tune_args(cifar_root, tmp_path / "b", "--trials", "1", "--storage", storage)) == 0
    assert len(optuna.load_study(study_name="fastnn", storage=storage).trials) == 1


def test_the_optuna_internals_tune_uses_still_exist(tmp_path):
    """fastnn.tune.optuna_api is the one place tune reaches into Optuna: each of its calls and
    names still does what tune needs on the installed Optuna (this fails when one changes)."""
    import warnings

    from optuna.trial import TrialState

    from fastnn.tune import optuna_api as api

    missing = [name for name in api.DATABASE_CALLS
               if not callable(getattr(optuna.storages.RDBStorage, name, None))]
    assert not missing, f"RDBStorage lost {missing}: patient_storage_class wraps them"
    # the fallback warning an outage makes RDBStorage log, and its logger, are still there,
    # and quiet_fallback_warnings drops that warning (only that one)
    import importlib
    import inspect
    import logging

    assert api.RDB_FALLBACK_WARNING in inspect.getsource(importlib.import_module(api.RDB_LOGGER))
    api.quiet_fallback_warnings()
    api.quiet_fallback_warnings()  # once: a second call adds no second filter
    logger = logging.getLogger(api.RDB_LOGGER)
    assert len(logger.filters) == 1

    def record(message):
        return logging.LogRecord(api.RDB_LOGGER, logging.WARNING, __file__, 0, message, (), None)

    assert not logger.filter(record(f"{api.RDB_FALLBACK_WARNING}: server closed the connection"))
    assert logger.filter(record("another warning"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'api.db'}",
                                             heartbeat_interval=60, grace_period=120,
                                             heartbeat_stale_trial_callback=retry)
    for study in (optuna.create_study(), optuna.create_study(storage=storage)):
        own = api.study_storage(study)  # the study's own storage (a cache around a database)
        study.enqueue_trial({"x": 0.5})
        queued, = study.get_trials(deepcopy=False)
        assert queued.system_attrs[api.FIXED_PARAMS] == {"x": 0.5}  # enqueue_trial's values
        assert own.set_trial_state_values(api.storage_id(queued), TrialState.RUNNING)
        trial = api.trial_handle(study, api.storage_id(queued))  # a live Trial for the claim
        assert trial.number == queued.number and api.storage_id(trial) == api.storage_id(queued)
        assert trial.suggest_float("x", 0.0, 1.0) == 0.5  # it takes the queued value
        trial.report(0.25, 1)
        study.tell(trial, 0.5)
        made = api.trial_handle(study, own.create_new_trial(
            own.get_study_id_from_name(study.study_name)))
        assert study.get_trials(deepcopy=False)[-1].number == made.number
    # a lost trial handed to the heartbeat retry callback: the retry names it
    own.set_trial_state_values(api.storage_id(made), TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert own.get_heartbeat_interval() == 60
        own.get_heartbeat_stale_trial_callback()(study, own.get_trial(api.storage_id(made)))
    retried = study.get_trials(deepcopy=False)[-1]
    assert retried.state == TrialState.WAITING
    assert retried.system_attrs[api.FAILED_TRIAL] == made.number
    assert retried.system_attrs[api.RETRY_HISTORY] == [made.number]


def test_tune_is_split_by_job_and_catches_only_what_it_names():
    """Each module of fastnn.tune under 500 lines; no `except Exception` (a storage error is
    one of storage.storage_errors(), anything else is a bug and shows)."""
    import pathlib

    folder = pathlib.Path(fastnn.__file__).parent / "tune"
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert len(sizes) > 4 and max(sizes.values()) < 500, sizes
    broad = [f"{path.name}:{i}" for path in folder.glob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"except\s*(Exception|BaseException)?\s*(as \w+)?:", line)]
    assert not broad, broad
