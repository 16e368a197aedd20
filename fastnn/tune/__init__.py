"""`fastnn tune`: hyperparameter search on CIFAR-10 with Optuna.

The search of each model is declared in fastnn.models' registry (its
`Search`): fc trains K trials at once as one stack per round
(stacked_search), convnet one trial at a time with the plain Solver
(single_search). The study lives in an Optuna storage (storage): SQLite in the
run folder by default, so `--resume` continues it; a database server (or a
journal file) shared by workers on several machines. `Worker` (worker)
decides which worker trains which trial: `--trials N` slots for the whole
study, heartbeats for the trials a worker trains, and the trials of a worker
that died queued again for a live one. The Optuna internals this needs are
in optuna_api, and nowhere else.

After the search the best configuration may be retrained for longer
(`--final-epochs`), and the best-validation model is tested on all test
images (results). Everything, loading and the test pass included, fits in
`--budget-minutes`. Ctrl-C or SIGTERM ends the search early with what finished
written; a database server that restarts is waited for (`--outage-seconds`).
This module runs the search: `tune(options)`.
"""
import contextlib
import os
import signal
import time

from fastnn import models
from fastnn.interrupt import TrainingInterrupted, stop_requests
from fastnn.runs import load_data, setup_runtime
from fastnn.tune.results import (BEST_FORMAT, FORMAT_VERSION, plot_study,
                                 previous_best, retrain, trial_note, write_results,
                                 write_trials_table)
from fastnn.tune.single_search import (CONV_SPACE, conv_baseline,
                                       conv_train_config, run_conv_trial)
from fastnn.tune.stacked_search import (BASELINE, MEMBER_SPACE, STRUCTURE_SPACE,
                                        UPDATE_RULES, hidden_dims, run_round, suggest_member,
                                        suggest_structure, train_config)
from fastnn.tune.storage import (DEFAULT_PORTS, MAX_RETRIES, STORAGE_ENV,
                                 StorageUnavailable, check_database, check_file_storage,
                                 describe_storage, hide_password, open_storage,
                                 patient_storage_class, wait)
from fastnn.tune.study import (RESERVE_SECONDS, SEARCH_SPACE_ATTR, Clock,
                               check_epochs, check_search_space, create_study, has_result,
                               model_defaults, search_space, trial_epochs, trial_key)
from fastnn.tune.worker import Worker

# the names callers used from the one-module fastnn.tune, where they live now
__all__ = [
    "tune", "TuneStopped", "Worker",
    "BEST_FORMAT", "FORMAT_VERSION", "plot_study", "previous_best", "retrain", "trial_note",
    "write_results", "write_trials_table",
    "CONV_SPACE", "conv_baseline", "conv_train_config", "run_conv_trial",
    "BASELINE", "MEMBER_SPACE", "STRUCTURE_SPACE", "UPDATE_RULES", "hidden_dims", "run_round",
    "suggest_member", "suggest_structure", "train_config",
    "DEFAULT_PORTS", "MAX_RETRIES", "STORAGE_ENV", "StorageUnavailable", "check_database",
    "check_file_storage", "describe_storage", "hide_password", "open_storage",
    "patient_storage_class", "wait",
    "RESERVE_SECONDS", "SEARCH_SPACE_ATTR", "Clock", "check_epochs", "check_search_space",
    "create_study", "has_result", "model_defaults", "search_space", "trial_epochs", "trial_key",
]


class TuneStopped(Exception):
    """The search stopped early (a signal, a lost storage): `status` is the exit status;
    the message says why and what was written."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def tune(options, log=print, data=None):
    """Run the search described by `options` (see cli.py's tune flags); returns best.json's dict.

    `data`: the CIFAR-10 split, when the caller has loaded it already. Ctrl-C or
    SIGTERM, or a database that stays away for options["outage_seconds"], stops
    the search: the trials in training are handed back, what finished is written
    (best.json, best_model.npz, trials.csv, plots), and TuneStopped says so.
    """
    with stop_requests() as stop:  # a signal is acted on between trials (Solver: between steps)
        return _tune(options, log, data, stop)


def _tune(options, log, data, stop):
    import fastnn

    search = models.search_for(options.setdefault("model", models.DEFAULT_TUNE_MODEL),
                               options.get("recipe"))
    for key, value in model_defaults(options["model"], options.get("recipe")).items():
        if options.get(key) is None and key != "epochs":  # epochs: the study's, if it has any
            options[key] = value
    clock = Clock(options["budget_minutes"], options["start"])
    out_dir = options["out"]
    os.makedirs(out_dir, exist_ok=True)
    # An explicit storage is a shared study: workers join it. The default one is this run's.
    options["shared"] = options["storage"] is not None
    if options["storage"] is None:
        options["storage"] = f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"
    study = create_study(options, open_storage(options, log, stop))
    check_epochs(study, options)
    setup_runtime(options)
    data = load_data(options) if data is None else data
    # The training splits go to the backend once: every round's Solver then finds them there
    # (on cupy, not one upload of X_train per round). The test split stays on the host.
    data = {**data, **{k: fastnn.xp().asarray(data[k])
                       for k in ("X_train", "y_train", "X_val", "y_val")}}
    if not options["shared"] and not study.trials:
        # Not with a shared storage: workers starting together would each enqueue it.
        study.enqueue_trial(search.baseline)
    best = previous_best(out_dir)  # (val_acc, config, model, trial number)
    trained_here = 0
    stopped = None  # TuneStopped, when the search ends early
    results = None  # trials with a result in the study (None: the storage is gone)
    with Worker(study, options, log) as worker:
        worker.stop = stop
        if not options["shared"]:
            worker.reclaim_running()
        round_seconds = None  # the first round always runs; its trials stop at the deadline
        waiting = False
        try:
            while True:
                wait(0, stop)
                if round_seconds is not None and \
                        clock.left() < RESERVE_SECONDS + options["final_seconds"] + round_seconds:
                    log("stopping the search: the budget is nearly spent")
                    break
                taken = worker.take(options["parallel"])
                if not taken:  # the study is full: done, or trials in flight on other workers
                    results, _, in_flight = worker.progress()
                    if results >= options["trials"] or not in_flight:
                        break
                    if not worker.heartbeats:
                        log(f"{in_flight} trials run on other workers; this one stops (a journal "
                            "storage keeps no heartbeats, so a lost trial is not run again)")
                        break
                    if clock.left() < RESERVE_SECONDS + options["final_seconds"] + \
                            worker.interval:
                        log("stopping: the budget is nearly spent")
                        break
                    if not waiting:
                        log(f"waiting for {in_flight} trials on other workers: a trial whose "
                            f"worker stops for {worker.grace} s runs again here")
                    waiting = True
                    wait(worker.interval, stop)
                    continue
                waiting = False
                round_start = time.perf_counter()
                trainer = run_round if search.stacked else run_conv_trial
                outcome, round_best, model_epochs = trainer(worker, taken, data, options, clock,
                                                            log)
                round_seconds = time.perf_counter() - round_start
                trained_here += len(outcome)
                if options["final_epochs"] and model_epochs:  # a retrain's cost, at this pace
                    per_model_epoch = round_seconds / model_epochs
                    options["final_seconds"] = 1.5 * per_model_epoch * options["final_epochs"]
                if round_best is not None and (best is None or round_best[0] > best[0]):
                    best = round_best
            results = worker.progress()[0]
        except TrainingInterrupted as interrupt:  # the first signal (a second one: at once)
            name = signal.Signals(interrupt.signum).name
            log(f"{name}: handing back the trials in training")
            worker.hand_back_all()
            stopped = TuneStopped(f"stopped by {name}", 128 + int(interrupt.signum))
            with contextlib.suppress(StorageUnavailable):
                results = worker.progress()[0]
        except StorageUnavailable as lost:  # its trials run again elsewhere after the grace
            again = f"the trials in training here run again on another worker after " \
                f"--grace-seconds {worker.grace}"
            if stop.requested:  # a signal while waiting for the database
                name = signal.Signals(stop.signum).name
                stopped = TuneStopped(f"stopped by {name}: {lost}; {again}",
                                      128 + int(stop.signum))
            else:
                stopped = TuneStopped(f"{lost}; {again}", 1)
    if best is None:
        if stopped is not None:
            raise TuneStopped(f"{stopped}; no trial had finished here, nothing was written",
                              stopped.status)
        if results >= options["trials"]:
            raise SystemExit(f"fastnn: study {options['study_name']!r} already has {results} "
                             f"trials with a result (--trials {options['trials']}); raise "
                             "--trials to run more")
        raise SystemExit("fastnn: no trial finished; raise --budget-minutes or --trials")
    if stopped is None and options["final_epochs"] and \
            clock.left() > RESERVE_SECONDS + options["final_seconds"]:
        value, config, model, number = best
        try:
            retrained, retrained_val = retrain(config, data, options["final_epochs"], log)
        except TrainingInterrupted as interrupt:  # the search's best is kept
            name = signal.Signals(interrupt.signum).name
            stopped = TuneStopped(f"stopped by {name} while retraining the best configuration",
                                  128 + int(interrupt.signum))
        else:
            if retrained_val >= value:
                best = (retrained_val, {**config, "epochs": options["final_epochs"]},
                        retrained, number)
    result = write_results(study if results is not None else None, best, data, options,
                           results, trained_here, log)
    if stopped is not None:
        written = "best.json, best_model.npz, trials.csv and plots" if results is not None \
            else "best.json and best_model.npz"
        raise TuneStopped(f"{stopped}; {written} of the {trained_here} trials finished here are "
                          f"in {out_dir}", stopped.status)
    return result
