"""The parts of a StackedSolver (fastnn.stacked): the stack's `Updater` and `Tracker`.

- `StackedUpdater`: one config per parameter whose learning rate (and AdamW
  decay) is a (K,) device array, one value per member; every step runs on the
  parameters' member blocks; `keep` follows the members that stay.
- `StackedTracker`: per-member results (status, histories, best val accuracy),
  each member's best parameters, pruning after each epoch and dropping members
  whose loss is not finite. The Solver's own histories stay empty.

Everything else (loop, batches, schedules, printing, checkpoints, Ctrl-C) is
Solver's.
"""
import math

import numpy as np

from fastnn import optim
from fastnn.backend import get_array_module, to_numpy
from fastnn.classifiers.base import member_blocks
from fastnn.solver_parts import Tracker, Updater

PER_MEMBER = ("learning_rate", "weight_decay")   # hyperparameters that may differ per member
EVAL_BATCH_SIZE = 512


def check_member_configs(update_rule, optim_configs, k_count):
    """(one filled config per member, the hyperparameters they share)."""
    if optim.SPECS[update_rule].filter_ndim is not None:
        raise ValueError(f"update rule {update_rule!r} steps each conv filter as a whole, and a "
                         "stack's update ops take member blocks; use another rule, or train the "
                         "members one at a time with Solver")
    configs = [{} for _ in range(k_count)] if optim_configs is None else [
        optim.check_config(update_rule, c or {}, f"optim_configs[{k}]")
        for k, c in enumerate(optim_configs)]
    if len(configs) != k_count:
        raise ValueError(f"optim_configs has {len(configs)} entries for a stack of "
                         f"{k_count} members; give one dict per member")
    defaults = optim.DEFAULTS[update_rule]
    for k, config in enumerate(configs):
        if set(config) & set(optim.SPECS[update_rule].optional):  # the stack has its own L2
            raise ValueError(f"optim_configs[{k}] sets {update_rule}'s weight_decay, which a "
                             "stack does not take; give each member a `reg` (L2) instead")
    for config in configs:
        for key, value in defaults.items():
            config.setdefault(key, value)
    shared = {}
    for key in defaults:
        if key in PER_MEMBER:
            continue
        values = {c[key] for c in configs}
        if len(values) > 1:
            raise ValueError(f"{key!r} differs between members ({sorted(values)}); a stack "
                             f"shares every hyperparameter but {list(PER_MEMBER)}")
        shared[key] = configs[0][key]
    return configs, shared


class StackedUpdater(Updater):
    """Update rule `update_rule` over a stack's parameters, member k from optim_configs[k]
    (`member_configs`: those configs filled in). Always in place, on member blocks."""

    def __init__(self, update_rule, stack, optim_configs):
        self.update_rule, self.fused = update_rule, True
        self.scalar_rows = {}
        self.xp = xp = get_array_module(*stack.params.values())
        configs, shared = check_member_configs(update_rule, optim_configs, stack.num_members)
        self.member_configs = configs
        lr = xp.asarray(np.array([c["learning_rate"] for c in configs], np.float64))
        decay = xp.asarray(np.array([c.get("weight_decay", 0.0) for c in configs], np.float64))
        self.configs = {}
        for name in stack.params:
            config = {**shared, "learning_rate": lr}
            if optim.by_role(self.update_rule):  # as Solver (adamw: the weights only)
                config = optim.role_config(self.update_rule, {**config, "weight_decay": decay},
                                           stack.param_roles[name])
            self.configs[name] = config
        self.base_lr = {name: lr for name in stack.params}

    def view(self, w):
        """Every member's `w` as the (A, K, B) blocks the update ops take."""
        return member_blocks(w)

    def keep(self, keep):
        """The optimizer state and per-member hyperparameters of the members at `keep`."""
        index = self.xp.asarray(np.array(keep, dtype=np.int64))
        for config in self.configs.values():
            for key, value in config.items():
                if hasattr(value, "ndim") and value.ndim == 1:    # per member: (K,)
                    config[key] = value[index]
                elif hasattr(value, "ndim") and value.ndim == 3:  # state blocks (A, K, B)
                    config[key] = self.xp.take(value, index, axis=1)
        self.base_lr = {name: lr[index] for name, lr in self.base_lr.items()}


class StackedTracker(Tracker):
    """Per-member results and best parameters of `stack`, trained by a StackedSolver.

    results[member_id]: status ("training", "complete", "pruned", "failed"),
    best_val_acc, loss_history, train_acc_history, val_acc_history, the
    member's settings and optim_config. best[member_id]: (params, running
    statistics) at its best val accuracy. Every loss is kept; losses are read
    (and non-finite ones detected) at epoch ends and when printed.
    """

    def __init__(self, stack, xp, member_configs):
        super().__init__(stack, xp)
        self.stack = stack
        self.results = {mid: {"status": "training", "best_val_acc": 0.0, "loss_history": [],
                              "train_acc_history": [], "val_acc_history": [],
                              "member": dict(m), "optim_config": dict(c)}
                        for mid, m, c in zip(stack.member_ids, stack.members, member_configs)}
        self.best, self.val_accs = {}, {}

    def finished(self):
        return not self.stack.num_members

    def last_loss(self):
        return float(np.mean([self.results[mid]["loss_history"][-1]
                              for mid in self.stack.member_ids])) if self.stack.num_members else 0.0

    def read_losses(self, solver):
        """Pending losses to the histories (one device read); members with a non-finite one fail."""
        if not self.pending:
            return
        values = to_numpy(self.xp.stack(self.pending))   # (steps, K)
        self.pending = []
        failed = []
        for k, mid in enumerate(self.stack.member_ids):
            column = [float(v) for v in values[:, k]]
            self.results[mid]["loss_history"].extend(column)
            if not all(math.isfinite(v) for v in column):
                failed.append(mid)
        if failed:
            if solver.verbose:
                solver._print(f"(Epoch {solver.epoch}) members {failed} failed: non-finite loss")
            solver._drop(failed, "failed")

    def _correct_counts(self, X, y, num_samples, eval_rng):
        """(correct predictions per member (K,) on the device, examples counted)."""
        xp, n = self.xp, X.shape[0]
        if num_samples is not None and n > num_samples:
            idx = xp.asarray(eval_rng.choice(n, num_samples, replace=False))
            X, y, n = X[idx], y[idx], num_samples
        correct = xp.zeros(self.stack.num_members, dtype=np.int64)
        for start in range(0, n, EVAL_BATCH_SIZE):
            scores = self.stack.loss(X[start:start + EVAL_BATCH_SIZE])
            correct += (xp.argmax(scores, axis=2) == y[None, start:start + EVAL_BATCH_SIZE]).sum(
                axis=1)
        return correct, n

    def record_accuracy(self, solver):
        """Train and val accuracy of every member (one device read); keep the best parameters."""
        if not self.stack.num_members:
            return
        xp, rng = self.xp, solver._eval_rng
        train_correct, n_train = self._correct_counts(solver.X_train, solver.y_train,
                                                      solver.num_train_samples, rng)
        val_correct, n_val = self._correct_counts(solver.X_val, solver.y_val,
                                                  solver.num_val_samples, rng)
        finite = None
        for w in self.stack.params.values():
            ok = xp.isfinite(member_blocks(w)).all(axis=(0, 2))
            finite = ok if finite is None else finite & ok
        counts = to_numpy(xp.stack([train_correct, val_correct, finite.astype(np.int64)]))
        self.val_accs = {}
        for k, mid in enumerate(self.stack.member_ids):
            result = self.results[mid]
            train_acc = int(counts[0, k]) / max(n_train, 1)
            val_acc = int(counts[1, k]) / max(n_val, 1)
            result["train_acc_history"].append(train_acc)
            result["val_acc_history"].append(val_acc)
            # NaN parameters can still score: never keep them (as Solver)
            if val_acc > result["best_val_acc"] and counts[2, k]:
                result["best_val_acc"] = val_acc
                self.best[mid] = self.stack.member_state(mid)
            self.val_accs[mid] = val_acc
        if solver.verbose:
            best = max(self.val_accs.items(), key=lambda item: item[1], default=(None, 0.0))
            solver._print(f"(Epoch {solver.epoch} / {solver.num_epochs}) {len(self.val_accs)} "
                          f"members; best val_acc {best[1]:f} (member {best[0]})")

    def after_epoch(self, solver):
        """Members that solver.on_epoch_end(epoch, val_accs) returns leave (pruned)."""
        if solver.on_epoch_end is not None and self.stack.num_members:
            pruned = solver.on_epoch_end(solver.epoch, dict(self.val_accs))
            if pruned:
                solver.remove_members(list(pruned), status="pruned")

    def keep_as_best(self):
        for mid in self.stack.member_ids:  # the initial parameters: a finite fallback
            self.best.setdefault(mid, self.stack.member_state(mid))

    def restore_best(self):
        """The stack keeps training's last parameters; StackedSolver.best_model has the best."""

    def save(self, arrays, meta):
        super().save(arrays, meta)
        meta["member_ids"] = list(self.stack.member_ids)
        meta["results"] = {str(mid): result for mid, result in self.results.items()}
        for mid, (params, running) in self.best.items():
            arrays.update({f"member_best/{mid}/param/{k}": v for k, v in params.items()})
            for i, stats in enumerate(running):
                arrays.update({f"member_best/{mid}/norm/{i}/{k}": v for k, v in stats.items()})

    def load(self, arrays, meta, path, solver=None):
        """Prune the stack (and solver's updater) to the checkpoint's members, then restore
        their bookkeeping."""
        saved = meta.get("member_ids")
        if saved is None:
            raise ValueError(f"{path} is incompatible: it is a Solver checkpoint, not a "
                             "StackedSolver one")
        missing = sorted(set(saved) - set(self.stack.member_ids))
        if missing:
            raise ValueError(f"{path} is incompatible: its members {missing} are not in this stack")
        gone = [mid for mid in self.stack.member_ids if mid not in saved]
        if gone:
            solver.updater.keep(self.stack.remove_members(gone))
        self.results = {int(mid): result for mid, result in meta["results"].items()}
        xp, self.best = self.xp, {}
        for name, value in arrays.items():
            if not name.startswith("member_best/"):
                continue
            mid, kind, rest = name[len("member_best/"):].split("/", 2)
            params, running = self.best.setdefault(
                int(mid), ({}, [{} for _ in self.stack.bn_params]))
            if kind == "param":
                params[rest] = xp.asarray(value)
            else:
                i, stat = rest.split("/")
                running[int(i)][stat] = xp.asarray(value)
        super().load(arrays, meta, path, solver)
