"""The course notebook's ThreeLayerConvNet bar: one epoch of CIFAR-10 above 0.40 training accuracy.

    FASTNN_DATA=/path/to/data python benchmarks/notebook_bar.py [--profile]

ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3), Solver with
adam (learning_rate 1e-3), batch 50, one epoch over the 49,000 training
images, as the course's ConvolutionalNetworks notebook trains it (the target
is under 2 minutes). Prints the wall time of solver.train() from a fresh
model (Numba compilation included), the final training accuracy (Solver's
1000-image subsample) and the validation accuracy. --profile also times each
layer op of 50 training steps (after the epoch).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads  # noqa: E402


def profile_steps(model, X, y, steps=50, batch=50):
    """Seconds per op over `steps` loss(X, y) calls, by wrapping the layer functions."""
    import fastnn.classifiers.cnn as cnn
    from fastnn import layer_utils

    totals = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    # the ops the model calls (cnn) and those its affine-relu sandwich calls (layer_utils):
    # each binding is wrapped once, so no time counts twice
    wrapped = [(cnn, n) for n in ("conv_forward_fast", "conv_backward_fast",
                                  "max_pool_forward_fast", "max_pool_backward_fast",
                                  "relu_forward", "relu_backward", "affine_forward",
                                  "affine_backward")]
    wrapped += [(layer_utils, n) for n in ("affine_forward", "affine_backward", "relu_forward",
                                           "relu_backward")]
    saved = [(module, n, getattr(module, n)) for module, n in wrapped]
    try:
        for module, n, fn in saved:
            setattr(module, n, timed(n, fn))
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(steps):
            idx = rng.integers(0, X.shape[0], batch)
            model.loss(X[idx], y[idx])
        total = time.perf_counter() - start
    finally:
        for module, n, fn in saved:
            setattr(module, n, fn)
    totals["the rest (softmax, L2, batch gather)"] = total - sum(totals.values())
    return total / steps, {k: v / steps for k, v in totals.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="also time each op of a step")
    args = parser.parse_args(argv)
    from fastnn.classifiers import ThreeLayerConvNet
    from fastnn.solver import Solver

    data = workloads.load_data()
    shape = workloads.IMAGE_SHAPE
    arrays = {"X_train": data.X_train.reshape(-1, *shape), "y_train": data.y_train,
              "X_val": data.X_val.reshape(-1, *shape), "y_val": data.y_val}
    print(f"data: {data.source}; {arrays['X_train'].shape[0]} train / "
          f"{arrays['X_val'].shape[0]} val", flush=True)
    np.random.seed(0)
    start = time.perf_counter()
    model = ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3)
    solver = Solver(model, arrays, update_rule="adam", optim_config={"learning_rate": 1e-3},
                    batch_size=50, num_epochs=1, verbose=False, seed=0)
    solver.train()
    seconds = time.perf_counter() - start
    print(f"one epoch ({solver.iterations_per_epoch} steps of 50): {seconds:.1f} s "
          f"(model, Solver and Numba compilation included); train acc "
          f"{solver.train_acc_history[-1]:.3f}, val acc {solver.val_acc_history[-1]:.3f}; "
          f"bar: > 0.40 in under 120 s -> "
          f"{'met' if solver.train_acc_history[-1] > 0.40 and seconds < 120 else 'NOT met'}")
    if args.profile:
        per_step, ops = profile_steps(model, arrays["X_train"], arrays["y_train"])
        print(f"per training step (forward + backward, no update): {1e3 * per_step:.1f} ms")
        for name, s in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<24}{1e3 * s:8.2f} ms")


if __name__ == "__main__":
    main()
