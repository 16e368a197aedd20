"""Print the end-to-end comparison table: fastnn vs naive NumPy vs PyTorch (vs the GPU ones).

    python benchmarks/report.py [--workloads two_layer deep_bn convnet ...] [--epochs-timed 1]
                                [--repeat 1] [--backends numpy cupy] [--conv-images N]
                                [--contenders ...] [--random-data] [--no-memory] [--json PATH]

Everything runs in this one process, one contender after the other, each
warmed up for one epoch before it is timed. See trainers.py, machine.py (and
README.md) for what images/s and the share of the matrix-multiply ceiling mean. With
`convnet` among the workloads it also measures the peak RSS of training that
net (memory.py, one fresh process per contender).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import machine  # noqa: E402
import memory  # noqa: E402
import trainers  # noqa: E402
import workloads  # noqa: E402
from trainers import BASELINE, CONTENDERS, CONV_REFERENCES, REFERENCE  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                        default=list(WORKLOADS), help="which nets to train (default: all)")
    parser.add_argument("--epochs-timed", type=int, default=1,
                        help="epochs per timed run, after one warm-up epoch (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs per contender; the median is reported (default 1)")
    parser.add_argument("--backends", nargs="+", choices=["numpy", "cupy"], default=None,
                        help="fastnn backends (default: numpy, and cupy when a GPU is usable)")
    parser.add_argument("--contenders", nargs="+", choices=["fastnn", "naive", "torch"],
                        default=["fastnn", "naive", "torch"],
                        help="families to run (default: all); GPU ones only with a GPU")
    parser.add_argument("--random-data", action="store_true",
                        help="random data even when $FASTNN_DATA holds CIFAR-10")
    parser.add_argument("--sgemm-repeats", type=int, default=5,
                        help="timed 4096^3 products per library for the ceiling (default 5)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed run, wait up to SECONDS for other processes "
                             "to leave the CPUs (for shared machines; default 0: don't wait)")
    parser.add_argument("--conv-images", type=int, default=workloads.CONV_NUM_TRAIN, metavar="N",
                        help="training images per epoch of the conv workloads (default "
                             f"{workloads.CONV_NUM_TRAIN}; {workloads.NUM_TRAIN} for whole epochs)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-RSS measurement of training convnet")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.epochs_timed < 1 or args.repeat < 1 or args.sgemm_repeats < 1:
        parser.error("--epochs-timed, --repeat and --sgemm-repeats must be >= 1")
    if args.conv_images < 256:
        parser.error(f"--conv-images must be at least one batch (256), got {args.conv_images}")
    return args


def plan(args):
    """[(contender, skip reason or None)] in run order."""
    gpu = trainers.skip_reason("fastnn-cupy") is None
    backends = args.backends or (["numpy", "cupy"] if gpu else ["numpy"])
    wanted = []
    if "fastnn" in args.contenders:
        wanted += [f"fastnn-{b}" for b in backends]
    if "naive" in args.contenders:
        wanted += ["naive-numpy"] + (["naive-cupy"] if "cupy" in backends else [])
    if "torch" in args.contenders:
        wanted += ["torch-cpu", "torch-cpu-cl", "torch-cuda", "torch-cuda-graph"]
    order = [c for c in CONTENDERS if c in wanted]
    return [(c, trainers.skip_reason(c)) for c in order]


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def selected_workloads(args):
    """{name: workload} with the conv workloads' epoch size from --conv-images."""
    chosen = {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        if workload.kind == "conv":
            workload = dataclasses.replace(workload, num_train=args.conv_images)
        chosen[name] = workload
    return chosen


def header_lines(env, rates, data_source, args, sgemm_other=None):
    def rates_text(device):
        parts = [f"{lib} {gflops:.1f}" for lib, gflops in rates.get(device, {}).items()]
        top = machine.ceiling(rates, device)
        return ", ".join(parts) + f" GFLOP/s -> ceiling {top:.1f} GFLOP/s" if parts else "none"

    blas = "; ".join(f"{b['internal_api']} {b['version']} ({b['threading_layer']}, "
                     f"{b['num_threads']} threads, {b['architecture']})" for b in env["blas"])
    versions = [f"python {env['python']}", f"fastnn {env['fastnn']}", f"numpy {env['numpy']}",
                f"numba {env['numba']}", f"torch {env.get('torch', '-')}"]
    if env.get("cupy"):
        versions.append(f"cupy {env['cupy']}")
    threads = (f"threads: fastnn {env['fastnn_threads']} (Numba kernels serial, threading "
               f"layer {env['numba_threading_layer']}) | BLAS {blas or 'none found'}")
    if env.get("torch_threads") is not None:
        threads += f" | torch {env['torch_threads']}"
    note = machine.blas_override_note(env)
    return [
        "fastnn end-to-end benchmark",
        *([note] if note else []),
        " | ".join(versions),
        f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs) | GPU: {env['gpu'] or 'none'}",
        threads,
        f"sgemm {machine.SGEMM_N}^3 fp32, median of {args.sgemm_repeats}: "
        f"CPU {rates_text('cpu')}" + (f" | GPU {rates_text('gpu')}" if rates.get("gpu") else "")
        + (f" (others {100 * sgemm_other:.0f}%)" if sgemm_other is not None else ""),
        f"data: {data_source}; {workloads.NUM_TRAIN} train / {workloads.NUM_VAL} val",
        f"timing: {args.epochs_timed} epoch(s) per run x {args.repeat} run(s) (median) after "
        "1 warm-up epoch; accuracy checks (1000 train + 1000 val) included",
        *([f"conv workloads: an epoch is the first {min(args.conv_images, workloads.NUM_TRAIN)} "
           f"of the {workloads.NUM_TRAIN} training images (--conv-images); their warm-up epoch "
           "is 4 steps"]
          if any(WORKLOADS[n].kind == "conv" for n in args.workloads) else []),
    ]


def reference_of(workload, by_name):
    """(label, result) the 'vs' column divides by: torch-cpu, or the faster torch layout."""
    if workload.kind != "conv":
        return f"vs {REFERENCE}", by_name.get(REFERENCE)
    measured = [by_name[c] for c in CONV_REFERENCES if c in by_name]
    return "vs torch best", max(measured, key=lambda r: r["images_per_s"], default=None)


def table_lines(workload, results, rates, num_train=workloads.NUM_TRAIN):
    by_name = {r["contender"]: r for r in results if "images_per_s" in r}
    label, ref = reference_of(workload, by_name)
    what = f"{workload.flops_per_step() / 1e9:.2f} GFLOP of matmul/step"
    if workload.kind == "conv":
        what += f", {workload.forward_flops_per_image() / 1e6:.1f} MFLOP forward/image"
    lines = [f"{workload.name}: {workload.description} "
             f"({workload.iterations_per_epoch(num_train)} steps/epoch, {what})",
             f"  {'contender':<18}{'device':<8}{'images/s':>10}{label:>14}"
             f"{'vs naive':>10}{'ceiling':>9}{'others':>8}"]
    for r in results:
        if "images_per_s" not in r:
            lines.append(f"  {r['contender']:<18}{r['device']:<8}skipped: {r['skipped']}")
            continue
        naive = by_name.get(BASELINE[r["device"]])
        vs_ref = r["images_per_s"] / ref["images_per_s"] if ref else None
        vs_naive = r["images_per_s"] / naive["images_per_s"] if naive else None
        share = machine.share_of_ceiling(r, rates)
        other = r.get("other_cpu_share")
        r.update(vs_reference=vs_ref, reference=ref and ref["contender"], vs_naive=vs_naive,
                 share_of_ceiling=share)
        lines.append(f"  {r['contender']:<18}{r['device']:<8}{r['images_per_s']:>10.0f}"
                     f"{_fmt(vs_ref, '.2f', 'x'):>14}{_fmt(vs_naive, '.2f', 'x'):>10}"
                     f"{_fmt(None if share is None else 100 * share, '.1f', '%'):>9}"
                     f"{_fmt(None if other is None else 100 * other, '.0f', '%'):>8}")
    return lines


def memory_lines(results):
    lines = [f"peak RSS, {memory.DESCRIPTION}",
             f"  {'contender':<18}{'before MB':>10}{'peak MB':>10}{'growth MB':>11}"]
    for r in results:
        if "error" in r:
            lines.append(f"  {r['contender']:<18}{r['error']}")
            continue
        growth = r.get("peak_growth_mb")
        lines.append(f"  {r['contender']:<18}{r['rss_before_mb']:>10.0f}{r['peak_mb']:>10.0f}"
                     f"{_fmt(growth, '.0f'):>11}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    runs = plan(args)
    needs_torch = any(c.startswith("torch") and reason is None for c, reason in runs)
    gpu_runs = any(trainers.device_of(c) == "gpu" and reason is None for c, reason in runs)

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    log("loading data ...")
    data = workloads.load_data(random=args.random_data)
    log("measuring the sgemm ceiling ...")
    if args.wait_quiet:
        machine.wait_until_quiet(args.wait_quiet)
    with machine.OtherLoad() as sgemm_load:
        rates = machine.sgemm_rates(repeats=args.sgemm_repeats, include_torch=needs_torch,
                                    include_gpu=gpu_runs)
    tables = {}
    chosen = selected_workloads(args)
    for name, workload in chosen.items():
        results = []
        for contender, reason in runs:
            reason = reason or trainers.skip_reason(contender, workload)
            if reason:
                results.append({"contender": contender, "device": trainers.device_of(contender),
                                "workload": name, "skipped": reason})
                continue
            log(f"{name}: {contender} (1 warm-up epoch + {args.repeat} x "
                f"{args.epochs_timed} timed) ...")
            res = trainers.measure(contender, workload, data, epochs=args.epochs_timed,
                                   repeat=args.repeat, wait_quiet=args.wait_quiet)
            other = res["other_cpu_share"]
            log(f"  {res['images_per_s']:.0f} images/s"
                + (f" (other processes used {100 * other:.0f}% of the CPUs)" if other else ""))
            results.append(res)
        tables[name] = results

    memory_results = []
    if "convnet" in chosen and not args.no_memory:
        for contender, reason in runs:
            if reason is None and trainers.device_of(contender) == "cpu" and \
                    trainers.skip_reason(contender, chosen["convnet"]) is None:
                log(f"peak RSS: convnet, {contender} (a fresh process) ...")
                memory_results.append(memory.measure_in_subprocess("convnet", contender))

    env = machine.environment()  # after the runs: the thread pools are all started now
    lines = header_lines(env, rates, data.source, args, sgemm_load.share)
    for name, results in tables.items():
        lines += [""] + table_lines(chosen[name], results, rates, data.X_train.shape[0])
    if memory_results:
        lines += [""] + memory_lines(memory_results)
    busiest = max([r.get("other_cpu_share") or 0 for rs in tables.values() for r in rs]
                  + [sgemm_load.share or 0])
    if busiest > 0.05:
        lines += ["", f"WARNING: other processes used up to {100 * busiest:.0f}% of the CPUs during "
                      "a reported run; rerun on a quiet machine (--wait-quiet 300, --repeat 3) "
                      "before trusting the ratios."]
    lines += ["", "images/s: training images per second over the timed epoch(s), accuracy "
                  "checks included; vs naive: same device's naive baseline;",
              "vs torch best (conv workloads): images/s over the faster of torch-cpu (NCHW) and "
              "torch-cpu-cl (channels-last);",
              "ceiling: (matmul FLOPs a step must do / seconds per step) / the device's "
              "fastest sgemm above.",
              "others: the share of all CPUs that other processes (or VM steal) used during "
              "the (median) timed run; above a few % it measured a busy machine.",
              f"total wall time {time.perf_counter() - started:.0f} s"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "sgemm_gflops": rates,
                       "sgemm_other_cpu_share": sgemm_load.share, "data": data.source,
                       "args": vars(args), "workloads": tables, "memory": memory_results},
                      f, indent=2)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
