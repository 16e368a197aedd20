"""`fastnn train`: a new run folder, or --resume of a stopped one; the results it writes."""
import json
import math
import os
import sys
import time

import numpy as np

from fastnn.cli.common import (TUNE_BEST_FORMAT, CommandError, UsageError, check_new_folder,
                               claimed_folder, failing_as, one_line)
from fastnn.files import FolderInUse, lock_folder, read_json, write_json
from fastnn.runs import (CONFIG_FORMAT, FORMAT_VERSION, LEGACY_DEFAULTS, METRICS_FORMAT, RESUMABLE,
                         build_model, build_solver, check_config, complete, load_data, new_config,
                         not_applicable, option_name, recorded, setup_runtime, tta_alias)


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
        if "tta" not in config and "flip_test" in config:  # written before tta: as flip_test
            config = tta_alias(config)
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
    """Backend, data, model and Solver for `config`, or CommandError saying what is wrong.
    A model that starts from the training images gets them (runs.build_model), on resume too:
    the checkpoint replaces what they set, but the Solver's first forward pass (its label
    check) runs before that, and airbench94's placeholder whitening filters overflow there
    (batchnorm's running variance starts at zero, its eps is 1e-12)."""
    with failing_as(CommandError, (RuntimeError, ValueError), "backend: "):
        setup_runtime(config)
    with failing_as(CommandError, (RuntimeError, ValueError, OSError), "CIFAR-10 data: "):
        data = load_data(config)
    with failing_as(CommandError, ValueError):
        model = build_model(config, data)
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
    # a new run: its recipe (--recipe, else --model's, else the main job's), then the file,
    # then the flags (--flip-test and --tta each replacing both of the file's)
    with failing_as(UsageError, ValueError):
        config = new_config({**base, **tta_alias(given)})
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
    level2 = f", {metrics['test_acc_tta']:.4f} with tta 2" if metrics["tta"] == 2 else ""
    print(f"best val acc {solver.best_val_acc:.4f}; test acc {metrics['test_acc']:.4f} on "
          f"{metrics['num_test']} images ({metrics['test_acc_plain']:.4f} without, "
          f"{metrics['test_acc_flip']:.4f} with flip averaging{level2}); "
          f"{metrics['seconds']:.0f} s; run folder {out_dir}{chance}")
    return 0


def write_results(solver, model, data, config, out_dir, start, failure):
    """model.npz, metrics.json (with `failure`, None when the run finished) and the plots."""
    import fastnn
    from fastnn import plots
    from fastnn.inference import tta_accuracies

    # the accuracy at each test-time augmentation level up to the run's (at least flip
    # averaging, for old readers) from one batched pass; test_acc is the one the run asks for.
    # It runs first so that model.npz and metrics.json are replaced together (an extended
    # run's files say the same number of epochs even when a kill comes during the test pass)
    tta = config["tta"]
    by_level = tta_accuracies(model, data["X_test"], data["y_test"], tta=max(tta, 1))
    fastnn.save(model, os.path.join(out_dir, "model.npz"))
    test_plain, test_flip, test_acc = by_level[0], by_level[1], by_level[tta]
    per_epoch = [{"epoch": e, "train_acc": tr, "val_acc": va}
                 for e, (tr, va) in enumerate(zip(solver.train_acc_history, solver.val_acc_history))]
    metrics = {"status": "diverged" if failure else "finished", "failure": failure,
               "best_val_acc": solver.best_val_acc, "test_acc": test_acc,
               "flip_test": config["flip_test"], "test_acc_plain": test_plain,
               "test_acc_flip": test_flip, "tta": tta, "test_acc_tta": test_acc,
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
