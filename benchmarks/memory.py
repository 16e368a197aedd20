"""Peak RSS of training a workload, one contender per fresh process.

    python benchmarks/memory.py convnet fastnn-numpy [--steps 8]

Prints one JSON object. The child trains `steps` steps on random images
(train set = steps * batch, 256 validation images, so the data set stays
small), one untimed warm-up epoch first (compilation, optimizer state), then
one more epoch: `rss_before_mb` is the RSS after the warm-up, `peak_mb` the
highest RSS during the second epoch (the kernel's VmHWM, reset after the
warm-up through /proc/self/clear_refs), `peak_growth_mb` their difference:
what one training step holds at its peak (activations kept for backward,
gradients, scratch). `process_peak_mb` is the peak of the whole process
(ru_maxrss: imports, compilation and the warm-up included). Linux only.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 8
DESCRIPTION = (f"ConvNet(widths=(32, 64, 128), stem_width=24), batch 256, {STEPS} steps of "
               "random images, each contender in a fresh process (memory.py): before = RSS after "
               "a warm-up epoch, peak = highest RSS in the next epoch, growth = peak - before")


def _status_mb(field):
    """VmRSS / VmHWM of this process in MB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(workload_name, contender, steps=STEPS):
    sys.path.insert(0, HERE)
    import dataclasses

    import numpy as np

    import trainers
    import workloads

    workload = workloads.WORKLOADS[workload_name]
    n = steps * workload.batch_size
    if workload.kind == "conv":
        workload = dataclasses.replace(workload, num_train=n)
    rng = np.random.default_rng(0)
    size = workloads.INPUT_DIM
    data = workloads.Dataset(rng.standard_normal((n, size), dtype=np.float32),
                             rng.integers(0, workloads.NUM_CLASSES, n),
                             rng.standard_normal((256, size), dtype=np.float32),
                             rng.integers(0, workloads.NUM_CLASSES, 256), source="random")
    trainer = trainers.make_trainer(contender, workload, data)
    trainer.warm_up()
    before = _status_mb("VmRSS")
    reset = _reset_peak()
    trainer.prepare(1)
    trainer.timed(1)
    peak = _status_mb("VmHWM") if reset else None
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"workload": workload_name, "contender": contender, "steps": steps,
            "batch_size": workload.batch_size, "rss_before_mb": before,
            "peak_mb": peak if peak is not None else process_peak,
            "peak_growth_mb": None if peak is None or before is None else peak - before,
            "process_peak_mb": process_peak}


def measure_in_subprocess(workload_name, contender, steps=STEPS, timeout=600):
    """measure() in a fresh Python process (so nothing else shares its peak); a dict."""
    command = [sys.executable, os.path.join(HERE, "memory.py"), workload_name, contender,
               "--steps", str(steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"contender": contender, "error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"contender": contender, "error": f"failed (exit {done.returncode}): {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload")
    parser.add_argument("contender")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.workload, args.contender, args.steps)))


if __name__ == "__main__":
    main()
