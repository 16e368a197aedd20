"""One table of hot ops, per array module.

`kernels.for_module(xp)` returns a namespace holding every op in `OPS`:
the backend's fast version where one exists (cpu.py: Numba, for numpy;
gpu.py: CuPy kernels, for cupy), else the reference (plain xp) version. The
layers call ops only through this table, so a backend adds speed by
defining a function of the same name and signature in its module.

A fast module's kernels take the floating dtypes in its `DTYPES`; an op
called with another dtype (judged by its first argument, the data array,
e.g. float16) runs the reference version instead.
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
    "dropout_stacked_forward", "dropout_stacked_backward", "softmax_loss_stacked",
    "batchnorm_rows_train_forward", "batchnorm_rows_backward", "l2_stacked_",
    # convolution (fastnn.fast_layers; the naive layers run the reference ops)
    "conv_forward", "conv_backward", "max_pool_forward", "max_pool_backward",
    "batchnorm_relu_train_forward", "batchnorm_relu_backward",
)

_tables = {}


def _fast_module(name):
    """The fast-kernel module for an array module name, or None."""
    if name == "numpy":
        return importlib.import_module("fastnn.kernels.cpu")
    if name == "cupy":
        return importlib.import_module("fastnn.kernels.gpu")
    return None


def _for_dtypes(fast_op, reference_op, dtypes):
    """fast_op for data of `dtypes` (the first argument's dtype), else reference_op."""
    if fast_op is None:
        return reference_op
    dtypes = tuple(np.dtype(d).type for d in dtypes)

    @functools.wraps(fast_op)
    def op(data, *args, **kwargs):
        if data.dtype.type in dtypes:
            return fast_op(data, *args, **kwargs)
        return reference_op(data, *args, **kwargs)

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
                            getattr(fast, "DTYPES", ())) for op in OPS})
        table.name = name if fast else f"{name}-reference"
        _tables[name] = table
    return table
