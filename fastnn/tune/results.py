"""What a search writes: best.json and best_model.npz, trials.csv, the plots; the retrain.

best.json holds the best trial's configuration (`fastnn train --config
DIR/best.json` retrains it), its validation and test accuracy and the study's
counts; trials.csv every trial, best first, with why it is as it is; plots:
trials.png (validation accuracy per trial) and importances.png.
"""
import contextlib
import csv
import os
import time
import warnings

from fastnn.files import atomic_write, read_json, write_json
from fastnn.plots import save_figure
from fastnn.runs import build_model, build_solver, complete, predict
from fastnn.tune.study import trial_key

BEST_FORMAT, FORMAT_VERSION = "fastnn-tune-best", 1


def retrain(config, data, epochs, log):
    """Train `config` for `epochs` with the plain Solver; returns (model, best val acc)."""
    config = {**config, "epochs": epochs, "print_every": 10**9}
    model = build_model(config, data)
    solver = build_solver(model, data, config, out_dir=None)
    solver.verbose = False
    solver.train()
    log(f"retrained the best configuration for {epochs} epochs: val {solver.best_val_acc:.4f}")
    return model, solver.best_val_acc


def write_trials_table(study, path):
    """All trials of the study, best first, as CSV."""
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: -(t.value if t.value is not None else -1))
    names = sorted({name for t in trials for name in t.params})
    with atomic_write(path, text=True, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "number", "state", "val_acc", "epochs_reported", "worker",
                         "note", *names])
        for rank, t in enumerate(trials, start=1):
            writer.writerow([rank, t.number, t.state.name, t.value, len(t.intermediate_values),
                             t.user_attrs.get("worker"), trial_note(t),
                             *[t.params.get(n) for n in names]])


def trial_note(trial):
    """Why a trial is as it is, for trials.csv: failed, skipped, lost, or a retry."""
    from optuna.trial import TrialState

    notes = []
    if trial_key(trial) != trial.number:
        notes.append(f"retry of {trial_key(trial)}")
    for attr in ("failed", "skipped"):
        if attr in trial.user_attrs:
            notes.append(f"{attr}: {trial.user_attrs[attr]}")
    if trial.state == TrialState.FAIL and not {"failed", "skipped"} & trial.user_attrs.keys():
        notes.append("lost: its worker stopped")
    return "; ".join(notes)


def plot_study(study, out_dir):
    """val_acc per trial (final and per-epoch), and parameter importances when Optuna can."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import optuna

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in study.get_trials(deepcopy=False):
        if t.intermediate_values:
            ax.plot([t.number] * len(t.intermediate_values), list(t.intermediate_values.values()),
                    ".", color="0.7", markersize=3)
        if t.value is not None:
            ax.plot(t.number, t.value, "o", color="C0")
    ax.set(xlabel="trial", ylabel="validation accuracy",
           title="Validation accuracy per trial (grey: per epoch)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trial numbers
    save_figure(fig, os.path.join(out_dir, "trials.png"))
    try:
        with warnings.catch_warnings():  # few trials per value: rough, and it says so
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few finished trials
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (Optuna default evaluator)", title="Hyperparameter importances")
    save_figure(fig, os.path.join(out_dir, "importances.png"))


def previous_best(out_dir):
    """The best of an earlier session in out_dir (--resume), as tune() keeps it, or None."""
    import fastnn

    json_path = os.path.join(out_dir, "best.json")
    model_path = os.path.join(out_dir, "best_model.npz")
    if not (os.path.exists(json_path) and os.path.exists(model_path)):
        return None
    saved = read_json(json_path, BEST_FORMAT, FORMAT_VERSION)
    return saved["val_acc"], saved["config"], fastnn.load(model_path), saved["trial"]


def write_results(study, best, data, options, results, trained_here, log):
    """best_model.npz and best.json of `best` (val_acc, config, model, trial number); then
    trials.csv and the plots of `study` (None: its storage is gone, they are left out)."""
    import fastnn

    value, config, model, number = best
    out_dir = options["out"]
    test_acc = float((fastnn.to_numpy(predict(model, data["X_test"],
                                              tta=complete(config)["tta"]))
                      == data["y_test"]).mean())
    study_best = {"study_best_trial": None, "study_best_val_acc": None}
    if study is not None:
        with contextlib.suppress(ValueError):  # completed trials only; pruned ones do not count
            study_best = {"study_best_trial": study.best_trial.number,
                          "study_best_val_acc": study.best_value}
    fastnn.save(model, os.path.join(out_dir, "best_model.npz"))
    result = {"config": config, "val_acc": value, "test_acc": test_acc,
              "num_test": int(data["X_test"].shape[0]), "trial": number, **study_best,
              "study_results": results, "worker": options["worker"],
              "worker_trials": trained_here,
              "seconds": round(time.perf_counter() - options["start"], 1)}
    write_json(os.path.join(out_dir, "best.json"), result, BEST_FORMAT, FORMAT_VERSION)
    if study is not None:
        write_trials_table(study, os.path.join(out_dir, "trials.csv"))
        plot_study(study, out_dir)
    log(f"best: val {value:.4f}, test {test_acc:.4f} on {result['num_test']} images "
        f"(trial {number}); {result['seconds']:.0f} s; folder {out_dir}")
    return result
