"""The classic workflow: load CIFAR-10, build a FullyConnectedNet, train it with Solver, plot.

    python examples/fully_connected_net.py                 # numpy (CPU)
    python examples/fully_connected_net.py --backend cupy  # the same code on a GPU

Data come from $FASTNN_DATA (a folder holding cifar-10-batches-py) or are
downloaded to the cache. The plot goes to fully_connected_net.png.
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fastnn  # noqa: E402
from fastnn.classifiers import FullyConnectedNet  # noqa: E402
from fastnn.data import get_cifar10_data  # noqa: E402
from fastnn.solver import Solver  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--num-training", type=int, default=49000)
parser.add_argument("--num-validation", type=int, default=1000)
parser.add_argument("--num-test", type=int, default=1000)
parser.add_argument("--plot", default="fully_connected_net.png")
args = parser.parse_args()

fastnn.set_backend(args.backend)
data = get_cifar10_data(num_training=args.num_training, num_validation=args.num_validation,
                        num_test=args.num_test)
for name, value in data.items():
    print(name, value.shape)

model = FullyConnectedNet([512, 256], use_batchnorm=True, dropout=0.2, seed=0)
solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3},
                lr_decay=0.9, batch_size=256, num_epochs=args.epochs, print_every=100, seed=0)
solver.train()
print(f"best validation accuracy: {solver.best_val_acc:.3f}")
print(f"test accuracy: {solver.check_accuracy(data['X_test'], data['y_test']):.3f}")

fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7))
top.plot(solver.loss_history, ".", markersize=2)
top.set(xlabel="iteration", ylabel="loss", title="Training loss")
bottom.plot(solver.train_acc_history, "-o", label="train")
bottom.plot(solver.val_acc_history, "-o", label="val")
bottom.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
bottom.legend()
fig.tight_layout()
fig.savefig(args.plot)
print(f"saved {args.plot}")
