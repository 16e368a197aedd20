"""One table of hot ops, per array module, grouped by family.

Each family module (activations, augment, losses, updates, batchnorm, norms,
conv, winograd, pool) holds, per op, its reference version (plain xp, declared
with `registry.declare`: its name, its data arguments, its dtypes), its Numba
version (registered for "numpy") and its CuPy version (registered for "cupy").
Shared helpers: rng.py (the keyed masks), _numba.py, _cupy.py.

`kernels.for_module(xp)` returns a namespace holding every declared op: the
backend's fast version where one is registered, else the reference. The layers
call ops only through this table. An op runs its fast version when its data
arrays (its leading `data_args` arguments: x, gamma and beta of a batchnorm;
w, dw and the state of an update) all have one dtype of its `dtypes`;
otherwise (float16, or float32 mixed with float64) it runs the reference,
which promotes as numpy and cupy do (an in-place update keeps w's dtype).
`kernels.reference` is the table of reference versions.
"""
import functools
import types

import numpy as np

# the family modules declare and register their ops on import
from fastnn.kernels import (activations, augment, batchnorm, conv, losses, norms,  # noqa: F401
                            pool, updates)
from fastnn.kernels.registry import OPS as _DECLARED, fast_ops

OPS = tuple(_DECLARED)  # every op's name, in declaration order
# how many leading arguments of each op are data arrays that share one dtype
DATA_ARGS = {name: op.data_args for name, op in _DECLARED.items()}

_tables = {}


def _for_dtypes(fast_op, reference_op, dtypes, data_args):
    """fast_op when the first `data_args` arguments share one dtype of `dtypes`, else
    reference_op."""
    if fast_op is None:
        return reference_op

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
        table = types.SimpleNamespace(**{
            op.name: _for_dtypes(op.fast.get(name), op.reference, op.dtypes, op.data_args)
            for op in _DECLARED.values()})
        table.name = name if fast_ops(name) else f"{name}-reference"
        _tables[name] = table
    return table
