"""The `fastnn` command: `fastnn train` and `fastnn evaluate` on CIFAR-10.

    fastnn train [--out DIR] [options]     train, write a run folder
    fastnn train --resume DIR              continue a stopped run
    fastnn evaluate DIR                    test accuracy and confusion matrix

A run folder holds config.json, metrics.json, loss.png, accuracy.png,
weights.png, model.npz (the best-validation model, `fastnn.load` reads it)
and checkpoint.npz (the Solver's state after the last epoch, for --resume).
"""
import argparse
import datetime
import os
import sys
import time

import numpy as np

START_TIME = time.perf_counter()  # budgets count from the command's start

from fastnn.files import read_json, write_json
from fastnn.runs import (CONFIG_FORMAT, FORMAT_VERSION, METRICS_FORMAT, RECIPES, RESUMABLE,
                         RULE_OPTIONS, build_model, build_solver, complete, defaults_for,
                         load_data, new_config, predict, setup_runtime)


def build_parser():
    parser = argparse.ArgumentParser(prog="fastnn", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a classifier on CIFAR-10",
                                argument_default=argparse.SUPPRESS)
    add = train.add_argument
    add("--model", choices=list(RECIPES),
        help="convnet (the main job), fc (fully connected), two_layer (TwoLayerNet) or "
             "three_layer_conv (ThreeLayerConvNet); the other defaults are that model's "
             "recipe: convnet's below, fc's in parentheses after a slash (convnet)")
    add("--widths", type=int, nargs="+", help="convnet channels of each group (32 64 128)")
    add("--stem-width", type=int, help="convnet channels of the stem (24)")
    add("--label-smoothing", type=float,
        help="convnet: mix the one-hot targets with the uniform distribution (0.2)")
    add("--hidden-dims", type=int, nargs="+", help="fc hidden sizes (1024 512 256)")
    add("--hidden-dim", type=int, help="two_layer / three_layer_conv hidden size (100 / 500)")
    add("--num-filters", type=int, help="three_layer_conv filters (32)")
    add("--filter-size", type=int, help="three_layer_conv filter size (7)")
    add("--batchnorm", action=argparse.BooleanOptionalAction, help="fc batchnorm (on)")
    add("--dropout", type=float, help="fc dropout: probability of dropping a unit (0.3)")
    add("--reg", type=float, help="L2 regularisation strength (5e-4 / 0)")
    add("--weight-scale", type=float,
        help="fc, two_layer, three_layer_conv: std of the initial weights (1e-2; "
             "three_layer_conv 1e-3); convnet draws He-style weights")
    add("--update-rule", choices=list(RULE_OPTIONS), help="update rule (sgd_nesterov / adam)")
    add("--lr", "--learning-rate", dest="learning_rate", type=float,
        help="learning rate (0.2 / 1e-3)")
    add("--momentum", type=float, help="sgd_momentum / sgd_nesterov momentum (0.9)")
    add("--beta1", type=float, help="adam beta1 (0.9)")
    add("--beta2", type=float, help="adam beta2 (0.999)")
    add("--decay-rate", type=float, help="rmsprop decay rate (0.99)")
    add("--epsilon", type=float, help="rmsprop/adam epsilon (1e-8)")
    add("--weight-decay", type=float, help="adamw decoupled weight decay (1e-2)")
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
    add("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (GPU)")
    add("--seed", type=int, help="seed for weights, batches and dropout (0)")
    add("--data", help="folder holding cifar-10-batches-py (default: $FASTNN_DATA or the cache)")
    add("--num-training", type=int, help="training images (49000)")
    add("--num-validation", type=int, help="validation images (1000)")
    add("--num-test", type=int, help="test images (10000)")
    add("--threads", type=int, help="CPU threads (all cores)")
    add("--print-every", type=int, help="read the loss every N iterations (50)")
    add("--out", help="run folder (default: a new one under runs/)")
    add("--resume", metavar="DIR", help="continue the stopped run in DIR")

    tune = commands.add_parser("tune", help="search hyperparameters with Optuna")
    add = tune.add_argument
    add("--model", choices=["fc", "convnet"], default="fc",
        help="fc: fully connected nets, K trials at once as a stack; convnet: ConvNets around "
             "the main job's recipe (learning rate, reg, momentum, label smoothing), one "
             "trial at a time (fc)")
    add("--widths", type=int, nargs="+", default=None,
        help="convnet trials' group widths (the recipe's 32 64 128)")
    add("--stem-width", type=int, default=None, help="convnet trials' stem width (24)")
    add("--trials", type=int, default=60, help="trials in the study, all workers together (60)")
    add("--budget-minutes", type=float, default=None,
        help="stop in time to finish within M minutes of the command's start (none)")
    add("--parallel", type=int, default=None,
        help="fc trials trained together as one stack (2; more pays for small nets and on "
             "GPUs); convnet trials train one at a time")
    add("--epochs", type=int, default=None,
        help="epochs per trial (fc 30; convnet the recipe's 11)")
    add("--final-epochs", type=int, default=0,
        help="retrain the best configuration for this many epochs at the end (0: no)")
    add("--crop-padding", type=int, default=None,
        help="trials that augment (fc: a searched choice; convnet: always) also translate "
             "by up to this many pixels (fc 0; convnet 2)")
    add("--lr-schedule", choices=["none", "step", "cosine", "onecycle"], default="onecycle",
        help="learning-rate schedule of every trial (onecycle)")
    add("--storage", default=None,
        help="Optuna storage URL shared by workers (default: sqlite in the run folder)")
    add("--study-name", default="fastnn", help="study name in the storage (fastnn)")
    add("--resume", action="store_true", help="continue the study in the storage")
    add("--out", default=None, help="run folder (default: a new one under runs/)")
    add("--seed", type=int, default=0, help="sampler and training seed (0)")
    add("--backend", choices=["numpy", "cupy"], default="numpy")
    add("--data", default=None, help="folder holding cifar-10-batches-py")
    add("--num-training", type=int, default=49000)
    add("--num-validation", type=int, default=1000)
    add("--num-test", type=int, default=10000)
    add("--threads", type=int, default=None)

    evaluate = commands.add_parser("evaluate", help="test accuracy and confusion matrix of a run")
    evaluate.add_argument("run_dir", help="a run folder written by `fastnn train`")
    evaluate.add_argument("--data", help="folder holding cifar-10-batches-py")
    evaluate.add_argument("--backend", choices=["numpy", "cupy"], default=None)
    evaluate.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                          help="average each image's scores with its mirror's (default: as the "
                               "run was trained to test)")
    return parser


# -- helpers -----------------------------------------------------------------
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
    raise RuntimeError("no free run folder name under runs/")


# -- commands ----------------------------------------------------------------
def train_command(args):
    import fastnn
    from fastnn import plots
    from fastnn.inference import plain_and_flip_accuracy
    from fastnn.solver import TrainingInterrupted

    given = {k: v for k, v in vars(args).items() if k not in ("command", "out", "resume")}
    if given.get("lr_schedule") == "none":
        given["lr_schedule"] = None
    if "resume" in args:
        out_dir = args.resume
        config_path = os.path.join(out_dir, "config.json")
        if not os.path.exists(config_path):
            raise SystemExit(f"fastnn: cannot resume: {config_path} does not exist "
                             "(is this a folder written by `fastnn train`?)")
        # a run made before a key existed keeps that key's old value (LEGACY_DEFAULTS)
        config = complete(read_json(config_path, CONFIG_FORMAT, FORMAT_VERSION))
        fixed = sorted(set(given) - RESUMABLE)
        if fixed:
            raise SystemExit(f"fastnn: --resume continues a run as configured; it cannot change "
                             f"{fixed} (only {sorted(RESUMABLE)})")
        config.update(given)
    else:
        config = new_config(given)
        out_dir = getattr(args, "out", None) or new_run_dir()
        if os.path.exists(os.path.join(out_dir, "config.json")):
            raise SystemExit(f"fastnn: {out_dir} already holds a run (config.json); continue it "
                             f"with `fastnn train --resume {out_dir}`, or choose another --out "
                             "(nothing was overwritten)")
        os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "config.json"), config, CONFIG_FORMAT, FORMAT_VERSION)

    start = time.perf_counter()
    setup_runtime(config)
    data = load_data(config)
    model = build_model(config)
    solver = build_solver(model, data, config, out_dir)
    if "resume" in args:
        solver.load_checkpoint(os.path.join(out_dir, "checkpoint.npz"))
        print(f"resuming {out_dir} at epoch {solver.epoch} of {config['epochs']}")
    try:
        solver.train()
    except TrainingInterrupted as stop:
        print(f"\nfastnn: {stop}. Resume with: fastnn train --resume {out_dir}", file=sys.stderr)
        return 130

    fastnn.save(model, os.path.join(out_dir, "model.npz"))
    # both accuracies from one batched pass; test_acc is the one the run asks for
    test_plain, test_flip = plain_and_flip_accuracy(model, data["X_test"], data["y_test"])
    test_acc = test_flip if config["flip_test"] else test_plain
    per_epoch = [{"epoch": e, "train_acc": tr, "val_acc": va}
                 for e, (tr, va) in enumerate(zip(solver.train_acc_history, solver.val_acc_history))]
    metrics = {"best_val_acc": solver.best_val_acc, "test_acc": test_acc,
               "flip_test": config["flip_test"], "test_acc_plain": test_plain,
               "test_acc_flip": test_flip,
               "num_test": int(data["X_test"].shape[0]), "epochs": per_epoch,
               "loss_history": solver.loss_history,
               "seconds": round(time.perf_counter() - start, 2)}
    write_json(os.path.join(out_dir, "metrics.json"), metrics, METRICS_FORMAT, FORMAT_VERSION)
    plots.plot_loss(solver.loss_history, os.path.join(out_dir, "loss.png"),
                    solver.iterations_per_epoch)
    plots.plot_accuracy(solver.train_acc_history, solver.val_acc_history,
                        os.path.join(out_dir, "accuracy.png"))
    plots.plot_first_layer_weights(fastnn.to_numpy(model.params["W1"]),
                                   os.path.join(out_dir, "weights.png"))
    print(f"best val acc {solver.best_val_acc:.4f}; test acc {test_acc:.4f} on "
          f"{metrics['num_test']} images ({test_plain:.4f} without, {test_flip:.4f} with flip "
          f"averaging); {metrics['seconds']:.0f} s; run folder {out_dir}")
    return 0


def confusion_matrix(y_true, y_pred, num_classes):
    """counts[i, j]: images of class i predicted as j (host numpy arrays in)."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def evaluate_command(args):
    import fastnn
    from fastnn import plots
    from fastnn.data import CLASSES

    config_path = os.path.join(args.run_dir, "config.json")
    model_path = os.path.join(args.run_dir, "model.npz")
    for path in (config_path, model_path):
        if not os.path.exists(path):
            raise SystemExit(f"fastnn: cannot evaluate: {path} does not exist "
                             "(train first: fastnn train --out DIR)")
    config = complete(read_json(config_path, CONFIG_FORMAT, FORMAT_VERSION))
    flip = config["flip_test"] if args.flip_test is None else args.flip_test
    if args.backend:
        config["backend"] = args.backend
    setup_runtime(config)
    data = load_data(config, args.data)
    model = fastnn.load(model_path)
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
    png = os.path.join(args.run_dir, "confusion.png")
    plots.plot_confusion_matrix(matrix, CLASSES, png)
    print(f"saved {png}")
    return 0


def tune_command(args):
    from fastnn import tune

    options = {**vars(args), "start": START_TIME, "final_seconds": 0,
               "worker": f"{os.uname().nodename}:{os.getpid()}"}
    if options["resume"] and options["out"] is None and options["storage"] is None:
        raise SystemExit("fastnn: --resume needs --out DIR (the earlier run folder) or --storage")
    if options["model"] == "convnet":
        if (options["parallel"] or 1) != 1:
            raise SystemExit(f"fastnn: convnet trials train one at a time; --parallel "
                             f"{options['parallel']} applies to --model fc")
        recipe = defaults_for("convnet")
        fill = {"parallel": 1, "epochs": recipe["epochs"], "crop_padding": recipe["crop_padding"]}
    else:
        for name in ("widths", "stem_width"):
            if options[name] is not None:
                raise SystemExit(f"fastnn: --{name.replace('_', '-')} applies to tune --model "
                                 "convnet, not fc")
        fill = {"parallel": 2, "epochs": 30, "crop_padding": 0}
    options.update({k: v for k, v in fill.items() if options[k] is None})
    options["out"] = options["out"] or new_run_dir()
    for name in ("trials", "parallel", "epochs"):
        if options[name] < 1:
            raise SystemExit(f"fastnn: --{name} must be >= 1, got {options[name]}")
    tune.tune(options)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"train": train_command, "evaluate": evaluate_command, "tune": tune_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
