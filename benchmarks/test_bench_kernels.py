"""Per-kernel benchmarks: every op in fastnn.kernels.OPS, fast table vs reference.

Implementations, grouped by op and shape so pytest-benchmark compares them:
  reference       fastnn.kernels.reference on numpy arrays (plain NumPy)
  numpy           fastnn.kernels.for_module(numpy) (the Numba kernels, or the
                  reference where cpu.py has none: the group name then says so)
  cupy-reference  the reference on cupy arrays      } GPU only; skipped with
  cupy            fastnn.kernels.for_module(cupy)   } the reason elsewhere

    python -m pytest benchmarks/test_bench_kernels.py
    python -m pytest benchmarks/test_bench_kernels.py -k "adam_ and 3072x1024"

Each op runs once before timing (Numba compilation, CuPy kernel builds);
GPU timings synchronise the device inside the timed function.
"""
import numpy as np
import pytest

from fastnn import kernels, optim
from fastnn.kernels import OPS, reference

import workloads

ACTIVATIONS = [(200, 100), (512, 1024), (512, 4096)]  # batch x width
SCORES = [(200, 10), (512, 10)]                       # batch x classes
PARAMETERS = [(3072, 100), (1024, 1024), (3072, 1024)]  # weight matrices the nets update
IMAGES = [(200, 3, 32, 32), (512, 3, 32, 32)]         # CIFAR-10 minibatches, NCHW
# stacked models (fastnn.stacked): 16 two_layer members, or 4 deep_bn-width members
STACKED_ACTIVATIONS = [(200, 16, 100), (512, 4, 1024)]  # (N, K, H) views of (K, H, N) arrays
STACKED_SCORES = [(16, 200, 10), (4, 512, 10)]          # (K, N, C): softmax_loss, members
STACKED_PARAMETERS = [(3072, 16, 100), (1024, 4, 1024)]  # (A, K, B)
STACKED_FEATURE_ROWS = [(1600, 200), (4096, 512)]        # (K*H, N): feature-major activations
# convolution: layers of the reference ConvNet at batch 64, channels-last views like its own
CONVS = [(64, 3, 32, 32, 24), (64, 24, 32, 32, 32), (64, 64, 8, 8, 128)]  # (N, C, H, W, F), 3x3 pad 1
POOLS = [(64, 32, 32, 32), (64, 128, 8, 8)]                             # (N, C, H, W), 2x2 stride 2
BN_RELU_ROWS = [(65536, 32), (4096, 128)]                               # (N*H*W, C)
# backward ops whose saved state comes from the same implementation's forward
FORWARD_OF = {"conv_backward": "conv_forward", "max_pool_backward": "max_pool_forward"}

SHAPES = {
    "relu_forward": ACTIVATIONS, "relu_backward": ACTIVATIONS,
    "dropout_forward": ACTIVATIONS, "dropout_backward": ACTIVATIONS,
    "softmax_loss": SCORES + STACKED_SCORES, "svm_loss": SCORES,
    "batchnorm_train_forward": ACTIVATIONS, "batchnorm_backward": ACTIVATIONS,
    # update rules: lone parameters and stacked blocks (A, K, B)
    **{spec.op: PARAMETERS + STACKED_PARAMETERS for spec in optim.SPECS.values()},
    "flip_crop": IMAGES,
    "dropout_stacked_forward": STACKED_ACTIVATIONS, "dropout_stacked_backward": STACKED_ACTIVATIONS,
    "batchnorm_rows_train_forward": STACKED_FEATURE_ROWS,
    "batchnorm_rows_backward": STACKED_FEATURE_ROWS,
    "l2_stacked_": STACKED_PARAMETERS,
    "conv_forward": CONVS, "conv_backward": CONVS,
    "max_pool_forward": POOLS, "max_pool_backward": POOLS,
    "batchnorm_relu_train_forward": BN_RELU_ROWS, "batchnorm_relu_backward": BN_RELU_ROWS,
}
# norms: layernorm over deep_bn-width activations; groupnorm over conv activations
SHAPES.update({
    "layernorm_forward": ACTIVATIONS[1:], "layernorm_backward": ACTIVATIONS[1:],
    "groupnorm_forward": [(256, 32, 32, 32), (256, 128, 8, 8)],
    "groupnorm_backward": [(256, 32, 32, 32), (256, 128, 8, 8)],
})
NORM_GROUPS = 8
UPDATE_OPS = {spec.op: name for name, spec in optim.SPECS.items()}  # adam_ serves adamw too
IMPLEMENTATIONS = ["reference", "numpy", "cupy-reference", "cupy"]


def make_args(op, shape, rng, xp=np):
    """Arguments for `op` at `shape`, float32 like the models; numpy arrays (moved to
    `xp` by the caller) except where the layout matters."""
    if op == "flip_crop":
        return rng.standard_normal(shape, dtype=np.float32), 1234, 7, True, 4
    if op in UPDATE_OPS:
        return make_update_args(op, shape, rng, xp)
    if op.endswith("_stacked_") or op.startswith("dropout_stacked") or len(shape) == 3:
        return make_stacked_args(op, shape, rng, xp)
    if op.startswith(("layernorm", "groupnorm")):
        return make_norm_args(op, shape, rng)
    if op in ("conv_forward", "max_pool_forward"):
        x = rng.standard_normal(shape[:1] + shape[2:4] + shape[1:2], dtype=np.float32)
        x = xp.asarray(x).transpose(0, 3, 1, 2)  # channels-last seen as NCHW
        if op == "max_pool_forward":
            return x, 2, 2, 2
        n, c, h, w, f = shape
        return x, rng.standard_normal((f, c, 3, 3), dtype=np.float32), None, 1, 1
    n, d = shape

    def normal(*s):
        return rng.standard_normal(s, dtype=np.float32)

    def positive(*s):
        return rng.random(s, dtype=np.float32) + np.float32(0.1)

    if op == "relu_forward":
        return (normal(n, d),)
    if op == "relu_backward":
        return normal(n, d), np.maximum(normal(n, d), 0)
    if op in ("dropout_forward", "dropout_backward"):
        return normal(n, d), 0.2, 1234, 7
    if op in ("softmax_loss", "svm_loss"):
        return normal(n, d), rng.integers(0, d, n, dtype=np.int64)
    if op == "batchnorm_train_forward":
        return normal(n, d), positive(d), normal(d), 1e-5
    if op == "batchnorm_backward":
        return normal(n, d), normal(n, d), positive(d), positive(d)
    if op == "batchnorm_rows_train_forward":  # shape is (features, N)
        return normal(n, d), positive(n), normal(n), 1e-5
    if op == "batchnorm_rows_backward":
        return normal(n, d), normal(n, d), positive(n), positive(n)
    if op == "batchnorm_relu_train_forward":
        return normal(n, d), positive(d), normal(d), 1e-5
    if op == "batchnorm_relu_backward":
        x = normal(n, d)
        return normal(n, d), x, np.maximum(x, 0), positive(d), normal(d), positive(d)
    raise AssertionError(f"no arguments defined for op {op!r}; add it to make_args")


def make_update_args(op, shape, rng, xp=np):
    """(w, dw, state, scalars) of an update-rule op: small steps, so repeated calls stay
    finite; 3-D shapes are stacked blocks with per-member learning rates (float64)."""
    w = rng.standard_normal(shape, dtype=np.float32)
    dw = np.float32(1e-3) * rng.standard_normal(shape, dtype=np.float32)
    spec = optim.SPECS[UPDATE_OPS[op]]
    lr = xp.asarray(np.geomspace(1e-5, 1e-3, shape[1])) if len(shape) == 3 else 1e-4
    config = {**spec.defaults, "learning_rate": lr, "t": 10}
    return w, dw, tuple(np.zeros_like(w) for _ in spec.state), spec.scalars(config)


def make_backward_args(op, shape, rng, xp, table):
    """(dout, saved) for a backward op, saved by `table`'s own forward (FORWARD_OF)."""
    out, saved = getattr(table, FORWARD_OF[op])(*make_args(FORWARD_OF[op], shape, rng, xp))
    dout = xp.asarray(rng.standard_normal(out.shape, dtype=np.float32))
    # the layout the forward made (channels-last on numpy), as the next layer hands it back
    dout = xp.ascontiguousarray(dout.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return (dout, saved) + ((False,) if op == "conv_backward" and shape[1] == 3 else ())


def shape_name(shape):
    return "x".join(str(d) for d in shape)


def make_stacked_args(op, shape, rng, xp=np):
    """Arguments of the stacked ops (K members along a model axis; see fastnn.stacked)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if op in ("dropout_stacked_forward", "dropout_stacked_backward"):
        n, k, h = shape
        # fastnn.stacked keeps activations feature-major, (K, H, N), and passes this view
        x = xp.asarray(rng.standard_normal((k, h, n), dtype=np.float32)).transpose(2, 0, 1)
        keys = rng.integers(0, 2**63, k, dtype=np.uint64)
        thresholds = np.full(k, reference.keep_threshold(0.2), dtype=np.uint64)
        return x, keys, thresholds, np.full(k, 1 / 0.8, dtype=np.float32), 7
    if op == "softmax_loss":  # K members' scores on shared labels
        k, n, c = shape
        return x, rng.integers(0, c, n, dtype=np.int64)
    k = shape[1]
    dw = np.float32(1e-3) * rng.standard_normal(shape, dtype=np.float32)
    if op == "l2_stacked_":
        return dw, x, np.geomspace(1e-4, 1e-1, k)
    raise AssertionError(f"no arguments defined for op {op!r}; add it to make_args")


def make_norm_args(op, shape, rng):
    """Arguments of the layernorm (N, D) and groupnorm (N, C, H, W) ops, float32."""
    x = rng.standard_normal(shape, dtype=np.float32)
    gamma = rng.random(shape[1], dtype=np.float32) + np.float32(0.5)
    beta = rng.standard_normal(shape[1], dtype=np.float32)
    if op == "layernorm_forward":
        return x, gamma, beta, 1e-5
    if op == "groupnorm_forward":
        return x, gamma, beta, NORM_GROUPS, 1e-5
    _, x_hat, inv_std, *_ = getattr(reference, op.replace("backward", "forward"))(
        *make_norm_args(op.replace("backward", "forward"), shape, rng))
    dout = rng.standard_normal(shape, dtype=np.float32)
    if op == "layernorm_backward":
        return dout, x_hat, gamma, inv_std
    if op == "groupnorm_backward":
        return dout, x_hat, gamma, inv_std, NORM_GROUPS
    raise AssertionError(f"no arguments defined for op {op!r}; add it to make_args")


def _cases():
    for op in OPS:
        if op not in SHAPES:  # a new op: say so rather than break the whole suite
            yield pytest.param(op, None, "numpy", id=f"{op}-no-shapes", marks=pytest.mark.skip(
                reason=f"op {op!r} has no benchmark shapes: add it to SHAPES and make_args "
                       "in benchmarks/test_bench_kernels.py"))
            continue
        for shape in SHAPES[op]:
            for impl in IMPLEMENTATIONS:
                yield pytest.param(op, shape, impl, id=f"{op}-{shape_name(shape)}-{impl}")


@pytest.mark.parametrize("op, shape, impl", list(_cases()))
def test_kernel(benchmark, op, shape, impl):
    if impl.startswith("cupy"):
        reason = workloads.skip_reason("fastnn-cupy")
        if reason:
            pytest.skip(reason)
        import cupy as xp

        def sync():
            xp.cuda.Device().synchronize()
    else:
        xp = np

        def sync():
            pass

    table = reference if impl.endswith("reference") else kernels.for_module(xp)
    fn = getattr(table, op)

    def to_xp(a):
        if isinstance(a, tuple):  # an update rule's state arrays
            return tuple(to_xp(b) for b in a)
        return xp.asarray(a) if isinstance(a, np.ndarray) else a

    rng = np.random.default_rng(0)
    raw = (make_backward_args(op, shape, rng, xp, table) if op in FORWARD_OF
           else make_args(op, shape, rng, xp))
    args = tuple(to_xp(a) for a in raw)

    def run():
        fn(*args)
        sync()

    run()  # compile / build and first touch, untimed
    benchmark.group = f"{op} {shape_name(shape)}"
    if kernels.for_module(np).__dict__[op] is getattr(reference, op):
        benchmark.group += " (the numpy table uses the reference here)"
    benchmark.extra_info.update(
        op=op, shape=list(shape), implementation=impl,
        function=f"{fn.__module__}.{fn.__name__}",
        bytes_per_call=int(sum(a.nbytes for a in args if hasattr(a, "nbytes"))
                           + sum(b.nbytes for a in args if isinstance(a, tuple) for b in a
                                 if hasattr(b, "nbytes"))))
    benchmark(run)
