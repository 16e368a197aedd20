"""The fc search: K trials of fully connected nets trained as one stack per round.

Each round takes K trials (`--parallel K`). The structural choices (depth,
widths, batch size, lr decay, update rule: FC_STRUCTURE in fastnn.models) are
drawn by the round's first trial and given to the others as single-value
ranges, so every trial records the values it was trained with; the continuous
ones (learning rate, reg, weight scale, dropout: FC_MEMBER) are drawn per
trial. The K nets train together as a `StackedFullyConnectedNet`; after every
epoch each trial reports its validation accuracy, and Optuna's pruner may stop
it (it leaves the stack).
"""
import time
import warnings

import numpy as np

from fastnn import models
from fastnn.runs import augment_options, recorded
from fastnn.tune.storage import wait
from fastnn.tune.study import RESERVE_SECONDS, suggest

UPDATE_RULES = models.FC_UPDATE_RULES
STRUCTURE_SPACE = models.FC_STRUCTURE  # what one round's trials share
MEMBER_SPACE = models.FC_MEMBER  # what each trial draws
SEARCH = models.MODELS["fc"].search
# A configuration known to do well on CIFAR-10: the first trial of a new study
BASELINE = SEARCH.baseline


def suggest_structure(trial, fixed=None):
    """The round's shared choices; `fixed` (another trial's) pins each to one value."""
    return {name: suggest(trial, name, spec, None if fixed is None else fixed[name])
            for name, spec in STRUCTURE_SPACE.items()}


def suggest_member(trial):
    return {name: suggest(trial, name, spec) for name, spec in MEMBER_SPACE.items()}


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


def run_round(worker, taken, data, options, clock, log):
    """Train the trials `taken` (worker.take's [(trial, slot)]) as one stack.

    Returns (outcome, round_best, model_epochs): outcome lists (trial number,
    val_acc or None) per trial; round_best is (val_acc, config, model, trial
    number) of the round's best trial, or None; model_epochs counts the
    epochs its nets trained, for pacing.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    trials = [trial for trial, _ in taken]
    structure = suggest_structure(trials[0])  # a queued trial brings its own
    members = []
    configs = []
    for i, (trial, slot) in enumerate(taken):
        with warnings.catch_warnings():
            # A retry holds its lost trial's values already: they win over the ranges asked
            # for here (a lost stack's first trial can lead the new stack, or follow).
            warnings.filterwarnings("ignore", "Inconsistent parameter values", RuntimeWarning)
            if i:
                suggest_structure(trial, fixed=structure)
            member = suggest_member(trial)
        # A retry draws the weights its lost trial would have: the seed follows the slot.
        config = train_config(structure, member, options, slot)
        trial.set_user_attr("config", config)
        members.append({"weight_scale": member["weight_scale"], "reg": member["reg"],
                        "dropout": member["dropout"], "seed": config["model_seed"]})
        configs.append(config)

    stack = StackedFullyConnectedNet(hidden_dims(structure), members, use_batchnorm=True)
    by_member = dict(enumerate(trials))
    lost = set()  # members another worker declared lost (this worker's heartbeats stalled)
    round_start = time.perf_counter()

    def on_epoch_end(epoch, val_accs):
        prune = []
        out_of_time = clock.left() < RESERVE_SECONDS + options["final_seconds"]
        for member_id, acc in val_accs.items():
            trial = by_member[member_id]
            try:
                trial.report(acc, epoch)
            except UpdateFinishedTrialError:
                lost.add(member_id)
                prune.append(member_id)
                continue
            if epoch < options["epochs"] and (out_of_time or trial.should_prune()):
                prune.append(member_id)  # never at the last epoch: that trial is complete
        return prune

    solver = StackedSolver(
        stack, data, update_rule=configs[0]["update_rule"],
        optim_configs=[{"learning_rate": c["learning_rate"]} for c in configs],
        lr_decay=structure["lr_decay"], lr_schedule=configs[0]["lr_schedule"],
        batch_size=configs[0]["batch_size"], num_epochs=options["epochs"],
        seed=options["seed"], augment=augment_options(configs[0]), on_epoch_end=on_epoch_end)
    wait(0, worker.stop)  # a signal since the trials were taken (the Solver sees only its own)
    solver.train()
    outcome, best_id, model_epochs = [], None, 0
    for member_id, trial in by_member.items():
        result = solver.results[member_id]
        model_epochs += max(len(result["val_acc_history"]) - 1, 0)
        value = result["best_val_acc"]
        name = f"trial {trial.number}" + (f" (retry of {taken[member_id][1]})"
                                          if taken[member_id][1] != trial.number else "")
        if member_id in lost:
            worker.finish(trial, state=TrialState.FAIL)  # logs that it was dropped
            continue
        if result["status"] == "failed" or not np.isfinite(value):
            if worker.finish(trial, state=TrialState.FAIL, failed="non-finite loss"):
                log(f"{name}: failed (non-finite loss)")
                outcome.append((trial.number, None))
            continue
        state = TrialState.PRUNED if result["status"] == "pruned" else None
        if not worker.finish(trial, None if state else value, state=state):
            continue
        outcome.append((trial.number, value))
        if best_id is None or value > solver.results[best_id]["best_val_acc"]:
            best_id = member_id
        config = configs[member_id]
        log(f"{name}: val {value:.4f} ({result['status']}) {SEARCH.summary(config)}")
    budget = "" if clock.deadline is None else f"; {clock.left():.0f} s of budget left"
    log(f"round of {len(trials)} took {time.perf_counter() - round_start:.0f} s{budget}")
    round_best = None
    if best_id is not None:  # only the round's best becomes a model: building one costs
        round_best = (solver.results[best_id]["best_val_acc"], configs[best_id],
                      solver.best_model(best_id), by_member[best_id].number)
    return outcome, round_best, model_epochs
