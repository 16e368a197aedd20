"""`fastnn tune`: hyperparameter search on CIFAR-10 with Optuna, K trials trained as one stack.

Each round asks Optuna for K trials (`--parallel K`). The structural
choices (depth, widths, batch size, lr decay, update rule) are drawn by the
round's first trial and given to the others as single-value ranges, so
every trial records the values it was trained with; the continuous ones
(learning rate, reg, weight scale, dropout) are drawn per trial. The K nets
train together as a `StackedFullyConnectedNet`; after every epoch each trial
reports its validation accuracy, and Optuna's pruner may stop it (it leaves
the stack). The study lives in an Optuna storage (SQLite in the run folder by
default), so `--resume` continues it and several workers on several machines
can share one study through a storage URL.

After the search the best configuration may be retrained for longer
(`--final-epochs`), and the best-validation model is tested on all test
images. Everything, loading and the test pass included, fits in
`--budget-minutes`.
"""
import csv
import math
import os
import time
import warnings

import numpy as np

from fastnn.files import atomic_write, read_json, write_json
from fastnn.plots import save_figure
from fastnn.runs import (augment_options, build_model, build_solver, complete, defaults_for,
                         load_data, predict, recorded, setup_runtime)

BEST_FORMAT, FORMAT_VERSION = "fastnn-tune-best", 1

UPDATE_RULES = ("adam", "adamw", "sgd_momentum")
# What one round's trials share, and the full range each is drawn from.
STRUCTURE_SPACE = {
    "num_hidden": ("int", 1, 4, False),
    "hidden_width": ("int", 256, 2048, True),
    "width_ratio": ("float", 0.25, 1.0, False),  # each later layer is this much narrower
    "log2_batch_size": ("int", 7, 9, False),
    "lr_decay": ("float", 0.85, 1.0, False),
    "update_rule_id": ("int", 0, len(UPDATE_RULES) - 1, False),  # index into UPDATE_RULES
    "augment": ("int", 0, 1, False),  # random horizontal flips (and --crop-padding crops)
}
MEMBER_SPACE = {
    "learning_rate": ("float", 1e-4, 1e-2, True),
    "reg": ("float", 1e-6, 1e-1, True),
    "weight_scale": ("float", 1e-3, 1e-1, True),
    "dropout": ("float", 0.0, 0.6, False),
}
# --model convnet: one ConvNet trial at a time (a stack of conv nets would save
# nothing: their products are already large), around the main job's recipe, in
# a small space; every trial trains all its epochs (the plain Solver has no
# per-epoch pruning hook), and its per-epoch validation accuracy is reported.
CONV_SPACE = {
    "learning_rate": ("float", 0.05, 0.5, True),
    "reg": ("float", 1e-4, 2e-3, True),
    "momentum": ("float", 0.8, 0.95, False),
    "label_smoothing": ("float", 0.0, 0.3, False),
}
RESERVE_SECONDS = 45  # the final test pass, plots and files


def _suggest(trial, name, spec, fixed=None):
    kind, low, high, log = spec
    if fixed is not None:  # a single-value range: the trial records the value it trains with
        low = high = fixed
    if kind == "int":
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, low, high, log=log)


def suggest_structure(trial, fixed=None):
    """The round's shared choices; `fixed` (another trial's) pins each to one value."""
    return {name: _suggest(trial, name, spec, None if fixed is None else fixed[name])
            for name, spec in STRUCTURE_SPACE.items()}


def suggest_member(trial):
    return {name: _suggest(trial, name, spec) for name, spec in MEMBER_SPACE.items()}


def hidden_dims(structure):
    width = structure["hidden_width"]
    return [max(16, int(round(width * structure["width_ratio"] ** i)))
            for i in range(structure["num_hidden"])]


def train_config(structure, member, options, trial_number):
    """A `fastnn train` configuration (runs.DEFAULTS keys) for one trial, of what applies.

    `seed` orders the batches (shared by a stack); `model_seed` draws the
    trial's weights and dropout masks.
    """
    return recorded({
        "model": "fc", "hidden_dims": hidden_dims(structure), "batchnorm": True,
        "dropout": member["dropout"], "reg": member["reg"],
        "weight_scale": member["weight_scale"],
        "update_rule": UPDATE_RULES[structure["update_rule_id"]],
        "learning_rate": member["learning_rate"], "lr_decay": structure["lr_decay"],
        "lr_schedule": None if options["lr_schedule"] == "none" else options["lr_schedule"],
        "augment": bool(structure["augment"]),
        "crop_padding": options["crop_padding"],
        "batch_size": 2 ** structure["log2_batch_size"], "epochs": options["epochs"],
        "seed": options["seed"], "model_seed": options["seed"] + trial_number,
        # the split decides the mean image subtracted from every input
        "data": options["data"], "num_training": options["num_training"],
        "num_validation": options["num_validation"], "num_test": options["num_test"],
    })


class Clock:
    """Seconds left of the budget, counted from the command's start."""

    def __init__(self, budget_minutes, start):
        self.deadline = None if budget_minutes is None else start + 60 * budget_minutes
        self.start = start

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()


def create_study(options):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=options["seed"], n_startup_trials=8)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    from sqlalchemy.exc import DBAPIError

    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=options["study_name"], storage=options["storage"],
                direction="maximize", sampler=sampler, pruner=pruner,
                load_if_exists=options["resume"] or options["shared"])
        except optuna.exceptions.DuplicatedStudyError:
            raise SystemExit(f"fastnn: study {options['study_name']!r} already exists in "
                             f"{options['storage']}; pass --resume to continue it") from None
        except DBAPIError:
            # Workers starting together race to create a new database's tables.
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


# A configuration known to do well on CIFAR-10 (about 0.62 test accuracy after
# 30 epochs with flips and a one-cycle schedule): the first trial of a new study, so the search starts from it.
BASELINE = {"num_hidden": 3, "hidden_width": 1024, "width_ratio": 0.5, "log2_batch_size": 8,
            "lr_decay": 1.0, "update_rule_id": UPDATE_RULES.index("adamw"), "augment": 1,
            "learning_rate": 1e-3, "reg": 1e-6, "weight_scale": 1e-2, "dropout": 0.3}


def conv_baseline():
    """The main job's recipe, as CONV_SPACE values: a new convnet study's first trial."""
    recipe = defaults_for("convnet")
    return {name: recipe[name] for name in CONV_SPACE}


def conv_train_config(params, options, trial_number):
    """A `fastnn train` configuration for one convnet trial: the recipe with `params`,
    the architecture and schedule of `options` (cli's tune flags)."""
    config = {**defaults_for("convnet"), **params, "epochs": options["epochs"],
              "lr_schedule": None if options["lr_schedule"] == "none" else options["lr_schedule"],
              "crop_padding": options["crop_padding"], "seed": options["seed"],
              "model_seed": options["seed"] + trial_number}
    for key in ("widths", "stem_width"):
        if options.get(key) is not None:
            config[key] = options[key]
    return recorded(config)


def run_conv_trial(study, data, options, clock, log):
    """Train one convnet trial; returns (outcome, trial_best, model_epochs) as run_round."""
    from optuna.trial import TrialState

    trial = study.ask()
    if trial.number >= options["trials"]:  # another worker took the last one
        trial.set_user_attr("skipped", "the study reached --trials before this one ran")
        study.tell(trial, state=TrialState.FAIL)
        return [], None, 0
    params = {name: _suggest(trial, name, spec) for name, spec in CONV_SPACE.items()}
    config = conv_train_config(params, options, trial.number)
    trial.set_user_attr("config", config)
    trial.set_user_attr("worker", options["worker"])
    start = time.perf_counter()
    model = build_model(config)
    solver = build_solver(model, data, config, out_dir=None, verbose=False)
    try:
        solver.train()
    except FloatingPointError as error:
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number}: failed ({error})")
        return [(trial.number, None)], None, solver.epoch
    # the epoch-end entries (with one iteration per epoch the first one is also one)
    epoch_ends = solver.val_acc_history[-solver.epoch:] if solver.epoch else []
    for epoch, acc in enumerate(epoch_ends, start=1):
        trial.report(acc, epoch)
    value = solver.best_val_acc
    study.tell(trial, value)
    log(f"trial {trial.number}: val {value:.4f} (complete) convnet "
        f"lr {config['learning_rate']:.2e} reg {config['reg']:.1e} "
        f"momentum {config['momentum']:.3f} smoothing {config['label_smoothing']:.2f}; "
        f"{time.perf_counter() - start:.0f} s; {clock.left():.0f} s of budget left")
    return [(trial.number, value)], (value, config, model, trial.number), solver.epoch


def trials_started(study):
    """Trials taken so far by every worker: finished, failed or running."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)))


def run_round(study, data, options, clock, k, log):
    """Train k trials as one stack.

    Returns (outcome, round_best, model_epochs): outcome lists (trial number,
    val_acc or None) per trial; round_best is (val_acc, config, model, trial
    number) of the round's best trial, or None; model_epochs counts the
    epochs its nets trained, for pacing.
    """
    from optuna.trial import TrialState

    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    trials = []
    for _ in range(k):
        trial = study.ask()
        if trial.number >= options["trials"]:  # another worker took the last ones
            trial.set_user_attr("skipped", "the study reached --trials before this one ran")
            study.tell(trial, state=TrialState.FAIL)
            break
        trials.append(trial)
    if not trials:
        return []
    structure = suggest_structure(trials[0])
    members = []
    configs = []
    for i, trial in enumerate(trials):
        if i:
            suggest_structure(trial, fixed=structure)
        member = suggest_member(trial)
        config = train_config(structure, member, options, trial.number)
        trial.set_user_attr("config", config)
        trial.set_user_attr("worker", options["worker"])
        members.append({"weight_scale": member["weight_scale"], "reg": member["reg"],
                        "dropout": member["dropout"], "seed": config["model_seed"]})
        configs.append(config)

    stack = StackedFullyConnectedNet(hidden_dims(structure), members, use_batchnorm=True)
    by_member = dict(enumerate(trials))
    round_start = time.perf_counter()

    def on_epoch_end(epoch, val_accs):
        prune = []
        out_of_time = clock.left() < RESERVE_SECONDS + options["final_seconds"]
        for member_id, acc in val_accs.items():
            trial = by_member[member_id]
            trial.report(acc, epoch)
            if epoch < options["epochs"] and (out_of_time or trial.should_prune()):
                prune.append(member_id)  # never at the last epoch: that trial is complete
        return prune

    solver = StackedSolver(
        stack, data, update_rule=configs[0]["update_rule"],
        optim_configs=[{"learning_rate": c["learning_rate"]} for c in configs],
        lr_decay=structure["lr_decay"], lr_schedule=configs[0]["lr_schedule"],
        batch_size=configs[0]["batch_size"], num_epochs=options["epochs"],
        seed=options["seed"], augment=augment_options(configs[0]), on_epoch_end=on_epoch_end)
    solver.train()
    outcome, best_id, model_epochs = [], None, 0
    for member_id, trial in by_member.items():
        result = solver.results[member_id]
        model_epochs += max(len(result["val_acc_history"]) - 1, 0)
        value = result["best_val_acc"]
        if result["status"] == "failed" or not np.isfinite(value):
            study.tell(trial, state=TrialState.FAIL)
            outcome.append((trial.number, None))
            continue
        if result["status"] == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
        outcome.append((trial.number, value))
        if best_id is None or value > solver.results[best_id]["best_val_acc"]:
            best_id = member_id
        config = configs[member_id]
        log(f"trial {trial.number}: val {value:.4f} ({result['status']}) "
            f"{config['hidden_dims']} bs {config['batch_size']} "
            f"{config['update_rule']} lr {config['learning_rate']:.2e}")
    budget = "" if clock.deadline is None else f"; {clock.left():.0f} s of budget left"
    log(f"round of {len(trials)} took {time.perf_counter() - round_start:.0f} s{budget}")
    round_best = None
    if best_id is not None:  # only the round's best becomes a model: building one costs
        round_best = (solver.results[best_id]["best_val_acc"], configs[best_id],
                      solver.best_model(best_id), by_member[best_id].number)
    return outcome, round_best, model_epochs


def retrain(config, data, epochs, log):
    """Train `config` for `epochs` with the plain Solver; returns (model, best val acc)."""
    config = {**config, "epochs": epochs, "print_every": 10**9}
    model = build_model(config)
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
        writer.writerow(["rank", "number", "state", "val_acc", "epochs_reported", *names])
        for rank, t in enumerate(trials, start=1):
            writer.writerow([rank, t.number, t.state.name, t.value, len(t.intermediate_values),
                             *[t.params.get(n) for n in names]])


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


def tune(options, log=print, data=None):
    """Run the search described by `options` (see cli.py's tune flags); returns best.json's dict.

    `data`: the CIFAR-10 split, when the caller has loaded it already.
    """
    import fastnn

    clock = Clock(options["budget_minutes"], options["start"])
    out_dir = options["out"]
    os.makedirs(out_dir, exist_ok=True)
    # An explicit storage is a shared study: workers join it. The default one is this run's.
    options["shared"] = options["storage"] is not None
    if options["storage"] is None:
        options["storage"] = f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"
    setup_runtime(options)
    data = load_data(options) if data is None else data
    study = create_study(options)
    if not options["shared"] and not study.trials:
        # Not with a shared storage: another worker could take it as a member of a
        # stack whose structure differs from the enqueued one.
        study.enqueue_trial(conv_baseline() if options["model"] == "convnet" else BASELINE)
    best = previous_best(out_dir)  # (val_acc, config, model, trial number)
    round_seconds = None  # the first round always runs; its trials stop at the deadline
    while trials_started(study) < options["trials"]:
        if round_seconds is not None and \
                clock.left() < RESERVE_SECONDS + options["final_seconds"] + round_seconds:
            log("stopping the search: the budget is nearly spent")
            break
        k = min(options["parallel"], options["trials"] - trials_started(study))
        round_start = time.perf_counter()
        if options["model"] == "convnet":
            outcome, round_best, model_epochs = run_conv_trial(study, data, options, clock, log)
        else:
            outcome, round_best, model_epochs = run_round(study, data, options, clock, k, log)
        round_seconds = time.perf_counter() - round_start
        if not outcome:
            break
        if options["final_epochs"] and model_epochs:  # a retrain's cost, at this round's pace
            per_model_epoch = round_seconds / model_epochs
            options["final_seconds"] = 1.5 * per_model_epoch * options["final_epochs"]
        if round_best is not None and (best is None or round_best[0] > best[0]):
            best = round_best
    if best is None:
        raise SystemExit("fastnn: no trial finished; raise --budget-minutes or --trials")
    value, config, model, number = best
    if options["final_epochs"] and clock.left() > RESERVE_SECONDS + options["final_seconds"]:
        retrained, retrained_val = retrain(config, data, options["final_epochs"], log)
        if retrained_val >= value:
            value, model = retrained_val, retrained
            config = {**config, "epochs": options["final_epochs"]}
    fastnn.save(model, os.path.join(out_dir, "best_model.npz"))
    test_acc = float((fastnn.to_numpy(predict(model, data["X_test"],
                                              flip=complete(config)["flip_test"]))
                      == data["y_test"]).mean())
    try:  # completed trials only; pruned ones (still ranked here) do not count for Optuna
        study_best = {"study_best_trial": study.best_trial.number,
                      "study_best_val_acc": study.best_value}
    except ValueError:
        study_best = {"study_best_trial": None, "study_best_val_acc": None}
    result = {"config": config, "val_acc": value, "test_acc": test_acc,
              "num_test": int(data["X_test"].shape[0]), "trial": number, **study_best,
              "trials_started": trials_started(study),
              "seconds": round(time.perf_counter() - options["start"], 1)}
    write_json(os.path.join(out_dir, "best.json"), result, BEST_FORMAT, FORMAT_VERSION)
    write_trials_table(study, os.path.join(out_dir, "trials.csv"))
    plot_study(study, out_dir)
    log(f"best: val {value:.4f}, test {test_acc:.4f} on {result['num_test']} images "
        f"(trial {number}); {result['seconds']:.0f} s; folder {out_dir}")
    return result
