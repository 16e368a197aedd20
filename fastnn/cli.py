"""The `fastnn` command: train, evaluate and tune classifiers on CIFAR-10.

    fastnn train [--out DIR] [options]     train, write a run folder
    fastnn train --resume DIR              continue a stopped run
    fastnn evaluate DIR                    test accuracy and confusion matrix
    fastnn tune [options]                  hyperparameter search (fastnn.tune)

A run folder holds config.json, metrics.json, loss.png, accuracy.png,
weights.png, model.npz (the best-validation model, `fastnn.load` reads it)
and checkpoint.npz (the Solver's state after the last epoch, for --resume).
The folder's state is what these files say together: no metrics.json, a run
still training (or stopped: --resume continues it); metrics.json "finished"
with as many epochs as config.json asks for, a finished run (--resume says so
and changes nothing; --resume --epochs N extends it); "finished" with fewer,
an extension under way or stopped, while model.npz and metrics.json still hold
the finished run's results (evaluate and --resume say so).

Failure paths: every check that can run before training (flags, output
folder, backend, data) runs before the run folder is claimed, so a failed
start leaves no trace. A run folder is held by one process at a time
(fastnn.files.lock_folder). Predictable mistakes end with one line on stderr
and exit status 2 (usage) or 1 (anything else); `--debug` or FASTNN_DEBUG=1
shows the traceback. Ctrl-C and SIGTERM save a checkpoint (exit 130 / 143);
a diverging loss saves the best model and metrics.json (exit 1).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np

from fastnn import models, optim
from fastnn.files import FolderInUse, lock_folder, read_json, write_json
from fastnn.runs import (CONFIG_FORMAT, FORMAT_VERSION, LEGACY_DEFAULTS,
                         METRICS_FORMAT, RESUMABLE, RULE_OPTIONS, build_model,
                         build_solver, check_config, complete, load_data,
                         new_config, not_applicable, option_name, predict, recorded,
                         setup_runtime)

START_TIME = time.perf_counter()  # budgets count from the command's start
TUNE_BEST_FORMAT = "fastnn-tune-best"  # fastnn.tune's best.json (kept here: no import of tune)


# the argparse keywords of a model option's flag, by its kind (fastnn.models.Option)
OPTION_KINDS = {"int": {"type": int}, "float": {"type": float}, "ints": {"type": int, "nargs": "+"},
                "bool": {"action": argparse.BooleanOptionalAction}}
# the models fastnn tune searches, its default first
TUNE_MODELS = sorted(models.TUNABLE, key=lambda name: name != models.DEFAULT_TUNE_MODEL)


class UsageError(Exception):
    """A flag or its value is wrong: one line, exit status 2."""


class CommandError(Exception):
    """A predictable failure (a folder, the data, a file): one line, exit status 1."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastnn", description="Train, evaluate and tune classifiers on CIFAR-10 "
        "(fastnn train / evaluate / tune). Set FASTNN_DEBUG=1 (or pass --debug) for tracebacks.")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=False,
                       help="show the full traceback of an error (also: FASTNN_DEBUG=1)")

    train = commands.add_parser(
        "train", help="train a classifier on CIFAR-10", parents=[debug],
        argument_default=argparse.SUPPRESS,
        description="Train a classifier on CIFAR-10 into a run folder (config.json, metrics.json, "
                    "model.npz, checkpoint.npz, plots). Flags that do not apply to the chosen "
                    "--model or --update-rule are refused.")
    add = train.add_argument
    add("--config", dest="config_file", metavar="FILE",
        help="start from the configuration in FILE (a run's config.json, or a tune folder's "
             "best.json); flags override it")
    abouts = [model.about for model in models.MODELS.values()]
    add("--model", choices=list(models.MODELS),
        help=f"{', '.join(abouts[:-1])} or {abouts[-1]}; the other defaults are that model's "
             f"recipe: {models.DEFAULT_MODEL}'s below, fc's after a slash "
             f"({models.DEFAULT_MODEL})")
    for key, option in models.OPTIONS.items():  # the models' own options
        add(option_name(key), help=option.help, **OPTION_KINDS[option.kind])
    add("--reg", type=float, help="L2 regularisation strength (5e-4 / 0)")
    add("--update-rule", choices=list(RULE_OPTIONS), help="update rule (sgd_nesterov / adam)")
    add("--lr", "--learning-rate", dest="learning_rate", type=float,
        help="learning rate (0.2 / 1e-3)")
    for key, text in rule_option_help().items():  # the update rules' hyperparameters
        add(option_name(key), type=float, help=text)
    add("--lr-schedule", choices=["none", "step", "cosine", "onecycle"],
        help="learning-rate schedule (onecycle / none); multiplies with --lr-decay")
    add("--augment", action=argparse.BooleanOptionalAction,
        help="random horizontal flips of the training images (on / off)")
    add("--crop-padding", type=int,
        help="with --augment, also random translations by up to this many pixels, "
             "zeros shifted in (2 / 0)")
    add("--flip-test", action=argparse.BooleanOptionalAction,
        help="test accuracy from the mean of each image's and its mirror's scores (on / off)")
    add("--lr-decay", type=float, help="learning-rate factor after each epoch (1 / 0.9)")
    add("--epochs", type=int, help="epochs (11 / 15)")
    add("--batch-size", type=int, help="minibatch size (256)")
    add("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (GPU) (numpy)")
    add("--seed", type=int, help="seed for weights, batches and dropout (0)")
    add("--data", help="folder holding cifar-10-batches-py or cifar-10-python.tar.gz "
                       "(default: $FASTNN_DATA, else ~/.cache/fastnn, downloaded there)")
    add("--num-training", type=int, help="training images (49000)")
    add("--num-validation", type=int, help="validation images (1000)")
    add("--num-test", type=int, help="test images (10000)")
    add("--threads", type=int, help="CPU threads (all cores)")
    add("--print-every", type=int, help="read the loss every N iterations (50)")
    add("--out", help="run folder (default: a new one under runs/)")
    add("--resume", metavar="DIR", help="continue the stopped run in DIR")

    tune = commands.add_parser(
        "tune", help="search hyperparameters with Optuna", parents=[debug],
        description="Search hyperparameters on CIFAR-10 with Optuna, --parallel trials trained "
                    "together as one stack; writes best.json, trials.csv, best_model.npz and "
                    "plots to the run folder (retrain the best: fastnn train --config "
                    "DIR/best.json).")
    add = tune.add_argument
    searches = {name: models.MODELS[name].search for name in TUNE_MODELS}
    add("--model", choices=TUNE_MODELS, default=TUNE_MODELS[0],
        help="; ".join(search.about for search in searches.values())
             + f" ({TUNE_MODELS[0]})")
    for search in searches.values():  # model options the trials take from a flag
        for key, text in search.flags.items():
            add(option_name(key), default=None, help=text,
                **OPTION_KINDS[models.OPTIONS[key].kind])
    add("--trials", type=int, default=60, help="trials in the study, all workers together (60)")
    add("--budget-minutes", type=float, default=None,
        help="stop in time to finish within M minutes of the command's start (none)")
    add("--parallel", type=int, default=None,
        help="fc trials trained together as one stack (2; more pays for small nets and on "
             "GPUs); convnet trials train one at a time")
    add("--epochs", type=int, default=None,
        help="epochs per trial (fc 30; convnet the recipe's 11; a resumed study keeps its own "
             "and refuses another)")
    add("--final-epochs", type=int, default=0,
        help="retrain the best configuration for this many epochs at the end (0: no)")
    add("--crop-padding", type=int, default=None,
        help="trials that augment (fc: a searched choice; convnet: always) also translate "
             "by up to this many pixels (fc 0; convnet 2)")
    add("--lr-schedule", choices=["none", "step", "cosine", "onecycle"], default="onecycle",
        help="learning-rate schedule of every trial (onecycle)")
    add("--storage", default=None,
        help="study storage shared by workers: postgresql+psycopg://USER@HOST:PORT/DB (the "
             "password from ~/.pgpass or PGPASSWORD, not the command line, where ps shows it), "
             "sqlite:///PATH or journal:PATH (default: $FASTNN_STORAGE, else sqlite in the run "
             "folder)")
    add("--study-name", default="fastnn", help="study name in the storage (fastnn)")
    add("--heartbeat-seconds", type=int, default=10,
        help="a worker records a heartbeat for its running trials this often (10)")
    add("--grace-seconds", type=int, default=60,
        help="a trial with no heartbeat for this long is lost: FAIL, and run again (60)")
    add("--outage-seconds", type=int, default=60,
        help="a database server that stops answering is waited for this long (retrying with "
             "backoff) before the worker stops (60)")
    add("--resume", action="store_true", help="continue the study in the storage")
    add("--out", default=None, help="run folder (default: a new one under runs/)")
    add("--seed", type=int, default=0, help="sampler and training seed (0)")
    add("--backend", choices=["numpy", "cupy"], default="numpy",
        help="numpy (CPU) or cupy (GPU) (numpy)")
    add("--data", default=None,
        help="folder holding cifar-10-batches-py or cifar-10-python.tar.gz "
             "(default: $FASTNN_DATA, else ~/.cache/fastnn)")
    add("--num-training", type=int, default=49000, help="training images per trial (49000)")
    add("--num-validation", type=int, default=1000,
        help="validation images that score the trials (1000)")
    add("--num-test", type=int, default=10000, help="test images for the best model (10000)")
    add("--threads", type=int, default=None, help="CPU threads (all cores)")

    evaluate = commands.add_parser(
        "evaluate", help="test accuracy and confusion matrix of a run", parents=[debug],
        description="Test accuracy and confusion matrix (printed, and DIR/confusion.png) of the "
                    "model in a train or tune run folder.")
    evaluate.add_argument("run_dir", help="a run folder of `fastnn train` or `fastnn tune`")
    evaluate.add_argument("--data", help="folder holding cifar-10-batches-py")
    evaluate.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                          help="numpy (CPU) or cupy (GPU) (the run's)")
    evaluate.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                          help="average each image's scores with its mirror's (default: as the "
                               "run was trained to test)")
    return parser


# -- helpers -----------------------------------------------------------------
def rule_option_help():
    """{hyperparameter: its flag's help} for the update rules' options (fastnn.optim's table):
    the rules that take it and their defaults, e.g. "adam/adamw beta1 (0.9)"."""
    rules, defaults = {}, {}
    for rule, keys in RULE_OPTIONS.items():
        for key in keys:
            rules.setdefault(key, []).append(rule)
            defaults.setdefault(key, {})[f"{optim.DEFAULTS[rule][key]:g}"] = None
    return {key: f"{'/'.join(rules[key])} {key.replace('_', ' ')} ({' / '.join(defaults[key])})"
            for key in rules}


def one_line(exc):
    """An exception's message on one line (OSError: 'reason: file')."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, FolderInUse):
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def failing_as(error, kinds, prefix="", hint=""):
    """Turn the exceptions `kinds` raised in the block into `error` (one line)."""
    try:
        yield
    except kinds as exc:
        raise error(prefix + one_line(exc) + hint) from exc


def new_run_dir():
    """Create and return a new folder runs/YYYYmmdd-HHMMSS[-N] (never one another run took)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in range(1, 10**6):
        path = os.path.join("runs", stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise CommandError("no free run folder name under runs/")


def check_new_folder(out_dir, holds_run, resume="fastnn train --resume {}"):
    """Raise CommandError when `out_dir` cannot become a new run folder; nothing is created.

    holds_run(folder) says whether an existing folder already holds a run;
    `resume` is the command that continues one.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CommandError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if os.path.isdir(out_dir):
        if holds_run(out_dir):
            raise CommandError(f"{out_dir} already holds a run; continue it with "
                               f"`{resume.format(out_dir)}`, or choose another --out "
                               "(nothing was overwritten)")
        existing = out_dir
    else:
        existing = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise CommandError(f"cannot create --out {out_dir}: {existing} is a file, not a "
                               "folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write in {existing} ({unwritable_reason(existing)}); "
                           "choose another --out")


def unwritable_reason(folder):
    """Why os.access says `folder` is not writable: a read-only mount, or its permissions."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        pass
    return "permission denied"


@contextlib.contextmanager
def claimed_folder(out_dir, holds_run, resume="fastnn train --resume {}", has_results=None):
    """Create (if needed) and lock a new run folder for the block; yields its path.

    Refused when another process holds it or when it holds a run by now (a
    process that started at the same instant won). A folder made here is
    removed again when the block fails before it holds a run (before
    `has_results(folder)`, when given: holds_run's test at the start may differ).
    """
    has_results = has_results or holds_run
    created = False
    try:
        if out_dir is None:
            out_dir, created = new_run_dir(), True
        elif not os.path.isdir(out_dir):
            os.makedirs(out_dir)
            created = True
    except FileExistsError:
        pass  # another process made it first: the lock decides
    except OSError as exc:
        raise CommandError(f"cannot create the run folder {out_dir or 'under runs/'}: "
                           f"{one_line(exc)}") from exc
    with failing_as(CommandError, FolderInUse), lock_folder(out_dir):
        try:
            if holds_run(out_dir):
                raise CommandError(f"{out_dir} already holds a run (another process started "
                                   f"it); continue it with `{resume.format(out_dir)}`, "
                                   "or choose another --out")
            yield out_dir
        except BaseException:
            if created and not has_results(out_dir):  # only while holding the lock
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


def train_holds_run(folder):
    return os.path.exists(os.path.join(folder, "config.json"))


def read_config_file(path):
    """A run configuration from a run's config.json or a tune folder's best.json, checked."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except OSError as exc:
        raise UsageError(f"--config {path}: {one_line(exc)}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) \
            else ""
        raise UsageError(f"--config {path} is not a fastnn configuration: it is not JSON{where}; "
                         "pass a run's config.json or a tune folder's best.json") from None
    try:
        if isinstance(raw, dict) and raw.get("format") == TUNE_BEST_FORMAT:
            config = read_json(path, TUNE_BEST_FORMAT, FORMAT_VERSION)["config"]
        else:
            config = read_json(path, CONFIG_FORMAT, FORMAT_VERSION)
        # a stored configuration without a key means that key's value before it existed
        config = {"model": LEGACY_DEFAULTS["model"], **config}
        check_config(new_config(config))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--config {path}: {one_line(exc)}") from exc
    return config


def checked(config, path):
    """`config`, read from `path`, checked as a new run's configuration is (check_config);
    ValueError naming the file."""
    try:
        check_config(config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config


def read_run_config(path):
    """A run folder's config.json, checked; ValueError naming the file."""
    return checked(read_json(path, CONFIG_FORMAT, FORMAT_VERSION), path)


def finished_metrics(run_dir):
    """The metrics.json of a run folder whose run finished, with its epoch count as
    "trained_epochs"; None when it has none or its run did not finish (it diverged)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    metrics = read_json(path, METRICS_FORMAT, FORMAT_VERSION)
    if metrics.get("status") != "finished":
        return None
    epochs = metrics.get("epochs")  # one accuracy check before training, one after each epoch
    if not isinstance(epochs, list) or not epochs or "test_acc" not in metrics:
        raise ValueError(f"{path} is damaged: it holds no epochs or test accuracy")
    return {**metrics, "trained_epochs": len(epochs) - 1}


def checkpoint_epoch(run_dir):
    """The epoch a run folder's checkpoint.npz is at (None: none, or unreadable)."""
    from fastnn.serialization import read_checkpoint

    try:
        return int(read_checkpoint(os.path.join(run_dir, "checkpoint.npz"))[1]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extension_note(run_dir, finished, epochs):
    """A line on a folder whose `finished` run (finished_metrics) is being extended to `epochs`."""
    at = checkpoint_epoch(run_dir)
    return (f"note: {os.path.join(run_dir, 'model.npz')} is from the finished "
            f"{finished['trained_epochs']}-epoch run (test acc {finished['test_acc']:.4f}); the "
            f"folder's extension to {epochs} epochs has not finished"
            + ("" if at is None else f" (its checkpoint is at epoch {at})")
            + f": if it stopped, resume it with fastnn train --resume {run_dir}")


def at_chance(accuracy, num_images, num_classes):
    """Whether `accuracy` on `num_images` is not measurably above guessing (1 / num_classes):
    within 3 standard errors of it, or 2 points where that is less."""
    chance = 1 / num_classes
    return accuracy < chance + max(0.02, 3 * math.sqrt(chance * (1 - chance) / num_images))


def check_flags(config, given):
    """UsageError naming a bad value or the given flags that do not apply under `config`."""
    with failing_as(UsageError, ValueError):
        check_config(config)
    unused = not_applicable(config, given)
    if unused:
        raise UsageError("; ".join(f"{option_name(k)} does not apply ({why})"
                                   for k, why in unused.items())
                         + ("; drop them" if len(unused) > 1 else "; drop it"))


def prepare(config):
    """Backend, data, model and Solver for `config`, or CommandError saying what is wrong."""
    with failing_as(CommandError, (RuntimeError, ValueError), "backend: "):
        setup_runtime(config)
    with failing_as(CommandError, (RuntimeError, ValueError, OSError), "CIFAR-10 data: "):
        data = load_data(config)
    with failing_as(CommandError, ValueError):
        model = build_model(config)
        solver = build_solver(model, data, config)
    return data, model, solver


# -- fastnn train ------------------------------------------------------------
def train_command(args):
    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "out", "resume", "debug", "config_file")}
    if given.get("lr_schedule") == "none":
        given["lr_schedule"] = None
    if "resume" in args:
        return resume_run(args, given)
    base = {}
    if "config_file" in args:
        base = read_config_file(args.config_file)
    # a new run: its model's recipe (convnet unless told), then the file, then the flags
    config = new_config({**base, **given})
    check_flags(config, given)
    out_dir = getattr(args, "out", None)
    if out_dir is not None:
        check_new_folder(out_dir, train_holds_run)
    data, model, solver = prepare(config)
    with claimed_folder(out_dir, train_holds_run) as out_dir:
        with failing_as(CommandError, OSError, "cannot write config.json: "):
            write_json(os.path.join(out_dir, "config.json"), recorded(config), CONFIG_FORMAT,
                       FORMAT_VERSION)
        solver.checkpoint_path = os.path.join(out_dir, "checkpoint.npz")
        return run_training(solver, model, data, config, out_dir)


def resume_run(args, given):
    out_dir = args.resume
    if "out" in args and os.path.abspath(args.out) != os.path.abspath(out_dir):
        raise UsageError(f"--out does not apply with --resume: the run continues in its folder "
                         f"{out_dir} (drop --out {args.out})")
    if "config_file" in args:
        raise UsageError("--config does not apply with --resume: the run continues as its "
                         "config.json says (drop --config)")
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isdir(out_dir):
        raise CommandError(f"cannot resume: there is no folder {out_dir}")
    if not os.path.exists(config_path):
        raise CommandError(f"cannot resume: {config_path} does not exist (is this a folder "
                           f"written by `fastnn train`? start a run with --out {out_dir})")
    unchanged = f" (nothing in {out_dir} was changed)"
    with failing_as(CommandError, (OSError, ValueError), "cannot resume: ", unchanged):
        stored = read_run_config(config_path)
    fixed = sorted(set(given) - RESUMABLE)
    if fixed:
        raise UsageError(f"--resume continues a run as configured; it cannot change "
                         f"{', '.join(option_name(k) for k in fixed)} (only "
                         f"{', '.join(option_name(k) for k in sorted(RESUMABLE))})")
    # a run made before a key existed keeps that key's old value (LEGACY_DEFAULTS)
    config = complete({**stored, **given})
    check_flags(config, given)
    epochs = config["epochs"]
    with failing_as(CommandError, FolderInUse), lock_folder(out_dir):
        with failing_as(CommandError, (OSError, ValueError), "cannot resume: ", unchanged):
            finished = finished_metrics(out_dir)
        if finished is not None and epochs <= finished["trained_epochs"]:
            trained = finished["trained_epochs"]
            if epochs < trained:
                raise UsageError(f"--epochs {epochs} is below the {trained} epochs {out_dir} "
                                 "has trained already")
            print(f"{out_dir} has finished ({trained} of {trained} epochs, test acc "
                  f"{finished['test_acc']:.4f}, best val acc {finished['best_val_acc']:.4f}); "
                  f"nothing to do, nothing changed. To train it longer: fastnn train --resume "
                  f"{out_dir} --epochs N (N > {trained})")
            if stored["epochs"] > trained:  # config.json asks for more: a stopped extension
                print(extension_note(out_dir, finished, stored["epochs"]))
            return 0
        data, model, solver = prepare(config)
        checkpoint = os.path.join(out_dir, "checkpoint.npz")
        solver.checkpoint_path = checkpoint
        if os.path.exists(checkpoint):
            with failing_as(CommandError, (OSError, ValueError), "cannot resume: ", unchanged):
                solver.load_checkpoint(checkpoint)
            if solver.epoch > epochs:
                raise UsageError(f"--epochs {epochs} is below the {solver.epoch} "
                                 f"epochs {out_dir} has trained already")
            extending = "" if finished is None else (
                f", extending the finished {finished['trained_epochs']}-epoch run (test acc "
                f"{finished['test_acc']:.4f}): its model.npz and metrics.json stay until the "
                "extension ends")
            print(f"resuming {out_dir} at epoch {solver.epoch} of {epochs}{extending}")
        else:  # it stopped in its first epoch: nothing to continue, so it starts over
            print(f"{out_dir} has no checkpoint yet (it stopped in its first epoch): "
                  "training it from the start")
        with failing_as(CommandError, OSError, "cannot write config.json: "):
            write_json(config_path, recorded(config), CONFIG_FORMAT, FORMAT_VERSION)
        return run_training(solver, model, data, config, out_dir)


def run_training(solver, model, data, config, out_dir):
    """Train, then write the model, metrics and plots; returns the exit status."""
    from fastnn.solver import TrainingInterrupted

    start = time.perf_counter()
    resume_hint = f"fastnn train --resume {out_dir}"
    failure = None
    try:
        with failing_as(CommandError, OSError, "training stopped: ",
                        f"; the last complete checkpoint is kept: fix it, then {resume_hint}"), \
                np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported below
            solver.train()
    except TrainingInterrupted as stop:
        print(f"\nfastnn: {stop}. Resume with: {resume_hint}", file=sys.stderr)
        return 128 + int(stop.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, perhaps mid-step
        print(f"\nfastnn: stopped at once; {out_dir} keeps the checkpoint of the last finished "
              f"epoch (if any). Resume with: {resume_hint}", file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # model.params already hold the best seen
        failure = one_line(exc)
    with failing_as(CommandError, OSError, "cannot write the results: ",
                    f"; free the space or fix the folder, then {resume_hint}"):
        metrics = write_results(solver, model, data, config, out_dir, start, failure)
    if failure:
        print(f"fastnn train: the run diverged: {failure} Saved the best model (val acc "
              f"{solver.best_val_acc:.4f}, test acc {metrics['test_acc']:.4f}) to "
              f"{os.path.join(out_dir, 'model.npz')} and the failure to metrics.json.",
              file=sys.stderr)
        return 1
    from fastnn.data import CLASSES

    chance = ""
    if at_chance(metrics["test_acc"], metrics["num_test"], len(CLASSES)):
        chance = (f"; that is chance level (1/{len(CLASSES)} for {len(CLASSES)} classes): the "
                  "run learned nothing measurable; train it longer (--epochs) or on more images "
                  "(--num-training)")
    print(f"best val acc {solver.best_val_acc:.4f}; test acc {metrics['test_acc']:.4f} on "
          f"{metrics['num_test']} images ({metrics['test_acc_plain']:.4f} without, "
          f"{metrics['test_acc_flip']:.4f} with flip averaging); {metrics['seconds']:.0f} s; "
          f"run folder {out_dir}{chance}")
    return 0


def write_results(solver, model, data, config, out_dir, start, failure):
    """model.npz, metrics.json (with `failure`, None when the run finished) and the plots."""
    import fastnn
    from fastnn import plots
    from fastnn.inference import plain_and_flip_accuracy

    # both accuracies from one batched pass; test_acc is the one the run asks for. It runs
    # first so that model.npz and metrics.json are replaced together (an extended run's
    # files say the same number of epochs even when a kill comes during the test pass)
    test_plain, test_flip = plain_and_flip_accuracy(model, data["X_test"], data["y_test"])
    fastnn.save(model, os.path.join(out_dir, "model.npz"))
    test_acc = test_flip if config["flip_test"] else test_plain
    per_epoch = [{"epoch": e, "train_acc": tr, "val_acc": va}
                 for e, (tr, va) in enumerate(zip(solver.train_acc_history, solver.val_acc_history))]
    metrics = {"status": "diverged" if failure else "finished", "failure": failure,
               "best_val_acc": solver.best_val_acc, "test_acc": test_acc,
               "flip_test": config["flip_test"], "test_acc_plain": test_plain,
               "test_acc_flip": test_flip,
               "num_test": int(data["X_test"].shape[0]), "epochs": per_epoch,
               "loss_history": [v if np.isfinite(v) else None for v in solver.loss_history],
               "seconds": round(time.perf_counter() - start, 2)}
    write_json(os.path.join(out_dir, "metrics.json"), metrics, METRICS_FORMAT, FORMAT_VERSION)
    finite_loss = [v for v in solver.loss_history if np.isfinite(v)]
    plots.plot_loss(finite_loss, os.path.join(out_dir, "loss.png"), solver.iterations_per_epoch)
    plots.plot_accuracy(solver.train_acc_history, solver.val_acc_history,
                        os.path.join(out_dir, "accuracy.png"))
    # the first weight's columns are image templates when it is an affine map of the
    # pixels; a conv model's first weight holds its first layer's filters
    first = next((model.params[k] for k, role in model.param_roles.items() if role == "weight"),
                 None)
    if first is not None and (first.ndim == 4 or first.ndim == 2
                              and first.shape[0] == 3 * 32 * 32):
        plots.plot_first_layer_weights(fastnn.to_numpy(first),
                                       os.path.join(out_dir, "weights.png"))
    return metrics


# -- fastnn evaluate ---------------------------------------------------------
def confusion_matrix(y_true, y_pred, num_classes):
    """counts[i, j]: images of class i predicted as j (host numpy arrays in)."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def evaluate_command(args):
    import fastnn
    from fastnn import plots
    from fastnn.data import CLASSES

    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise CommandError(f"cannot evaluate: there is no folder {run_dir}")
    config_path = os.path.join(run_dir, "config.json")
    model_path = os.path.join(run_dir, "model.npz")
    best_path = os.path.join(run_dir, "best.json")
    finished = None
    with failing_as(CommandError, (OSError, ValueError), "cannot evaluate: "):
        if os.path.exists(best_path):  # a `fastnn tune` folder
            config = checked(read_json(best_path, TUNE_BEST_FORMAT, FORMAT_VERSION)["config"],
                             best_path)
            model_path = os.path.join(run_dir, "best_model.npz")
        elif os.path.exists(config_path):
            config = read_run_config(config_path)
            finished = finished_metrics(run_dir)
        else:
            raise CommandError(f"cannot evaluate: {run_dir} holds no run (no config.json or "
                               "best.json); train one with fastnn train --out DIR")
    if not os.path.exists(model_path):
        raise CommandError(f"cannot evaluate: {model_path} does not exist (the run has not "
                           f"finished; resume it: fastnn train --resume {run_dir})")
    config = complete(config)
    if finished is not None and finished["trained_epochs"] < config["epochs"]:
        print(extension_note(run_dir, finished, config["epochs"]))
    flip = config["flip_test"] if args.flip_test is None else args.flip_test
    if args.backend:
        config["backend"] = args.backend
    with failing_as(CommandError, (RuntimeError, ValueError), "backend: "):
        setup_runtime(config)
    with failing_as(CommandError, (RuntimeError, ValueError, OSError), "CIFAR-10 data: "):
        data = load_data(config, args.data)
    with failing_as(CommandError, (OSError, ValueError), "cannot evaluate: "):
        model = fastnn.load(model_path)
    with failing_as(CommandError, ValueError, f"cannot evaluate {model_path}: "):
        y_pred = fastnn.to_numpy(predict(model, data["X_test"], flip=flip))
    y_true = data["y_test"]
    accuracy = float((y_pred == y_true).mean())
    matrix = confusion_matrix(y_true, y_pred, len(CLASSES))
    width = max(len(c) for c in CLASSES)
    print(f"test accuracy {accuracy:.4f} on {len(y_true)} images "
          f"(flip averaging {'on' if flip else 'off'})")
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for name, row in zip(CLASSES, matrix):
        print(f"{name:>{width}} " + " ".join(f"{v:5d}" for v in row))
    png = os.path.join(run_dir, "confusion.png")
    with failing_as(CommandError, OSError, "cannot write the plot: "):
        plots.plot_confusion_matrix(matrix, CLASSES, png)
    print(f"saved {png}")
    return 0


# -- fastnn tune -------------------------------------------------------------
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
    from fastnn.tune import model_defaults

    options.update({k: v for k, v in model_defaults(options["model"]).items()
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


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "tune": tune_command}


def main(argv=None):
    """Run the command in argv; returns its exit status (argparse exits with 2 on bad flags)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FASTNN_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if debug:
            raise
        print(f"fastnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fastnn evaluate DIR | head`: the reader has all it wanted
        # stdout's unflushed rest would raise again at exit: send it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CommandError, OSError) as exc:  # OSError: the file system said no
        if debug:
            raise
        print(f"fastnn {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nfastnn {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
