"""ThreeLayerConvNet: the course's first convolutional classifier.

conv - relu - 2x2 max pool - affine - relu - affine - softmax, on images
(N, C, H, W). The conv layer keeps the spatial size for odd filter sizes
(stride 1, pad (filter_size - 1) // 2); the pool halves it (floored).
"""
import numpy as np

from fastnn.checks import as_size, as_sizes
from fastnn.classifiers.base import Classifier, standard_normal
from fastnn.fast_layers import (conv_backward_fast, conv_forward_fast, max_pool_backward_fast,
                                max_pool_forward_fast)
from fastnn.kernels.conv import conv_output_size
from fastnn.layer_utils import affine_relu_backward, affine_relu_forward
from fastnn.layers import affine_backward, affine_forward, relu_backward, relu_forward

POOL_PARAM = {"pool_height": 2, "pool_width": 2, "stride": 2}


class ThreeLayerConvNet(Classifier):
    """conv - relu - 2x2 max pool - affine - relu - affine - softmax.

    input_dim (C, H, W); W1 (F, C, fs, fs), b1 (F,); W2 (F * H'' * W'', hidden_dim),
    b2; W3 (hidden_dim, num_classes), b3, with H'' = H' // 2 and H' the conv
    output height (H for odd filter sizes). Weights are weight_scale * N(0, 1)
    from np.random (so `np.random.seed` makes them reproducible), biases zero.
    """

    def __init__(self, input_dim=(3, 32, 32), num_filters=32, filter_size=7, hidden_dim=100,
                 num_classes=10, weight_scale=1e-3, reg=0.0, dtype=np.float32):
        input_dim = tuple(as_sizes(input_dim, "input_dim", low=1))
        if len(input_dim) != 3:
            raise ValueError(f"input_dim must be (C, H, W) with positive sizes, got {input_dim}")
        channels, height, width = input_dim
        num_filters = as_size(num_filters, "num_filters", low=1)
        filter_size = as_size(filter_size, "filter_size", low=1)
        hidden_dim = as_size(hidden_dim, "hidden_dim", low=1)
        num_classes = as_size(num_classes, "num_classes", low=1)
        pad = (filter_size - 1) // 2
        conv_h, conv_w = (conv_output_size(size, filter_size, 1, pad) for size in (height, width))
        if min(conv_h, conv_w) < 2:
            raise ValueError(
                f"filter_size {filter_size} (pad {pad}) leaves a {conv_h}x{conv_w} conv output "
                f"on {height}x{width} images, too small for the 2x2 pool; use a filter_size of "
                f"at most {min(height, width) + 2 * pad - 1}")
        self.input_dim = input_dim
        self.dtype = np.dtype(dtype)
        self.reg = reg
        self.num_layers = 3
        self.conv_param = {"stride": 1, "pad": pad}
        self.pool_param = dict(POOL_PARAM)
        self.init_args = dict(input_dim=list(input_dim), num_filters=num_filters,
                              filter_size=filter_size, hidden_dim=hidden_dim,
                              num_classes=num_classes, weight_scale=float(weight_scale),
                              reg=float(reg), dtype=self.dtype.name)
        pooled = num_filters * (1 + (conv_h - 2) // 2) * (1 + (conv_w - 2) // 2)
        layout = [("W1", (num_filters, channels, filter_size, filter_size), "weight"),
                  ("b1", (num_filters,), "bias"), ("W2", (pooled, hidden_dim), "weight"),
                  ("b2", (hidden_dim,), "bias"), ("W3", (hidden_dim, num_classes), "weight"),
                  ("b3", (num_classes,), "bias")]
        self._start_params()  # no layer keeps running statistics: norm_params stays {}
        for name, shape, role in layout:  # weights drawn in the course's order: W1, W2, W3
            value = weight_scale * standard_normal(None, shape) if role == "weight" \
                else np.zeros(shape)
            self._add_param(name, value, role)

    def loss(self, X, y=None):
        """X (N, C, H, W) -> scores (N, num_classes), or (loss, grads) with labels y (N,)."""
        if tuple(X.shape[1:]) != self.input_dim:
            raise ValueError(f"ThreeLayerConvNet expects images of shape (N, "
                             f"{', '.join(map(str, self.input_dim))}), got {tuple(X.shape)}; "
                             "reshape flat rows with X.reshape(-1, C, H, W)")
        p = self.params
        # conv_relu_pool_forward/backward's three fast ops, written out: the sandwich's
        # backward always computes dx, which this first layer does not need (about half
        # the cost of its backward)
        conv, conv_cache = conv_forward_fast(X, p["W1"], p["b1"], self.conv_param)
        relu, relu_cache = relu_forward(conv)
        pooled, pool_cache = max_pool_forward_fast(relu, self.pool_param)
        hidden, hidden_cache = affine_relu_forward(pooled, p["W2"], p["b2"])
        scores, scores_cache = affine_forward(hidden, p["W3"], p["b3"])
        if y is None:
            return scores

        def backward(dscores):
            grads = {}
            dhidden, grads["W3"], grads["b3"] = affine_backward(dscores, scores_cache)
            dpooled, grads["W2"], grads["b2"] = affine_relu_backward(dhidden, hidden_cache)
            drelu = relu_backward(max_pool_backward_fast(dpooled, pool_cache), relu_cache)
            _, grads["W1"], grads["b1"] = conv_backward_fast(drelu, conv_cache, need_dx=False)
            return grads

        return self._loss_and_grads(scores, y, backward)
