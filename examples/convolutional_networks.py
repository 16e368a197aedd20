"""The ConvolutionalNetworks workflow: overfit a ThreeLayerConvNet on 100 images, then train a ConvNet.

    python examples/convolutional_networks.py                 # numpy (CPU)
    python examples/convolutional_networks.py --backend cupy  # the same code on a GPU

Part 1, the sanity check: a ThreeLayerConvNet trained with Solver on 100
training images should overfit them (training accuracy near 1, validation
accuracy far below). Part 2: fastnn's ConvNet trained with Solver on the main
job's recipe (`fastnn train`'s defaults: Nesterov SGD on a one-cycle schedule,
flips and 2-pixel translations, label smoothing 0.2, 11 epochs of batch 256);
on all of CIFAR-10 it reaches about 0.85 test accuracy with flip averaging
(12-23 minutes on a 2-core CPU). --epochs, --num-training and --widths make
smaller runs; the recipe is tuned for 11 epochs of all the data, and a much
shorter run of it can stay near chance accuracy.

Data come from $FASTNN_DATA (a folder holding cifar-10-batches-py) or are
downloaded to the cache. The plots go to convolutional_networks_overfit.png
and convolutional_networks.png (--plot-prefix changes the name).
"""
import argparse
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fastnn  # noqa: E402
from fastnn.classifiers import ConvNet, ThreeLayerConvNet  # noqa: E402
from fastnn.data import get_cifar10_data  # noqa: E402
from fastnn.solver import Solver  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
parser.add_argument("--epochs", type=int, default=11, help="the ConvNet's epochs (part 2)")
parser.add_argument("--num-training", type=int, default=49000)
parser.add_argument("--num-validation", type=int, default=1000)
parser.add_argument("--num-test", type=int, default=1000)
parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128],
                    help="the ConvNet's group widths (smaller: faster)")
parser.add_argument("--stem-width", type=int, default=24)
parser.add_argument("--plot-prefix", default="convolutional_networks")
args = parser.parse_args()


def plot_training(solver, title, path):
    """The notebook's two panels: the loss per iteration, the accuracies per epoch."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7))
    top.plot(solver.loss_history, "o", markersize=3, alpha=0.5)
    top.set(xlabel="iteration", ylabel="loss", title=f"{title}: training loss")
    epochs = np.arange(len(solver.val_acc_history))
    bottom.plot(epochs, solver.train_acc_history, "-o", label="train")
    bottom.plot(epochs, solver.val_acc_history, "-o", label="val")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.set(xlabel="epoch (0: before training)", ylabel="accuracy", title=f"{title}: accuracy")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"saved {path}")


fastnn.set_backend(args.backend)
data = get_cifar10_data(num_training=args.num_training, num_validation=args.num_validation,
                        num_test=args.num_test)
for name, value in data.items():
    print(name, value.shape)

# -- Part 1: sanity check, overfit small data ----------------------------------
np.random.seed(231)  # ThreeLayerConvNet draws its weights from np.random, as in the course
num_train = 100
small_data = {
    "X_train": data["X_train"][:num_train], "y_train": data["y_train"][:num_train],
    "X_val": data["X_val"], "y_val": data["y_val"],
}
model = ThreeLayerConvNet(weight_scale=1e-2)
solver = Solver(model, small_data, num_epochs=15, batch_size=50, update_rule="adam",
                optim_config={"learning_rate": 1e-3}, verbose=True, print_every=1, seed=0)
solver.train()
print(f"overfit: train accuracy {solver.train_acc_history[-1]:.3f}, "
      f"val accuracy {solver.val_acc_history[-1]:.3f}")
plot_training(solver, "ThreeLayerConvNet on 100 images", f"{args.plot_prefix}_overfit.png")

# -- Part 2: train a ConvNet ---------------------------------------------------
model = ConvNet(widths=args.widths, stem_width=args.stem_width, reg=5e-4,
                label_smoothing=0.2, seed=0)
solver = Solver(model, data, update_rule="sgd_nesterov",
                optim_config={"learning_rate": 0.2, "momentum": 0.9},
                lr_schedule="onecycle", augment={"flip": True, "crop_padding": 2},
                batch_size=256, num_epochs=args.epochs, print_every=50, seed=0)
start = time.perf_counter()
solver.train()
print(f"trained in {time.perf_counter() - start:.0f} s")
print(f"best validation accuracy: {solver.best_val_acc:.3f}")
X_test, y_test = data["X_test"], data["y_test"]
print(f"test accuracy: {solver.check_accuracy(X_test, y_test):.3f}, "
      f"with flip averaging: {solver.check_accuracy(X_test, y_test, flip=True):.3f}")
plot_training(solver, "ConvNet", f"{args.plot_prefix}.png")
