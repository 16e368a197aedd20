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

Keyword options, each off by default (airbench's recipe turns them all on):
activation "gelu"; bn_scale "frozen" (no gamma{i} parameters: batchnorm scales by 1,
only the shifts learn); bn_eps, bn_momentum; logit_scale (multiplies the scores);
head_bias=False (no b{L}); dirac_init (identity start for each 3x3 conv's first
filters); stem "whiten" (a 2x2 conv, no padding, C -> 2*C*4 channels, with a bias
`b1`, then the activation, no batchnorm; its filters `buffers["W1"]` are not trained
and are set from data by `init_whitening`).
"""
import numpy as np

from fastnn.backend import get_array_module, xp as active_xp
from fastnn.checks import as_size, as_sizes
from fastnn.classifiers.base import Classifier, standard_normal
from fastnn.fast_layers import (conv_backward_fast, conv_forward_fast, conv_pool_backward_fast,
                                conv_pool_forward_fast, max_pool_backward_fast,
                                max_pool_forward_fast, spatial_batchnorm_gelu_backward,
                                spatial_batchnorm_gelu_forward, spatial_batchnorm_relu_backward,
                                spatial_batchnorm_relu_forward)
from fastnn.init import whitening_filters
from fastnn.layers import (affine_backward, affine_forward, gelu_backward, gelu_forward,
                           relu_backward, relu_forward)

_CONV = {"stride": 1, "pad": 1}
_POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}
_WHITEN_CONV = {"stride": 1, "pad": 0}
WHITEN_KERNEL = 2
# activation -> (batchnorm + activation forward, its backward, activation forward, backward)
_ACTIVATIONS = {
    "relu": (spatial_batchnorm_relu_forward, spatial_batchnorm_relu_backward,
             relu_forward, relu_backward),
    "gelu": (spatial_batchnorm_gelu_forward, spatial_batchnorm_gelu_backward,
             gelu_forward, gelu_backward),
}
# The keyword options and their defaults; init_args records only those that differ, so a
# default net's init_args (and the files and checkpoints written before them) are unchanged
OPTION_DEFAULTS = dict(activation="relu", bn_scale="learned", bn_eps=1e-5, bn_momentum=0.9,
                       logit_scale=1.0, head_bias=True, dirac_init=False, stem="conv")


def init_weight(rng, shape, fan_in, gain=2.0):
    """He-style initial weights: N(0, gain / fan_in) (gain 2 suits relu layers).

    rng: a numpy Generator, or None for np.random (np.random.seed reproduces it).
    """
    return np.sqrt(gain / fan_in) * standard_normal(rng, shape)


def dirac_(w):
    """Filters w (F, C, kh, kw), in place: the first min(F, C) become the identity on their
    input channel (w[i, i] one at the centre, zero elsewhere), as torch.nn.init.dirac_ on
    w[:C]; the rest are kept."""
    m = min(w.shape[0], w.shape[1])
    w[:m] = 0
    w[np.arange(m), np.arange(m), w.shape[2] // 2, w.shape[3] // 2] = 1
    return w


def _check_options(options):
    """The keyword options checked (ValueError naming the bad one) -> normalised values."""
    o = dict(options)
    for name, allowed in (("activation", tuple(_ACTIVATIONS)), ("bn_scale", ("learned", "frozen")),
                          ("stem", ("conv", "whiten"))):
        if o[name] not in allowed:
            raise ValueError(f"ConvNet {name} must be one of {allowed}, got {o[name]!r}")
    for name in ("head_bias", "dirac_init"):
        if not isinstance(o[name], (bool, np.bool_)):
            raise ValueError(f"ConvNet {name} must be True or False, got {o[name]!r}")
        o[name] = bool(o[name])
    o["bn_eps"], o["bn_momentum"], o["logit_scale"] = (
        float(o["bn_eps"]), float(o["bn_momentum"]), float(o["logit_scale"]))
    if not 0 < o["bn_eps"] < np.inf:
        raise ValueError(f"ConvNet bn_eps must be a positive number, got {o['bn_eps']}")
    if not 0 <= o["bn_momentum"] <= 1:
        raise ValueError(f"ConvNet bn_momentum must be in [0, 1] (running = momentum * running "
                         f"+ (1 - momentum) * batch), got {o['bn_momentum']}")
    if not 0 < o["logit_scale"] < np.inf:
        raise ValueError(f"ConvNet logit_scale must be a positive number, got {o['logit_scale']}")
    return o


class ConvNet(Classifier):
    """The contract's ConvNet (see the module docstring); `loss(X)` / `loss(X, y)`.

    widths: channels of each group (each halves the image size); stem_width:
    the stem's channels (with stem="whiten" it must be 2*C*2*2, 24 for RGB, the default).
    label_smoothing (default 0: the plain softmax loss) mixes the one-hot targets with
    the uniform distribution. The other keywords are the options of the module docstring.
    """

    def __init__(self, widths=(32, 64, 128), stem_width=24, input_dim=(3, 32, 32),
                 num_classes=10, reg=0.0, dtype=np.float32, seed=None, label_smoothing=0.0,
                 activation="relu", bn_scale="learned", bn_eps=1e-5, bn_momentum=0.9,
                 logit_scale=1.0, head_bias=True, dirac_init=False, stem="conv"):
        widths = as_sizes(widths, "widths", low=1)
        stem_width = as_size(stem_width, "stem_width", low=1)
        num_classes = as_size(num_classes, "num_classes", low=1)
        input_dim = as_sizes(input_dim, "input_dim", low=1)
        if not widths or len(input_dim) != 3:
            raise ValueError(f"ConvNet needs at least one group width and input_dim (C, H, W); "
                             f"got widths {widths}, input_dim {input_dim}")
        options = _check_options(dict(
            activation=activation, bn_scale=bn_scale, bn_eps=bn_eps, bn_momentum=bn_momentum,
            logit_scale=logit_scale, head_bias=head_bias, dirac_init=dirac_init, stem=stem))
        channels, height, width = input_dim
        whiten = options["stem"] == "whiten"
        if whiten and stem_width != 2 * channels * WHITEN_KERNEL ** 2:
            raise ValueError(f"ConvNet stem='whiten' makes 2 * C * 2 * 2 = "
                             f"{2 * channels * WHITEN_KERNEL ** 2} channels from C = {channels}; "
                             f"got stem_width {stem_width}: pass stem_width="
                             f"{2 * channels * WHITEN_KERNEL ** 2}")
        shrink = WHITEN_KERNEL - 1 if whiten else 0  # the whitening conv has no padding
        if min(height, width) - shrink < 2 ** len(widths):
            raise ValueError(f"ConvNet: {len(widths)} groups halve the image {len(widths)} times, "
                             f"which needs at least {2 ** len(widths) + shrink} pixels a side; "
                             f"input_dim {tuple(input_dim)} has {min(height, width)}: use fewer "
                             "widths")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.dtype = np.dtype(dtype)
        self.reg = float(reg)
        self.label_smoothing = float(label_smoothing)
        self.widths, self.stem_width = widths, stem_width
        self.options = options
        self.init_args = dict(widths=widths, stem_width=self.stem_width,
                              input_dim=[channels, height, width], num_classes=num_classes,
                              reg=self.reg, dtype=self.dtype.name,
                              seed=None if seed is None else int(seed),
                              label_smoothing=self.label_smoothing)
        self.init_args.update({k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]})
        rng = None if seed is None else np.random.default_rng(seed)
        self._start_params()
        self.buffers = {}  # arrays the model computes with but no update rule touches (saved)
        # batchnorm's scale when it is frozen: one array of ones per width, made once
        self._ones = {}
        conv_channels = [channels, self.stem_width]
        for w in widths:
            conv_channels += [w, w]
        self.num_convs = len(conv_channels) - 1
        for i in range(1, self.num_convs + 1):
            c_in, c_out = conv_channels[i - 1], conv_channels[i]
            if i == 1 and whiten:
                # placeholder filters (drawn as a conv's would be) until init_whitening
                filters = init_weight(rng, (c_out, c_in, WHITEN_KERNEL, WHITEN_KERNEL),
                                      WHITEN_KERNEL ** 2 * c_in)
                self.buffers["W1"] = active_xp().asarray(filters, dtype=self.dtype)
                self._add_param("b1", np.zeros(c_out), "bias")
                continue
            filters = init_weight(rng, (c_out, c_in, 3, 3), 9 * c_in)
            self._add_param(f"W{i}", dirac_(filters) if options["dirac_init"] else filters,
                            "weight")
            if options["bn_scale"] == "learned":
                self._add_param(f"gamma{i}", np.ones(c_out), "scale")
            elif c_out not in self._ones:
                self._ones[c_out] = active_xp().ones(c_out, dtype=self.dtype)
            self._add_param(f"beta{i}", np.zeros(c_out), "shift")
            self._add_norm(i, c_out).update(eps=options["bn_eps"],
                                            momentum=options["bn_momentum"])
        last = self.num_convs + 1
        self._add_param(f"W{last}", init_weight(rng, (conv_channels[-1], num_classes),
                                                conv_channels[-1], 1.0), "weight")
        if options["head_bias"]:
            self._add_param(f"b{last}", np.zeros(num_classes), "bias")
        self.num_layers = last  # norm_params[str(i)]: the batchnorm after conv W{i}

    def init_whitening(self, X, eps=5e-4):
        """Set the whitening stem's filters from training images X (N, C, H, W) (airbench:
        the first 5000, normalised as the training data are): fastnn.init.whitening_filters
        with eps relative to the images' variance (airbench's 5e-4 on its unit-variance
        images, whatever scale X has)."""
        if self.options["stem"] != "whiten":
            raise ValueError(f"init_whitening needs a ConvNet built with stem='whiten'; this one "
                             f"has stem={self.options['stem']!r}")
        channels = self.init_args["input_dim"][0]
        if getattr(X, "ndim", None) != 4 or X.shape[1] != channels:
            raise ValueError(f"init_whitening needs images (N, {channels}, H, W); got shape "
                             f"{getattr(X, 'shape', None)}")
        filters = whitening_filters(X, WHITEN_KERNEL, eps, relative=True)
        self.buffers["W1"][...] = active_xp().asarray(filters, dtype=self.dtype)

    def _gamma(self, i):
        """The scale of batchnorm i: its parameter, or the shared ones when frozen."""
        gamma = self.params.get(f"gamma{i}")
        return self._ones[self.params[f"beta{i}"].shape[0]] if gamma is None else gamma

    def loss(self, X, y=None):
        """X (N, C, H, W) -> scores (N, num_classes), or (loss, grads) given labels y (N,)."""
        mode = "test" if y is None else "train"
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        p = self.params
        bn_act_forward, bn_act_backward, act_forward, act_backward = (
            _ACTIVATIONS[self.options["activation"]])
        xp = get_array_module(X)
        hidden = xp.asarray(X, dtype=self.dtype)
        caches = []
        first = 1
        if self.options["stem"] == "whiten":
            hidden, _ = conv_forward_fast(hidden, self.buffers["W1"], p["b1"], _WHITEN_CONV)
            hidden, stem_cache = act_forward(hidden)
            first = 2
        for i in range(first, self.num_convs + 1):
            # convs 2, 4, ... open a group and are followed by the pool
            pooled = i % 2 == 0
            if pooled:  # one op: fused where the backend can (fastnn.fast_layers)
                hidden, conv_cache = conv_pool_forward_fast(hidden, p[f"W{i}"], None, _CONV, _POOL)
            else:
                hidden, conv_cache = conv_forward_fast(hidden, p[f"W{i}"], None, _CONV)
            hidden, bn_cache = bn_act_forward(hidden, self._gamma(i), p[f"beta{i}"],
                                              self.norm_params[str(i)])
            caches.append((conv_cache, pooled, bn_cache))
        n, channels, height, width = hidden.shape
        pooled_max, head_pool_cache = max_pool_forward_fast(
            hidden, {"pool_height": height, "pool_width": width, "stride": 1})
        last = self.num_layers
        head_bias = self.options["head_bias"]
        features = pooled_max.reshape(n, channels)
        if head_bias:
            scores, affine_cache = affine_forward(features, p[f"W{last}"], p[f"b{last}"])
        else:
            scores, affine_cache = xp.matmul(features, p[f"W{last}"]), (features, p[f"W{last}"])
        scale = self.options["logit_scale"]
        if scale != 1.0:
            scores *= scale
        if y is None:
            return scores

        def backward(dscores):
            grads = {}
            if scale != 1.0:
                dscores = dscores * scale
            dfeatures, grads[f"W{last}"], db = affine_backward(dscores, affine_cache)
            if head_bias:
                grads[f"b{last}"] = db
            dhidden = max_pool_backward_fast(dfeatures.reshape(n, channels, 1, 1),
                                             head_pool_cache)
            # the whitening stem learns its bias only, and not once the Solver froze it:
            # then nothing needs the gradient of the stem's output (as autograd skips it)
            stem_learns = first == 2 and "b1" not in self.frozen
            for i in range(self.num_convs, first - 1, -1):
                conv_cache, pooled, bn_cache = caches[i - first]
                dhidden, dgamma, dbeta = bn_act_backward(dhidden, bn_cache)
                if f"gamma{i}" in p:  # not when the scale is frozen
                    grads[f"gamma{i}"] = dgamma
                grads[f"beta{i}"] = dbeta
                conv_backward = conv_pool_backward_fast if pooled else conv_backward_fast
                dhidden, grads[f"W{i}"], _ = conv_backward(dhidden, conv_cache,
                                                           need_dx=i > first or stem_learns)
            if stem_learns:
                grads["b1"] = act_backward(dhidden, stem_cache).sum(axis=(0, 2, 3))
            return grads

        return self._loss_and_grads(scores, y, backward, smoothing=self.label_smoothing)
