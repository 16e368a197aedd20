"""Example arguments for every op of the table: one entry per op, read by the tests
(tests/test_kernels.py, at each entry's `small` shape) and the benchmarks
(benchmarks/test_bench_kernels.py, at its `shapes`, the models' own sizes).

    args(op, rng, shape=None, xp=np, dtype=np.float32) -> the op's arguments

Arrays are host numpy arrays of `dtype` (the caller moves them to xp), except
where their layout matters (a channels-last activation seen as NCHW, the stack's
(K, H, N) activations seen as (N, K, H)): those are made on xp. A backward op
whose input is what its forward saved names that forward (`forward`); its
arguments come from `backward_args`. Adding an op: one entry in EXAMPLES.
"""
from typing import Callable, NamedTuple

import numpy as np

from fastnn import optim
from fastnn.kernels import reference
from fastnn.kernels.registry import OPS


class Example(NamedTuple):
    make: Callable      # (draw, shape, xp) -> arguments; None for a backward of saved state
    small: tuple        # the tests' shape
    shapes: list        # the benchmarks' shapes
    forward: str = None  # a backward op: the forward whose saved state it takes


class _Draw:
    """Random arrays of one dtype from one generator."""

    def __init__(self, rng, dtype):
        self.rng, self.dtype = rng, np.dtype(dtype)

    def normal(self, *shape):
        return self.rng.standard_normal(shape).astype(self.dtype)

    def positive(self, *shape):
        return (self.rng.random(shape) + 0.1).astype(self.dtype)

    def labels(self, n, classes):
        return self.rng.integers(0, classes, n, dtype=np.int64)


def _channels_last(xp, a):
    """The (N, C, H, W) view of a channels-last copy of host `a` on xp: the fast layers' layout."""
    return xp.ascontiguousarray(xp.asarray(a).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


# the models' sizes, float32 like them
ACTIVATIONS = [(200, 100), (512, 1024), (512, 4096)]    # batch x width
SCORES = [(200, 10), (512, 10)]                         # batch x classes
PARAMETERS = [(3072, 100), (1024, 1024), (3072, 1024)]  # weight matrices the nets update
IMAGES = [(200, 3, 32, 32), (512, 3, 32, 32)]           # CIFAR-10 minibatches, NCHW
# stacked models (fastnn.stacked): 16 two_layer members, or 4 deep_bn-width members
STACKED_ACTIVATIONS = [(200, 16, 100), (512, 4, 1024)]  # (N, K, H) views of (K, H, N) arrays
STACKED_SCORES = [(16, 200, 10), (4, 512, 10)]          # (K, N, C): softmax_loss, members
STACKED_PARAMETERS = [(3072, 16, 100), (1024, 4, 1024)]  # (A, K, B)
STACKED_FEATURE_ROWS = [(1600, 200), (4096, 512)]        # (K*H, N): feature-major activations
# convolution: layers of the reference ConvNet at batch 64 (N, C, H, W, F), 3x3 pad 1
CONVS = [(64, 3, 32, 32, 24), (64, 24, 32, 32, 32), (64, 64, 8, 8, 128)]
CONV_POOLS = [(64, 24, 32, 32, 32), (64, 64, 8, 8, 128)]  # each followed by a 2x2 pool
POOLS = [(64, 32, 32, 32), (64, 128, 8, 8)]               # (N, C, H, W), 2x2 stride 2
BN_RELU_ROWS = [(65536, 32), (4096, 128)]                 # (N*H*W, C), relu or gelu
GROUPNORM_IMAGES = [(256, 32, 32, 32), (256, 128, 8, 8)]


def _groups(channels):
    return 8 if channels % 8 == 0 else 2


def _dropout_stacked(d, shape, xp):
    n, k, h = shape
    x = xp.asarray(d.normal(k, h, n)).transpose(2, 0, 1)  # as the stack passes it
    p = np.linspace(0.0, 0.5, k)  # member 0 keeps every unit
    return (x, reference.dropout_seed_keys(range(1, k + 1)),
            np.array([reference.keep_threshold(q) for q in p], np.uint64),
            (1 / (1 - p)).astype(d.dtype), 7)


def _norm_backward(forward):
    def make(d, shape, xp):
        forward_args = EXAMPLES[forward].make(d, shape, xp)
        _, x_hat, inv_std = getattr(reference, forward)(*forward_args)
        return (d.normal(*shape), x_hat, forward_args[1], inv_std) + forward_args[3:-1]

    return make


def _bn_relu_backward(d, shape, xp):
    x, gamma, beta, eps = EXAMPLES["batchnorm_relu_train_forward"].make(d, shape, xp)
    out, mean, inv_std, _ = reference.batchnorm_relu_train_forward(x, gamma, beta, eps)
    return d.normal(*shape), x, out, gamma, mean, inv_std


def _bn_gelu_backward(d, shape, xp):
    x, gamma, beta, eps = EXAMPLES["batchnorm_gelu_train_forward"].make(d, shape, xp)
    _, mean, inv_std, _ = reference.batchnorm_gelu_train_forward(x, gamma, beta, eps)
    return d.normal(*shape), x, gamma, beta, mean, inv_std


def _conv(d, shape, xp):
    n, c, h, w, f = shape
    return _channels_last(xp, d.normal(n, c, h, w)), d.normal(f, c, 3, 3), None, 1, 1


def _update(rule):
    """(w, dw, state, scalars) of a rule's op: small steps, so repeated calls stay finite;
    3-D shapes are stacked blocks with per-member learning rates (float64, as the stack's)."""
    spec = optim.SPECS[rule]

    def make(d, shape, xp):
        lr = np.geomspace(1e-5, 1e-3, shape[1]) if len(shape) == 3 else 1e-3
        config = {**spec.defaults, "learning_rate": lr, "t": 10}
        return (d.normal(*shape), d.normal(*shape) * d.dtype.type(1e-3),
                tuple(d.positive(*shape) for _ in spec.state), spec.scalars(config))

    return make


EXAMPLES = {
    "relu_forward": Example(lambda d, s, xp: (d.normal(*s),), (7, 9), ACTIVATIONS),
    "relu_backward": Example(lambda d, s, xp: (d.normal(*s), np.maximum(d.normal(*s), 0)),
                             (7, 9), ACTIVATIONS),
    "gelu_forward": Example(lambda d, s, xp: (d.normal(*s),), (7, 9), ACTIVATIONS),
    "gelu_backward": Example(lambda d, s, xp: (d.normal(*s), d.normal(*s)), (7, 9), ACTIVATIONS),
    "dropout_forward": Example(lambda d, s, xp: (d.normal(*s), 0.2, 1234, 7), (7, 9),
                               ACTIVATIONS),
    "dropout_backward": Example(lambda d, s, xp: (d.normal(*s), 0.2, 1234, 7), (7, 9),
                                ACTIVATIONS),
    "dropout_stacked_forward": Example(_dropout_stacked, (6, 4, 5), STACKED_ACTIVATIONS),
    "dropout_stacked_backward": Example(_dropout_stacked, (6, 4, 5), STACKED_ACTIVATIONS),
    "flip_crop": Example(lambda d, s, xp: (d.normal(*s), 1234, 7, True, 4), (3, 2, 6, 6),
                         IMAGES),
    # (K, N, C) scores: K members on shared labels
    "softmax_loss": Example(lambda d, s, xp: (d.normal(*s), d.labels(*s[-2:])), (8, 5),
                            SCORES + STACKED_SCORES),
    "svm_loss": Example(lambda d, s, xp: (d.normal(*s), d.labels(*s)), (8, 5), SCORES),
    "batchnorm_train_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), 1e-5), (8, 6),
        ACTIVATIONS),
    "batchnorm_backward": Example(
        lambda d, s, xp: (d.normal(*s), d.normal(*s), d.positive(s[1]), d.positive(s[1])),
        (8, 6), ACTIVATIONS),
    # (features, N)
    "batchnorm_rows_train_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[0]), d.normal(s[0]), 1e-5), (6, 8),
        STACKED_FEATURE_ROWS),
    "batchnorm_rows_backward": Example(
        lambda d, s, xp: (d.normal(*s), d.normal(*s), d.positive(s[0]), d.positive(s[0])),
        (6, 8), STACKED_FEATURE_ROWS),
    "batchnorm_relu_train_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), 1e-5), (8, 6),
        BN_RELU_ROWS),
    "batchnorm_relu_test_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), d.normal(s[1]),
                          d.positive(s[1]), 1e-5), (8, 6), BN_RELU_ROWS),
    "batchnorm_relu_backward": Example(_bn_relu_backward, (8, 6), BN_RELU_ROWS),
    "batchnorm_gelu_train_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), 1e-5), (8, 6),
        BN_RELU_ROWS),
    "batchnorm_gelu_test_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), d.normal(s[1]),
                          d.positive(s[1]), 1e-5), (8, 6), BN_RELU_ROWS),
    "batchnorm_gelu_backward": Example(_bn_gelu_backward, (8, 6), BN_RELU_ROWS),
    "layernorm_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), 1e-5), (8, 6),
        ACTIVATIONS[1:]),
    "layernorm_backward": Example(_norm_backward("layernorm_forward"), (8, 6), ACTIVATIONS[1:]),
    "groupnorm_forward": Example(
        lambda d, s, xp: (d.normal(*s), d.positive(s[1]), d.normal(s[1]), _groups(s[1]), 1e-5),
        (2, 4, 3, 3), GROUPNORM_IMAGES),
    "groupnorm_backward": Example(_norm_backward("groupnorm_forward"), (2, 4, 3, 3),
                                  GROUPNORM_IMAGES),
    "l2_stacked_": Example(
        lambda d, s, xp: (d.normal(*s) * d.dtype.type(1e-3), d.normal(*s),
                          np.geomspace(1e-4, 1e-1, s[1])), (3, 4, 5), STACKED_PARAMETERS),
    "conv_forward": Example(_conv, (2, 3, 6, 5, 4), CONVS),
    "conv_backward": Example(None, (2, 3, 6, 5, 4), CONVS, forward="conv_forward"),
    # 8 channels and even sizes: the numpy version's fused Winograd path
    "conv_pool_forward": Example(lambda d, s, xp: _conv(d, s, xp) + (2, 2, 2), (2, 8, 6, 4, 8),
                                 CONV_POOLS),
    "conv_pool_backward": Example(None, (2, 8, 6, 4, 8), CONV_POOLS, forward="conv_pool_forward"),
    "max_pool_forward": Example(
        lambda d, s, xp: (_channels_last(xp, d.normal(*s)), 2, 2, 2), (2, 3, 6, 6), POOLS),
    "max_pool_backward": Example(None, (2, 3, 6, 6), POOLS, forward="max_pool_forward"),
}
# every rule's op (adam_ serves adamw too: the last rule of an op gives its example)
EXAMPLES.update({spec.op: Example(_update(rule), (5, 6), PARAMETERS + STACKED_PARAMETERS)
                 for rule, spec in optim.SPECS.items()})


def args(op, rng, shape=None, xp=np, dtype=np.float32):
    """The example arguments of `op` (not a backward of saved state) at `shape` (default:
    its `small` one)."""
    example = EXAMPLES[op]
    return example.make(_Draw(rng, dtype), example.small if shape is None else shape, xp)


def backward_args(op, table, rng, shape=None, xp=np, dtype=np.float32):
    """(dout, saved) of a backward op: saved by `table`'s forward (EXAMPLES[op].forward) on
    its example; dout channels-last, as the next layer hands it back."""
    forward = EXAMPLES[op].forward
    out, saved = getattr(table, forward)(*to_module(xp, args(forward, rng, shape, xp, dtype)))
    return _channels_last(xp, rng.standard_normal(out.shape).astype(dtype)), saved


def to_module(xp, value):
    """An example's arguments (a tuple, nested: an update's state) with their host arrays
    moved to xp."""
    if isinstance(value, tuple):
        return tuple(to_module(xp, v) for v in value)
    return xp.asarray(value) if isinstance(value, np.ndarray) else value


def missing():
    """Declared ops without an example (a test fails on any)."""
    return sorted(set(OPS) - set(EXAMPLES))
