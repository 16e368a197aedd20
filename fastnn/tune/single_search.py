"""The search of a model trained one trial at a time (convnet): the plain Solver per trial.

A trial's configuration is its model's recipe (fastnn.models.RECIPES) with the
values drawn from the model's Search.space and the architecture given by its
tune flags; every trial trains all its epochs (the plain Solver has no
per-epoch pruning hook), and its per-epoch validation accuracy is reported.
"""
import time
import warnings

from fastnn import models
from fastnn.runs import build_model, build_solver, recipe_config, recorded
from fastnn.tune.storage import wait
from fastnn.tune.study import suggest

CONV_SPACE = models.CONV_SPACE


def conv_baseline(model="convnet"):
    """The first trial of a new study of `model` (one trained one at a time)."""
    return models.MODELS[model].search.baseline


def conv_train_config(params, options, slot):
    """A `fastnn train` configuration for one trial trained alone: its recipe (--recipe, else
    its model's) with `params`, the architecture (the model's tune flags) and schedule of
    `options` (cli's tune flags); the weights' seed follows the slot, as train_config's does."""
    model = options.get("model", "convnet")
    recipe = options.get("recipe") or models.MODELS[model].recipe
    config = {**recipe_config(recipe), **params, "epochs": options["epochs"],
              "lr_schedule": None if options["lr_schedule"] == "none" else options["lr_schedule"],
              "crop_padding": options["crop_padding"], "seed": options["seed"],
              "model_seed": options["seed"] + slot}
    for key in models.MODELS[model].search.flags:
        if options.get(key) is not None:
            config[key] = options[key]
    for key in ("data", "num_training", "num_validation", "num_test"):  # as train_config
        config[key] = options[key]
    return recorded(config)


def run_conv_trial(worker, taken, data, options, clock, log):
    """Train one trial (worker.take(1)'s [(trial, slot)]) of a model searched one trial at a
    time (convnet) with the plain Solver; returns (outcome, trial_best, model_epochs) as
    run_round does."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    (trial, slot), = taken
    with warnings.catch_warnings():  # a retry holds its lost trial's values already
        warnings.filterwarnings("ignore", "Inconsistent parameter values", RuntimeWarning)
        search = models.search_for(options.get("model", "convnet"), options.get("recipe"))
        params = {name: suggest(trial, name, spec) for name, spec in search.space.items()}
    config = conv_train_config(params, options, slot)
    trial.set_user_attr("config", config)
    start = time.perf_counter()
    model = build_model(config, data)
    solver = build_solver(model, data, config, out_dir=None, verbose=False)
    wait(0, worker.stop)  # a signal since the trial was taken (the Solver sees only its own)
    try:
        solver.train()  # Ctrl-C: TrainingInterrupted, and tune() hands the trial back
    except FloatingPointError:
        if worker.finish(trial, state=TrialState.FAIL, failed="non-finite loss"):
            log(f"trial {trial.number}: failed (non-finite loss)")
            return [(trial.number, None)], None, solver.epoch
        return [], None, solver.epoch
    # the epoch-end entries (with one iteration per epoch the first one is also one)
    epoch_ends = solver.val_acc_history[-solver.epoch:] if solver.epoch else []
    try:
        for epoch, acc in enumerate(epoch_ends, start=1):
            trial.report(acc, epoch)
    except UpdateFinishedTrialError:
        pass  # another worker found it lost: finish() below says so
    value = solver.best_val_acc
    if not worker.finish(trial, value):
        return [], None, solver.epoch
    budget = "" if clock.deadline is None else f"; {clock.left():.0f} s of budget left"
    log(f"trial {trial.number}: val {value:.4f} (complete) {config['model']} "
        f"{search.summary(config)}; {time.perf_counter() - start:.0f} s{budget}")
    return [(trial.number, value)], (value, config, model, trial.number), solver.epoch
