"""`fastnn tune`: its flags checked and completed, its folder claimed, fastnn.tune run."""
import os
import signal
import sys

import numpy as np

from fastnn import models
from fastnn.cli.common import (START_TIME, CommandError, UsageError, check_new_folder,
                               claimed_folder, failing_as)
from fastnn.cli.parser import TUNE_MODELS, build_parser
from fastnn.runs import check_config, load_data, option_name, setup_runtime


TUNE_RESUME = "fastnn tune --resume --out {}"


def tune_holds_run(folder):
    """A study in the folder, or a worker's results (best.json and its model)."""
    return any(os.path.exists(os.path.join(folder, name))
               for name in ("study.db", "best.json", "best_model.npz"))


def fill_tune_defaults(options):
    """The per-model defaults of --parallel and --crop-padding (None: not given); --epochs
    stays None when not given: a resumed study keeps its own (fastnn.tune.check_epochs)."""
    model, search = options["model"], models.MODELS[options["model"]].search
    if not search.stacked and (options["parallel"] or 1) != 1:
        stacked = [name for name in TUNE_MODELS if models.MODELS[name].search.stacked]
        raise UsageError(f"{model} trials train one at a time; --parallel "
                         f"{options['parallel']} applies to --model {'/'.join(stacked)}")
    for other in TUNE_MODELS:
        for name in models.MODELS[other].search.flags:
            if name not in search.flags and options[name] is not None:
                raise UsageError(f"{option_name(name)} applies to tune --model {other}, "
                                 f"not {model}")
    recipe = options.get("recipe")
    if recipe is not None and recipe != models.MODELS[model].recipe:
        if models.recipe(recipe).model != model:
            raise UsageError(f"--recipe {recipe} trains --model {models.recipe(recipe).model}, "
                             f"not {model}: drop --recipe, or pick a recipe of {model} "
                             f"({', '.join(models.recipes_of(model))})")
        if search.stacked:
            raise UsageError(f"{model} trials are built from the search's structure; --recipe "
                             f"{recipe} applies to the models searched one trial at a time")
    from fastnn.tune import model_defaults

    options.update({k: v for k, v in model_defaults(options["model"], recipe).items()
                    if options[k] is None and k != "epochs"})


def check_tune_options(options):
    for name, low in (("trials", 1), ("parallel", 1), ("epochs", 1), ("final_epochs", 0),
                      ("heartbeat_seconds", 1), ("outage_seconds", 1)):
        if options[name] is not None and options[name] < low:
            raise UsageError(f"{option_name(name)} must be >= {low}, got {options[name]}")
    if options["grace_seconds"] <= options["heartbeat_seconds"]:
        raise UsageError(f"--grace-seconds ({options['grace_seconds']}) must exceed "
                         f"--heartbeat-seconds ({options['heartbeat_seconds']}), or every running "
                         "trial looks lost between two heartbeats")
    budget = options["budget_minutes"]
    if budget is not None and not (np.isfinite(budget) and budget > 0):
        raise UsageError(f"--budget-minutes must be a positive number of minutes, got {budget}")
    shared = {k: options[k] for k in ("num_training", "num_validation", "num_test", "threads",
                                      "backend", "seed", "crop_padding")}
    if options["epochs"] is not None:
        shared["epochs"] = options["epochs"]
    with failing_as(UsageError, ValueError):
        check_config({**shared, "augment": True})  # trials that augment use --crop-padding
    if options["resume"] and options["out"] is None and options["storage"] is None:
        raise UsageError("--resume needs --out DIR (the earlier run folder) or --storage")


def tune_resume_command(given, out_dir):
    """The command that resumes a tune of the flags `given` (vars of its arguments): those that
    differ from the defaults, --resume and --out DIR; a --storage URL's password is shown as
    ***, and a URL from $FASTNN_STORAGE (not in `given`) is left to it."""
    import shlex

    from fastnn.tune import hide_password

    tune_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["tune"]
    words = ["fastnn", "tune", "--resume", "--out", out_dir]
    for action in tune_parser._actions:
        value = given.get(action.dest, action.default)
        if not action.option_strings or value == action.default or \
                action.dest in ("help", "debug", "resume", "out"):
            continue
        if action.dest == "storage":
            value = hide_password(value)
        words += [action.option_strings[0],
                  *(map(str, value) if isinstance(value, list) else [str(value)])]
    command = shlex.join(words)
    if ":***@" in command:
        command += " (with the password for ***, or with it in ~/.pgpass or PGPASSWORD)"
    return command


def tune_command(args):
    from fastnn import tune

    options = {**vars(args), "start": START_TIME, "final_seconds": 0,
               "worker": f"{os.uname().nodename}:{os.getpid()}"}
    if options["storage"] is None and os.environ.get(tune.STORAGE_ENV):  # --storage wins
        options["storage"] = os.environ[tune.STORAGE_ENV]
    fill_tune_defaults(options)
    check_tune_options(options)
    out_dir = options["out"]

    def holds_run(folder):  # a new study may not reuse a folder, a resumed one must
        return False if options["resume"] else tune_holds_run(folder)

    if out_dir is not None:
        if options["resume"] and options["storage"] is None and not tune_holds_run(out_dir):
            raise CommandError(f"cannot resume: {out_dir} holds no study (no study.db); start "
                               f"one with fastnn tune --out {out_dir}")
        if not (options["resume"] and os.path.isdir(out_dir)):
            check_new_folder(out_dir, tune_holds_run, TUNE_RESUME)
    with failing_as(CommandError, (RuntimeError, ValueError), "backend: "):
        setup_runtime(options)
    with failing_as(CommandError, (RuntimeError, ValueError, OSError), "CIFAR-10 data: "):
        data = load_data(options)
    resume_hint = None  # set once the folder is known; the folder goes if it holds nothing
    try:
        with claimed_folder(out_dir, holds_run, TUNE_RESUME, tune_holds_run) as out_dir:
            resume_hint = tune_resume_command(vars(args), out_dir)
            options["out"] = out_dir
            try:
                with failing_as(CommandError, (OSError, tune.StorageUnavailable)):
                    tune.tune(options, data=data)
            except SystemExit as stop:  # fastnn.tune's own one-line refusals
                if not isinstance(stop.code, str):
                    raise
                raise CommandError(stop.code.removeprefix("fastnn: ")) from None
    except tune.TuneStopped as stop:  # a signal, or the database stayed away
        print(f"\nfastnn tune: {stop}. Resume with: {resume_hint}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the search began: at once
        if resume_hint is None:
            raise
        print(f"\nfastnn tune: stopped at once; the study keeps every finished trial. "
              f"Resume with: {resume_hint}", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0
