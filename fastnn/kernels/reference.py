"""The reference table: every op's plain-xp version, by name, correct on every backend.

The naive layers run these and every fast version is tested against them.
Each is written in its family's module (fastnn/kernels/<family>.py), declared
there beside its Numba and CuPy versions; this module gathers them, with the
keyed-mask helpers (fastnn.kernels.rng) that the layers and tests use.
"""
from fastnn.kernels.registry import OPS
from fastnn.kernels.rng import (dropout_keep, dropout_seed_keys, is_step_array,  # noqa: F401
                                keep_threshold, mix64)

globals().update({name: op.reference for name, op in OPS.items()})
