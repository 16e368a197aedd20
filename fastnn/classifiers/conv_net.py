"""ConvNet: a stem and groups of 3x3 convolutions with spatial batchnorm, a global max, softmax.

    stem:      conv 3x3 (pad 1, C -> stem_width) - spatial batchnorm - relu
    per width: conv 3x3 - 2x2 max pool (stride 2) - spatial batchnorm - relu -
               conv 3x3 - spatial batchnorm - relu
    head:      max over the remaining positions of each channel - affine - softmax

Convolutions have no bias (each feeds a batchnorm). Parameters: `W1` the
stem's filters, `W2, W3` the first group's, ... (`W{2g}`, `W{2g+1}` for
group g), `gamma{i}` / `beta{i}` the batchnorm after conv `W{i}`, and
`W{L}`, `b{L}` the affine layer (L = 2 * len(widths) + 2). The layers run
channels-last on numpy (fastnn.fast_layers); inputs are (N, C, H, W).
"""
import numpy as np

from fastnn.backend import get_array_module
from fastnn.checks import as_size, as_sizes
from fastnn.classifiers.base import Classifier, standard_normal
from fastnn.fast_layers import (conv_backward_fast, conv_forward_fast, conv_pool_backward_fast,
                                conv_pool_forward_fast, max_pool_backward_fast,
                                max_pool_forward_fast, spatial_batchnorm_relu_backward,
                                spatial_batchnorm_relu_forward)
from fastnn.layers import affine_backward, affine_forward

_CONV = {"stride": 1, "pad": 1}
_POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}


def init_weight(rng, shape, fan_in, gain=2.0):
    """He-style initial weights: N(0, gain / fan_in) (gain 2 suits relu layers).

    rng: a numpy Generator, or None for np.random (np.random.seed reproduces it).
    """
    return np.sqrt(gain / fan_in) * standard_normal(rng, shape)


class ConvNet(Classifier):
    """The contract's ConvNet (see the module docstring); `loss(X)` / `loss(X, y)`.

    widths: channels of each group (each halves the image size); stem_width:
    the stem's channels. label_smoothing (default 0: the plain softmax loss)
    mixes the one-hot targets with the uniform distribution.
    """

    def __init__(self, widths=(32, 64, 128), stem_width=24, input_dim=(3, 32, 32),
                 num_classes=10, reg=0.0, dtype=np.float32, seed=None, label_smoothing=0.0):
        widths = as_sizes(widths, "widths", low=1)
        stem_width = as_size(stem_width, "stem_width", low=1)
        num_classes = as_size(num_classes, "num_classes", low=1)
        input_dim = as_sizes(input_dim, "input_dim", low=1)
        if not widths or len(input_dim) != 3:
            raise ValueError(f"ConvNet needs at least one group width and input_dim (C, H, W); "
                             f"got widths {widths}, input_dim {input_dim}")
        channels, height, width = input_dim
        if min(height, width) < 2 ** len(widths):
            raise ValueError(f"ConvNet: {len(widths)} groups halve the image {len(widths)} times, "
                             f"which needs at least {2 ** len(widths)} pixels a side; input_dim "
                             f"{tuple(input_dim)} has {min(height, width)}: use fewer widths")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.dtype = np.dtype(dtype)
        self.reg = float(reg)
        self.label_smoothing = float(label_smoothing)
        self.widths, self.stem_width = widths, stem_width
        self.init_args = dict(widths=widths, stem_width=self.stem_width,
                              input_dim=[channels, height, width], num_classes=num_classes,
                              reg=self.reg, dtype=self.dtype.name,
                              seed=None if seed is None else int(seed),
                              label_smoothing=self.label_smoothing)
        rng = None if seed is None else np.random.default_rng(seed)
        self._start_params()
        conv_channels = [channels, self.stem_width]
        for w in widths:
            conv_channels += [w, w]
        self.num_convs = len(conv_channels) - 1
        for i in range(1, self.num_convs + 1):
            c_in, c_out = conv_channels[i - 1], conv_channels[i]
            self._add_param(f"W{i}", init_weight(rng, (c_out, c_in, 3, 3), 9 * c_in), "weight")
            self._add_param(f"gamma{i}", np.ones(c_out), "scale")
            self._add_param(f"beta{i}", np.zeros(c_out), "shift")
            self._add_norm(i, c_out)
        last = self.num_convs + 1
        self._add_param(f"W{last}", init_weight(rng, (conv_channels[-1], num_classes),
                                                conv_channels[-1], 1.0), "weight")
        self._add_param(f"b{last}", np.zeros(num_classes), "bias")
        self.num_layers = last  # bn_params[i - 1]: the batchnorm after conv W{i}

    def loss(self, X, y=None):
        """X (N, C, H, W) -> scores (N, num_classes), or (loss, grads) given labels y (N,)."""
        mode = "test" if y is None else "train"
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        p = self.params
        xp = get_array_module(X)
        hidden = xp.asarray(X, dtype=self.dtype)
        caches = []
        for i in range(1, self.num_convs + 1):
            # convs 2, 4, ... open a group and are followed by the pool
            pooled = i % 2 == 0
            if pooled:  # one op: fused where the backend can (fastnn.fast_layers)
                hidden, conv_cache = conv_pool_forward_fast(hidden, p[f"W{i}"], None, _CONV, _POOL)
            else:
                hidden, conv_cache = conv_forward_fast(hidden, p[f"W{i}"], None, _CONV)
            hidden, bn_cache = spatial_batchnorm_relu_forward(
                hidden, p[f"gamma{i}"], p[f"beta{i}"], self.bn_params[i - 1])
            caches.append((conv_cache, pooled, bn_cache))
        n, channels, height, width = hidden.shape
        pooled_max, head_pool_cache = max_pool_forward_fast(
            hidden, {"pool_height": height, "pool_width": width, "stride": 1})
        last = self.num_layers
        scores, affine_cache = affine_forward(pooled_max.reshape(n, channels), p[f"W{last}"],
                                              p[f"b{last}"])
        if y is None:
            return scores

        def backward(dscores):
            grads = {}
            dfeatures, grads[f"W{last}"], grads[f"b{last}"] = affine_backward(dscores,
                                                                              affine_cache)
            dhidden = max_pool_backward_fast(dfeatures.reshape(n, channels, 1, 1),
                                             head_pool_cache)
            for i in range(self.num_convs, 0, -1):
                conv_cache, pooled, bn_cache = caches[i - 1]
                dhidden, grads[f"gamma{i}"], grads[f"beta{i}"] = spatial_batchnorm_relu_backward(
                    dhidden, bn_cache)
                conv_backward = conv_pool_backward_fast if pooled else conv_backward_fast
                dhidden, grads[f"W{i}"], _ = conv_backward(dhidden, conv_cache, need_dx=i > 1)
            return grads

        return self._loss_and_grads(scores, y, backward, smoothing=self.label_smoothing)
