"""A two-layer net on CIFAR-10, trained with the classic Solver and plain SGD.

    python examples/two_layer_net.py [--backend cupy]

Then it shows what the first layer learned: examples/two_layer_weights.png.
"""
import argparse

import fastnn
from fastnn import plots
from fastnn.classifiers import TwoLayerNet
from fastnn.data import get_cifar10_data
from fastnn.solver import Solver

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--num-training", type=int, default=49000)
parser.add_argument("--num-validation", type=int, default=1000)
parser.add_argument("--num-test", type=int, default=1000)
parser.add_argument("--plot", default="two_layer_weights.png")
args = parser.parse_args()

fastnn.set_backend(args.backend)
data = get_cifar10_data(num_training=args.num_training, num_validation=args.num_validation,
                        num_test=args.num_test)
model = TwoLayerNet(hidden_dim=100, weight_scale=1e-3, reg=0.05)
solver = Solver(model, data, update_rule="sgd", lr_decay=0.95, batch_size=200,
                optim_config={"learning_rate": 1e-3}, num_epochs=args.epochs, print_every=100,
                seed=0)
solver.train()
print(f"best validation accuracy: {solver.best_val_acc:.3f}")
print(f"test accuracy: {solver.check_accuracy(data['X_test'], data['y_test']):.3f}")
plots.plot_first_layer_weights(fastnn.to_numpy(model.params["W1"]), args.plot)
print(f"saved {args.plot}")
