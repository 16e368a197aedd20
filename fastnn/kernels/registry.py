"""Op declarations: each op is declared once, beside its reference version, and each
backend's fast version registers against that declaration.

    @declare(data_args=2)              # in the family module, on the reference (plain xp)
    def relu_backward(dout, out): ...

    @relu_backward.register("numpy")   # its Numba version, in the same module
    def relu_backward_numba(dout, out): ...

`declare` records the op under its function's name with the number of its
leading data arguments (arrays that must share one dtype: x, gamma and beta of
a batchnorm; w, dw and the state tuple of an update) and the dtypes its fast
versions take. Registering for an unknown backend, twice for one backend, or a
version whose parameters differ from the reference's raises at import; a
misspelled op is a NameError there.
"""
import inspect

import numpy as np

BACKENDS = ("numpy", "cupy")
FLOATS = (np.float32, np.float64)  # other dtypes (float16) run the reference

OPS = {}  # op name -> Op, in declaration order
# backend -> why its fast versions cannot run, and what to do (set by kernels/_numba.py when
# Numba does not import); their registrations are then dropped and the backend runs the
# references
unavailable = {}


class Op:
    """One op of the table: its reference version and the fast versions registered for it."""

    def __init__(self, reference, data_args, dtypes):
        self.name = reference.__name__
        self.reference = reference
        self.data_args = data_args
        self.dtypes = frozenset(np.dtype(d) for d in dtypes)
        self.fast = {}  # backend name -> function

    def register(self, backend):
        """Decorator: `function` is this op's fast version on `backend` ("numpy" or "cupy")."""
        if backend not in BACKENDS:
            raise ValueError(f"op {self.name}: unknown backend {backend!r}; use one of "
                             f"{BACKENDS}")
        if backend in self.fast:
            raise ValueError(f"op {self.name} already has a {backend} version "
                             f"({self.fast[backend].__qualname__}); register one per backend")

        def decorator(function):
            if backend in unavailable:
                return function
            if _parameters(function) != _parameters(self.reference):
                raise ValueError(
                    f"op {self.name}: its {backend} version {function.__qualname__}"
                    f"{inspect.signature(function)} does not take the reference's parameters "
                    f"{inspect.signature(self.reference)}")
            self.fast[backend] = function
            return function

        return decorator

    def __repr__(self):
        return f"Op({self.name}, data_args={self.data_args}, fast={sorted(self.fast)})"


def _parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def declare(data_args=1, dtypes=FLOATS):
    """Decorator on a reference function: declare the op of its name; returns the function,
    which gains `.register(backend)` for its fast versions."""
    def decorator(reference):
        name = reference.__name__
        if not 1 <= data_args <= len(_parameters(reference)):
            raise ValueError(f"op {name}: data_args {data_args} is not between 1 and its "
                             f"{len(_parameters(reference))} parameters")
        if name in OPS:
            raise ValueError(f"op {name} is declared twice ({OPS[name].reference.__module__} "
                             f"and {reference.__module__})")
        op = OPS[name] = Op(reference, data_args, dtypes)
        reference.register = op.register
        return reference

    return decorator


def fast_ops(backend):
    """The names of the ops that have a fast version on `backend`."""
    return {name for name, op in OPS.items() if backend in op.fast}
