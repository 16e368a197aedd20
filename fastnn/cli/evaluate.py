"""`fastnn evaluate`: test accuracy and confusion matrix of a train or tune run folder."""
import os

import numpy as np

from fastnn.cli.common import TUNE_BEST_FORMAT, CommandError, UsageError, failing_as
from fastnn.cli.train import checked, extension_note, finished_metrics, read_run_config
from fastnn.files import read_json
from fastnn.runs import (FORMAT_VERSION, check_tta, complete, load_data, predict, setup_runtime,
                         tta_alias)

# what each test-time augmentation level averages, as the accuracy line says it
TTA_WORDS = {0: "flip averaging off", 1: "flip averaging on",
             2: "tta 2: averaged over mirror and 1-pixel translations"}


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
    given = {k: v for k, v in (("tta", args.tta), ("flip_test", args.flip_test)) if v is not None}
    given = tta_alias(given)
    if given:
        with failing_as(UsageError, ValueError):
            check_tta(given)
    tta = given.get("tta", config["tta"])
    if args.backend:
        config["backend"] = args.backend
    with failing_as(CommandError, (RuntimeError, ValueError), "backend: "):
        setup_runtime(config)
    with failing_as(CommandError, (RuntimeError, ValueError, OSError), "CIFAR-10 data: "):
        data = load_data(config, args.data)
    with failing_as(CommandError, (OSError, ValueError), "cannot evaluate: "):
        model = fastnn.load(model_path)
    with failing_as(CommandError, ValueError, f"cannot evaluate {model_path}: "):
        y_pred = fastnn.to_numpy(predict(model, data["X_test"], tta=tta))
    y_true = data["y_test"]
    accuracy = float((y_pred == y_true).mean())
    matrix = confusion_matrix(y_true, y_pred, len(CLASSES))
    width = max(len(c) for c in CLASSES)
    print(f"test accuracy {accuracy:.4f} on {len(y_true)} images "
          f"({TTA_WORDS[tta]})")
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for name, row in zip(CLASSES, matrix):
        print(f"{name:>{width}} " + " ".join(f"{v:5d}" for v in row))
    png = os.path.join(run_dir, "confusion.png")
    with failing_as(CommandError, OSError, "cannot write the plot: "):
        plots.plot_confusion_matrix(matrix, CLASSES, png)
    print(f"saved {png}")
    return 0
