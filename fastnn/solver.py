"""Solver: trains a classifier with minibatch gradient descent and keeps the best model.

One loop for a lone model and for a stack of K. The Solver holds the data,
the minibatch order, the loop, checkpoints and Ctrl-C; two parts hold the
rest (fastnn.solver_parts): its `updater` (the update rule's configs and step
scalars) and its `tracker` (histories, pending losses, the best parameters).
fastnn.stacked.StackedSolver is a Solver with the stack's parts.

The training step does no host/device traffic: losses stay on the device and
are read when printed (every `print_every` iterations, when verbose or with a
progress bar) and at epoch ends, where the non-finite check runs; minibatch
indices go to the device once per epoch; the data are checked once, when the
Solver is built.
"""
import math
import signal

import numpy as np

from fastnn import inference, kernels, optim, schedules
from fastnn.backend import get_array_module, to_numpy
from fastnn.checks import as_optional_size, as_real, as_size
from fastnn.interrupt import TrainingInterrupted, stop_requests
from fastnn.kernels.rng import alternating_flips
from fastnn.serialization import (CHECKPOINT_FORMAT, model_state, read_checkpoint,
                                  set_model_state, write_checkpoint)
from fastnn.classifiers.base import ROLES
from fastnn.solver_parts import Lookahead, Tracker, Updater, check_lookahead

__all__ = ["Solver", "TrainingInterrupted", "CHECKPOINT_FORMAT"]

OPTIONS = {
    # the classic options
    "update_rule": "sgd", "optim_config": None, "lr_decay": 1.0, "batch_size": 128,
    "num_epochs": 10, "print_every": 10, "verbose": True, "num_train_samples": 1000,
    "num_val_samples": None, "checkpoint_name": None,
    # fastnn's additions
    "seed": None,             # int: batch order and accuracy subsamples; None: from np.random
    "sampling": "epoch",      # "epoch": a permutation per epoch; "replacement": classic draws
    "fused_updates": True,    # in-place update kernels (same parameters as fastnn.optim)
    "checkpoint_path": None,  # one checkpoint file, rewritten atomically every epoch
    "progress": False,        # a tqdm progress bar per epoch
    "lr_schedule": None,      # None, "step", "cosine" or "onecycle" (fastnn.schedules)
    "lr_schedule_config": None,
    "augment": None,          # None, or {"flip": True, "crop_padding": 4} (True: those)
    # by parameter role (model.param_roles; optim.role_config): {role: m} multiplies the
    # role's learning rate but not its decay step (airbench: {"shift": 64.0}); the roles
    # weight_decay shrinks (None: optim.DECAYED_ROLES, the weights)
    "lr_multipliers": None,
    "decayed_roles": None,
    "train_epochs": None,     # {param name: epochs}: it gets no steps after that many epochs
    "lookahead": None,        # True or {"every", "base", "power"}: solver_parts.Lookahead
}
AUGMENT_DEFAULTS = {"flip": True, "crop_padding": 4, "padding_mode": "zeros"}
# flip: True, a random mirror per image per step; "alternate", airbench's alternating
# flips (rng.alternating_flips: a coin per image in epoch 0, then the opposite each epoch)
FLIPS = (False, True, "alternate")
# what a translation shifts in: zeros, or the image's reflection (airbench's)
PADDING_MODES = ("zeros", "reflect")


def _gather(xp, source, idx, out):
    """out[:] = source[idx] along axis 0, without a temporary."""
    if xp is np:
        # numpy buffers `out` in its default mode="raise"; the indices are in range
        np.take(source, idx, axis=0, out=out, mode="clip")
    else:
        xp.take(source, idx, axis=0, out=out)


def check_augment(augment, X_train):
    """The `augment` option with defaults filled in (None: off); checks it fits X_train."""
    if not augment:
        return None
    options = dict(AUGMENT_DEFAULTS) if augment is True else {**AUGMENT_DEFAULTS, **augment}
    unknown = sorted(set(options) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown augment options {unknown}; known: {sorted(AUGMENT_DEFAULTS)}")
    if X_train.ndim != 4:
        raise ValueError(f"augment needs images shaped (N, C, H, W); X_train has shape "
                         f"{X_train.shape}")
    options["crop_padding"] = as_size(options["crop_padding"], "crop_padding", low=0,
                                      high=min(X_train.shape[2:]) - 1)
    flip = options["flip"]
    if (flip != "alternate") if isinstance(flip, str) else flip not in FLIPS:
        raise ValueError(f"augment's flip must be True (random flips), False or 'alternate' "
                         f"(alternating flips), got {flip!r}")
    options["flip"] = flip if isinstance(flip, str) else bool(flip)
    if options["padding_mode"] not in PADDING_MODES:
        raise ValueError(f"augment's padding_mode must be one of {PADDING_MODES}, got "
                         f"{options['padding_mode']!r}")
    return options


def part_attribute(part, name, doc):
    """A Solver attribute that is `name` of its part `part` (read and written there)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Solver:
    """Train `model` on `data` (X_train, y_train, X_val, y_val); see OPTIONS for kwargs.

    StackedSolver is a Solver: a stack and K lone nets get the same data
    checks, minibatches and learning-rate schedule for one seed.
    """

    optim_configs = part_attribute("updater", "configs", "One config per parameter name.")
    loss_history = part_attribute("tracker", "loss_history", "Every loss read (floats).")
    train_acc_history = part_attribute("tracker", "train_acc_history", "Train accuracies.")
    val_acc_history = part_attribute("tracker", "val_acc_history", "Val accuracies.")
    best_val_acc = part_attribute("tracker", "best_val_acc", "The best val accuracy.")
    best_params = part_attribute("tracker", "best_params", "The best parameters (copies).")
    _pending_losses = part_attribute("tracker", "pending", "Losses not read yet (device).")

    # -- data, minibatches, schedule -------------------------------------------
    def _to_device(self, X, y, split, dtype):
        """(X, y) of one split on the device, checked once: the step needs no checks."""
        xp = self._xp
        X = xp.asarray(X, dtype=dtype)
        if not hasattr(y, "ndim"):  # a list of labels
            y = np.asarray(y)
        if X.shape[0] == 0:
            raise ValueError(f"the {split} split is empty (X_{split} has shape {X.shape}); Solver "
                             f"needs at least one {split} example")
        if y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X_{split} has {X.shape[0]} rows but y_{split} has shape {y.shape}; "
                             "they need one label per row")
        if y.dtype.kind not in "iu":
            raise ValueError(f"y_{split} must hold integer labels, got dtype {y.dtype}")
        bad = int((~xp.isfinite(X)).sum())  # once here, so that the step never checks
        if bad:
            raise ValueError(f"X_{split} holds {bad} NaN or infinite values; clean or drop those "
                             "rows before training")
        return X, xp.asarray(y, dtype=np.int64)

    def _check_labels(self, num_classes):
        """Every train and val label in [0, num_classes) (one device read)."""
        for split, y in (("train", self.y_train), ("val", self.y_val)):
            low, high = (int(v) for v in to_numpy(self._xp.stack([y.min(), y.max()])))
            if low < 0 or high >= num_classes:
                raise ValueError(f"y_{split} has labels from {low} to {high}, but the model has "
                                 f"{num_classes} classes: labels must be in [0, {num_classes})")

    @property
    def iterations_per_epoch(self):
        return max(self.X_train.shape[0] // self.batch_size, 1)

    def _scheduled_factor(self):
        """With a schedule, the learning rate is base * this: lr_decay**epoch * the factor."""
        per_epoch = self.iterations_per_epoch
        return self.lr_decay ** self.epoch * schedules.lr_factor(
            self.lr_schedule, self._t, self.num_epochs * per_epoch, per_epoch,
            self.lr_schedule_config)

    def _next_batch(self, t):
        xp, n, bs = self._xp, self.X_train.shape[0], min(self.batch_size, self.X_train.shape[0])
        if self._epoch_order is None:  # one host-to-device copy per epoch, none per step
            per_epoch = self.iterations_per_epoch
            order = (self._batch_rng.integers(0, n, per_epoch * bs)
                     if self.sampling == "replacement" else self._batch_rng.permutation(n))
            self._epoch_order = xp.asarray(order)
        i = t % self.iterations_per_epoch
        idx = self._epoch_order[i * bs:(i + 1) * bs]
        if self._batch is None or self._batch[0].shape[0] != bs:
            self._batch = (xp.empty((bs, *self.X_train.shape[1:]), dtype=self.X_train.dtype),
                           xp.empty(bs, dtype=self.y_train.dtype))
        X_batch, y_batch = self._batch
        _gather(xp, self.X_train, idx, X_batch)
        _gather(xp, self.y_train, idx, y_batch)
        if self.augment:  # the step as the step counter array (see _begin_step)
            flip, augment = self.augment["flip"], kernels.for_module(xp).flip_crop
            if flip == "alternate":  # by dataset image; the epoch from the counter, on the device
                flip = alternating_flips(idx, self._augment_seed,
                                         self._step_index // self.iterations_per_epoch)
            X_batch = augment(X_batch, self._augment_seed, self._step_index, flip,
                              self.augment["crop_padding"],
                              self.augment["padding_mode"] == "reflect")
        return X_batch, y_batch

    def __init__(self, model, data, **kwargs):
        unknown = sorted(set(kwargs) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown Solver option(s) {unknown}; known: {sorted(OPTIONS)}")
        options = {**OPTIONS, **kwargs}
        for name, value in options.items():
            setattr(self, name, value)
        if self.update_rule not in optim.RULES:
            raise ValueError(f"unknown update rule {self.update_rule!r}; "
                             f"choose one of {sorted(optim.RULES)}")
        if self.sampling not in ("epoch", "replacement"):
            raise ValueError(f"sampling must be 'epoch' or 'replacement', got {self.sampling!r}")
        self.batch_size = as_size(self.batch_size, "batch_size", low=1)
        self.num_epochs = as_size(self.num_epochs, "num_epochs")
        self.print_every = as_size(self.print_every, "print_every", low=1)
        self.num_train_samples = as_optional_size(self.num_train_samples, "num_train_samples",
                                                  low=1)
        self.num_val_samples = as_optional_size(self.num_val_samples, "num_val_samples", low=1)
        self.lr_decay = as_real(self.lr_decay, "lr_decay", 0, math.inf, low_open=True)
        self.optim_config = optim.check_config(self.update_rule, self.optim_config or {},
                                               "optim_config")
        self.lr_schedule_config = schedules.check_schedule(self.lr_schedule,
                                                           self.lr_schedule_config)
        self.model = model
        missing = [k for k in ("X_train", "y_train", "X_val", "y_val") if k not in data]
        if missing:
            raise ValueError(f"data is missing {missing}; it needs X_train, y_train, X_val, y_val")
        self.augment = check_augment(self.augment, data["X_train"])
        self._check_role_options()
        self._xp = get_array_module(*model.params.values())
        dtype = getattr(self.model, "dtype", None)
        self.X_train, self.y_train = self._to_device(data["X_train"], data["y_train"], "train", dtype)
        self.X_val, self.y_val = self._to_device(data["X_val"], data["y_val"], "val", dtype)
        # one forward pass learns the class count
        self._check_labels(self.model.loss(self.X_train[:1]).shape[-1])
        seed = self.seed if self.seed is not None else int(np.random.randint(2**31 - 1))
        batch_seq, eval_seq, augment_seq = np.random.SeedSequence(seed).spawn(3)
        self._batch_rng = np.random.default_rng(batch_seq)
        self._eval_rng = np.random.default_rng(eval_seq)
        self._augment_seed = int(augment_seq.generate_state(1)[0])
        self._reset()

    def _check_role_options(self):
        """lr_multipliers, decayed_roles, train_epochs, lookahead: checked (a stack refuses them)."""
        model = self.model
        given = [name for name in ("lr_multipliers", "decayed_roles", "train_epochs", "lookahead")
                 if getattr(self, name) not in (None, False)]
        if given and getattr(model, "num_members", None) is not None:
            raise ValueError(f"StackedSolver does not take {given}; train the members with "
                             "Solver for those")
        multipliers = dict(self.lr_multipliers or {})
        for role, value in multipliers.items():
            if role not in ROLES:
                raise ValueError(f"lr_multipliers names role {role!r}; roles are {ROLES}")
            multipliers[role] = as_real(value, f"lr_multipliers[{role!r}]", 0, math.inf,
                                        low_open=True)
        self.lr_multipliers = multipliers or None
        if self.decayed_roles is not None:
            if isinstance(self.decayed_roles, str) or not set(self.decayed_roles) <= set(ROLES):
                raise ValueError(f"decayed_roles must be a list of roles from {ROLES}, got "
                                 f"{self.decayed_roles!r}")
            self.decayed_roles = tuple(self.decayed_roles)
        epochs = dict(self.train_epochs or {})
        for name, value in epochs.items():
            if name not in model.params:
                raise ValueError(f"train_epochs names {name!r}, which is not a parameter of "
                                 f"this model; its parameters: {sorted(model.params)}")
            epochs[name] = as_size(value, f"train_epochs[{name!r}]", low=0)
        self.train_epochs = epochs or None
        self.lookahead = check_lookahead(self.lookahead)

    def _freeze(self):
        """The updater's frozen parameters: those whose train_epochs have passed (a model
        that declares `frozen`, as fastnn's classifiers do, is told them while it trains:
        see Classifier)."""
        if self.train_epochs:
            self.updater.frozen = frozenset(name for name, epochs in self.train_epochs.items()
                                            if self.epoch >= epochs)
            if hasattr(self.model, "frozen"):
                self.model.frozen = self.updater.frozen

    def _reset(self):
        self.epoch = 0
        self._t = 0
        self._epoch_order = None
        self._batch = None
        # the step number as an array of the backend, rewritten in place before each step
        self._step_index = self._xp.zeros((), dtype=np.int64)
        self.updater = self._make_updater()
        self.tracker = self._make_tracker()
        self._lookahead = Lookahead(self.model, self.lookahead) if self.lookahead else None
        self._freeze()

    # the parts (fastnn.solver_parts); StackedSolver makes the stack's
    def _make_updater(self):
        return Updater(self.update_rule, self.model, self.optim_config, self.fused_updates,
                       self.lr_multipliers, self.decayed_roles)

    def _make_tracker(self):
        return Tracker(self.model, self._xp)

    # -- the training step ---------------------------------------------------
    def _begin_step(self):
        """The host half of a step: its scalars into the arrays that the step's ops read.

        The step number goes into `_step_index` (the dropout and augment step,
        as the contract's dropout_param["step"]); the updater writes each
        parameter's learning rate (times the schedule) and the rule's step
        scalars into its scalar rows. The arrays stay the same objects from
        step to step, so everything after this reads the step's values from
        memory and a CUDA graph of it stays valid.
        """
        self._step_index[...] = self._t
        dropout_param = getattr(self.model, "dropout_param", None)
        if dropout_param is not None:
            dropout_param["step"] = self._step_index
        self.updater.begin_step(self.model.params)

    def _step(self):
        updater = self.updater
        if self.lr_schedule:
            updater.set_learning_rates(self._scheduled_factor())
        self._begin_step()
        X_batch, y_batch = self._next_batch(self._t)
        loss, grads = self.model.loss(X_batch, y_batch)
        updater.step(self.model.params, grads)
        self.tracker.pending.append(loss)

    def _read_losses(self):
        """Pending losses to the histories (one device read); see Tracker.read_losses."""
        self.tracker.read_losses(self)

    # -- accuracy and the best model -------------------------------------------
    def check_accuracy(self, X, y, num_samples=None, batch_size=128, flip=False, tta=None):
        """Fraction of `X` the model classifies as `y` (a Python float).

        num_samples: evaluate a random subsample of this size. Predictions
        run in batches of `batch_size` (fastnn.inference); correct counts stay
        on the device. flip: average each image's scores with its mirror's;
        tta: the test-time augmentation level instead (fastnn.inference).
        """
        num_samples = as_optional_size(num_samples, "num_samples", low=1)
        xp = self._xp
        X, y = xp.asarray(X), xp.asarray(y)
        n = X.shape[0]
        if num_samples is not None and n > num_samples:
            idx = xp.asarray(self._eval_rng.choice(n, num_samples, replace=False))
            X, y, n = X[idx], y[idx], num_samples
        correct = inference.count_correct(self.model, X, y, batch_size, flip, tta)
        return float(correct) / max(n, 1)

    # -- the loop ------------------------------------------------------------
    def train(self):
        """Run the optimisation; afterwards model.params holds the best parameters seen."""
        per_epoch = self.iterations_per_epoch
        total = self.num_epochs * per_epoch
        bar = None
        tracker = self.tracker
        if not tracker.best_params:  # the initial parameters: a finite fallback from the start
            tracker.keep_as_best()
        self._freeze()
        with stop_requests() as stop:
            try:
                while self._t < total and not tracker.finished():
                    if self.progress and bar is None:
                        bar = self._progress_bar(per_epoch)
                    self._step()
                    t = self._t
                    self._t += 1
                    if self._lookahead is not None:
                        self._lookahead.after_step(self._t, total)
                    if bar is not None:
                        bar.update(1)
                    # a device read only when something is shown (else at epoch ends)
                    if t % self.print_every == 0 and (self.verbose or bar is not None):
                        self._read_losses()
                        if self.verbose and bar is None:
                            self._print(f"(Iteration {t + 1} / {total}) "
                                        f"loss: {tracker.last_loss():f}")
                        if bar is not None:
                            bar.set_postfix(loss=f"{tracker.last_loss():.4f}")
                    epoch_end = self._t % per_epoch == 0
                    if epoch_end:
                        self._read_losses()
                        self.epoch += 1
                        self._epoch_order = None
                        if not self.lr_schedule:  # the classic decay; schedules set it per step
                            self.updater.decay_learning_rates(self.lr_decay)
                        self._freeze()
                        if bar is not None:
                            bar.close()
                            bar = None
                    if t == 0 or epoch_end or self._t == total:
                        self._read_losses()
                        tracker.record_accuracy(self)
                    if epoch_end:
                        tracker.after_epoch(self)
                        self._write_checkpoints()
                    if stop.requested:
                        self._interrupted(stop.signum)
            finally:
                if bar is not None:
                    bar.close()
                if self.train_epochs and hasattr(self.model, "frozen"):
                    self.model.frozen = frozenset()  # every gradient again outside training
        self._read_losses()
        tracker.restore_best()

    # -- printing ------------------------------------------------------------
    def _progress_bar(self, per_epoch):
        from tqdm.auto import tqdm

        return tqdm(total=per_epoch, desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
                    unit="batch", leave=False, dynamic_ncols=True,
                    disable=None)  # None: no bar when stderr is not a terminal (a log file)

    def _print(self, line):
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line)

    # -- checkpoints ---------------------------------------------------------
    def _write_checkpoints(self):
        if self.checkpoint_name is not None:
            self.save_checkpoint(f"{self.checkpoint_name}_epoch_{self.epoch}.npz")
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)

    def save_checkpoint(self, path):
        """Write everything train() needs to continue to `path`, atomically."""
        from fastnn import __version__

        self._read_losses()
        arrays = {f"model/{k}": v for k, v in model_state(self.model).items()}
        configs = self.updater.save(arrays)
        if self._lookahead is not None:
            self._lookahead.save(arrays)
        if self._epoch_order is not None:
            arrays["epoch_order"] = self._epoch_order
        seed = getattr(self.model, "dropout_param", {}).get("seed")
        meta = {
            "fastnn_version": __version__,
            "model_class": type(self.model).__name__,
            "model_args": getattr(self.model, "init_args", None),
            "update_rule": self.update_rule, "optim_configs": configs,
            "epoch": self.epoch, "t": self._t,
            "batch_rng": self._batch_rng.bit_generator.state,
            "eval_rng": self._eval_rng.bit_generator.state,
            "augment_seed": self._augment_seed,
            # drawn at construction when the model was built without a seed
            "dropout_seed": seed if isinstance(seed, int) else None,
        }
        self.tracker.save(arrays, meta)
        self._save_extra(arrays, meta)
        write_checkpoint(path, arrays, meta)

    def _save_extra(self, arrays, meta):
        """Add what a subclass keeps beyond the Solver's and its parts' state to a checkpoint."""

    def _load_extra(self, arrays, meta, path):
        """Restore (or check) what _save_extra wrote; called first, before the parts load."""

    def load_checkpoint(self, path):
        """Restore the state save_checkpoint wrote; train() then continues from there."""
        arrays, meta = read_checkpoint(path)
        if meta.get("model_class") != type(self.model).__name__ or (
                meta.get("model_args") != getattr(self.model, "init_args", None)):
            raise ValueError(f"{path} is incompatible: it was written for {meta.get('model_class')}"
                             f"({meta.get('model_args')}), not this {type(self.model).__name__}"
                             f"({getattr(self.model, 'init_args', None)})")
        if meta.get("update_rule") != self.update_rule:
            raise ValueError(f"{path} is incompatible: it was trained with update rule "
                             f"{meta.get('update_rule')!r}, this Solver uses {self.update_rule!r}")
        xp = self._xp
        self._load_extra(arrays, meta, path)
        self.tracker.load(arrays, meta, path, self)
        set_model_state(self.model, {k[len("model/"):]: v for k, v in arrays.items()
                                     if k.startswith("model/")}, path)
        self.updater.load(meta["optim_configs"], arrays, xp)
        self._epoch_order = xp.asarray(arrays["epoch_order"]) if "epoch_order" in arrays else None
        self.epoch, self._t = int(meta["epoch"]), int(meta["t"])
        self._freeze()
        if self._lookahead is not None:
            self._lookahead.load(arrays, path, xp)
        self._batch_rng.bit_generator.state = meta["batch_rng"]
        self._eval_rng.bit_generator.state = meta["eval_rng"]
        self._augment_seed = int(meta["augment_seed"])
        if meta.get("dropout_seed") is not None:
            self.model.dropout_param["seed"] = meta["dropout_seed"]

    # -- Ctrl-C (fastnn.interrupt) -----------------------------------------------
    def _interrupted(self, signum):
        path = self.checkpoint_path
        if path is None and self.checkpoint_name is not None:
            path = f"{self.checkpoint_name}_interrupted.npz"
        if path is not None:
            self.save_checkpoint(path)
            message = f"interrupted at iteration {self._t}; state saved to {path}"
        else:
            message = f"interrupted at iteration {self._t}; no checkpoint_path was set, nothing saved"
        if signum == signal.SIGTERM:
            message = f"stopped by SIGTERM: {message}"
        raise TrainingInterrupted(message, path, signal.Signals(signum))
