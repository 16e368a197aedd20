"""The parts a Solver is made of, besides its loop and data: an `Updater` and a `Tracker`.

- `Updater`: the update rule's state: one config per parameter (hyperparameters
  and the rule's state arrays, `Solver.optim_configs`), the base learning rates
  a schedule scales, and the scalar rows the in-place update ops read.
- `Tracker`: the loss and accuracy histories, losses waiting on the device to be
  read, and the best parameters (and norms' running statistics) seen.

A Solver builds one of each from its class attributes `Updater` and `Tracker`;
fastnn.stacked_parts has the stack's versions (per-member learning rates and
bookkeeping), which is all StackedSolver changes. Each part writes its own
entries of a checkpoint (`save` / `load`), in the format Solver has always used.
"""
import math

from fastnn import optim
from fastnn.backend import to_numpy
from fastnn.checks import as_real, as_size
from fastnn.classifiers.base import check_roles, norm_params
from fastnn.serialization import STATISTICS


class Updater:
    """Update rule `update_rule` over `model.params`, starting from `optim_config`.

    fused: in-place ops (optim.begin_step / apply_step) on `view(w)` of each
    parameter; otherwise the functional rules, which rebind model.params.
    lr_multipliers {role: m} and decayed_roles: by parameter role, see
    optim.role_config. `frozen`: names of parameters that get no step (their
    state waits), set by the Solver from its train_epochs.
    """

    frozen = frozenset()  # a class attribute: the stack's updater has it too
    base_scaled = {}  # name -> {key: base value} of the rule's `scaled` hyperparameters (too)

    def __init__(self, update_rule, model, optim_config, fused, lr_multipliers=None,
                 decayed_roles=None):
        self.update_rule, self.fused = update_rule, fused
        # the step's scalars as arrays of the backend, rewritten in place before each step
        # (begin_step): each parameter's update-op scalar rows
        self.scalar_rows = {}
        self.configs = {name: dict(optim_config) for name in model.params}
        lr_multipliers = lr_multipliers or {}
        # e.g. adamw decays the model's weights only
        if optim.by_role(self.update_rule, optim_config) or lr_multipliers or decayed_roles:
            roles = check_roles(model)
            self.configs = {name: optim.role_config(self.update_rule, config, roles[name],
                                                    lr_multipliers.get(roles[name], 1.0),
                                                    decayed_roles)
                            for name, config in self.configs.items()}
        self.base_lr = {name: config.get("learning_rate",
                                         optim.DEFAULTS[self.update_rule]["learning_rate"])
                        for name, config in self.configs.items()}
        # the rule's other learning rates (muon's muon_learning_rate): scaled alike
        self.base_scaled = {name: {key: config.get(key, optim.DEFAULTS[self.update_rule][key])
                                   for key in optim.SPECS[self.update_rule].scaled}
                            for name, config in self.configs.items()}

    def view(self, w):
        """The array the update op steps for parameter w."""
        return w

    def set_learning_rates(self, factor):
        """learning_rate = base * factor (a schedule's), and the rule's other learning rates."""
        for name, config in self.configs.items():
            config["learning_rate"] = self.base_lr[name] * factor
            for key, base in self.base_scaled.get(name, {}).items():
                config[key] = base * factor

    def decay_learning_rates(self, lr_decay):
        defaults = optim.DEFAULTS[self.update_rule]
        for config in self.configs.values():
            for key in ("learning_rate", *optim.SPECS[self.update_rule].scaled):
                config[key] = config.get(key, defaults[key]) * lr_decay

    def begin_step(self, params):
        """The host half of a fused step: each parameter's learning rate, Adam's step count
        and bias corrections into its scalar rows (optim.begin_step), the same arrays from
        step to step. (The functional rules take Python floats: nothing to do.)"""
        if self.fused:
            rows, frozen = self.scalar_rows, self.frozen
            for name, w in params.items():
                if name in frozen:
                    continue
                rows[name] = optim.begin_step(self.update_rule, self.view(w), self.configs[name],
                                              rows.get(name))

    def step(self, params, grads):
        """Update every parameter with its gradient (in place when fused)."""
        rule, configs, frozen = self.update_rule, self.configs, self.frozen
        if self.fused:  # in place: params[name] stays the same array
            view, rows = self.view, self.scalar_rows
            for name, w in params.items():
                if name not in frozen:
                    optim.apply_step(rule, view(w), view(grads[name]), configs[name], rows[name])
        else:
            for name, w in list(params.items()):
                if name not in frozen:
                    params[name], configs[name] = optim.RULES[rule](w, grads[name], configs[name])

    def save(self, arrays):
        """The configs' arrays into `arrays` (optim/NAME/KEY); returns the rest (JSON)."""
        configs = {}
        for name, config in self.configs.items():
            configs[name] = {}
            for key, value in config.items():
                if hasattr(value, "shape"):
                    arrays[f"optim/{name}/{key}"] = value
                else:
                    configs[name][key] = value
        return configs

    def load(self, configs, arrays, xp):
        """The configs save wrote: `configs` (JSON part) and their arrays."""
        self.configs = {}
        for name, config in configs.items():
            config = dict(config)
            prefix = f"optim/{name}/"
            config.update({k[len(prefix):]: xp.asarray(v) for k, v in arrays.items()
                           if k.startswith(prefix)})
            self.configs[name] = config


LOOKAHEAD_DEFAULTS = {"every": 5, "base": 0.95 ** 5, "power": 3.0}


def check_lookahead(lookahead):
    """The `lookahead` option with defaults filled in (None: off; True: the defaults)."""
    if lookahead is None or lookahead is False:
        return None
    options = dict(LOOKAHEAD_DEFAULTS) if lookahead is True else {**LOOKAHEAD_DEFAULTS,
                                                                   **dict(lookahead)}
    unknown = sorted(set(options) - set(LOOKAHEAD_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown lookahead options {unknown}; known: "
                         f"{sorted(LOOKAHEAD_DEFAULTS)}")
    options["every"] = as_size(options["every"], "lookahead['every']", low=1)
    options["base"] = as_real(options["base"], "lookahead['base']", 0, 1)
    options["power"] = as_real(options["power"], "lookahead['power']", 0, math.inf)
    return options


class Lookahead:
    """airbench's Lookahead: an average of the model's parameters and running statistics.

    Every `every` steps, with s steps done of `total`, decay d = base * (s /
    total) ** power (a host float: no device read), each array w and its
    average a: a += (1 - d) * (w - a); w = a. After the last step the model
    gets the average (d = 1). The averages live on the model's backend,
    starting as copies of its arrays.
    """

    def __init__(self, model, options):
        self.model, self.options = model, options
        self.averages = {key: value.copy() for key, value in self._arrays().items()}

    def _arrays(self):
        """The arrays averaged: "param/NAME" and "norm/KEY/STAT" -> the model's array."""
        arrays = {f"param/{name}": w for name, w in self.model.params.items()}
        for key, bn_param in norm_params(self.model).items():
            arrays.update({f"norm/{key}/{stat}": bn_param[stat] for stat in STATISTICS
                           if bn_param.get(stat) is not None})
        return arrays

    def after_step(self, steps, total):
        """Called with `steps` done of `total`: average (and copy back) when it is time."""
        every = self.options["every"]
        if steps % every == 0:
            self.update(self.options["base"] * (steps / total) ** self.options["power"])
        if steps == total:
            self.update(1.0)

    def update(self, decay):
        """a += (1 - decay) * (w - a); w = a, in place, for every averaged array."""
        averages = self.averages
        for key, w in self._arrays().items():
            average = averages[key]
            if decay != 1.0:
                w -= average                 # w - a, in w's memory: no temporary
                w *= w.dtype.type(1.0 - decay)
                average += w
            w[...] = average

    def save(self, arrays):
        arrays.update({f"lookahead/{key}": value for key, value in self.averages.items()})

    def load(self, arrays, path, xp):
        saved = {key[len("lookahead/"):]: value for key, value in arrays.items()
                 if key.startswith("lookahead/")}
        if set(saved) != set(self.averages):
            raise ValueError(f"{path} is incompatible: it holds no lookahead averages for this "
                             "model (it was written without lookahead); resume it without "
                             "the lookahead option")
        self.averages = {key: xp.asarray(value) for key, value in saved.items()}


class Tracker:
    """Histories (loss_history, train_acc_history, val_acc_history: Python floats), the
    losses still on the device (`pending`), and the best parameters seen."""

    def __init__(self, model, xp):
        self.model, self.xp = model, xp
        self.best_val_acc = 0.0
        self.best_params = {}
        self.best_norms = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.pending = []

    def finished(self):
        """True when nothing is left to train before the last iteration."""
        return False

    def last_loss(self):
        """The latest loss read, for printing (a Python float)."""
        return self.loss_history[-1]

    def read_losses(self, solver):
        """Pending losses to loss_history (one device read); stop on a non-finite one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        values = [float(v) for v in to_numpy(self.xp.stack([self.xp.asarray(l) for l in pending]))]
        first = len(self.loss_history)
        self.loss_history.extend(values)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            iteration = first + bad + 1
            self.restore_best()
            raise FloatingPointError(
                f"the training loss became {values[bad]} at iteration {iteration} (epoch "
                f"{(iteration - 1) // solver.iterations_per_epoch + 1}); training stopped and "
                "model.params holds the best parameters seen. Try a lower learning_rate, a "
                "smaller weight_scale or stronger reg.")

    def record_accuracy(self, solver):
        """Train and val accuracy into the histories; keep the parameters when val is best."""
        train_acc = solver.check_accuracy(solver.X_train, solver.y_train,
                                          num_samples=solver.num_train_samples)
        val_acc = solver.check_accuracy(solver.X_val, solver.y_val,
                                        num_samples=solver.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if solver.verbose:
            solver._print(f"(Epoch {solver.epoch} / {solver.num_epochs}) "
                          f"train acc: {train_acc:f}; val_acc: {val_acc:f}")
        if val_acc > self.best_val_acc or not self.best_params:
            # NaN parameters can still score (argmax of NaN rows is class 0): never keep them
            xp = self.xp
            if bool(xp.stack([xp.isfinite(w).all() for w in self.model.params.values()]).all()):
                self.best_val_acc = val_acc
                self.keep_as_best()

    def after_epoch(self, solver):
        """Called at each epoch end, after the accuracy check, before checkpoints."""

    def keep_as_best(self):
        self.best_params = {k: v.copy() for k, v in self.model.params.items()}
        self.best_norms = {key: {k: p[k].copy() for k in STATISTICS if p.get(k) is not None}
                           for key, p in norm_params(self.model).items()}

    def restore_best(self):
        """model.params (and the norms' running statistics) <- the best seen."""
        if not self.best_params:
            return
        for name, best in self.best_params.items():  # into the arrays: params are never rebound
            self.model.params[name][...] = best
        for key, bn_param in norm_params(self.model).items():
            bn_param.update({k: v.copy() for k, v in self.best_norms.get(key, {}).items()})

    def save(self, arrays, meta):
        """The best parameters into `arrays`, the histories into `meta` (losses read first)."""
        arrays.update({f"best/{k}": v for k, v in self.best_params.items()})
        for key, best in self.best_norms.items():
            arrays.update({f"best_norm/{key}/{k}": v for k, v in best.items()})
        meta.update(best_val_acc=self.best_val_acc, loss_history=self.loss_history,
                    train_acc_history=self.train_acc_history,
                    val_acc_history=self.val_acc_history)

    def load(self, arrays, meta, path, solver=None):
        """Restore what save wrote (called before the model state is restored)."""
        xp = self.xp
        self.best_params = {k[len("best/"):]: xp.asarray(v) for k, v in arrays.items()
                            if k.startswith("best/")}
        self.best_norms = {}
        for name, value in arrays.items():
            if name.startswith("best_norm/"):
                key, stat = name[len("best_norm/"):].split("/", 1)
                self.best_norms.setdefault(key, {})[stat] = xp.asarray(value)
        self.best_val_acc = float(meta["best_val_acc"])
        self.loss_history = [float(v) for v in meta["loss_history"]]
        self.train_acc_history = [float(v) for v in meta["train_acc_history"]]
        self.val_acc_history = [float(v) for v in meta["val_acc_history"]]
        self.pending = []

