"""Update rules: `rule(w, dw, config=None) -> (next_w, config)`.

`config` holds the hyperparameters (Python floats) and the rule's state
(arrays, and `t` an int); missing hyperparameters get their defaults. Each
rule computes in the array module of `w`.

One home per rule: `SPECS[name]` says what a rule has (hyperparameters and
their defaults, state arrays, whether it counts steps) and which in-place
op of the kernel table (`fastnn.kernels`, e.g. `adam_`) computes its step.
That op is the one formula, written once per backend (its reference, Numba
and CuPy versions in fastnn/kernels/updates.py); the functional rules below,
the fused in-place path (`fused_update`) and the Solver's and the stack's path (`begin_step`, which
writes the step's scalars into arrays in place, then `apply_step`) all run
it, so they give the same parameters by construction. Adding a rule: its `Rule` here, its op
declared in kernels/updates.py with its Numba and CuPy versions registered there.

What a rule does to a parameter may depend on the parameter's role
(`model.param_roles`: weight, bias, scale, shift; fastnn.classifiers.base.ROLES):
`role_config` gives one parameter's config, from the rule's properties
(`Rule.decoupled_decay`, `Rule.optional`), the roles' (DECAYED_ROLES, or the
Solver's `decayed_roles`) and a role's learning-rate multiplier (the Solver's
`lr_multipliers`). A Solver asks `by_role` whether it needs the model's roles
at all, so no code outside this module names a rule.

Weight decay comes in two kinds, as in PyTorch:
- adamw's (`decoupled_decay`): w * (1 - lr * weight_decay), then the Adam step;
- the SGD rules' optional `weight_decay` (torch.optim.SGD's): the rule steps
  with dw + weight_decay * w, so the decay goes through the momentum.
Either way a role's learning-rate multiplier m scales its gradient step but
not its decay step: role_config gives it learning_rate * m and
weight_decay / m, so lr * weight_decay stays the same (airbench's bias_scaler).

airbench94 (legacy/airbench94.py main(): lr 11.5 and weight decay 0.0153 per
1024 examples, momentum 0.85, bias_scaler 64, batch N, a summed loss, torch
SGD with lr = 11.5 / kilostep_scale, kilostep_scale = 1024 * (1 + 1 / (1 -
0.85)), and weight_decay = wd / lr per group) in fastnn's terms (a mean loss,
so fastnn's learning rate is torch's times N):

    Solver(model, data, update_rule="sgd_nesterov", batch_size=N,
           optim_config={"learning_rate": 11.5 * N / 1024 / (1 + 1 / (1 - 0.85)),  # 1.5 at N=1024
                         "momentum": 0.85, "weight_decay": 0.0153 / 11.5},          # any N
           lr_multipliers={"shift": 64.0}, decayed_roles=("weight", "bias", "shift"),
           lr_schedule="triangle")

Each step is then airbench's, g = dw + wd_r * w; buf = mu * buf + g;
w -= lr_r * (g + mu * buf), exactly while the learning rate is constant.
Under a schedule it differs slightly: fastnn's sgd_nesterov keeps the
learning rate inside its velocity (v = mu * v - lr_t * g; w += mu * v - lr_t * g,
so the momentum of past steps carries their own learning rates), torch's
scales the whole buffer by the current one. During airbench's warm-up (lr
rising) fastnn's momentum part is up to about mu / (1 - mu) steps' worth of
lr change smaller, during the decay larger. Over airbench94's 486 steps of the
"triangle" schedule that is up to about 7% of a step in the first steps and
15% in the last (where the factor nears 0.07), 0.3% to 2% of the parameters
at the end (random and steady gradients); tests/test_optim.py checks the
first steps. Reproducing torch's form exactly would take a rule of its own
(its op in kernels/updates.py).

muon (airbench94_muon.py's optimizer; Muon: KellerJordan/Muon) steps each conv filter (4-D)
as a whole: Nesterov momentum (muon_momentum, torch's form), the filter's norm reset to
sqrt(F), then muon_learning_rate times the momentum's (F, C*kh*kw) matrix orthogonalised by
three Newton-Schulz iterations (kernels.updates.orthogonalize); no weight decay for them. Every
other parameter (the head, biases, batchnorm shifts) gets sgd_nesterov's step with
learning_rate, momentum and weight_decay, by role as above. A schedule scales both learning
rates (Rule.scaled). fastnn.models' `_airbench_muon` maps airbench94_muon's hyperparameters.
"""
from typing import Callable, NamedTuple

import numpy as np

from fastnn import kernels
from fastnn.backend import get_array_module
from fastnn.checks import as_real


class Rule(NamedTuple):
    """What the code needs to know about an update rule besides its formula."""
    defaults: dict          # hyperparameter -> default (Python float); learning_rate first
    state: tuple            # names of its state arrays in config (zeros like w at first)
    op: str                 # the kernel-table op that applies one step in place
    scalars: Callable       # filled config -> the op's scalars (floats, or per-member arrays)
    counts_steps: bool = False  # config["t"] += 1 before each step (bias corrections)
    # its `weight_decay` hyperparameter shrinks the parameters of DECAYED_ROLES only
    # (decoupled weight decay, as AdamW): every other parameter gets weight_decay 0
    decoupled_decay: bool = False
    # hyperparameters the rule takes when given but does not fill in (configs and checkpoints
    # of runs without them stay as they were): the SGD rules' coupled `weight_decay`
    optional: tuple = ()
    # hyperparameters that a schedule and lr_decay scale as they scale learning_rate (muon's
    # muon_learning_rate)
    scaled: tuple = ()
    # parameters of this many dimensions get the rule's own step and no weight decay (muon:
    # the conv filters); None: every parameter gets the same step
    filter_ndim: int = None


def _adam_scalars(c):
    """Adam's op scalars; `decay` is AdamW's decoupled weight decay (1 for adam: exact)."""
    lr, b1, b2, t = c["learning_rate"], c["beta1"], c["beta2"], c["t"]
    return (lr, b1, 1 - b1, b2, 1 - b2, 1 - b1 ** t, 1 - b2 ** t, c["epsilon"],
            1 - lr * c.get("weight_decay", 0.0))


_ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}

SPECS = {
    "sgd": Rule({"learning_rate": 1e-2}, (), "sgd_", lambda c: (c["learning_rate"],),
                optional=("weight_decay",)),
    "sgd_momentum": Rule({"learning_rate": 1e-2, "momentum": 0.9}, ("velocity",),
                         "sgd_momentum_", lambda c: (c["learning_rate"], c["momentum"]),
                         optional=("weight_decay",)),
    "sgd_nesterov": Rule({"learning_rate": 1e-2, "momentum": 0.9}, ("velocity",),
                         "sgd_nesterov_", lambda c: (c["learning_rate"], c["momentum"]),
                         optional=("weight_decay",)),
    "rmsprop": Rule({"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}, ("cache",),
                    "rmsprop_", lambda c: (c["learning_rate"], c["decay_rate"],
                                           1 - c["decay_rate"], c["epsilon"])),
    "adam": Rule(_ADAM, ("m", "v"), "adam_", _adam_scalars, counts_steps=True),
    "adamw": Rule({**_ADAM, "weight_decay": 1e-2}, ("m", "v"), "adam_", _adam_scalars,
                  counts_steps=True, decoupled_decay=True),
    # airbench94_muon's: Muon on the conv filters, Nesterov SGD (sgd_nesterov's) on the rest
    "muon": Rule({"learning_rate": 1e-2, "momentum": 0.85, "muon_learning_rate": 0.24,
                  "muon_momentum": 0.6}, ("velocity",), "muon_",
                 lambda c: (c["learning_rate"], c["momentum"], c["muon_learning_rate"],
                            c["muon_momentum"]),
                 optional=("weight_decay",), scaled=("muon_learning_rate",),
                 filter_ndim=kernels.updates.FILTER_NDIM),
}
DEFAULTS = {name: spec.defaults for name, spec in SPECS.items()}
# The parameter roles that decoupled weight decay shrinks: weights, not biases or the
# norms' scales and shifts.
DECAYED_ROLES = ("weight",)


def by_role(rule, config=None):
    """Whether parameters of different roles get different configs under `rule` with
    `config` (role_config); only then does a Solver need its model's param_roles (a Solver
    with lr_multipliers or decayed_roles always does)."""
    return SPECS[rule].decoupled_decay or bool((config or {}).get("weight_decay"))


def role_config(rule, config, role, lr_multiplier=1.0, decayed_roles=None):
    """The optim config of one parameter of `role` under `rule`: a copy of `config` with what
    the rule does by role applied.

    Weight decay (adamw's, its default when missing; the SGD rules' when given)
    stays for `decayed_roles` (default DECAYED_ROLES) and is 0 for the others.
    lr_multiplier m: learning_rate * m and weight_decay / m, so that the decay
    step lr * weight_decay is the same for every role (airbench's bias_scaler).
    """
    config = dict(config)
    decayed_roles = DECAYED_ROLES if decayed_roles is None else decayed_roles
    if SPECS[rule].decoupled_decay:
        config.setdefault("weight_decay", DEFAULTS[rule]["weight_decay"])
    if "weight_decay" in config and role not in decayed_roles:
        config["weight_decay"] = 0.0
    if lr_multiplier != 1.0:
        config["learning_rate"] = (config.get("learning_rate", DEFAULTS[rule]["learning_rate"])
                                   * lr_multiplier)
        if "weight_decay" in config:
            config["weight_decay"] = config["weight_decay"] / lr_multiplier
    return config


def check_rule(rule):
    """Raise ValueError unless `rule` names an update rule."""
    if rule not in SPECS:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {sorted(SPECS)}")


def check_config_keys(rule, config, where):
    """Raise ValueError naming the keys of `config` that rule `rule` does not know (typos)."""
    known = {*DEFAULTS[rule], *SPECS[rule].optional}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown} for update rule {rule!r}; "
                         f"known: {sorted(known)}")


# Each hyperparameter's allowed values: (low, high, low end open, high end open), all finite.
_INF = float("inf")
RANGES = {"learning_rate": (0, _INF, True, False), "momentum": (0, 1, False, True),
          "decay_rate": (0, 1, False, True), "beta1": (0, 1, False, True),
          "beta2": (0, 1, False, True), "epsilon": (0, _INF, True, False),
          "weight_decay": (0, _INF, False, False), "muon_learning_rate": (0, _INF, True, False),
          "muon_momentum": (0, 1, False, True)}


def check_config(rule, config, where):
    """`config` with its hyperparameters as Python floats; ValueError for an unknown key
    (check_config_keys) or a value out of its range (RANGES: a positive learning rate,
    momentum and decay rates in [0, 1), ...), TypeError for one that is not a number."""
    check_config_keys(rule, config, where)
    checked = dict(config)
    for key, value in config.items():
        low, high, low_open, high_open = RANGES[key]
        checked[key] = as_real(value, f"{where}[{key!r}]", low, high, low_open=low_open,
                               high_open=high_open)
    return checked


def _config(name, config):
    config = {} if config is None else config
    for key, value in DEFAULTS[name].items():
        config.setdefault(key, value)
    return config


def _prepare(rule, w, config, copy):
    """Fill config, make (or copy) the rule's state like w, advance t.

    Returns (config, state tuple) with the state in SPECS[rule].state order.
    """
    spec = SPECS.get(rule)
    if spec is None:
        check_rule(rule)
    config = _config(rule, config)
    xp = get_array_module(w)
    state = []
    for key in spec.state:
        value = config.get(key)
        value = xp.zeros_like(w) if value is None else value.copy() if copy else value
        config[key] = value
        state.append(value)
    if spec.counts_steps:
        config["t"] = config.get("t", 0) + 1
    return config, tuple(state)


def _decayed(w, dw, decay):
    """dw + decay * w: the SGD rules' coupled weight decay (torch.optim.SGD's: it goes
    through the momentum), in a new array (the caller's gradient is kept)."""
    out = w * w.dtype.type(decay)
    out += dw
    return out


def _coupled_decay(spec, w, config):
    """Whether w steps with the SGD rules' coupled weight decay: given, and w is not a filter
    that the rule steps on its own (muon's)."""
    return bool(spec.optional and config.get("weight_decay") and w.ndim != spec.filter_ndim)


def _step(rule, w, dw, config, copy):
    """One step of `rule` on w (a copy of w and its state when `copy`) -> (w, config)."""
    if copy:
        w = w.copy()
    config, state = _prepare(rule, w, config, copy)
    spec = SPECS[rule]
    if _coupled_decay(spec, w, config):
        dw = _decayed(w, dw, config["weight_decay"])
    getattr(kernels.for_module(get_array_module(w, dw)), spec.op)(w, dw, state,
                                                                 spec.scalars(config))
    return w, config


def begin_step(rule, w, config, rows=None):
    """The host half of an in-place step: fill config, make its state, advance t, and write
    the op's scalars into `rows`, in place.

    w: the parameter, or its (A, K, B) member blocks. rows: the scalar rows
    from the previous call for this parameter (None, or a shape that no
    longer fits, makes new ones): a (K, H) array of w's module and dtype,
    column j holding scalar j of SPECS[rule].scalars(config), cast to w.dtype
    as the functional rules cast them. Returns rows; `apply_step` reads
    them, so the array work of a step takes no Python number of the step
    (a CUDA graph of the step stays valid as the scalars change).
    """
    config, _ = _prepare(rule, w, config, copy=False)
    values = SPECS[rule].scalars(config)
    xp = get_array_module(w)
    members = w.shape[1] if w.ndim == 3 else 1
    if rows is None or rows.shape != (members, len(values)) or rows.dtype != w.dtype:
        rows = xp.empty((members, len(values)), dtype=w.dtype)
    # the host values in one write (on cupy one small copy, made between steps);
    # array values (a stack's per-member learning rates) column by column, on their device
    host = [isinstance(v, _HOST_SCALARS) for v in values]
    if all(host):
        rows[...] = values if xp is np else xp.asarray(values, dtype=np.float64)
        return rows
    rows[...] = xp.asarray([float(v) if on_host else 0.0 for v, on_host in zip(values, host)],
                           dtype=np.float64)
    for j, (value, on_host) in enumerate(zip(values, host)):
        if not on_host:
            rows[:, j] = value
    return rows


_HOST_SCALARS = (int, float, np.generic)  # Python and numpy numbers (not arrays)


def apply_step(rule, w, dw, config, rows):
    """The array half of an in-place step after begin_step: rule's op on w with config's
    state and the scalars in rows (w a parameter, or the (A, K, B) blocks of K stacked
    members, fastnn.stacked)."""
    spec = SPECS[rule]
    op = getattr(kernels.for_module(get_array_module(w, dw)), spec.op)
    if _coupled_decay(spec, w, config):  # off: a few lookups, no array work
        dw = _decayed(w, dw, config["weight_decay"])
    op(w, dw, tuple(config[key] for key in spec.state), rows)


def fused_update(rule, w, dw, config):
    """Update `w` in place with rule `rule` (a name in RULES), as `RULES[rule]` would.

    One kernel-table call per parameter: no temporaries of the parameter's
    size. `config` is filled and its state kept exactly as the functional
    rule keeps it; `w` itself is updated (never replaced).
    """
    return _step(rule, w, dw, config, copy=False)[1]


def _functional(name, doc):
    def rule(w, dw, config=None):
        return _step(name, w, dw, config, copy=True)

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    return rule


_COUPLED = ("\n\nWith `weight_decay` given (optional), dw + weight_decay * w in place of dw "
            "(torch.optim.SGD's weight decay).")
sgd = _functional("sgd", "w - learning_rate * dw." + _COUPLED)
sgd_momentum = _functional(
    "sgd_momentum", "v = momentum * v - learning_rate * dw; w + v (state: velocity)." + _COUPLED)
sgd_nesterov = _functional(
    "sgd_nesterov", "Nesterov momentum: v = momentum * v - learning_rate * dw; "
                    "w + momentum * v - learning_rate * dw (state: velocity)." + _COUPLED)
rmsprop = _functional(
    "rmsprop", "cache = d * cache + (1 - d) * dw**2; w - lr * dw / (sqrt(cache) + eps).")
adam = _functional("adam", "Adam with bias correction (state: m, v, t).")
adamw = _functional(
    "adamw", "Adam with decoupled weight decay: w * (1 - lr * weight_decay), then the Adam "
             "step.\n\nSolver sets weight_decay to 0 for everything but the model's weights "
             "(role_config).")

muon = _functional(
    "muon", "Muon (airbench94_muon's) on conv filters, Nesterov SGD on everything else.\n\n"
            "A 4-D w (F, C, kh, kw): v = muon_momentum * v + dw; w *= sqrt(F) / |w|; w -= "
            "muon_learning_rate * orthogonalize(dw + muon_momentum * v), the step's (F, C*kh*kw) "
            "matrix orthogonalised by Newton-Schulz iterations (kernels.updates.orthogonalize); "
            "no weight decay (the norm is fixed). Any other w: sgd_nesterov's step with "
            "learning_rate, momentum (and weight_decay when given). State: velocity." + _COUPLED)

RULES = {name: globals()[name] for name in SPECS}
