"""Fully connected classifiers: TwoLayerNet and FullyConnectedNet.

Parameters live in `model.params` (arrays of the backend active at
construction); `model.loss(X)` gives scores, `model.loss(X, y)` gives
`(loss, grads)`. The softmax loss here skips the label checks of
`fastnn.layers.softmax_loss`: `Solver` checks the labels once up front. On
every backend an out-of-range label gives a NaN loss (computed on the device,
no synchronisation), never a read out of bounds or a wrapped-around class.
"""
import numpy as np

from fastnn.backend import xp as active_xp
from fastnn.checks import as_size, as_sizes
from fastnn.classifiers.base import Classifier, standard_normal
from fastnn.layer_utils import FC_LAYERS, affine_relu_backward, affine_relu_forward
from fastnn.layers import affine_backward, affine_forward, draw_seed


class _FullyConnected(Classifier):
    """What both nets share: their parameters, in the order of the initial draws."""

    def _init_params(self, dims, weight_scale, normalization, rng):
        """W1..WL (weight_scale * N(0, 1)), b zero; gamma one, beta zero after each hidden
        affine when `normalization` is "batchnorm" or "layernorm".

        Each batchnorm also gets a running-statistics layer (norm_params "1",
        ...; bn_params lists the same dicts, as the course's nets do);
        layernorm keeps none.
        """
        self._start_params()
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            self._add_param(f"W{i}", weight_scale * standard_normal(rng, (fan_in, fan_out)),
                            "weight")
            self._add_param(f"b{i}", np.zeros(fan_out), "bias")
            if normalization and i < len(dims) - 1:
                self._add_param(f"gamma{i}", np.ones(fan_out), "scale")
                self._add_param(f"beta{i}", np.zeros(fan_out), "shift")
                if normalization == "batchnorm":
                    self._add_norm(i, fan_out)


class TwoLayerNet(_FullyConnected):
    """affine - relu - affine - softmax, for inputs of `input_dim` features."""

    def __init__(self, input_dim=3 * 32 * 32, hidden_dim=100, num_classes=10,
                 weight_scale=1e-3, reg=0.0, dtype=np.float32):
        input_dim = as_size(input_dim, "input_dim", low=1)
        hidden_dim = as_size(hidden_dim, "hidden_dim", low=1)
        num_classes = as_size(num_classes, "num_classes", low=1)
        self.dtype = np.dtype(dtype)
        self.reg = reg
        self.num_layers = 2
        self.init_args = dict(input_dim=input_dim, hidden_dim=hidden_dim,
                              num_classes=num_classes, weight_scale=float(weight_scale),
                              reg=float(reg), dtype=self.dtype.name)
        self._init_params([input_dim, hidden_dim, num_classes], weight_scale, None, None)

    def loss(self, X, y=None, l2=True):
        """X (N, d1, ...) -> scores (N, C), or (loss, grads) when labels y (N,) are given.

        l2=False leaves the L2 term out (a caller that adds it itself).
        """
        p = self.params
        hidden, cache1 = affine_relu_forward(X, p["W1"], p["b1"])
        scores, cache2 = affine_forward(hidden, p["W2"], p["b2"])
        if y is None:
            return scores

        def backward(dscores):
            dhidden, dw2, db2 = affine_backward(dscores, cache2)
            _, dw1, db1 = affine_relu_backward(dhidden, cache1, need_dx=False)
            return {"W1": dw1, "b1": db1, "W2": dw2, "b2": db2}

        return self._loss_and_grads(scores, y, backward, l2=l2)


NORMALIZATIONS = (None, "batchnorm", "layernorm")


def _resolve_normalization(use_batchnorm, normalization):
    """The one normalisation that `use_batchnorm` and `normalization` describe together."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if use_batchnorm and normalization not in (None, "batchnorm"):
        raise ValueError(f"use_batchnorm=True asks for batchnorm but normalization="
                         f"{normalization!r}; give one of them (normalization={normalization!r} "
                         "alone, or use_batchnorm=True alone)")
    return "batchnorm" if use_batchnorm else normalization


def _resolve_dropout(dropout, dropout_keep_ratio):
    """The dropping probability that `dropout` and `dropout_keep_ratio` describe together."""
    if dropout_keep_ratio is None:
        p = float(dropout)
    else:
        keep = float(dropout_keep_ratio)
        if not 0 < keep <= 1:
            raise ValueError(f"dropout_keep_ratio is the probability of keeping a unit and must "
                             f"be in (0, 1], got {dropout_keep_ratio}")
        p = 1.0 - keep
        # dropout=0 is also the default, so it agrees with any keep ratio
        if dropout:
            if not np.isclose(float(dropout), p, rtol=1e-9, atol=1e-12):
                raise ValueError(f"dropout={dropout} (drop probability) and dropout_keep_ratio="
                                 f"{dropout_keep_ratio} (keep probability, i.e. dropout={p:g}) "
                                 "disagree; give one of them")
            p = float(dropout)  # the contract's own form wins the last bit of rounding
    if not 0 <= p < 1:
        raise ValueError(f"dropout is the probability of dropping a unit and must be in "
                         f"[0, 1), got {dropout}")
    return p


class FullyConnectedNet(_FullyConnected):
    """{affine - [batchnorm | layernorm] - relu - [dropout]} x (L - 1) - affine - softmax.

    `dropout` is the probability of dropping a unit (0: no dropout); the later
    course's `dropout_keep_ratio=r` means dropout = 1 - r. `normalization` is
    None, "batchnorm" (the same as `use_batchnorm=True`) or "layernorm";
    either kind has gamma{i}, beta{i} (roles "scale", "shift"), and only
    batchnorm keeps running statistics (`bn_params`, `norm_params`). With
    `seed` set, the weights are drawn from `np.random.default_rng(seed)` and
    the dropout masks are seeded (deterministic); without it the weights come
    from `np.random` (so `np.random.seed` makes them reproducible) and the
    dropout seed is drawn once from the backend's generator. Either way the
    masks change with `dropout_param["step"]`, which Solver advances.
    """

    # the layers it is built from; StackedFullyConnectedNet runs this net's constructor and
    # loss with the stacked ones (fastnn.stacked_layers)
    layer_set = FC_LAYERS

    def __init__(self, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=0,
                 use_batchnorm=False, reg=0.0, weight_scale=1e-2, dtype=np.float32, seed=None,
                 normalization=None, dropout_keep_ratio=None):
        self.normalization = _resolve_normalization(use_batchnorm, normalization)
        dropout = _resolve_dropout(dropout, dropout_keep_ratio)
        self.hidden_dims = as_sizes(hidden_dims, "hidden_dims", low=1)
        self.input_dim = as_size(input_dim, "input_dim", low=1)
        self.num_classes = as_size(num_classes, "num_classes", low=1)
        self.dtype = np.dtype(dtype)
        self.reg = reg
        self.use_batchnorm = self.normalization == "batchnorm"
        self.use_dropout = dropout > 0
        self.num_layers = len(self.hidden_dims) + 1
        self.dims = [self.input_dim, *self.hidden_dims, self.num_classes]
        # the hidden layers' sandwich, chosen once
        layer_set, norm = self.layer_set, self.normalization
        self._hidden_forward, self._hidden_backward = (
            (layer_set.affine_bn_relu_forward, layer_set.affine_bn_relu_backward)
            if norm == "batchnorm" else
            (layer_set.affine_ln_relu_forward, layer_set.affine_ln_relu_backward)
            if norm == "layernorm" else
            (layer_set.affine_relu_forward, layer_set.affine_relu_backward))
        # plain Python values: fastnn.save writes them as JSON. Each net is
        # written in the oldest form that describes it (batchnorm as
        # use_batchnorm, a keep ratio as dropout), so files and checkpoints of
        # nets that earlier versions knew keep their exact init_args.
        self.init_args = dict(hidden_dims=self.hidden_dims, input_dim=self.input_dim,
                              num_classes=self.num_classes, dropout=dropout,
                              use_batchnorm=self.use_batchnorm, reg=float(reg),
                              weight_scale=float(weight_scale), dtype=self.dtype.name,
                              seed=None if seed is None else int(seed))
        if self.normalization == "layernorm":
            self.init_args["normalization"] = "layernorm"
        rng = None if seed is None else np.random.default_rng(seed)
        self._init_params(self.dims, weight_scale, self.normalization, rng)
        self.dropout_param = {"mode": "train", "p": dropout, "step": 0}
        if self.use_dropout:
            # One seed for the model's life (the Solver advances `step`): drawing
            # one per call would read a device value every step on cupy.
            self.dropout_param["seed"] = int(seed) if seed is not None else draw_seed(active_xp())
        # layernorm keeps no state: one ln_param (eps) per layer, never saved
        self.ln_params = ([{} for _ in self.hidden_dims] if self.normalization == "layernorm"
                          else [])

    def _layer_dropout_param(self, layer):
        """Layer `layer`'s dropout settings: its own seed, so equal-width layers differ."""
        param = dict(self.dropout_param)
        if param.get("seed") is not None:
            param["seed"] = param["seed"] + layer
        return param

    def loss(self, X, y=None, l2=True):
        """X (N, d1, ...) -> scores (N, C), or (loss, grads) when labels y (N,) are given.

        l2=False leaves the L2 term out (a caller that adds it itself).
        """
        mode = "test" if y is None else "train"
        self.dropout_param["mode"] = mode
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        p, layer_set = self.params, self.layer_set
        norms = self.bn_params or self.ln_params  # one dict per hidden layer, or none
        forward, backward_layer = self._hidden_forward, self._hidden_backward
        hidden = X
        caches = []
        for i in range(1, self.num_layers):
            w, b = p[f"W{i}"], p[f"b{i}"]
            if norms:
                hidden, cache = forward(hidden, w, b, p[f"gamma{i}"], p[f"beta{i}"], norms[i - 1])
            else:
                hidden, cache = forward(hidden, w, b)
            drop_cache = None
            if self.use_dropout:
                hidden, drop_cache = layer_set.dropout_forward(hidden,
                                                               self._layer_dropout_param(i))
            caches.append((cache, drop_cache))
        last = self.num_layers
        scores, last_cache = layer_set.affine_forward(hidden, p[f"W{last}"], p[f"b{last}"])
        if mode == "test":
            return scores

        def backward(dscores):
            grads = {}
            dhidden, grads[f"W{last}"], grads[f"b{last}"] = layer_set.affine_backward(
                dscores, last_cache)
            for i in range(last - 1, 0, -1):
                cache, drop_cache = caches[i - 1]
                dhidden = layer_set.dropout_backward(dhidden, drop_cache)
                layer_grads = backward_layer(dhidden, cache, need_dx=i > 1)
                dhidden, grads[f"W{i}"], grads[f"b{i}"] = layer_grads[:3]
                if norms:
                    grads[f"gamma{i}"], grads[f"beta{i}"] = layer_grads[3:]
            return grads

        return self._loss_and_grads(scores, y, backward, l2=l2)
