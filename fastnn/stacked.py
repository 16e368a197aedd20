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

Layout (K members, layer widths D = input_dim, H1, ..., HL-1, C):

- W1 (D, K, H1): reshaped for free to (D, K*H1), so the first layer is ONE
  matrix product over the shared minibatch; b1 (K, H1).
- Wi (K, Hi-1, Hi) for i > 1, bi (K, Hi): batched matrix products.
- gammai, betai (K, Hi); running statistics (K, Hi) in `bn_params`.
- Hidden activations are kept feature-major, (K, H, N): every product is
  then on C-contiguous or transposed operands (BLAS reads both without a
  copy), the first layer's (K*H1, N) output is the transposed problem
  (as fast as the (N, K*H1) product on idle cores, and 3-4x faster than it
  in our measurements when other processes share the cores), and
  batchnorm of the rows of (K*H, N) (`batchnorm_rows_*` ops, each feature a
  contiguous row) is per-member batchnorm.

A stack declares each parameter's role (`param_roles`, as FullyConnectedNet)
and its member axis (`member_axes`); `as_member_blocks` views any
parameter-shaped array as (A, K, B), the form the stacked kernel
ops (`fastnn.kernels` `*_stacked*`) take. Members are named by their index
in the `members` list given to the constructor (their id); ids stay the
same when other members leave the stack (`remove_members`).

Everything is written against the array namespace of the parameters:
numpy (Numba kernels) or cupy (the kernels' reference versions; the cupy
path has not been run yet, for want of a GPU where it was written). The
training step does no host/device synchronisation: per-member learning
rates live on the device as float64, losses stay there until the epoch end.
"""
import math

import numpy as np

from fastnn import kernels, optim, schedules
from fastnn.backend import get_array_module, get_backend, to_numpy, use_backend, xp as active_xp
from fastnn.classifiers import FullyConnectedNet
from fastnn.kernels.reference import dropout_seed_keys, keep_threshold
from fastnn.solver import SolverBase, check_augment

MEMBER_DEFAULTS = {"weight_scale": 1e-2, "reg": 0.0, "dropout": 0.0}
MEMBER_KEYS = ("weight_scale", "reg", "dropout", "seed")
BN_EPS = 1e-5        # batchnorm_forward's defaults, which FullyConnectedNet uses
BN_MOMENTUM = 0.9


def as_member_blocks(a, axis):
    """View an array whose members lie along `axis` as (A, K, B); member k owns [:, k, :]."""
    return a.reshape(math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1:]))


def take_members(a, axis, index):
    """The members `index` (an index array of a's module) of `a`, members along `axis`."""
    xp = get_array_module(a, index)
    return xp.take(a, index, axis=axis)


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
            "dropout": float(m["dropout"]), "seed": int(m["seed"])}


class StackedFullyConnectedNet:
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
        self.hidden_dims = [int(h) for h in hidden_dims]
        if not self.hidden_dims:
            raise ValueError("a stack needs at least one hidden layer (hidden_dims is empty)")
        members = [_check_member(i, m) for i, m in enumerate(members)]
        if not members:
            raise ValueError("a stack needs at least one member")
        self.input_dim, self.num_classes = int(input_dim), int(num_classes)
        self.use_batchnorm = bool(use_batchnorm)
        self.dtype = np.dtype(dtype)
        self.num_layers = len(self.hidden_dims) + 1
        self.dims = [self.input_dim, *self.hidden_dims, self.num_classes]
        self.members = members
        self.member_ids = list(range(len(members)))
        self.backend = get_backend()
        self._init_params()

    def _init_params(self):
        """Each member's W_i from its own default_rng(seed), in FullyConnectedNet's order."""
        xp, k_count = active_xp(), len(self.members)
        layers = list(enumerate(zip(self.dims[:-1], self.dims[1:]), start=1))
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
        self.params, self.param_roles, self.member_axes = {}, {}, {}

        def add(name, value, role, axis=0):
            self.params[name], self.param_roles[name], self.member_axes[name] = value, role, axis

        for i, (_, fan_out) in layers:
            add(f"W{i}", xp.asarray(weights[i]), "weight", 1 if i == 1 else 0)
            add(f"b{i}", xp.zeros((k_count, fan_out), dtype=self.dtype), "bias")
            if self.use_batchnorm and i < self.num_layers:
                add(f"gamma{i}", xp.ones((k_count, fan_out), dtype=self.dtype), "scale")
                add(f"beta{i}", xp.zeros((k_count, fan_out), dtype=self.dtype), "shift")
        self.bn_params = [{"running_mean": xp.zeros((k_count, h), dtype=self.dtype),
                           "running_var": xp.zeros((k_count, h), dtype=self.dtype)}
                          for h in self.hidden_dims] if self.use_batchnorm else []
        self._set_member_values()

    def _set_member_values(self):
        """Per-member constants on the device: reg, dropout keys, thresholds and scales."""
        xp, dtype, members = active_xp_of(self), self.dtype, self.members
        regs = np.array([m["reg"] for m in members], dtype=np.float64)
        self._any_reg = bool(np.any(regs))
        self._reg = xp.asarray(regs.astype(dtype))
        self._half_reg = xp.asarray((0.5 * regs).astype(dtype))
        ps = [m["dropout"] for m in members]
        self._use_dropout = any(p > 0 for p in ps)
        # FullyConnectedNet's layer i draws its mask with seed (seed + i)
        seeds = [m["seed"] for m in members]
        self._dropout_keys = xp.asarray(np.stack([dropout_seed_keys([s + i for s in seeds])
                                                  for i in range(1, self.num_layers)]))
        self._keep_thresholds = xp.asarray(np.array([keep_threshold(p) for p in ps],
                                                    dtype=np.uint64))
        self._dropout_scales = xp.asarray(np.array([1.0 / (1.0 - p) for p in ps], dtype=dtype))

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

    # -- forward and backward ------------------------------------------------
    def loss(self, X, y=None, step=0):
        """Scores of every member, or their losses and gradients.

        X (N, d1, ...) with d1*... = input_dim; y (N,) integer labels or None.
        step: the dropout step (StackedSolver passes its iteration), as
        FullyConnectedNet's dropout_param["step"].
        Returns scores (K, N, C) when y is None (test mode: running batchnorm
        statistics, no dropout); else (losses (K,) array on the device,
        grads dict keyed and shaped like params). Member k's loss is its
        softmax loss + 0.5 * reg_k * sum of its W**2.
        """
        return self._loss(X, y, step)

    def _loss(self, X, y, step, grads_out=None, with_l2=True):
        """loss(); grads_out: optional {name: array shaped like params[name]} written into.

        with_l2=False leaves the L2 term out of losses and grads (StackedSolver's
        update kernels add it while they read the weights anyway).
        """
        if not self.member_ids:
            raise ValueError("the stack has no members left")
        xp = get_array_module(X, *self.params.values())
        ops = kernels.for_module(xp)
        scores, cache = self._forward(xp, ops, X, y is not None, step)
        if y is None:
            return scores
        losses, dscores = ops.softmax_loss_stacked(scores, y)
        grads = self._backward(xp, ops, dscores, cache, step, grads_out or {})
        if with_l2 and self._any_reg:
            for name in (n for n, role in self.param_roles.items() if role == "weight"):
                axis = self.member_axes[name]
                sum_squares = ops.l2_stacked_(as_member_blocks(grads[name], axis),
                                              as_member_blocks(self.params[name], axis), self._reg)
                losses = losses + self._half_reg * sum_squares
        return losses, grads

    def _forward(self, xp, ops, X, train, step):
        p, k_count, n = self.params, self.num_members, X.shape[0]
        x2d = X.reshape(n, -1)
        if x2d.shape[1] != self.input_dim:
            raise ValueError(f"X of shape {X.shape} has {x2d.shape[1]} features per example; "
                             f"the stack expects input_dim={self.input_dim}")
        hidden = None          # (K, H, N)
        layer_inputs, layer_caches = [], []
        for i in range(1, self.num_layers):
            width = self.dims[i]
            if i == 1:  # the one wide product: (K*H1, D) @ (D, N)
                a = xp.matmul(p["W1"].reshape(self.input_dim, k_count * width).T, x2d.T)
            else:       # (K, H, Hprev) @ (K, Hprev, N)
                a = xp.matmul(p[f"W{i}"].transpose(0, 2, 1), hidden).reshape(k_count * width, n)
            a += p[f"b{i}"].reshape(k_count * width, 1)
            bn_cache = None
            if self.use_batchnorm:
                a, bn_cache = self._batchnorm_forward(xp, ops, a, i, train)
            relu_out = ops.relu_forward(a)
            hidden = relu_out.reshape(k_count, width, n)
            if train and self._use_dropout:
                hidden = ops.dropout_stacked_forward(
                    hidden.transpose(2, 0, 1), self._dropout_keys[i - 1], self._keep_thresholds,
                    self._dropout_scales, step).transpose(1, 2, 0)
            layer_caches.append((relu_out, bn_cache))
            layer_inputs.append(hidden)
        last = self.num_layers
        scores = xp.matmul(hidden.transpose(0, 2, 1), p[f"W{last}"])   # (K, N, C)
        scores += p[f"b{last}"][:, None, :]
        return scores, (x2d, layer_inputs, layer_caches)

    def _batchnorm_forward(self, xp, ops, a, i, train):
        """Batchnorm of each row of a (K*H, N) over its N examples: per-member batchnorm."""
        k_count, width = self.num_members, self.dims[i]
        gamma = self.params[f"gamma{i}"].reshape(-1)
        beta = self.params[f"beta{i}"].reshape(-1)
        bn = self.bn_params[i - 1]
        if train:
            out, x_hat, inv_std, mean, var = ops.batchnorm_rows_train_forward(a, gamma, beta,
                                                                              BN_EPS)
            bn["running_mean"] = (BN_MOMENTUM * bn["running_mean"]
                                  + (1 - BN_MOMENTUM) * mean.reshape(k_count, width))
            bn["running_var"] = (BN_MOMENTUM * bn["running_var"]
                                 + (1 - BN_MOMENTUM) * var.reshape(k_count, width))
            return out, (x_hat, gamma, inv_std)
        scale = gamma / xp.sqrt(bn["running_var"].reshape(-1) + a.dtype.type(BN_EPS))
        shift = beta - bn["running_mean"].reshape(-1) * scale
        return a * scale[:, None] + shift[:, None], None

    def _backward(self, xp, ops, dscores, cache, step, grads_out):
        """dscores (K, N, C) -> grads keyed like params (no gradient for X)."""
        x2d, layer_inputs, layer_caches = cache
        p, k_count, n = self.params, self.num_members, x2d.shape[0]
        last = self.num_layers
        grads = {f"W{last}": xp.matmul(layer_inputs[-1], dscores),   # (K, H, N) @ (K, N, C)
                 f"b{last}": dscores.sum(axis=1)}
        dhidden = xp.matmul(p[f"W{last}"], dscores.transpose(0, 2, 1))  # (K, H, N)
        for i in range(last - 1, 0, -1):
            width = self.dims[i]
            relu_out, bn_cache = layer_caches[i - 1]
            if self._use_dropout:
                dhidden = ops.dropout_stacked_backward(
                    dhidden.transpose(2, 0, 1), self._dropout_keys[i - 1], self._keep_thresholds,
                    self._dropout_scales, step).transpose(1, 2, 0)
            da = ops.relu_backward(dhidden.reshape(k_count * width, n), relu_out)  # (K*H, N)
            if bn_cache is not None:
                da, dgamma, dbeta = ops.batchnorm_rows_backward(da, *bn_cache)
                grads[f"gamma{i}"] = dgamma.reshape(k_count, width)
                grads[f"beta{i}"] = dbeta.reshape(k_count, width)
            grads[f"b{i}"] = da.sum(axis=1).reshape(k_count, width)
            if i == 1:  # the one wide product: (D, N) @ (N, K*H1)
                out = grads_out.get("W1")
                dw = xp.matmul(x2d.T, da.T, out=None if out is None
                               else out.reshape(self.input_dim, k_count * width))
                grads["W1"] = dw.reshape(self.input_dim, k_count, width)
            else:
                da = da.reshape(k_count, width, n)
                grads[f"W{i}"] = xp.matmul(layer_inputs[i - 2], da.transpose(0, 2, 1))
                dhidden = xp.matmul(p[f"W{i}"], da)   # (K, Hprev, H) @ (K, H, N)
        return {name: grads[name] for name in p}

    # -- members -------------------------------------------------------------
    def member_state(self, member_id):
        """(params, running statistics) of one member as FullyConnectedNet holds them (copies).

        params: {name: array shaped as in FullyConnectedNet}; running
        statistics: one dict per hidden layer ([] without batchnorm).
        """
        k = self.position(member_id)
        params = {name: xp_take_one(a, self.member_axes[name], k).copy()
                  for name, a in self.params.items()}
        running = [{key: bn[key][k].copy() for key in ("running_mean", "running_var")}
                   for bn in self.bn_params]
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
        xp = active_xp_of(self)
        index = xp.asarray(np.array(keep, dtype=np.int64))
        self.params = {name: take_members(a, self.member_axes[name], index)
                       for name, a in self.params.items()}
        for bn in self.bn_params:
            for key in ("running_mean", "running_var"):
                bn[key] = xp.take(bn[key], index, axis=0)
        self.member_ids = [self.member_ids[k] for k in keep]
        self.members = [self.members[k] for k in keep]
        self._set_member_values()
        return keep


def xp_take_one(a, axis, k):
    """Member k's slice of `a` (members along `axis`), a view."""
    return a[(slice(None),) * axis + (k,)]


def active_xp_of(stack):
    """The array module the stack's parameters live in."""
    return get_array_module(stack.params["W1"]) if getattr(stack, "params", None) else active_xp()


# -- training -----------------------------------------------------------------
_PER_MEMBER = ("learning_rate", "weight_decay")   # hyperparameters that may differ per member
EVAL_BATCH_SIZE = 512


class StackedSolver(SolverBase):
    """Train every member of a StackedFullyConnectedNet at once, as K Solvers would.

    data: X_train, y_train, X_val, y_val (as for Solver). update_rule: a
    fastnn.optim rule. optim_configs: one dict per member (in the stack's
    order) with its learning_rate (and, for adamw, weight_decay); the other
    hyperparameters (beta1, momentum, ...) must be the same for all. The
    remaining options mean what they mean for Solver: for the same seed the
    same minibatches, augmentation, dropout steps, learning rates and
    accuracy subsamples. Histories are per member and every loss is kept;
    losses are read (and non-finite ones detected) at epoch ends.

    on_epoch_end(epoch, val_accs) is called after each epoch's accuracies
    with val_accs {member_id: float}; it may return member ids to prune.
    A member whose loss is not finite fails and leaves the stack; the others
    go on. After train(): `results[member_id]` holds status ("complete",
    "pruned", "failed"), best_val_acc and the histories; best_model(member_id)
    gives a FullyConnectedNet with its best parameters.
    """

    def __init__(self, stack, data, update_rule="adam", optim_configs=None, lr_decay=1.0,
                 lr_schedule=None, lr_schedule_config=None, batch_size=128, num_epochs=10,
                 num_train_samples=1000, num_val_samples=None, seed=None, augment=None,
                 sampling="epoch", on_epoch_end=None, verbose=False):
        if update_rule not in optim.RULES:
            raise ValueError(f"unknown update rule {update_rule!r}; choose one of "
                             f"{sorted(optim.RULES)}")
        if sampling not in ("epoch", "replacement"):
            raise ValueError(f"sampling must be 'epoch' or 'replacement', got {sampling!r}")
        if int(batch_size) < 1 or int(num_epochs) < 0:
            raise ValueError(f"batch_size must be >= 1 and num_epochs >= 0; got {batch_size}, "
                             f"{num_epochs}")
        missing = [k for k in ("X_train", "y_train", "X_val", "y_val") if k not in data]
        if missing:
            raise ValueError(f"data is missing {missing}; it needs X_train, y_train, X_val, y_val")
        self.stack = stack
        self.update_rule = update_rule
        self.lr_decay, self.batch_size, self.num_epochs = lr_decay, int(batch_size), int(num_epochs)
        self.lr_schedule = lr_schedule
        self.lr_schedule_config = schedules.check_schedule(lr_schedule, lr_schedule_config)
        self.num_train_samples, self.num_val_samples = num_train_samples, num_val_samples
        self.sampling, self.on_epoch_end, self.verbose = sampling, on_epoch_end, verbose
        self.augment = check_augment(augment, data["X_train"])
        self._xp = xp = active_xp_of(stack)
        self._ops = kernels.for_module(xp)
        dtype = stack.dtype
        self.X_train, self.y_train = self._to_device(data["X_train"], data["y_train"], "train", dtype)
        self.X_val, self.y_val = self._to_device(data["X_val"], data["y_val"], "val", dtype)
        self._check_labels(stack.num_classes)
        configs = self._check_configs(optim_configs)
        seed = seed if seed is not None else int(np.random.randint(2**31 - 1))
        batch_seq, eval_seq, augment_seq = np.random.SeedSequence(seed).spawn(3)
        self._batch_rng = np.random.default_rng(batch_seq)
        self._eval_rng = np.random.default_rng(eval_seq)
        self._augment_seed = int(augment_seq.generate_state(1)[0])
        # per-member rates in float64 on the device: the Solver's Python floats, exactly
        self._base_lr = xp.asarray(np.array([c["learning_rate"] for c in configs], np.float64))
        self._lr = self._base_lr.copy()
        self._weight_decay = xp.asarray(np.array([c.get("weight_decay", 0.0) for c in configs],
                                                 np.float64))
        self._state = {name: {key: xp.zeros_like(w) for key in optim.SPECS[update_rule].state}
                       for name, w in stack.params.items()}
        self._grad_buffers = {"W1": xp.empty_like(stack.params["W1"])}
        self.epoch, self._t = 0, 0
        self._epoch_order, self._batch, self._pending_losses = None, None, []
        self.results = {mid: {"status": "training", "best_val_acc": 0.0, "loss_history": [],
                              "train_acc_history": [], "val_acc_history": [],
                              "member": dict(m), "optim_config": dict(c)}
                        for mid, m, c in zip(stack.member_ids, stack.members, configs)}
        self._best = {}

    # -- setup -----------------------------------------------------------------
    def _check_configs(self, optim_configs):
        """One filled config per member; the shared hyperparameters kept in self._shared."""
        k_count = self.stack.num_members
        configs = [{} for _ in range(k_count)] if optim_configs is None else [
            dict(c or {}) for c in optim_configs]
        if len(configs) != k_count:
            raise ValueError(f"optim_configs has {len(configs)} entries for a stack of "
                             f"{k_count} members; give one dict per member")
        defaults = optim.DEFAULTS[self.update_rule]
        for k, config in enumerate(configs):
            optim.check_config_keys(self.update_rule, config, f"optim_configs[{k}]")
            for key, value in defaults.items():
                config.setdefault(key, value)
        self._shared = {}
        for key in defaults:
            if key in _PER_MEMBER:
                continue
            values = {c[key] for c in configs}
            if len(values) > 1:
                raise ValueError(f"{key!r} differs between members ({sorted(values)}); a stack "
                                 f"shares every hyperparameter but {list(_PER_MEMBER)}")
            self._shared[key] = configs[0][key]
        return configs

    # -- the training step -------------------------------------------------------
    def _step(self):
        t = self._t
        if self.lr_schedule:  # as Solver: base * lr_decay**epoch * schedule factor
            self._lr = self._base_lr * self._scheduled_factor()
        X_batch, y_batch = self._next_batch(t)
        stack = self.stack
        losses, grads = stack._loss(X_batch, y_batch, t, self._grad_buffers, with_l2=False)
        for sum_squares in self._update(grads, t + 1):  # the L2 term, one weight matrix each
            losses = losses + stack._half_reg * sum_squares
        self._pending_losses.append(losses)

    def _update(self, grads, t):
        """One fused in-place update per parameter, every member at once.

        grads come without the L2 term: the kernels add reg_k * W to each
        weight matrix's gradient as they read W, and return the per-member
        sum(W**2) they saw (listed, one per weight matrix, when any reg > 0).
        """
        rule, stack = self.update_rule, self.stack
        keys = optim.SPECS[rule].state
        sums = []
        for name, w in stack.params.items():
            axis = stack.member_axes[name]
            w, dw = as_member_blocks(w, axis), as_member_blocks(grads[name], axis)
            state = [as_member_blocks(self._state[name][key], axis) for key in keys]
            weight = stack.param_roles[name] == "weight"
            l2 = stack._reg if stack._any_reg and weight else None
            # Solver decays weight matrices only
            config = {**self._shared, "learning_rate": self._lr, "t": t,
                      "weight_decay": self._weight_decay if weight else 0.0}
            sum_squares = optim.update_(rule, w, dw, state, config, l2=l2)
            if l2 is not None:
                sums.append(sum_squares)
        return sums

    # -- epoch ends --------------------------------------------------------------
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
                print(f"(Epoch {self.epoch}) members {failed} failed: non-finite loss")
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

    def _finite_members(self):
        """(K,) bool on the device: every parameter of the member is finite."""
        xp, finite = self._xp, None
        for name, w in self.stack.params.items():
            ok = xp.isfinite(as_member_blocks(w, self.stack.member_axes[name])).all(axis=(0, 2))
            finite = ok if finite is None else finite & ok
        return finite

    def _record_accuracy(self):
        """Train and val accuracy of every member (one device read); keep the best parameters."""
        xp = self._xp
        train_correct, n_train = self._correct_counts(self.X_train, self.y_train,
                                                      self.num_train_samples)
        val_correct, n_val = self._correct_counts(self.X_val, self.y_val, self.num_val_samples)
        counts = to_numpy(xp.stack([train_correct, val_correct,
                                    self._finite_members().astype(np.int64)]))
        val_accs = {}
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
            val_accs[mid] = val_acc
        if self.verbose:
            best = max(val_accs.items(), key=lambda item: item[1], default=(None, 0.0))
            print(f"(Epoch {self.epoch} / {self.num_epochs}) {len(val_accs)} members; "
                  f"best val_acc {best[1]:f} (member {best[0]})")
        return val_accs

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
        index = self._xp.asarray(np.array(keep, dtype=np.int64))
        axes = self.stack.member_axes
        self._state = {name: {key: take_members(a, axes[name], index) for key, a in state.items()}
                       for name, state in self._state.items()}
        self._base_lr = self._base_lr[index]
        self._lr = self._lr[index]
        self._weight_decay = self._weight_decay[index]
        self._grad_buffers = {"W1": self._xp.empty_like(self.stack.params["W1"])}
        for mid in member_ids:
            self.results[mid]["status"] = status

    # -- the loop ----------------------------------------------------------------
    def train(self):
        """Train every member; afterwards `results` and `best_model(member_id)` hold the outcome."""
        per_epoch = self.iterations_per_epoch
        total = self.num_epochs * per_epoch
        for mid in self.stack.member_ids:  # the initial parameters: a finite fallback
            self._best.setdefault(mid, self.stack.member_state(mid))
        while self._t < total and self.stack.num_members:
            self._step()
            t = self._t
            self._t += 1
            epoch_end = self._t % per_epoch == 0
            if epoch_end:
                self.epoch += 1
                self._epoch_order = None
                if not self.lr_schedule:  # the classic decay; schedules set it per step
                    self._lr = self._lr * self.lr_decay
            if t == 0 or epoch_end or self._t == total:
                self._read_losses()
                if not self.stack.num_members:
                    break
                val_accs = self._record_accuracy()
                if epoch_end and self.on_epoch_end is not None:
                    pruned = self.on_epoch_end(self.epoch, dict(val_accs))
                    if pruned:
                        self.remove_members(list(pruned), status="pruned")
        self._read_losses()
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


def _member_net(stack, member, params, running):
    """A FullyConnectedNet with the stack's architecture and `member`'s settings, holding
    `params` and the batchnorm running statistics `running` (arrays taken as they are)."""
    with use_backend(stack.backend):
        net = FullyConnectedNet(stack.hidden_dims, stack.input_dim, stack.num_classes,
                                dropout=member["dropout"], use_batchnorm=stack.use_batchnorm,
                                reg=member["reg"], weight_scale=member["weight_scale"],
                                dtype=stack.dtype, seed=member["seed"])
    net.params = dict(params)
    for bn_param, stats in zip(net.bn_params, running):
        bn_param.update(stats)
    return net
