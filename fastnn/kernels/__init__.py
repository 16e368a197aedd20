"""One table of hot ops, per array module.

`kernels.for_module(xp)` returns a namespace holding every op in `OPS`:
the backend's fast version where one exists (cpu.py: Numba, for numpy;
gpu.py: CuPy kernels, for cupy), else the reference (plain xp) version. The
layers call ops only through this table, so a backend adds speed by
defining a function of the same name and signature in its module.

A fast module's kernels take the floating dtypes in its `DTYPES`, one dtype
per call. An op runs its fast version when its data arrays (the leading
arguments that `DATA_ARGS` counts: x, gamma and beta of a batchnorm; w, dw
and the state of an update) all have one dtype of `DTYPES`; otherwise (float16,
or float32 mixed with float64) it runs the reference version, which promotes
as numpy and cupy do (an in-place update keeps w's dtype).
"""
import functools
import importlib
import types

import numpy as np

from fastnn.kernels import reference

OPS = (
    "relu_forward", "relu_backward",
    "dropout_forward", "dropout_backward",
    "softmax_loss", "svm_loss",
    "batchnorm_train_forward", "batchnorm_backward",
    # update rules, in place, for lone parameters and stacked members alike
    # (fastnn.optim.SPECS names each rule's op)
    "sgd_", "sgd_momentum_", "sgd_nesterov_", "rmsprop_", "adam_",
    "flip_crop",
    # stacked models (fastnn.stacked): K members along a model axis
    "dropout_stacked_forward", "dropout_stacked_backward",
    "batchnorm_rows_train_forward", "batchnorm_rows_backward", "l2_stacked_",
    # norms (fastnn.layers: layernorm, spatial groupnorm)
    "layernorm_forward", "layernorm_backward", "groupnorm_forward", "groupnorm_backward",
    # convolution (fastnn.fast_layers; the naive layers run the reference ops)
    "conv_forward", "conv_backward", "max_pool_forward", "max_pool_backward",
    "conv_pool_forward", "conv_pool_backward",
    "batchnorm_relu_train_forward", "batchnorm_relu_test_forward", "batchnorm_relu_backward",
)

# How many leading arguments of an op are data arrays that share one dtype;
# ops not named here have one. The arguments after them are labels, seeds,
# masks and hyperparameters (a stack's per-member learning rates stay float64).
# An update rule's data are w, dw and its state (a tuple of arrays); its
# scalars h (per-member ones stay float64) are not.
DATA_ARGS = {
    "relu_backward": 2,
    "batchnorm_train_forward": 3, "batchnorm_backward": 4,
    "sgd_": 3, "sgd_momentum_": 3, "sgd_nesterov_": 3, "rmsprop_": 3, "adam_": 3,
    "batchnorm_rows_train_forward": 3, "batchnorm_rows_backward": 4,
    "l2_stacked_": 2,
    "layernorm_forward": 3, "layernorm_backward": 4,
    "groupnorm_forward": 3, "groupnorm_backward": 4,
    "batchnorm_relu_train_forward": 3, "batchnorm_relu_test_forward": 5,
    "batchnorm_relu_backward": 4,
}

_tables = {}


def _fast_module(name):
    """The fast-kernel module for an array module name, or None."""
    if name == "numpy":
        return importlib.import_module("fastnn.kernels.cpu")
    if name == "cupy":
        return importlib.import_module("fastnn.kernels.gpu")
    return None


def _for_dtypes(fast_op, reference_op, dtypes, data_args):
    """fast_op when the first `data_args` arguments share one dtype of `dtypes`, else
    reference_op."""
    if fast_op is None:
        return reference_op
    dtypes = frozenset(np.dtype(d) for d in dtypes)

    # the check runs on every op call, so it stays a few attribute reads (no generators)
    if data_args == 1:
        @functools.wraps(fast_op)
        def op(*args, **kwargs):
            if args[0].dtype in dtypes:
                return fast_op(*args, **kwargs)
            return reference_op(*args, **kwargs)

        return op

    def same_dtype(values, dtype):
        for v in values:
            if isinstance(v, (tuple, list)):
                if not same_dtype(v, dtype):
                    return False
            elif v.dtype != dtype:
                return False
        return True

    @functools.wraps(fast_op)
    def op(*args, **kwargs):
        dtype = args[0].dtype
        if dtype in dtypes and same_dtype(args[1:data_args], dtype):
            return fast_op(*args, **kwargs)
        return reference_op(*args, **kwargs)

    return op


def for_module(xp):
    """The op table (a SimpleNamespace) for array module `xp`."""
    name = "cupy" if xp is not np else "numpy"
    table = _tables.get(name)
    if table is None:
        fast = _fast_module(name)
        # getattr(None, op, None) is None: no fast module means all reference
        table = types.SimpleNamespace(**{
            op: _for_dtypes(getattr(fast, op, None), getattr(reference, op),
                            getattr(fast, "DTYPES", ()), DATA_ARGS.get(op, 1)) for op in OPS})
        table.name = name if fast else f"{name}-reference"
        _tables[name] = table
    return table
