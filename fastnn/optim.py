"""Update rules: `rule(w, dw, config=None) -> (next_w, config)`.

`config` holds the hyperparameters (Python floats) and the rule's state
(arrays, and `t` an int); missing hyperparameters get their defaults. Each
rule computes in the array module of `w`. The Solver's fused in-place path
(`fastnn.kernels` ops `sgd_`, `adam_`, ...) gives the same parameters.
"""
from fastnn.backend import get_array_module

DEFAULTS = {
    "sgd": {"learning_rate": 1e-2},
    "sgd_momentum": {"learning_rate": 1e-2, "momentum": 0.9},
    "rmsprop": {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8},
    "adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "adamw": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8,
              "weight_decay": 1e-2},
}


def check_config_keys(rule, config, where):
    """Raise ValueError naming the keys of `config` that rule `rule` does not know (typos)."""
    unknown = sorted(set(config) - set(DEFAULTS[rule]))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown} for update rule {rule!r}; "
                         f"known: {sorted(DEFAULTS[rule])}")


def _config(name, config):
    config = {} if config is None else config
    for key, value in DEFAULTS[name].items():
        config.setdefault(key, value)
    return config


def sgd(w, dw, config=None):
    """w - learning_rate * dw."""
    config = _config("sgd", config)
    return w - config["learning_rate"] * dw, config


def sgd_momentum(w, dw, config=None):
    """v = momentum * v - learning_rate * dw; w + v (state: velocity)."""
    config = _config("sgd_momentum", config)
    xp = get_array_module(w, dw)
    v = config.get("velocity")
    if v is None:
        v = xp.zeros_like(w)
    v = config["momentum"] * v - config["learning_rate"] * dw
    config["velocity"] = v
    return w + v, config


def rmsprop(w, dw, config=None):
    """cache = d * cache + (1 - d) * dw**2; w - lr * dw / (sqrt(cache) + eps)."""
    config = _config("rmsprop", config)
    xp = get_array_module(w, dw)
    cache = config.get("cache")
    if cache is None:
        cache = xp.zeros_like(w)
    decay = config["decay_rate"]
    cache = decay * cache + (1 - decay) * (dw * dw)
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (xp.sqrt(cache) + config["epsilon"]), config


def adam(w, dw, config=None):
    """Adam with bias correction (state: m, v, t)."""
    config = _config("adam", config)
    xp = get_array_module(w, dw)
    m, v = config.get("m"), config.get("v")
    m = xp.zeros_like(w) if m is None else m
    v = xp.zeros_like(w) if v is None else v
    t = config.get("t", 0) + 1
    b1, b2 = config["beta1"], config["beta2"]
    m = b1 * m + (1 - b1) * dw
    v = b2 * v + (1 - b2) * (dw * dw)
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    next_w = w - config["learning_rate"] * m_hat / (xp.sqrt(v_hat) + config["epsilon"])
    config.update(m=m, v=v, t=t)
    return next_w, config


def adamw(w, dw, config=None):
    """Adam with decoupled weight decay: w * (1 - lr * weight_decay), then the Adam step.

    Solver sets weight_decay to 0 for everything but the weight matrices
    (biases, gamma and beta are not decayed).
    """
    config = _config("adamw", config)
    decayed = w * (1 - config["learning_rate"] * config["weight_decay"])
    adam_config = {k: v for k, v in config.items() if k != "weight_decay"}
    next_w, adam_config = adam(decayed, dw, adam_config)
    config.update(adam_config)
    return next_w, config


RULES = {"sgd": sgd, "sgd_momentum": sgd_momentum, "rmsprop": rmsprop, "adam": adam,
         "adamw": adamw}


def fused_update(rule, w, dw, config):
    """Update `w` in place with rule `rule` (a name in RULES), as `RULES[rule]` would.

    One kernel-table call per parameter (fastnn.kernels ops `sgd_`, ...):
    no temporaries of the parameter's size. `config` is filled and its state
    kept exactly as the functional rule keeps it.
    """
    from fastnn import kernels

    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {sorted(RULES)}")
    config = _config(rule, config)
    xp = get_array_module(w, dw)
    ops = kernels.for_module(xp)
    lr = config["learning_rate"]
    if rule == "sgd":
        ops.sgd_(w, dw, lr)
    elif rule == "sgd_momentum":
        if config.get("velocity") is None:
            config["velocity"] = xp.zeros_like(w)
        ops.sgd_momentum_(w, dw, config["velocity"], lr, config["momentum"])
    elif rule == "rmsprop":
        if config.get("cache") is None:
            config["cache"] = xp.zeros_like(w)
        ops.rmsprop_(w, dw, config["cache"], lr, config["decay_rate"], config["epsilon"])
    elif rule in ("adam", "adamw"):
        for key in ("m", "v"):
            if config.get(key) is None:
                config[key] = xp.zeros_like(w)
        config["t"] = config.get("t", 0) + 1
        args = (w, dw, config["m"], config["v"], lr, config["beta1"], config["beta2"],
                config["epsilon"], config["t"])
        if rule == "adam":
            ops.adam_(*args)
        else:
            ops.adamw_(*args, config["weight_decay"])
    return config
