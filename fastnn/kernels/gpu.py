"""CuPy kernels for the cupy backend.

None yet: every op falls back to the reference (plain cupy) implementation
through the kernel table. Fused CuPy kernels are the GPU-speed work.
"""
