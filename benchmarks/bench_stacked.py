"""Stacked training throughput: K two-layer nets as one stack vs K Solvers one after another.

    python benchmarks/bench_stacked.py [--members 16] [--backend numpy] [--random-data]
                                       [--repeat 1] [--wait-quiet SECONDS] [--profile]

The workload is workloads.py's two_layer (3072-100-10, batch 200, adam) on
its 49,000 / 1,000 train/val split (real CIFAR-10 when $FASTNN_DATA holds
it, else random data). K members with different learning rates, reg and
seeds; one epoch of each is timed, after a warm-up epoch, for

- stacked: StackedSolver on a StackedFullyConnectedNet of the K members;
- one after another: fastnn's Solver on each member's FullyConnectedNet,
  the K epochs back to back (the same work: the same steps and the same
  accuracy checks as the stacked run, K times over).

model-images/s = K * images per epoch / seconds. The share of the sgemm
ceiling is (FLOPs per stacked step / seconds per step) / the 4096^3 float32
sgemm rate measured in this run (workloads.py's definitions: the first
layer has no input gradient; seconds per step include the accuracy
checks). "steps only" times the training steps alone (no accuracy checks).
The CPU share other processes took during each timed run is printed: a
large one means the numbers measured a busy machine. With --repeat, the
contenders run alternately and the fastest run of each is reported.
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import fastnn  # noqa: E402
import machine  # noqa: E402
import workloads  # noqa: E402
from machine import OtherLoad, synchronize  # noqa: E402

WORKLOAD = workloads.WORKLOADS["two_layer"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=16, help="K, the stack size (default 16)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--random-data", action="store_true",
                        help="random data even when $FASTNN_DATA holds CIFAR-10")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed run, wait up to this long for other processes "
                             "to leave the CPUs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs of each contender, alternating; the fastest is reported "
                             "(default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of 50 stacked training steps")
    return parser.parse_args(argv)


def member_settings(k_count):
    """K members: log-spread learning rates and reg, the two-layer weight scale, own seeds."""
    rng = np.random.default_rng(0)
    members = [{"seed": 100 + k, "weight_scale": WORKLOAD.net.weight_scale,
                "reg": float(10 ** rng.uniform(-6, -1)), "dropout": 0.0} for k in range(k_count)]
    configs = [{"learning_rate": float(10 ** rng.uniform(-4, -2.5))} for _ in range(k_count)]
    return members, configs


SOLVER_OPTIONS = dict(update_rule="adam", batch_size=WORKLOAD.batch_size, num_epochs=1,
                      num_train_samples=workloads.NUM_TRAIN_SAMPLES)


def stacked_run(members, configs, data, device):
    """(seconds of one epoch of the whole stack after a warm-up epoch, the warmed solver)."""
    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    stack = StackedFullyConnectedNet(list(WORKLOAD.net.hidden_dims), members)
    StackedSolver(stack, data, optim_configs=configs, seed=0, **SOLVER_OPTIONS).train()
    solver = StackedSolver(stack, data, optim_configs=configs, seed=1, **SOLVER_OPTIONS)
    return timed(solver.train, device), solver


def sequential_run(members, configs, data, device):
    """Seconds of one epoch of each member's own Solver, one after another (after a warm-up)."""
    from fastnn.classifiers import FullyConnectedNet
    from fastnn.solver import Solver

    def net(member):
        return FullyConnectedNet(list(WORKLOAD.net.hidden_dims), **member)

    Solver(net(members[0]), data, optim_config=dict(configs[0]), verbose=False, seed=0,
           **SOLVER_OPTIONS).train()
    solvers = [Solver(net(m), data, optim_config=dict(c), verbose=False, seed=1,
                      print_every=10**9, **SOLVER_OPTIONS) for m, c in zip(members, configs)]

    def train_all():
        for solver in solvers:
            solver.train()

    return timed(train_all, device)


def fastest_run(runs):
    """The (seconds, other-process CPU share) of the fastest of [(seconds, share)].

    Other processes on the cores only ever add time, so the fastest run is
    the one that measured the code most nearly alone; every run is printed.
    """
    return min(runs, key=lambda run: run[0])


def timed(fn, device):
    synchronize(device)
    with OtherLoad() as load:
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    timed.other_share = load.share
    return seconds


def steps_only(solver, device, steps=50):
    """Seconds per training step of a warmed StackedSolver, accuracy checks excluded."""
    solver._step()  # noqa: SLF001 (the benchmark times the step itself)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        solver._step()  # noqa: SLF001
        solver._t += 1  # noqa: SLF001
    solver._pending_losses.clear()  # noqa: SLF001
    synchronize(device)
    return (time.perf_counter() - start) / steps


def sgemm_rate(backend):
    rates = machine.sgemm_rates(repeats=5, include_torch=False,
                                include_gpu=backend == "cupy")
    return machine.ceiling(rates, "gpu" if backend == "cupy" else "cpu")


def main(argv=None):
    args = parse_args(argv)
    fastnn.set_backend(args.backend)
    device = "gpu" if args.backend == "cupy" else "cpu"
    env = machine.environment()
    print(f"fastnn {env['fastnn']}, numpy {env['numpy']}, numba {env['numba']}, "
          f"threads {env['fastnn_threads']}, cpu {env['cpu']} ({env['logical_cpus']} logical)"
          + (f", gpu {env['gpu']}" if env.get("gpu") else ""))
    for blas in env["blas"]:
        print(f"BLAS: {blas['internal_api']} {blas['version']} ({blas['num_threads']} threads, "
              f"{blas['architecture']})")
    note = machine.blas_override_note(env)
    if note:
        print(note)
    data_set = workloads.load_data(random=args.random_data)
    data = data_set.arrays(args.backend)
    print(f"data: {data_set.source}")
    k_count = args.members
    members, configs = member_settings(k_count)
    images = WORKLOAD.images_per_epoch(data_set.X_train.shape[0])
    steps = WORKLOAD.iterations_per_epoch(data_set.X_train.shape[0])
    flops_per_step = k_count * WORKLOAD.flops_per_step()

    def quiet():
        if args.wait_quiet:
            machine.wait_until_quiet(args.wait_quiet)

    quiet()
    rate_before = sgemm_rate(args.backend)
    stacked, sequential = [], []
    for _ in range(args.repeat):
        quiet()
        seconds, solver = stacked_run(members, configs, data, device)
        stacked.append((seconds, timed.other_share))
        quiet()
        sequential.append((sequential_run(members, configs, data, device), timed.other_share))
    quiet()
    step_s = steps_only(solver, device)
    rate_after = sgemm_rate(args.backend)
    rate = max(rate_before, rate_after)
    stacked_s, stacked_other = fastest_run(stacked)
    sequential_s, sequential_other = fastest_run(sequential)

    def row(name, seconds, per_step, other):
        gflops = flops_per_step / per_step / 1e9
        other = "n/a" if other is None else f"{100 * other:.0f}%"
        print(f"{name:34s} {seconds:9.2f} {k_count * images / seconds:15,.0f} {gflops:9.1f} "
              f"{100 * gflops / rate:13.1f}% {other:>8s}")

    print(f"\ntwo_layer ({WORKLOAD.description}), K={k_count} members, {steps} steps per epoch, "
          f"{flops_per_step / 1e9:.2f} GFLOP per stacked step")
    print(f"sgemm 4096^3 float32: {rate_before:.1f} GFLOP/s before, {rate_after:.1f} after "
          f"(ceiling: {rate:.1f})")
    print(f"{'':34s} {'seconds':>9s} {'model-images/s':>15s} {'GFLOP/s':>9s} "
          f"{'share of sgemm':>14s} {'others':>8s}")
    if args.repeat > 1:
        for name, runs in (("stacked", stacked), ("one after another", sequential)):
            print(f"{name} runs: " + ", ".join(
                f"{s:.2f} s (others {'n/a' if o is None else f'{100 * o:.0f}%'})" for s, o in runs))
    row("stacked, one epoch", stacked_s, stacked_s / steps, stacked_other)
    row("stacked, steps only", step_s * steps, step_s, None)
    row(f"{k_count} Solvers one after another", sequential_s, sequential_s / steps,
        sequential_other)
    share = flops_per_step * steps / stacked_s / 1e9 / rate
    print(f"\nstacked speed-up over one after another: {sequential_s / stacked_s:.2f}x "
          f"(target >= 1.3x); share of the sgemm ceiling {100 * share:.0f}% (target >= 65%)")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        steps_only(solver, device, steps=50)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return {"stacked_s": stacked_s, "sequential_s": sequential_s, "step_s": step_s,
            "sgemm": rate, "flops_per_step": flops_per_step, "steps": steps}


if __name__ == "__main__":
    main()
