"""Learning-rate schedules: a factor on the base learning rate at each iteration.

The Solver's learning rate at iteration t (epoch e) is

    base_lr * lr_decay ** e * lr_factor(schedule, t, total, ...)

so `lr_decay` (the classic per-epoch decay) and a schedule multiply; leave
`lr_decay=1.0` to use a schedule alone. Factors are pure functions of the
iteration, so a resumed run gets the same rates.
"""
import math

from fastnn.checks import as_optional_size, as_real, as_size

SCHEDULES = ("constant", "step", "cosine", "onecycle", "triangle", "linear")
DEFAULTS = {
    "constant": {},
    "step": {"step_epochs": None, "gamma": 0.1},             # None: a third of the epochs
    "cosine": {"min_factor": 0.0},
    # min_iterations: a run of fewer iterations peaks at total / min_iterations of the learning
    # rate (a warm-up of a few steps to the full rate diverges); 0: always the full peak
    "onecycle": {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4,
                 "min_iterations": 0},
    # airbench's get_lr: linear from 0.2 up to 1 over the first 23% of steps, then down to 0.07
    "triangle": {"pct_start": 0.23, "start_factor": 0.2, "end_factor": 0.07,
                 "min_iterations": 0},
    # airbench94_muon's: from 1 straight down to end_factor, no warm-up
    "linear": {"end_factor": 0.0},
}


def check_schedule(schedule, config=None):
    """Validate a schedule name and its options; returns the options with defaults."""
    name = schedule or "constant"
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {SCHEDULES}")
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(f"unknown options {unknown} for lr_schedule {name!r}; "
                         f"known: {sorted(DEFAULTS[name])}")
    config = {**DEFAULTS[name], **config}
    for key, value in config.items():
        where = f"lr_schedule_config[{key!r}]"
        if key == "step_epochs":
            config[key] = as_optional_size(value, where, low=1)
        elif key == "min_iterations":
            config[key] = as_size(value, where, low=0)
        elif key in _UNIT_INTERVAL:
            config[key] = as_real(value, where, 0, 1)
        elif key in _NON_NEGATIVE:
            config[key] = as_real(value, where, 0, math.inf)
        else:  # gamma and the divisors
            config[key] = as_real(value, where, 0, math.inf, low_open=True)
    return config


_UNIT_INTERVAL = ("min_factor", "pct_start")
_NON_NEGATIVE = ("start_factor", "end_factor")


def _cosine(start, end, fraction):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def lr_factor(schedule, iteration, total_iterations, iterations_per_epoch, config=None):
    """The factor on the base learning rate for 0-based `iteration` of `total_iterations`.

    - constant: 1
    - step: gamma ** (epoch // step_epochs)
    - cosine: from 1 down to min_factor along half a cosine
    - onecycle: warm-up from 1/div_factor to 1 over the first pct_start of
      training, then down to 1/(div_factor*final_div_factor), both halves
      cosine-shaped (as PyTorch's OneCycleLR)
    - triangle: airbench's get_lr, both halves straight lines: from
      start_factor up to 1 over the first int(pct_start * total) iterations,
      then down to end_factor at iteration `total` (so the last iteration,
      total - 1, is a step above end_factor, as in airbench)
    - linear: airbench94_muon's, 1 - (1 - end_factor) * iteration / total

    Both cycles take `min_iterations` (0: off): a run of fewer iterations
    has its whole cycle scaled by total / min_iterations, so a shortened run
    warms up to a lower peak instead of diverging.
    """
    name = schedule or "constant"
    config = check_schedule(name, config)
    total = max(int(total_iterations), 1)
    if name == "constant":
        return 1.0
    if name == "step":
        epochs = max(total // max(iterations_per_epoch, 1), 1)
        step_epochs = config["step_epochs"] or max(epochs // 3, 1)
        return config["gamma"] ** ((iteration // max(iterations_per_epoch, 1)) // step_epochs)
    if name == "cosine":
        return _cosine(1.0, config["min_factor"], iteration / total)
    if name == "linear":
        return 1.0 - (1.0 - config["end_factor"]) * min(iteration / total, 1.0)
    # a short run scales the whole cycle down (min_iterations)
    peak = min(1.0, total / config["min_iterations"]) if config["min_iterations"] else 1.0
    if name == "triangle":
        warmup = int(total * config["pct_start"])
        if iteration < warmup:
            fraction = iteration / warmup
            return peak * (config["start_factor"] * (1 - fraction) + 1.0 * fraction)
        fraction = (iteration - warmup) / max(total - warmup, 1)
        return peak * (1.0 * (1 - fraction) + config["end_factor"] * fraction)
    start = 1.0 / config["div_factor"]
    end = start / config["final_div_factor"]
    warmup = max(config["pct_start"] * total, 1.0)
    if iteration < warmup:
        return peak * _cosine(start, 1.0, iteration / warmup)
    return peak * _cosine(1.0, end, (iteration - warmup) / max(total - warmup, 1.0))
