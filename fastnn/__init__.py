"""fastnn: the classic modular-layers neural-network framework, fast.

NumPy with Numba kernels on CPU, CuPy with fused kernels on GPU; one switch
between them: `fastnn.set_backend("cupy")`.
"""
__version__ = "0.1.0"

from fastnn.backend import get_backend, set_backend, to_numpy, use_backend, xp
from fastnn.threads import get_num_threads, set_num_threads
from fastnn.serialization import load, save

__all__ = ["__version__", "set_backend", "get_backend", "use_backend", "xp", "to_numpy",
           "set_num_threads", "get_num_threads", "save", "load"]
