"""What every fastnn model declares, and what Solver, the stack, save/load and the CLI read.

A model has:
- `params`: name -> backend array (the contract's names: W1, b1, gamma1, ...);
- `param_roles`: name -> one of ROLES. "weight": the arrays that get L2
  (`0.5 * reg * sum(W**2)`) and AdamW's decay (affine matrices and conv
  filters); "bias"; "scale" / "shift": a normalisation's gamma / beta;
- `norm_params`: layer key -> the bn_param-style dict of each normalisation
  layer that keeps running statistics (`running_mean`, `running_var`), keyed
  by its gamma's suffix ("gamma1" -> "1"); layers without running statistics
  (layernorm) are not in it;
- `bn_params`: the same dicts as a list, in the order they were made (the
  course's form);
- optionally `buffers`: name -> backend array the model computes with but no
  update rule sees (not in `params`; ConvNet's whitening filters), saved and
  restored with the params (fastnn.serialization);
- `init_args` (JSON-able constructor arguments), `dtype`, `loss(X, y=None)`.

Roles are declared where a parameter is made (`Classifier._add_param`); no
code decides a role from a parameter's name.
"""
import math

import numpy as np

from fastnn import kernels
from fastnn.backend import get_array_module, get_backend, xp as active_xp

ROLES = ("weight", "bias", "scale", "shift")


def check_roles(model):
    """model.param_roles, checked: one known role for every parameter (ValueError otherwise)."""
    roles = getattr(model, "param_roles", None)
    if roles is None:
        raise ValueError(f"{type(model).__name__} declares no param_roles (name -> one of "
                         f"{ROLES}); fastnn's models do, see fastnn.classifiers.base")
    if set(roles) != set(model.params) or not set(roles.values()) <= set(ROLES):
        raise ValueError(f"{type(model).__name__}.param_roles must give each parameter one of "
                         f"{ROLES}; params {sorted(model.params)}, roles {roles}")
    return roles


def norm_params(model):
    """The model's running-statistics layers: layer key -> bn_param dict ({} when none).

    A model of the classic course framework without `norm_params` but with a
    `bn_params` list gets keys "1", "2", ... for its entries, in order.
    """
    declared = getattr(model, "norm_params", None)
    if declared is not None:
        return declared
    return {str(i): p for i, p in enumerate(getattr(model, "bn_params", []), start=1)}


class Classifier:
    """Base of fastnn's classifiers: declared parameters, L2 over the weights, the softmax head.

    Subclasses set `dtype`, `reg` and `init_args`, create every parameter
    with `_add_param` (after `_start_params`), register each running-
    statistics layer with `_add_norm`, and return `_loss_and_grads(...)` from
    `loss(X, y)`.

    `frozen`: names of parameters the Solver gives no steps now (its
    train_epochs), set by the Solver while it trains; a loss may leave their
    gradients out and skip the backward work only they need.
    """

    frozen = frozenset()

    def _start_params(self):
        self.params, self.param_roles, self.norm_params, self.bn_params = {}, {}, {}, []
        self.backend = get_backend()

    def _add_param(self, name, value, role):
        """params[name] = value (moved to the active backend in self.dtype), declared `role`."""
        if role not in ROLES:
            raise ValueError(f"role of {name!r} must be one of {ROLES}, got {role!r}")
        self.params[name] = active_xp().asarray(value, dtype=self.dtype)
        self.param_roles[name] = role

    def _add_norm(self, key, features):
        """A running-statistics layer `key` of `features` (an int or shape): its bn_param dict.

        The statistics start at zero, as batchnorm_forward would create them.
        """
        xp = active_xp()
        bn_param = {"mode": "train", "running_mean": xp.zeros(features, dtype=self.dtype),
                    "running_var": xp.zeros(features, dtype=self.dtype)}
        self.norm_params[str(key)] = bn_param
        self.bn_params.append(bn_param)
        return bn_param

    def weight_names(self):
        """The parameters with role "weight" (L2, AdamW decay), in params order."""
        return [name for name, role in self.param_roles.items() if role == "weight"]

    def _loss_and_grads(self, scores, y, grads_of_scores, smoothing=0.0, l2=True):
        """(loss, grads): the softmax loss of scores (N, C) and labels y (N,) plus L2 on the
        weights (unless l2=False); grads_of_scores(dscores) -> the grads dict.

        smoothing s: label-smoothed targets (1 - s) * onehot + s / C, in the loss op's one pass.
        """
        xp = get_array_module(scores, y)
        loss, dscores = kernels.for_module(xp).softmax_loss(scores, y, smoothing)
        grads = grads_of_scores(dscores)
        return (self._add_l2(xp, loss, grads) if l2 else loss), grads

    def _add_l2(self, xp, loss, grads):
        """loss + 0.5 * reg * sum(W**2) over the weights; grads get reg * W."""
        if self.reg:
            for name in self.weight_names():
                w = self.params[name]
                flat = w.reshape(-1)
                loss = loss + 0.5 * self.reg * xp.dot(flat, flat)
                grads[name] += self.reg * w
        return loss


def member_blocks(a):
    """View an array with a leading member axis (K, ...) as (A, K, B) blocks in memory order.

    Member k owns [:, k, :]; the view walks a's memory contiguously, so an
    array and its gradient or optimizer state laid out alike give blocks that
    line up (the stack's first layer (K, D, M) is a (D, K, M) array: blocks
    (D, K, M)). Raises ValueError for an array with gaps.
    """
    perm = sorted(range(a.ndim), key=lambda i: (-a.strides[i], i))
    memory = a.transpose(perm)
    if not memory.flags.c_contiguous:
        raise ValueError(f"member_blocks needs a dense array; got shape {a.shape}, strides "
                         f"{a.strides}")
    axis = perm.index(0)
    return memory.reshape(math.prod(memory.shape[:axis]), a.shape[0],
                          math.prod(memory.shape[axis + 1:]))


def standard_normal(rng, shape):
    """Standard normal draws from a Generator, or from np.random when rng is None."""
    return np.random.randn(*shape) if rng is None else rng.standard_normal(shape)
