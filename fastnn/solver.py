"""Solver: trains a classifier with minibatch gradient descent and keeps the best model.

One loop for a lone model and for a stack of K (fastnn.stacked.StackedSolver
overrides the per-member bookkeeping: its `_loss`, `_update`, `_read_losses`,
`_record_accuracy`, `_after_epoch`, best-model and checkpoint hooks).

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
from fastnn.classifiers.base import check_roles, norm_params
from fastnn.interrupt import TrainingInterrupted, stop_requests
from fastnn.serialization import (CHECKPOINT_FORMAT, STATISTICS, model_state, read_checkpoint,
                                  set_model_state, write_checkpoint)

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
}
AUGMENT_DEFAULTS = {"flip": True, "crop_padding": 4}


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
    return options


class Solver:
    """Train `model` on `data` (X_train, y_train, X_val, y_val); see OPTIONS for kwargs.

    StackedSolver is a Solver: a stack and K lone nets get the same data
    checks, minibatches and learning-rate schedule for one seed.
    """

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
            X_batch = kernels.for_module(xp).flip_crop(X_batch, self._augment_seed,
                                                       self._step_index,
                                                       self.augment["flip"],
                                                       self.augment["crop_padding"])
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

    def _reset(self):
        self.epoch = 0
        self.best_val_acc = 0.0
        self.best_params = {}
        self._best_norms = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self._pending_losses = []
        self._t = 0
        self._epoch_order = None
        self._batch = None
        # the step's scalars as arrays of the backend, rewritten in place before each step
        # (_begin_step): the step number, and each parameter's update-op scalar rows
        self._step_index = self._xp.zeros((), dtype=np.int64)
        self._scalar_rows = {}
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        if optim.by_role(self.update_rule):  # e.g. adamw decays the model's weights only
            roles = check_roles(self.model)
            self.optim_configs = {name: optim.role_config(self.update_rule, config, roles[name])
                                  for name, config in self.optim_configs.items()}
        self._base_lr = {name: config.get("learning_rate",
                                          optim.DEFAULTS[self.update_rule]["learning_rate"])
                         for name, config in self.optim_configs.items()}

    # -- the training step ---------------------------------------------------
    def _set_learning_rates(self):
        """With a schedule: learning_rate = base * lr_decay**epoch * schedule factor."""
        factor = self._scheduled_factor()
        for name, config in self.optim_configs.items():
            config["learning_rate"] = self._base_lr[name] * factor

    def _begin_step(self):
        """The host half of a step: its scalars into the arrays that the step's ops read.

        The step number goes into `_step_index` (the dropout and augment step,
        as the contract's dropout_param["step"]); with fused updates, each
        parameter's learning rate (times the schedule), Adam's step count and
        bias corrections go into its scalar rows (optim.begin_step). The
        arrays stay the same objects from step to step, so everything after
        this reads the step's values from memory and a CUDA graph of it stays
        valid. (Without fused updates the functional rules take Python floats.)
        """
        self._step_index[...] = self._t
        dropout_param = getattr(self.model, "dropout_param", None)
        if dropout_param is not None:
            dropout_param["step"] = self._step_index
        if self._fused():
            rows = self._scalar_rows
            for name, w in self.model.params.items():
                rows[name] = optim.begin_step(self.update_rule, self._update_view(w),
                                              self.optim_configs[name], rows.get(name))

    def _step(self):
        if self.lr_schedule:
            self._set_learning_rates()
        self._begin_step()
        X_batch, y_batch = self._next_batch(self._t)
        loss, grads = self._loss(X_batch, y_batch)
        for name, w in list(self.model.params.items()):
            loss = self._update(name, w, grads[name], loss)
        self._pending_losses.append(loss)

    def _read_losses(self):
        """Move pending losses to loss_history (one device read); stop on a non-finite one."""
        if not self._pending_losses:
            return
        pending = self._pending_losses
        self._pending_losses = []
        values = [float(v) for v in to_numpy(self._xp.stack([self._xp.asarray(l) for l in pending]))]
        first = len(self.loss_history)
        self.loss_history.extend(values)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            iteration = first + bad + 1
            self._restore_best()
            raise FloatingPointError(
                f"the training loss became {values[bad]} at iteration {iteration} (epoch "
                f"{(iteration - 1) // self.iterations_per_epoch + 1}); training stopped and "
                "model.params holds the best parameters seen. Try a lower learning_rate, a "
                "smaller weight_scale or stronger reg.")

    # -- accuracy and the best model -------------------------------------------
    def check_accuracy(self, X, y, num_samples=None, batch_size=128, flip=False):
        """Fraction of `X` the model classifies as `y` (a Python float).

        num_samples: evaluate a random subsample of this size. Predictions
        run in batches of `batch_size` (fastnn.inference); correct counts stay
        on the device. flip: average each image's scores with its mirror's.
        """
        num_samples = as_optional_size(num_samples, "num_samples", low=1)
        xp = self._xp
        X, y = xp.asarray(X), xp.asarray(y)
        n = X.shape[0]
        if num_samples is not None and n > num_samples:
            idx = xp.asarray(self._eval_rng.choice(n, num_samples, replace=False))
            X, y, n = X[idx], y[idx], num_samples
        return float(inference.count_correct(self.model, X, y, batch_size, flip)) / max(n, 1)

    def _record_accuracy(self):
        train_acc = self.check_accuracy(self.X_train, self.y_train,
                                        num_samples=self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val, num_samples=self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if self.verbose:
            self._print(f"(Epoch {self.epoch} / {self.num_epochs}) "
                        f"train acc: {train_acc:f}; val_acc: {val_acc:f}")
        if val_acc > self.best_val_acc or not self.best_params:
            # NaN parameters can still score (argmax of NaN rows is class 0): never keep them
            xp = self._xp
            if bool(xp.stack([xp.isfinite(w).all() for w in self.model.params.values()]).all()):
                self.best_val_acc = val_acc
                self._keep_as_best()

    def _keep_as_best(self):
        self.best_params = {k: v.copy() for k, v in self.model.params.items()}
        self._best_norms = {key: {k: p[k].copy() for k in STATISTICS if p.get(k) is not None}
                            for key, p in norm_params(self.model).items()}

    def _restore_best(self):
        """model.params (and the norms' running statistics) <- the best seen."""
        if not self.best_params:
            return
        for name, best in self.best_params.items():  # into the arrays: params are never rebound
            self.model.params[name][...] = best
        for key, bn_param in norm_params(self.model).items():
            bn_param.update({k: v.copy() for k, v in self._best_norms.get(key, {}).items()})

    # -- the loop ------------------------------------------------------------
    def train(self):
        """Run the optimisation; afterwards model.params holds the best parameters seen."""
        per_epoch = self.iterations_per_epoch
        total = self.num_epochs * per_epoch
        bar = None
        if not self.best_params:  # the initial parameters: a finite fallback from the start
            self._keep_as_best()
        with stop_requests() as stop:
            try:
                while self._t < total and not self._finished():
                    if self.progress and bar is None:
                        bar = self._progress_bar(per_epoch)
                    self._step()
                    t = self._t
                    self._t += 1
                    if bar is not None:
                        bar.update(1)
                    # a device read only when something is shown (else at epoch ends)
                    if t % self.print_every == 0 and (self.verbose or bar is not None):
                        self._read_losses()
                        if self.verbose and bar is None:
                            self._print(f"(Iteration {t + 1} / {total}) "
                                        f"loss: {self._last_loss():f}")
                        if bar is not None:
                            bar.set_postfix(loss=f"{self._last_loss():.4f}")
                    epoch_end = self._t % per_epoch == 0
                    if epoch_end:
                        self._read_losses()
                        self.epoch += 1
                        self._epoch_order = None
                        if not self.lr_schedule:  # the classic decay; schedules set it per step
                            self._decay_learning_rates()
                        if bar is not None:
                            bar.close()
                            bar = None
                    if t == 0 or epoch_end or self._t == total:
                        self._read_losses()
                        self._record_accuracy()
                    if epoch_end:
                        self._after_epoch()
                        self._write_checkpoints()
                    if stop.requested:
                        self._interrupted(stop.signum)
            finally:
                if bar is not None:
                    bar.close()
        self._read_losses()
        self._restore_best()

    # -- hooks (StackedSolver trains K members through the same loop) ---------
    def _finished(self):
        """True when nothing is left to train before the last iteration."""
        return False

    def _after_epoch(self):
        """Called at each epoch end, after the accuracy check, before checkpoints."""

    def _last_loss(self):
        """The latest loss read, for printing (a Python float)."""
        return self.loss_history[-1]

    def _loss(self, X_batch, y_batch):
        """(loss, grads) of one minibatch."""
        return self.model.loss(X_batch, y_batch)

    def _fused(self):
        """Whether updates run in place (optim.begin_step / apply_step)."""
        return self.fused_updates

    def _update_view(self, w):
        """The array the update op steps for parameter w (the stack: its member blocks)."""
        return w

    def _update(self, name, w, dw, loss):
        """Update parameter `name` (the array w) with gradient dw; returns the step's loss."""
        if self.fused_updates:  # in place: model.params[name] stays the same array
            optim.apply_step(self.update_rule, w, dw, self.optim_configs[name],
                             self._scalar_rows[name])
        else:
            self.model.params[name], self.optim_configs[name] = optim.RULES[self.update_rule](
                w, dw, self.optim_configs[name])
        return loss

    def _decay_learning_rates(self):
        default = optim.DEFAULTS[self.update_rule]["learning_rate"]
        for config in self.optim_configs.values():
            config["learning_rate"] = config.get("learning_rate", default) * self.lr_decay

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
        arrays.update({f"best/{k}": v for k, v in self.best_params.items()})
        for key, best in self._best_norms.items():
            arrays.update({f"best_norm/{key}/{k}": v for k, v in best.items()})
        configs = {}
        for name, config in self.optim_configs.items():
            configs[name] = {}
            for key, value in config.items():
                if hasattr(value, "shape"):
                    arrays[f"optim/{name}/{key}"] = value
                else:
                    configs[name][key] = value
        if self._epoch_order is not None:
            arrays["epoch_order"] = self._epoch_order
        seed = getattr(self.model, "dropout_param", {}).get("seed")
        meta = {
            "fastnn_version": __version__,
            "model_class": type(self.model).__name__,
            "model_args": getattr(self.model, "init_args", None),
            "update_rule": self.update_rule, "optim_configs": configs,
            "epoch": self.epoch, "t": self._t, "best_val_acc": self.best_val_acc,
            "loss_history": self.loss_history, "train_acc_history": self.train_acc_history,
            "val_acc_history": self.val_acc_history,
            "batch_rng": self._batch_rng.bit_generator.state,
            "eval_rng": self._eval_rng.bit_generator.state,
            "augment_seed": self._augment_seed,
            # drawn at construction when the model was built without a seed
            "dropout_seed": seed if isinstance(seed, int) else None,
        }
        self._save_extra(arrays, meta)
        write_checkpoint(path, arrays, meta)

    def _save_extra(self, arrays, meta):
        """Add what a subclass keeps beyond Solver's state to a checkpoint's arrays and meta."""

    def _load_extra(self, arrays, meta, path):
        """Restore what _save_extra wrote (called before the model state is restored)."""

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

        def section(prefix):
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        self._load_extra(arrays, meta, path)
        set_model_state(self.model, section("model/"), path)
        self.best_params = {k: xp.asarray(v) for k, v in section("best/").items()}
        self._best_norms = {}
        for name, value in section("best_norm/").items():
            key, stat = name.split("/", 1)
            self._best_norms.setdefault(key, {})[stat] = xp.asarray(value)
        self.optim_configs = {}
        for name, config in meta["optim_configs"].items():
            config = dict(config)
            config.update({k: xp.asarray(v) for k, v in section(f"optim/{name}/").items()})
            self.optim_configs[name] = config
        self._epoch_order = xp.asarray(arrays["epoch_order"]) if "epoch_order" in arrays else None
        self.epoch, self._t = int(meta["epoch"]), int(meta["t"])
        self.best_val_acc = float(meta["best_val_acc"])
        self.loss_history = [float(v) for v in meta["loss_history"]]
        self.train_acc_history = [float(v) for v in meta["train_acc_history"]]
        self.val_acc_history = [float(v) for v in meta["val_acc_history"]]
        self._pending_losses = []
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
