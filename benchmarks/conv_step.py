"""ConvNet training step: fastnn (numpy) against PyTorch CPU, NCHW and channels-last, one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv_step.py
        [--widths 32 64 128] [--stem-width 24] [--batch 256] [--steps 5] [--rounds 3]
        [--cpu-time] [--no-torch] [--recipe NAME]

One step = forward, backward and a plain SGD update of every parameter, on
the contract's ConvNet and the same net in PyTorch (no conv biases, batchnorm
after each conv, the first conv of a group followed by its 2x2 pool, a
global max, a linear layer). The contenders take turns for `--rounds`
rounds of `--steps` steps, so a busy machine slows them alike; the figures
are medians of all steps. `--cpu-time` times one thread per contender in
process CPU time: the work a step takes, which other processes on a busy
machine distort far less than wall time (but it hides how well each uses
two cores). Then come fastnn's peak resident set, its step memory
(tracemalloc: what the forward keeps for the backward, and the backward's
peak above that) and its time per op (timing wrappers around the layer
functions ConvNet calls). `--recipe NAME` times the ConvNet of a `fastnn train`
recipe instead (e.g. airbench94: its whitening stem set from the step's
random images, GELU, frozen batchnorm scales); a recipe with the whitening
stem races airbench's net in PyTorch (benchmarks/airbench_torch.py, float32,
the recipe's label smoothing). `--frozen-stem`: the steps after the stem's
bias stops learning (airbench's epoch 3 on), which skip the stem's backward.
"""
import argparse
import collections
import resource
import statistics
import time

import numpy as np

import fastnn
from fastnn import kernels, optim
from fastnn.classifiers import ConvNet
from fastnn.classifiers import conv_net as conv_net_module


def forward_mflop(widths, stem_width, input_dim=(3, 32, 32), stem="conv"):
    """Multiply-adds x 2 of the convs and the affine layer, per image (MFLOP); stem "whiten":
    a 2x2 conv without padding (one pixel less each way)."""
    channels, height, width = input_dim
    if stem == "whiten":
        height, width = height - 1, width - 1
        flop = 2 * 4 * channels * stem_width * height * width
    else:
        flop = 2 * 9 * channels * stem_width * height * width
    c_in = stem_width
    for w in widths:
        flop += 2 * 9 * c_in * w * height * width  # the group's first conv, before its pool
        height, width = height // 2, width // 2
        flop += 2 * 9 * w * w * height * width
        c_in = w
    return (flop + 2 * c_in * 10) / 1e6


def fastnn_step(model, X, y, lr=1e-3):
    configs = {name: {"learning_rate": lr} for name in model.params}

    def step():
        _, grads = model.loss(X, y)
        for name, w in model.params.items():
            if name in grads:  # not a frozen one (--frozen-stem)
                optim.fused_update("sgd", w, grads[name], configs[name])

    return step


def torch_net(widths, stem_width, channels=3, num_classes=10):
    import torch.nn as nn

    def conv(c_in, c_out):
        return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)

    layers = [conv(channels, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU()]
    c_in = stem_width
    for w in widths:
        layers += [conv(c_in, w), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.ReLU(),
                   conv(w, w), nn.BatchNorm2d(w), nn.ReLU()]
        c_in = w
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def torch_step(widths, stem_width, X, y, channels_last, lr=1e-3, airbench=False,
               frozen_stem=False, label_smoothing=0.0):
    """airbench: airbench's net (benchmarks/airbench_torch.py) instead of the contract's,
    its stem's bias frozen with frozen_stem."""
    import torch

    if airbench:
        import airbench_torch

        net = airbench_torch.make_net(widths, channels_last=False)
        airbench_torch.init_whitening_conv(net[0], torch.from_numpy(X))
        net[0].bias.requires_grad = not frozen_stem
    else:
        net = torch_net(widths, stem_width)
    inputs, labels = torch.from_numpy(X), torch.from_numpy(y)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(inputs), labels,
                                                 label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step, count, clock=time.perf_counter):
    times = []
    for _ in range(count):
        start = clock()
        step()
        times.append(clock() - start)
    return times


class OpTimer:
    """Wraps the layer functions ConvNet calls and sums their wall time per name."""

    NAMES = ("conv_forward_fast", "conv_backward_fast", "conv_pool_forward_fast",
             "conv_pool_backward_fast", "max_pool_forward_fast",
             "max_pool_backward_fast", "spatial_batchnorm_forward", "spatial_batchnorm_backward",
             "spatial_batchnorm_relu_forward", "spatial_batchnorm_relu_backward",
             "spatial_batchnorm_gelu_forward", "spatial_batchnorm_gelu_backward",
             "relu_forward", "relu_backward", "gelu_forward", "gelu_backward",
             "affine_forward", "affine_backward")

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.totals = collections.defaultdict(float)
        self.originals = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(conv_net_module, name, None)
            if original is None:
                continue
            self.originals[name] = original
            setattr(conv_net_module, name, self._timed(name, original))
        # ConvNet picks its batchnorm+activation layers from a table built at import
        self.activations = dict(conv_net_module._ACTIVATIONS)
        conv_net_module._ACTIVATIONS.update({
            key: tuple(self._timed(f.__name__, f) for f in layers)
            for key, layers in self.activations.items()})
        return self

    def _timed(self, name, function):
        def timed(*args, **kwargs):
            start = self.clock()
            result = function(*args, **kwargs)
            self.totals[name] += self.clock() - start
            return result
        return timed

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(conv_net_module, name, original)
        conv_net_module._ACTIVATIONS.update(self.activations)


def memory_profile(model, X, y):
    """(MB kept for the backward at the end of the forward, MB peak of the step above that).

    tracemalloc sees numpy's allocations; the end of the forward is the model's call of
    the shared loss (Classifier._loss_and_grads, with the scores).
    """
    import tracemalloc

    marks = {}
    original = model._loss_and_grads

    def marked(*args, **kwargs):
        marks["forward"] = tracemalloc.get_traced_memory()[0]
        return original(*args, **kwargs)

    model._loss_and_grads = marked
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model.loss(X, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        del model._loss_and_grads  # the class's method again
    return (marks["forward"] - base) / 2**20, (peak - marks["forward"]) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="group widths (32 64 128, or the recipe's)")
    parser.add_argument("--stem-width", type=int, default=24)
    parser.add_argument("--recipe", default=None,
                        help="time the ConvNet of this fastnn train recipe (a whitening-stem "
                             "recipe against airbench's net in PyTorch)")
    parser.add_argument("--frozen-stem", action="store_true",
                        help="with a whitening-stem recipe: its bias frozen (airbench's epochs "
                             "3 on): no stem backward")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time fastnn only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread each and process CPU time instead of wall time: the "
                             "work per step, which a busy machine distorts far less")
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        fastnn.set_num_threads(1)

    import os
    import threadpoolctl

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stem = "conv"
    if args.recipe:
        from fastnn import runs

        given = {"recipe": args.recipe, **({"widths": args.widths} if args.widths else {})}
        config = runs.new_config(given)
        if config["model"] != "convnet":
            parser.error(f"--recipe {args.recipe} trains --model {config['model']}, not a ConvNet")
        model = runs.build_model(config, {"X_train": X})
        args.widths, args.stem_width = config["widths"], config["stem_width"]
        stem = config.get("stem") or "conv"
        if stem != "whiten":
            args.no_torch = True  # only airbench's net is ported (benchmarks/airbench_torch.py)
        if args.frozen_stem:
            if stem != "whiten":
                parser.error("--frozen-stem needs a recipe with the whitening stem")
            model.frozen = frozenset({"b1"})
    else:
        args.widths = args.widths or [32, 64, 128]
        model = ConvNet(widths=args.widths, stem_width=args.stem_width, seed=0)
    contenders = {"fastnn numpy": fastnn_step(model, X, y)}
    rss_fastnn = None
    if not args.no_torch:
        import torch

        if args.cpu_time:
            torch.set_num_threads(1)
        port = dict(airbench=stem == "whiten", frozen_stem=args.frozen_stem,
                    label_smoothing=model.label_smoothing if stem == "whiten" else 0.0)
        contenders["torch NCHW"] = torch_step(args.widths, args.stem_width, X, y, False, **port)
        contenders["torch channels-last"] = torch_step(args.widths, args.stem_width, X, y, True,
                                                       **port)
    for name, step in contenders.items():  # warm up: compile, allocate, fill caches
        time_steps(step, 2)
        if name == "fastnn numpy":
            rss_fastnn = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, step in contenders.items():
            times[name] += time_steps(step, args.steps, clock)

    blas = [(p["internal_api"], p.get("architecture"), p["num_threads"])
            for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    mflop = forward_mflop(args.widths, args.stem_width, stem=stem)
    recipe = f" of --recipe {args.recipe}" if args.recipe else ""
    print(f"ConvNet{recipe}(widths={tuple(args.widths)}, stem_width={args.stem_width}), "
          f"batch {args.batch}, "
          f"{mflop:.1f} MFLOP forward per image; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; numpy BLAS {blas}; fastnn "
          f"{fastnn.__version__}" + ("" if args.no_torch else
                                     f"; torch {torch.__version__}, {torch.get_num_threads()} threads"))
    medians = {name: statistics.median(t) for name, t in times.items()}
    best_torch = min((m for n, m in medians.items() if n.startswith("torch")), default=None)
    if args.cpu_time:
        print("CPU time of one thread per contender (ms/step and img/s per CPU-second):")
    print(f"{'contender':<22}{'ms/step':>10}{'img/s':>10}{'GFLOP/s':>10}{'vs best torch':>15}")
    for name, median in medians.items():
        ratio = "" if best_torch is None else f"{best_torch / median:.2f}x"
        print(f"{name:<22}{1e3 * median:>10.1f}{args.batch / median:>10.0f}"
              f"{3 * mflop * args.batch / median / 1e3:>10.0f}{ratio:>15}")
    print(f"fastnn peak RSS after warm-up: {rss_fastnn / 1024:.0f} MB "
          f"({(rss_fastnn - rss_start) / 1024:.0f} MB above the start, Numba's compiler included)")
    kept, scratch = memory_profile(model, X, y)
    print(f"fastnn step memory (tracemalloc): {kept:.0f} MB kept for the backward, peak "
          f"{scratch:.0f} MB above that during the backward (gradients and scratch)")

    step = contenders["fastnn numpy"]
    with OpTimer(clock) as timer:
        count = args.steps * args.rounds
        total = sum(time_steps(step, count, clock)) / count
    print(f"fastnn per-op time per step (of {1e3 * total:.1f} ms with the timers):")
    for name, seconds in sorted(timer.totals.items(), key=lambda item: -item[1]):
        print(f"  {name:<34}{1e3 * seconds / count:>8.1f} ms")
    other = total - sum(timer.totals.values()) / count
    print(f"  {'other (loss, update, glue)':<34}{1e3 * other:>8.1f} ms")


if __name__ == "__main__":
    main()
