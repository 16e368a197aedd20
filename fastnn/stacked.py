"""Stacked training: K fully connected nets of one architecture trained at the same time.

A stack's members share the architecture (hidden_dims, batchnorm on or
off), and, in `StackedSolver`, the minibatches, batch size, update rule and
learning-rate schedule; each has its own weight scale, reg, dropout and
seed, its own learning rate (and weight decay) and its own batchnorm
statistics. Member k of a stack computes what
`FullyConnectedNet(hidden_dims, ..., seed=seed_k)` computes (the same
initial weights bit for bit, the same dropout masks), and `StackedSolver`
draws the minibatches and learning rates `Solver` draws for the same seed,
so a stacked run equals K separate `Solver` runs up to float rounding; it
just does the work of K nets in a few wide matrix products. (One thing
rounding decides: with batchnorm, a bias that feeds a batchnorm layer has a
true gradient of 0, and Adam turns the round-off it gets instead into
steps of up to lr, in a stack as in a lone net.)

There is no second network here: `StackedFullyConnectedNet` is a
`FullyConnectedNet` whose parameters have a leading member axis, and its
`loss` is FullyConnectedNet's, computed by the same layers (fastnn.layers
take a member axis: see its docstring); `StackedSolver` is a `Solver` (the
same loop, batches, schedules, printing, progress bar, checkpoints and
Ctrl-C handling) whose bookkeeping is per member.

Layout (K members, layer widths D = input_dim, H1, ..., HL-1, C): every
parameter is (K, ...) (`member_blocks` views any of them, its gradient or
optimizer state as the (A, K, B) blocks the update ops take); W1 (K, D, H1)
is a view of a (D, K, H1) array, so the first layer is ONE matrix product
over the shared minibatch. Members are named by their index in the
`members` list given to the constructor (their id); ids stay the same when
other members leave the stack (`remove_members`).

Everything is written against the array namespace of the parameters. The
training step does no host/device synchronisation: per-member learning
rates live on the device as float64, losses stay there until the epoch end.
"""
import math

import numpy as np

from fastnn import optim
from fastnn.backend import get_array_module, to_numpy, use_backend, xp as active_xp
from fastnn.checks import as_size
from fastnn.classifiers import FullyConnectedNet
from fastnn.classifiers.base import member_blocks
from fastnn.serialization import STATISTICS
from fastnn.solver import Solver

MEMBER_DEFAULTS = {"weight_scale": 1e-2, "reg": 0.0, "dropout": 0.0}
MEMBER_KEYS = ("weight_scale", "reg", "dropout", "seed")
PER_MEMBER = ("learning_rate", "weight_decay")   # hyperparameters that may differ per member
EVAL_BATCH_SIZE = 512


def take_members(a, index):
    """Members `index` (positions, an index array of a's module) of `a` (K, ...), its layout kept."""
    xp = get_array_module(a, index)
    perm = sorted(range(a.ndim), key=lambda i: (-a.strides[i], i))
    taken = xp.take(a.transpose(perm), index, axis=perm.index(0))
    return taken.transpose(np.argsort(perm))


def _check_member(index, member):
    unknown = sorted(set(member) - set(MEMBER_KEYS))
    if unknown:
        raise ValueError(f"member {index}: unknown keys {unknown}; known: {list(MEMBER_KEYS)}")
    if member.get("seed") is None:
        raise ValueError(f"member {index} needs an integer 'seed' (its initial weights and "
                         "dropout masks are those of FullyConnectedNet(..., seed=seed))")
    m = {**MEMBER_DEFAULTS, **member}
    if not 0 <= m["dropout"] < 1:
        raise ValueError(f"member {index}: dropout is the probability of dropping a unit and "
                         f"must be in [0, 1), got {m['dropout']}")
    return {"weight_scale": float(m["weight_scale"]), "reg": float(m["reg"]),
            "dropout": float(m["dropout"]), "seed": as_size(m["seed"], f"member {index}: seed")}


class StackedFullyConnectedNet(FullyConnectedNet):
    """K FullyConnectedNets of one architecture, held and computed as one.

    hidden_dims, input_dim, num_classes, use_batchnorm, dtype: shared, as in
    FullyConnectedNet (at least one hidden layer). members: a list of dicts
    with `seed` (int, required), `weight_scale` (1e-2), `reg` (0.0) and
    `dropout` (0.0, the probability of dropping a unit); member k's initial
    parameters are those of FullyConnectedNet(..., seed=members[k]["seed"]).
    Parameters live on the backend active at construction.
    """

    def __init__(self, hidden_dims, members, input_dim=3 * 32 * 32, num_classes=10,
                 use_batchnorm=False, dtype=np.float32):
        hidden_dims = [as_size(h, f"hidden_dims[{i}]", low=1) for i, h in enumerate(hidden_dims)]
        if not hidden_dims:
            raise ValueError("a stack needs at least one hidden layer (hidden_dims is empty)")
        members = [_check_member(i, m) for i, m in enumerate(members)]
        if not members:
            raise ValueError("a stack needs at least one member")
        self.dtype = np.dtype(dtype)
        self.hidden_dims = hidden_dims
        self.input_dim = as_size(input_dim, "input_dim", low=1)
        self.num_classes = as_size(num_classes, "num_classes", low=1)
        self.use_batchnorm = bool(use_batchnorm)
        self.normalization = "batchnorm" if self.use_batchnorm else None
        self.ln_params = []  # layernorm members are not stacked yet
        self.num_layers = len(hidden_dims) + 1
        self.dims = [self.input_dim, *hidden_dims, self.num_classes]
        self.init_args = dict(hidden_dims=hidden_dims, members=members, input_dim=self.input_dim,
                              num_classes=self.num_classes, use_batchnorm=self.use_batchnorm,
                              dtype=self.dtype.name)
        self.members = members
        self.member_ids = list(range(len(members)))
        self._init_member_params()
        self._set_member_values()

    def _init_member_params(self):
        """Each member's parameters from its own default_rng(seed), in FullyConnectedNet's order."""
        k_count, dims = len(self.members), self.dims
        layers = list(enumerate(zip(dims[:-1], dims[1:]), start=1))
        weights = {i: np.empty((fan_in, k_count, fan_out) if i == 1 else (k_count, fan_in, fan_out),
                               dtype=self.dtype) for i, (fan_in, fan_out) in layers}
        for k, member in enumerate(self.members):
            rng = np.random.default_rng(member["seed"])
            for i, (fan_in, fan_out) in layers:
                w = member["weight_scale"] * rng.standard_normal((fan_in, fan_out))
                if i == 1:
                    weights[i][:, k, :] = w
                else:
                    weights[i][k] = w
        self._start_params()
        for i, (_, fan_out) in layers:
            self._add_param(f"W{i}", weights[i], "weight")
            if i == 1:  # (K, D, H1), a view of the (D, K, H1) array: one product per layer
                self.params["W1"] = self.params["W1"].transpose(1, 0, 2)
            self._add_param(f"b{i}", np.zeros((k_count, fan_out)), "bias")
            if self.use_batchnorm and i < self.num_layers:
                self._add_param(f"gamma{i}", np.ones((k_count, fan_out)), "scale")
                self._add_param(f"beta{i}", np.zeros((k_count, fan_out)), "shift")
                self._add_norm(i, (k_count, fan_out))
        self.bn_params = list(self.norm_params.values())

    def _set_member_values(self):
        """Per-member constants: reg (on the device), dropout p and seeds (the layers' own)."""
        xp, members = get_array_module(*self.params.values()), self.members
        regs = np.array([m["reg"] for m in members], dtype=np.float64)
        self.reg = regs
        self._any_reg = bool(np.any(regs))
        self._reg = xp.asarray(regs.astype(self.dtype))
        self._half_reg = xp.asarray((0.5 * regs).astype(self.dtype))
        ps = np.array([m["dropout"] for m in members])
        self.use_dropout = bool(np.any(ps > 0))
        # FullyConnectedNet's layer i draws its mask with seed (seed + i), per member
        self.dropout_param = {"mode": "train", "p": ps, "step": getattr(self, "dropout_param", {}).get("step", 0),
                              "seed": np.array([m["seed"] for m in members], dtype=np.int64)}

    def _add_l2(self, xp, loss, grads):
        """Member k's loss + 0.5 * reg_k * sum of its W**2; its grads get reg_k * W."""
        if not self._any_reg:
            return loss
        from fastnn import kernels

        ops = kernels.for_module(xp)
        for name in self.weight_names():
            sums = ops.l2_stacked_(member_blocks(grads[name]), member_blocks(self.params[name]),
                                   self._reg)
            loss = loss + self._half_reg * sums
        return loss

    @property
    def num_members(self):
        """K, the number of members in the stack now."""
        return len(self.member_ids)

    def position(self, member_id):
        """The index along the member axis of member `member_id`."""
        try:
            return self.member_ids.index(member_id)
        except ValueError:
            raise KeyError(f"member {member_id!r} is not in the stack; its members are "
                           f"{self.member_ids}") from None

    def loss(self, X, y=None, step=None, l2=True):
        """Scores of every member, or their losses and gradients (FullyConnectedNet.loss).

        X (N, d1, ...) with d1*... = input_dim; y (N,) integer labels or None.
        step: the dropout step (default: dropout_param["step"], which
        StackedSolver advances). Returns scores (K, N, C) when y is None
        (test mode); else (losses (K,) on the device, grads keyed and laid
        out like params). Member k's loss is its softmax loss + 0.5 * reg_k *
        sum of its W**2 (left out with l2=False).
        """
        if not self.member_ids:
            raise ValueError("the stack has no members left")
        width = math.prod(X.shape[1:])
        if width != self.input_dim:
            raise ValueError(f"X of shape {X.shape} has {width} features per example; "
                             f"the stack expects input_dim={self.input_dim}")
        if step is not None:
            self.dropout_param["step"] = step
        return super().loss(X, y, l2=l2)

    # -- members -------------------------------------------------------------
    def member_state(self, member_id):
        """(params, running statistics) of one member as FullyConnectedNet holds them (copies).

        params: {name: array shaped as in FullyConnectedNet}; running
        statistics: one dict per hidden layer ([] without batchnorm).
        """
        k = self.position(member_id)
        params = {name: a[k].copy() for name, a in self.params.items()}
        running = [{key: bn[key][k].copy() for key in STATISTICS} for bn in self.bn_params]
        return params, running

    def member(self, member_id):
        """A FullyConnectedNet holding member `member_id`'s current parameters and BN statistics."""
        params, running = self.member_state(member_id)
        return _member_net(self, self.members[self.position(member_id)], params, running)

    def remove_members(self, member_ids):
        """Prune: the members `member_ids` leave the stack (every array loses their slices).

        Returns the positions (in the stack before the call) of the members kept.
        """
        drop = set(member_ids)
        unknown = sorted(drop - set(self.member_ids))
        if unknown:
            raise KeyError(f"members {unknown} are not in the stack; its members are "
                           f"{self.member_ids}")
        keep = [k for k, mid in enumerate(self.member_ids) if mid not in drop]
        xp = get_array_module(*self.params.values())
        index = xp.asarray(np.array(keep, dtype=np.int64))
        for name, a in self.params.items():
            self.params[name] = take_members(a, index)
        for bn in self.bn_params:
            for key in STATISTICS:
                bn[key] = xp.take(bn[key], index, axis=0)
        self.member_ids = [self.member_ids[k] for k in keep]
        self.members = [self.members[k] for k in keep]
        self._set_member_values()
        return keep


class StackedSolver(Solver):
    """Train every member of a StackedFullyConnectedNet at once, as K Solvers would.

    data: X_train, y_train, X_val, y_val (as for Solver). update_rule: a
    fastnn.optim rule ("adam"). optim_configs: one dict per member (in the
    stack's order) with its learning_rate (and, for adamw, weight_decay);
    the other hyperparameters (beta1, momentum, ...) must be the same for
    all. The other options are Solver's and mean what they mean there (for
    the same seed: the same minibatches, augmentation, dropout steps,
    learning rates and accuracy subsamples; checkpoint_path, progress,
    print_every, verbose (False here)). Histories are per member and every
    loss is kept; losses are read (and non-finite ones detected) at epoch
    ends and when printed.

    on_epoch_end(epoch, val_accs) is called after each epoch's accuracies
    with val_accs {member_id: float}; it may return member ids to prune.
    A member whose loss is not finite fails and leaves the stack; the others
    go on. After train(): `results[member_id]` holds status ("complete",
    "pruned", "failed"), best_val_acc and the histories; best_model(member_id)
    gives a FullyConnectedNet with its best parameters.
    """

    def __init__(self, stack, data, update_rule="adam", optim_configs=None, on_epoch_end=None,
                 verbose=False, **options):
        if "optim_config" in options:
            raise ValueError("StackedSolver takes optim_configs, one dict per member")
        self.stack, self.on_epoch_end = stack, on_epoch_end
        self._member_configs = optim_configs
        super().__init__(stack, data, update_rule=update_rule, verbose=verbose, **options)

    # -- setup -----------------------------------------------------------------
    def _reset(self):
        super()._reset()
        stack, xp = self.stack, self._xp
        configs = self._check_configs(self._member_configs)
        lr = xp.asarray(np.array([c["learning_rate"] for c in configs], np.float64))
        decay = xp.asarray(np.array([c.get("weight_decay", 0.0) for c in configs], np.float64))
        self.optim_configs = {}
        for name in stack.params:
            config = {**self._shared, "learning_rate": lr}
            if optim.by_role(self.update_rule):  # as Solver (adamw: the weights only)
                config = optim.role_config(self.update_rule, {**config, "weight_decay": decay},
                                           stack.param_roles[name])
            self.optim_configs[name] = config
        self._base_lr = {name: lr for name in stack.params}
        # the update ops add reg_k * W to the weights' gradients as they read W
        self._fused_l2 = self.fused_updates and stack._any_reg
        self.results = {mid: {"status": "training", "best_val_acc": 0.0, "loss_history": [],
                              "train_acc_history": [], "val_acc_history": [],
                              "member": dict(m), "optim_config": dict(c)}
                        for mid, m, c in zip(stack.member_ids, stack.members, configs)}
        self._best, self._val_accs = {}, {}

    def _check_configs(self, optim_configs):
        """One filled config per member; the shared hyperparameters kept in self._shared."""
        k_count = self.stack.num_members
        configs = [{} for _ in range(k_count)] if optim_configs is None else [
            optim.check_config(self.update_rule, c or {}, f"optim_configs[{k}]")
            for k, c in enumerate(optim_configs)]
        if len(configs) != k_count:
            raise ValueError(f"optim_configs has {len(configs)} entries for a stack of "
                             f"{k_count} members; give one dict per member")
        defaults = optim.DEFAULTS[self.update_rule]
        for config in configs:
            for key, value in defaults.items():
                config.setdefault(key, value)
        self._shared = {}
        for key in defaults:
            if key in PER_MEMBER:
                continue
            values = {c[key] for c in configs}
            if len(values) > 1:
                raise ValueError(f"{key!r} differs between members ({sorted(values)}); a stack "
                                 f"shares every hyperparameter but {list(PER_MEMBER)}")
            self._shared[key] = configs[0][key]
        return configs

    # -- the training step -------------------------------------------------------
    def _loss(self, X_batch, y_batch):
        return self.stack.loss(X_batch, y_batch, l2=not self._fused_l2)

    def _fused(self):
        return True  # the stack always updates in place

    def _update_view(self, w):
        return member_blocks(w)

    def _update(self, name, w, dw, loss):
        """One fused in-place update of every member's `name` (member_blocks of it)."""
        stack = self.stack
        l2 = stack._reg if self._fused_l2 and stack.param_roles[name] == "weight" else None
        sums = optim.apply_step(self.update_rule, member_blocks(w), member_blocks(dw),
                                self.optim_configs[name], self._scalar_rows[name], l2=l2)
        return loss if l2 is None else loss + stack._half_reg * sums

    # -- losses, accuracy, pruning -----------------------------------------------
    def _finished(self):
        return not self.stack.num_members

    def _last_loss(self):
        return float(np.mean([self.results[mid]["loss_history"][-1]
                              for mid in self.stack.member_ids])) if self.stack.num_members else 0.0

    def _read_losses(self):
        """Pending losses to the histories (one device read); members with a non-finite one fail."""
        if not self._pending_losses:
            return
        values = to_numpy(self._xp.stack(self._pending_losses))   # (steps, K)
        self._pending_losses = []
        failed = []
        for k, mid in enumerate(self.stack.member_ids):
            column = [float(v) for v in values[:, k]]
            self.results[mid]["loss_history"].extend(column)
            if not all(math.isfinite(v) for v in column):
                failed.append(mid)
        if failed:
            if self.verbose:
                self._print(f"(Epoch {self.epoch}) members {failed} failed: non-finite loss")
            self._drop(failed, "failed")

    def _correct_counts(self, X, y, num_samples):
        """(correct predictions per member (K,) on the device, examples counted)."""
        xp, n = self._xp, X.shape[0]
        if num_samples is not None and n > num_samples:
            idx = xp.asarray(self._eval_rng.choice(n, num_samples, replace=False))
            X, y, n = X[idx], y[idx], num_samples
        correct = xp.zeros(self.stack.num_members, dtype=np.int64)
        for start in range(0, n, EVAL_BATCH_SIZE):
            scores = self.stack.loss(X[start:start + EVAL_BATCH_SIZE])
            correct += (xp.argmax(scores, axis=2) == y[None, start:start + EVAL_BATCH_SIZE]).sum(
                axis=1)
        return correct, n

    def _record_accuracy(self):
        """Train and val accuracy of every member (one device read); keep the best parameters."""
        if not self.stack.num_members:
            return
        xp = self._xp
        train_correct, n_train = self._correct_counts(self.X_train, self.y_train,
                                                      self.num_train_samples)
        val_correct, n_val = self._correct_counts(self.X_val, self.y_val, self.num_val_samples)
        finite = None
        for w in self.stack.params.values():
            ok = xp.isfinite(member_blocks(w)).all(axis=(0, 2))
            finite = ok if finite is None else finite & ok
        counts = to_numpy(xp.stack([train_correct, val_correct, finite.astype(np.int64)]))
        self._val_accs = {}
        for k, mid in enumerate(self.stack.member_ids):
            result = self.results[mid]
            train_acc = int(counts[0, k]) / max(n_train, 1)
            val_acc = int(counts[1, k]) / max(n_val, 1)
            result["train_acc_history"].append(train_acc)
            result["val_acc_history"].append(val_acc)
            # NaN parameters can still score: never keep them (as Solver)
            if val_acc > result["best_val_acc"] and counts[2, k]:
                result["best_val_acc"] = val_acc
                self._best[mid] = self.stack.member_state(mid)
            self._val_accs[mid] = val_acc
        if self.verbose:
            best = max(self._val_accs.items(), key=lambda item: item[1], default=(None, 0.0))
            self._print(f"(Epoch {self.epoch} / {self.num_epochs}) {len(self._val_accs)} members; "
                        f"best val_acc {best[1]:f} (member {best[0]})")

    def _after_epoch(self):
        if self.on_epoch_end is not None and self.stack.num_members:
            pruned = self.on_epoch_end(self.epoch, dict(self._val_accs))
            if pruned:
                self.remove_members(list(pruned), status="pruned")

    def _keep_as_best(self):
        for mid in self.stack.member_ids:  # the initial parameters: a finite fallback
            self._best.setdefault(mid, self.stack.member_state(mid))

    def _restore_best(self):
        """The stack keeps training's last parameters; best_model(member_id) has the best."""

    def remove_members(self, member_ids, status="pruned"):
        """Members `member_ids` leave the stack (and their optimizer state with them)."""
        unknown = sorted(set(member_ids) - set(self.results), key=repr)
        if unknown:
            raise KeyError(f"cannot prune members {unknown}: no such members; the stack "
                           f"started with {sorted(self.results)}")
        self._read_losses()  # pending losses are (K,) arrays of the stack as it is now
        # members that already left (failed or pruned) stay as they are
        member_ids = [mid for mid in member_ids if mid in self.stack.member_ids]
        if member_ids:
            self._drop(member_ids, status)

    def _drop(self, member_ids, status):
        keep = self.stack.remove_members(member_ids)
        self._keep_configs(keep)
        for mid in member_ids:
            self.results[mid]["status"] = status

    def _keep_configs(self, keep):
        """The optimizer state and per-member hyperparameters of the members at `keep`."""
        index = self._xp.asarray(np.array(keep, dtype=np.int64))
        for config in self.optim_configs.values():
            for key, value in config.items():
                if hasattr(value, "ndim") and value.ndim == 1:    # per member: (K,)
                    config[key] = value[index]
                elif hasattr(value, "ndim") and value.ndim == 3:  # state blocks (A, K, B)
                    config[key] = self._xp.take(value, index, axis=1)
        self._base_lr = {name: lr[index] for name, lr in self._base_lr.items()}

    # -- the loop ----------------------------------------------------------------
    def train(self):
        """Train every member; afterwards `results` and `best_model(member_id)` hold the outcome."""
        super().train()
        for mid in self.stack.member_ids:
            self.results[mid]["status"] = "complete"
        return self.results

    def best_model(self, member_id):
        """A FullyConnectedNet holding member `member_id`'s best parameters (by val accuracy)."""
        if member_id not in self.results:
            raise KeyError(f"no member {member_id!r}; members: {sorted(self.results)}")
        if member_id not in self._best:
            self._best[member_id] = self.stack.member_state(member_id)
        params, running = self._best[member_id]
        return _member_net(self.stack, self.results[member_id]["member"],
                           {k: v.copy() for k, v in params.items()},
                           [{k: v.copy() for k, v in stats.items()} for stats in running])

    # -- checkpoints (Solver's format, plus the members' bookkeeping) ---------------
    def _save_extra(self, arrays, meta):
        meta["member_ids"] = list(self.stack.member_ids)
        meta["results"] = {str(mid): result for mid, result in self.results.items()}
        for mid, (params, running) in self._best.items():
            arrays.update({f"member_best/{mid}/param/{k}": v for k, v in params.items()})
            for i, stats in enumerate(running):
                arrays.update({f"member_best/{mid}/norm/{i}/{k}": v for k, v in stats.items()})

    def _load_extra(self, arrays, meta, path):
        """Prune the stack to the checkpoint's members, then restore their bookkeeping."""
        saved = meta.get("member_ids")
        if saved is None:
            raise ValueError(f"{path} is incompatible: it is a Solver checkpoint, not a "
                             "StackedSolver one")
        missing = sorted(set(saved) - set(self.stack.member_ids))
        if missing:
            raise ValueError(f"{path} is incompatible: its members {missing} are not in this stack")
        gone = [mid for mid in self.stack.member_ids if mid not in saved]
        if gone:
            self._keep_configs(self.stack.remove_members(gone))
        self.results = {int(mid): result for mid, result in meta["results"].items()}
        xp, self._best = self._xp, {}
        for name, value in arrays.items():
            if not name.startswith("member_best/"):
                continue
            mid, kind, rest = name[len("member_best/"):].split("/", 2)
            params, running = self._best.setdefault(
                int(mid), ({}, [{} for _ in self.stack.bn_params]))
            if kind == "param":
                params[rest] = xp.asarray(value)
            else:
                i, stat = rest.split("/")
                running[int(i)][stat] = xp.asarray(value)


def _member_net(stack, member, params, running):
    """A FullyConnectedNet with the stack's architecture and `member`'s settings, holding
    `params` and the batchnorm running statistics `running` (arrays taken as they are)."""
    with use_backend("cupy" if get_array_module(*params.values()) is not np else "numpy"):
        net = FullyConnectedNet(stack.hidden_dims, stack.input_dim, stack.num_classes,
                                dropout=member["dropout"], use_batchnorm=stack.use_batchnorm,
                                reg=member["reg"], weight_scale=member["weight_scale"],
                                dtype=stack.dtype, seed=member["seed"])
    net.params = dict(params)
    for bn_param, stats in zip(net.bn_params, running):
        bn_param.update(stats)
    return net
