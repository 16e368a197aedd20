"""Tests for fastnn.kernels: every op of each backend's table against the reference ops.

The numpy table holds the Numba versions, the cupy table the CuPy versions
where they exist (each op's family module, fastnn/kernels/<family>.py, holds
both beside its reference); both must give what fastnn.kernels.reference gives
on the same inputs (fastnn.kernels.examples makes them). Dropout masks must
match bit for bit, on every backend and thread count.
"""
import numpy as np
import pytest

import fastnn
from fastnn import kernels, layers, optim
from fastnn.backend import get_array_module
from fastnn.kernels import (_cupy, _numba, activations, batchnorm, conv, examples, losses, norms,
                            pool, reference, registry, updates, winograd)
from fastnn.kernels import rng as keyed
from helpers import backend_tolerances, host_copies, numba_kernels, tolerances

X_SHAPES = [(1, 7), (5, 3), (64, 10), (3, 4, 5), (97, 130)]  # the last spans several chunks
LOSS_SHAPES = [(1, 10), (1, 1), (2, 2), (16, 10), (300, 7)]
BN_SHAPES = [(1, 6), (2, 1), (8, 5), (128, 40)]


@pytest.fixture
def ops(backend):
    """(array module, the backend's op table)."""
    return backend, kernels.for_module(backend)


def _host(a):
    return fastnn.to_numpy(a)


def _close(actual, expected, dtype, scale=1.0):
    """A backend's result against numpy's (float32 tolerances when it comes from a GPU)."""
    rtol, atol = backend_tolerances(get_array_module(actual), dtype)
    np.testing.assert_allclose(_host(actual), _host(expected), rtol=rtol, atol=atol * scale)


def _reference(op, *args):
    """Reference op `op` run by numpy on host copies of `args`: what every backend must give."""
    return getattr(reference, op)(*host_copies(*args))


def _outputs(result, args):
    """What an op produced: its results, and the arrays it updates in place."""
    results = list(result) if isinstance(result, tuple) else [] if result is None else [result]
    arrays = [a for a in args if hasattr(a, "shape")]
    arrays += [b for a in args if isinstance(a, tuple) for b in a if hasattr(b, "shape")]
    return results + arrays


# -- the table: declarations, registrations, dtype guard -------------------------
# The ops that run fast on each backend. A fast version lost (a misnamed or
# unregistered kernel) fails here instead of running the reference in silence.
NUMBA_OPS = set(kernels.OPS)  # every op has a Numba version
CUPY_OPS = {"relu_forward", "relu_backward", "gelu_forward", "gelu_backward",
            "dropout_forward", "dropout_backward", "softmax_loss",
            "layernorm_forward", "layernorm_backward", "groupnorm_forward", "groupnorm_backward",
            "conv_forward", "conv_backward", "max_pool_forward", "max_pool_backward",
            "conv_pool_forward", "conv_pool_backward",
            "sgd_", "sgd_momentum_", "sgd_nesterov_", "rmsprop_", "adam_", "muon_"}


def test_each_backend_runs_exactly_its_fast_ops():
    """Checked from the registrations, so the CuPy set is checked without CuPy too."""
    assert registry.fast_ops("numpy") == NUMBA_OPS
    assert registry.fast_ops("cupy") == CUPY_OPS
    table = kernels.for_module(np)
    for name, op in registry.OPS.items():  # the fast version sits behind the dtype guard
        assert getattr(table, name).__wrapped__ is op.fast["numpy"], name


def test_every_update_rule_has_its_op_declared_with_its_data():
    """fastnn.optim.SPECS names each rule's op: each is declared, with w, dw and the state as
    its data (a mixed dtype among them runs the reference), and runs fast on both backends."""
    for rule, spec in optim.SPECS.items():
        assert spec.op in registry.OPS, (rule, spec.op)
        assert kernels.DATA_ARGS[spec.op] == 3, spec.op
        assert {"numpy", "cupy"} <= set(registry.OPS[spec.op].fast), spec.op


def test_registration_fails_loudly():
    """An unknown backend, a second version for one backend, an op declared twice, a fast
    version whose parameters are not the reference's, more data arguments than parameters:
    each raises where it is written (at import), naming the op."""
    with pytest.raises(ValueError, match="relu_forward: unknown backend 'numba'"):
        reference.relu_forward.register("numba")
    with pytest.raises(ValueError, match="relu_forward already has a numpy version"):
        reference.relu_forward.register("numpy")
    with pytest.raises(ValueError, match="op relu_forward is declared twice"):
        registry.declare()(reference.relu_forward)
    with pytest.raises(ValueError, match=r"op relu_backward: its cupy version .*\(dout\) does "
                                         r"not take the reference's parameters \(dout, out\)"):
        registry.Op(reference.relu_backward, 2, registry.FLOATS).register("cupy")(
            lambda dout: dout)

    def three(a, b, c):
        pass

    with pytest.raises(ValueError, match="op three: data_args 4 is not between 1 and its 3"):
        registry.declare(data_args=4)(three)
    assert "three" not in registry.OPS
    assert registry.fast_ops("numpy") == NUMBA_OPS  # nothing changed by the failed attempts


def test_every_op_has_example_arguments():
    assert examples.missing() == []
    for name, example in examples.EXAMPLES.items():
        assert example.shapes, name
        assert (example.make is None) == (example.forward is not None), name


def _example(op, xp, table, seed=20):
    """(the op's arguments on xp for `table`, the same on the host for the reference)."""
    forward = examples.EXAMPLES[op].forward
    if forward is not None:  # a backward: its input is the state its own table's forward saved
        return (examples.backward_args(op, table, np.random.default_rng(seed), xp=xp),
                examples.backward_args(op, reference, np.random.default_rng(seed)))
    return (examples.to_module(xp, examples.args(op, np.random.default_rng(seed), xp=xp)),
            examples.args(op, np.random.default_rng(seed)))


@pytest.mark.parametrize("op", kernels.OPS)
def test_every_op_matches_its_reference(ops, op):
    """Each op of the table gives what the reference gives on numpy (a fast kernel that drifts
    fails; on cupy the comparison is with numpy's result, never with itself)."""
    xp, table = ops
    fast_args, ref_args = _example(op, xp, table)
    backward = examples.EXAMPLES[op].forward is not None  # its arguments: (dout, saved)
    got = _outputs(getattr(table, op)(*fast_args), () if backward else fast_args)
    want = _outputs(getattr(reference, op)(*ref_args), () if backward else ref_args)
    if op in SAVING:
        got, want = got[:1], want[:1]  # (out, saved): the saved state is each table's own
    got = [g for g in got if g is not None]
    want = [w for w in want if w is not None]
    assert len(got) == len(want)
    rtol, atol = backend_tolerances(xp, np.float32)
    for g, w in zip(got, want):
        np.testing.assert_allclose(_host(xp.asarray(g)), np.asarray(w), rtol=rtol,
                                   atol=atol, err_msg=op)


FORWARDS = [op for op in kernels.OPS if examples.EXAMPLES[op].forward is None]
SAVING = {example.forward for example in examples.EXAMPLES.values()} - {None}


@pytest.mark.parametrize("op", FORWARDS)
def test_other_dtypes_run_the_reference(op):
    """float16 (which the Numba kernels do not take) gets the reference op, dtype kept."""
    table = kernels.for_module(np)
    args = examples.args(op, np.random.default_rng(0), dtype=np.float16)
    ref_args = host_copies(*args)  # (in-place updates: each its own copy)
    ref_args = [tuple(host_copies(*a)) if isinstance(a, tuple) else a for a in ref_args]
    got = _outputs(getattr(table, op)(*args), args)
    expected = _outputs(getattr(reference, op)(*ref_args), ref_args)
    if op in SAVING:
        got, expected = got[:1], expected[:1]  # (out, saved)
    for g, e in zip(got, expected):
        assert np.asarray(g).dtype == np.asarray(e).dtype, op
        np.testing.assert_array_equal(g, e, err_msg=op)
    assert layers.relu_forward(args[0])[0].dtype == np.float16


def _with_float64(value):
    if isinstance(value, tuple):
        return tuple(_with_float64(v) for v in value)
    return value.astype(np.float64)


MIXED = [(op, position) for op in kernels.OPS for position in range(1, kernels.DATA_ARGS[op])]


@pytest.mark.parametrize("op, position", MIXED)
def test_mixed_dtypes_run_the_reference(ops, op, position):
    """float32 data with one of its other data arguments (a declared data position) in
    float64 gets the reference op, which promotes as the array module does, on every
    backend: the fast kernels take one dtype and CuPy's raise on a mix. An in-place update
    keeps w's dtype."""
    xp, table = ops
    host = list(examples.args(op, np.random.default_rng(14)))
    host[position] = _with_float64(host[position])
    args = examples.to_module(xp, tuple(host))
    ref_args = [tuple(host_copies(*a)) if isinstance(a, tuple) else a
                for a in host_copies(*args)]
    got = _outputs(getattr(table, op)(*args), args)
    expected = _outputs(getattr(reference, op)(*ref_args), ref_args)
    assert len(got) == len(expected)
    rtol, atol = backend_tolerances(xp, np.float32)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype, op
        np.testing.assert_allclose(_host(g), e, rtol=rtol, atol=atol, err_msg=op)
    if op.endswith("_"):  # in place: the updated array keeps its dtype
        assert args[0].dtype == np.float32


# -- relu ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", X_SHAPES)
def test_relu(ops, dtype, shape):
    xp, table = ops
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    dout = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    out, out_ref = table.relu_forward(x), _reference("relu_forward", x)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(_host(out), _host(out_ref))
    dx, dx_ref = table.relu_backward(dout, out), _reference("relu_backward", dout, out_ref)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(_host(dx), _host(dx_ref))


def test_relu_non_finite_like_reference(ops, dtype):
    """NaN and inf go through relu as in the reference (np.maximum propagates NaN), so
    a diverged activation reaches the loss and the Solver's non-finite check."""
    xp, table = ops
    x = xp.asarray(np.array([[np.nan, -np.inf, np.inf, -1.0, 0.0, 2.0]]), dtype=dtype)
    np.testing.assert_array_equal(_host(table.relu_forward(x)), _reference("relu_forward", x))
    assert np.isnan(_host(table.relu_forward(x))[0, 0])


def test_relu_subnormals_and_nan_on_numpy(dtype):
    """Positive subnormals pass, negative ones (and -0, -inf) give 0, NaN stays NaN: in
    the reference and in the Numba kernel (a GPU flushes subnormals: not compared there)."""
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([tiny, -tiny, 3 * tiny, -3 * tiny, np.nan, -np.nan, np.inf, -np.inf, -0.0,
                  0.0, 1.5, -1.5], dtype=dtype)
    expected = np.array([tiny, 0, 3 * tiny, 0, np.nan, np.nan, np.inf, 0, 0, 0, 1.5, 0],
                        dtype=dtype)
    for op in (reference.relu_forward, activations.relu_forward_numba,
               kernels.for_module(np).relu_forward):
        out = op(x)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, expected)
    dout = np.arange(1, x.size + 1, dtype=dtype)
    keep = expected > 0  # dout passes where the output was positive, subnormals included
    for op in (reference.relu_backward, activations.relu_backward_numba):
        np.testing.assert_array_equal(op(dout, expected), np.where(keep, dout, 0))


def test_relu_never_passes_a_negative_subnormal(ops, dtype):
    """On every backend: a negative subnormal gives +0, never itself (CuPy's -ftz=true
    flushes it to 0 in a comparison, so `x < 0 ? 0 : x` let it through); NaN stays NaN; a
    positive subnormal gives itself, or 0 where the device flushes subnormals."""
    xp, table = ops
    tiny = np.finfo(dtype).smallest_subnormal
    x = xp.asarray(np.array([-tiny, -5 * tiny, np.nan, tiny, 2.0], dtype=dtype))
    out = _host(table.relu_forward(x))
    assert (out[:2] == 0).all() and not np.signbit(out[:2]).any()
    assert np.isnan(out[2]) and out[3] in (0, tiny) and out[4] == 2


def test_relu_non_contiguous_input(ops, dtype):
    xp, table = ops
    x = xp.asarray(np.random.default_rng(1).standard_normal((6, 9)), dtype=dtype).T
    out = table.relu_forward(x)
    np.testing.assert_array_equal(_host(out), _reference("relu_forward", x))
    dout = xp.asarray(np.random.default_rng(2).standard_normal((9, 6)), dtype=dtype)
    np.testing.assert_array_equal(_host(table.relu_backward(dout, out)),
                                  _reference("relu_backward", dout, out))


# -- gelu ----------------------------------------------------------------------
def _strided_views(xp, a):
    """a (2-D or more) as it is, transposed, a slice of a bigger array, and every other row."""
    bigger = xp.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    bigger[::2] = a
    return {"contiguous": a, "transposed": xp.ascontiguousarray(a.T).T,
            "sliced": xp.concatenate([a, a], axis=-1)[..., a.shape[-1]:],
            "every_other": bigger[::2]}


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "every_other"])
@pytest.mark.parametrize("shape", X_SHAPES)
def test_gelu(ops, dtype, shape, layout):
    """Forward and backward against the reference on dense and strided views, tails included
    (|x| up to 12: gelu is x, or 0, to the dtype's precision there)."""
    xp, table = ops
    rng = np.random.default_rng(12)
    x = _strided_views(xp, xp.asarray(rng.standard_normal(shape) * 4, dtype=dtype))[layout]
    dout = _strided_views(xp, xp.asarray(rng.standard_normal(shape), dtype=dtype))[layout]
    out = table.gelu_forward(x)
    assert out.dtype == dtype and out.shape == shape
    _close(out, _reference("gelu_forward", x), dtype)
    dx = table.gelu_backward(dout, x)
    assert dx.dtype == dtype and dx.shape == shape
    _close(dx, _reference("gelu_backward", dout, x), dtype)


# non-finite inputs on purpose: inf * 0 is NaN, as in the reference; numpy warns about it
_NON_FINITE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning")


@_NON_FINITE_WARNINGS
def test_gelu_non_finite_like_reference(ops, dtype):
    """NaN stays NaN, inf gives inf and -inf NaN (-inf * 0, as PyTorch's x * Phi(x)), on every
    backend as in the reference, so a diverged activation reaches the loss's non-finite check."""
    xp, table = ops
    x = xp.asarray(np.array([[np.nan, -np.inf, np.inf, -40.0, 0.0, 40.0]]), dtype=dtype)
    out = _host(table.gelu_forward(x))
    np.testing.assert_array_equal(out, _reference("gelu_forward", x))
    np.testing.assert_array_equal(out[0], [np.nan, np.nan, np.inf, 0, 0, 40])



def _gelu_grid(dtype):
    """A dense grid of inputs: [-12, 12] every 1.2e-5, both signs' magnitudes from the
    smallest to the largest of the dtype, and NaN, +-inf."""
    info = np.finfo(dtype)
    magnitudes = np.geomspace(float(info.tiny), float(info.max), 20_000)
    return np.concatenate([np.linspace(-12, 12, 2_000_001), magnitudes, -magnitudes,
                           [0.0, np.nan, np.inf, -np.inf]]).astype(dtype)


def _gelu_exact(x):
    """gelu and its gradient in float64 (math.erf per value) of float64 x."""
    phi = 0.5 + 0.5 * activations.erf(np, x * activations._SQRT_HALF)
    with np.errstate(over="ignore"):  # x * x of the largest x: exp(-inf) is 0
        return x * phi, phi + x * activations._INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _assert_gelu_close(got, exact, x, dtype):
    """The contract's tolerance (1e-6 of the largest magnitude in float32, 1e-12 in float64)
    over every window [-b, b] of the grid, from tiny to the largest values; NaN and inf
    where the float64 reference has them."""
    tol = {np.float32: 1e-6, np.float64: 1e-12}[np.dtype(dtype).type]
    got = got.astype(np.float64)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(got[~finite], exact[~finite])
    for bound in (1e-30, 1e-3, 0.5, 2, 6, 12, 1e3, np.inf):
        window = finite & (np.abs(x) <= bound)
        scale = np.abs(exact[window]).max()
        np.testing.assert_allclose(got[window], exact[window], rtol=0, atol=tol * scale,
                                   err_msg=f"|x| <= {bound}")


@_NON_FINITE_WARNINGS
def test_gelu_dense_grid_against_float64(ops, dtype):
    """gelu, its gradient and the fused batchnorm + gelu (at unit scale) against the float64
    reference on a dense grid: the tails, tiny and huge values, NaN and inf included."""
    xp, table = ops
    x = _gelu_grid(dtype)
    exact_out, exact_grad = _gelu_exact(x.astype(np.float64))
    _assert_gelu_close(_host(table.gelu_forward(xp.asarray(x))), exact_out, x, dtype)
    dout = xp.ones_like(xp.asarray(x))
    _assert_gelu_close(_host(table.gelu_backward(dout, xp.asarray(x))), exact_grad, x, dtype)
    # rows (M, 8); mean 0, variance 1, eps 0, gamma 1, beta 0: the batchnorm is the identity
    rows = xp.asarray(np.concatenate([x, np.zeros(-x.size % 8, dtype)]).reshape(-1, 8))
    ones, zeros = xp.ones(8, dtype=dtype), xp.zeros(8, dtype=dtype)
    fused = _host(table.batchnorm_gelu_test_forward(rows, ones, zeros, zeros, ones, 0.0))
    _assert_gelu_close(fused.reshape(-1)[:x.size], exact_out, x, dtype)


def test_gelu_float32_kernels_vectorise():
    """The float32 gelu loops (standalone and fused with batchnorm) compile to vector code with
    no call to libm's erf or exp (scalar calls, 15-20x slower here); float64 keeps libm."""
    import re

    import numba

    def llvm_ir(dispatcher, *arg_types):
        # a fresh compile: the cached kernels cannot be inspected
        options = {k: v for k, v in dispatcher.targetoptions.items()
                   if k not in ("cache", "nopython")}
        fresh = numba.njit(**options)(dispatcher.py_func)
        fresh.compile(arg_types)
        return fresh.inspect_llvm(arg_types)

    f32, f64 = numba.float32[::1], numba.float64[::1]
    rows32 = numba.float32[:, ::1]
    for name, ir in [("_gelu_forward", llvm_ir(activations._gelu_forward, f32, f32)),
                     ("_gelu_backward", llvm_ir(activations._gelu_backward, f32, f32, f32)),
                     ("_bn_gelu_apply", llvm_ir(batchnorm._bn_gelu_apply, rows32, numba.float32[::1],
                                                numba.float32[::1], numba.float32[::1], rows32))]:
        assert re.search(r"<\d+ x float>", ir), f"{name}: no float32 vector code"
        assert not re.search(r"call [^(]*@\w*(erf|exp)\w*\(", ir), f"{name}: calls libm erf/exp"
    assert re.search(r"@\w*erf\w*\(", llvm_ir(activations._gelu_forward, f64, f64))

# -- dropout -------------------------------------------------------------------
@pytest.mark.parametrize("shape", X_SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_bit_identical_to_reference(ops, dtype, shape, p):
    xp, table = ops
    rng = np.random.default_rng(3)
    x_host = rng.standard_normal(shape).astype(dtype)
    x_host[x_host == 0] = 1.0  # a zero input would hide the mask
    x = xp.asarray(x_host)
    for seed, step in ((0, 0), (123, 0), (123, 5), (2**31 - 2, 10**6)):
        out = table.dropout_forward(x, p, seed, step)
        expected = reference.dropout_forward(np.asarray(x_host), p, seed, step)  # host reference
        assert out.dtype == dtype and out.shape == shape
        np.testing.assert_array_equal(_host(out), expected)
        dx = table.dropout_backward(x, p, seed, step)
        np.testing.assert_array_equal(_host(dx), reference.dropout_backward(x_host, p, seed, step))


def test_dropout_same_mask_on_every_thread_count(dtype):
    numba = pytest.importorskip("numba")
    table = kernels.for_module(np)
    x = np.random.default_rng(4).standard_normal((97, 130)).astype(dtype)  # > one chunk
    previous = numba.get_num_threads()
    counts = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS})
    outputs = []
    try:
        for n in counts:
            numba.set_num_threads(n)
            outputs.append(table.dropout_forward(x, 0.5, 99, 7))
    finally:
        numba.set_num_threads(previous)
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])
    np.testing.assert_array_equal(outputs[0], reference.dropout_forward(x, 0.5, 99, 7))


def test_numba_kernels_are_serial():
    """The Numba loops are serial by policy (_numba.py's docstring says why): none may ask
    for threads."""
    kernels_found = list(numba_kernels().values())
    assert len(kernels_found) > 10
    assert [k.py_func.__name__ for k in kernels_found if k.targetoptions.get("parallel")] == []


def test_dropout_mask_statistics():
    keep = reference.dropout_keep(np, 200_000, seed=5, step=0, p=0.25)
    assert abs(keep.mean() - 0.75) < 0.005
    # consecutive positions and steps are not correlated
    assert abs((keep[1:] & keep[:-1]).mean() - 0.75 ** 2) < 0.005
    other = reference.dropout_keep(np, 200_000, seed=5, step=1, p=0.25)
    assert abs((keep & other).mean() - 0.75 ** 2) < 0.005


# -- losses --------------------------------------------------------------------
def _loss_inputs(shape, dtype, scale, label_dtype, seed, ties=False):
    rng = np.random.default_rng(seed)
    N, C = shape
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    if ties:
        x[:] = x[:, :1]  # every class scores the same in a row
    y = rng.integers(0, C, N).astype(label_dtype)
    y[0] = 0
    y[-1] = C - 1
    return x, y


@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["unit", "large"])
@pytest.mark.parametrize("ties", [False, True], ids=["", "ties"])
def test_loss(ops, dtype, loss, shape, scale, ties):
    xp, table = ops
    x_host, y_host = _loss_inputs(shape, dtype, scale, np.int64, seed=5, ties=ties)
    x, y = xp.asarray(x_host), xp.asarray(y_host)
    value, dx = getattr(table, loss)(x, y)
    ref_value, ref_dx = _reference(loss, x, y)
    assert np.isfinite(float(value))
    assert dx.dtype == dtype and dx.shape == shape
    assert _host(xp.asarray(value)).dtype == dtype
    rtol, _ = backend_tolerances(xp, dtype)
    # the loss is a mean of N rows: compare on the scale of the rows' size
    np.testing.assert_allclose(float(value), float(ref_value), rtol=rtol,
                               atol=rtol * max(1.0, float(np.abs(x_host).max())))
    _close(dx, ref_dx, dtype)


@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_softmax_loss_label_smoothing(ops, dtype, shape, smoothing):
    """Fast = reference with smoothing s; the reference = the plain formula in float64."""
    xp, table = ops
    x_host, y_host = _loss_inputs(shape, dtype, 1.0, np.int64, seed=15)
    x, y = xp.asarray(x_host), xp.asarray(y_host)
    value, dx = table.softmax_loss(x, y, smoothing)
    ref_value, ref_dx = reference.softmax_loss(x, y, smoothing)
    assert dx.dtype == dtype and _host(xp.asarray(value)).dtype == dtype
    rtol, atol = tolerances(dtype)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=rtol, atol=atol)
    _close(dx, ref_dx, dtype)
    n, classes = shape
    x64 = x_host.astype(np.float64)
    log_p = x64 - x64.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    q = np.full(shape, smoothing / classes)
    q[np.arange(n), y_host] += 1 - smoothing
    np.testing.assert_allclose(float(ref_value), -(q * log_p).sum() / n, rtol=rtol, atol=atol)
    np.testing.assert_allclose(_host(ref_dx), (np.exp(log_p) - q) / n, rtol=rtol, atol=atol)


def test_softmax_loss_label_smoothing_gradient():
    """The reference's dx is the numerical gradient of its loss (float64)."""
    from fastnn.gradient_check import eval_numerical_gradient, rel_error

    rng = np.random.default_rng(16)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    _, dx = reference.softmax_loss(x, y, 0.2)
    numeric = eval_numerical_gradient(lambda x: float(reference.softmax_loss(x, y, 0.2)[0]), x,
                                      verbose=False)
    assert rel_error(dx, numeric) < 1e-7


@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8])
def test_loss_label_dtypes_and_layout(ops, dtype, loss, label_dtype):
    xp, table = ops
    x_host, y_host = _loss_inputs((12, 6), dtype, 1.0, label_dtype, seed=6)
    x_t = xp.asarray(np.ascontiguousarray(x_host.T)).T  # non-contiguous scores
    value, dx = getattr(table, loss)(x_t, xp.asarray(y_host))
    ref_value, ref_dx = getattr(reference, loss)(x_host, y_host.astype(np.int64))
    rtol, atol = backend_tolerances(xp, dtype)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=rtol, atol=atol)
    _close(dx, ref_dx, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("column", [0, 1, 2], ids=["correct", "wrong", "wrong_last"])
def test_loss_non_finite_scores_like_reference(ops, loss, value, column):
    """A NaN or inf score gives the loss the reference gives (a NaN stays NaN), so the
    Solver's non-finite check sees a diverged model."""
    xp, table = ops
    x_host = np.zeros((2, 3))
    x_host[0, column] = value
    x, y = xp.asarray(x_host), xp.asarray(np.array([0, 1]))
    got, dx = getattr(table, loss)(x, y)
    want, ref_dx = _reference(loss, x, y)
    np.testing.assert_array_equal(float(got), float(want))  # NaN equals NaN here
    rtol, atol = backend_tolerances(xp, np.float64)
    np.testing.assert_allclose(_host(dx), _host(ref_dx), rtol=rtol, atol=atol)  # NaN where NaN


@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_unchecked_loss_gives_nan_for_bad_labels(ops, dtype, loss, bad):
    """Without the label check (model.loss skips it) a bad label makes the loss and its
    row of dx NaN on every backend, the reference included: never an out-of-bounds read,
    never a plausible loss of a wrapped-around class, and no device sync to find out."""
    xp, table = ops
    x = xp.asarray(np.random.default_rng(7).standard_normal((4, 5)), dtype=dtype)
    y = xp.asarray(np.array([0, bad, 2, 4]))
    for op in (getattr(table, loss), getattr(reference, loss)):
        value, dx = op(x, y)
        assert np.isnan(float(value))
        dx = _host(dx)
        assert np.isnan(dx[1]).all() and np.isfinite(dx[[0, 2, 3]]).all()
        good = [0, 2, 3]
        _, dx_good = _reference(loss, x[good], y[good])
        # the good rows keep their gradient (averaged over all 4 rows)
        _close(dx[good], _host(dx_good) * 3 / 4, dtype)


# -- batchnorm -----------------------------------------------------------------
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm(ops, dtype, shape):
    xp, table = ops
    rng = np.random.default_rng(8)
    x = xp.asarray(3 * rng.standard_normal(shape) + 1, dtype=dtype)
    gamma = xp.asarray(rng.standard_normal(shape[1]) + 1, dtype=dtype)
    beta = xp.asarray(rng.standard_normal(shape[1]), dtype=dtype)
    dout = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    got = table.batchnorm_train_forward(x, gamma, beta, 1e-5)
    want = _reference("batchnorm_train_forward", x, gamma, beta, 1e-5)
    assert len(got) == 5
    for g, w, name in zip(got, want, ("out", "x_hat", "inv_std", "mean", "var")):
        assert g.dtype == dtype and g.shape == w.shape, name
        _close(g, w, dtype, scale=10)
    out, x_hat, inv_std, mean, var = want
    got = table.batchnorm_backward(dout, xp.asarray(x_hat), gamma, xp.asarray(inv_std))
    want = _reference("batchnorm_backward", dout, x_hat, gamma, inv_std)
    for g, w, name in zip(got, want, ("dx", "dgamma", "dbeta")):
        assert g.dtype == dtype and g.shape == w.shape, name
        _close(g, w, dtype, scale=10 * shape[0])


def test_reference_batchnorm_against_numpy():
    x = np.random.default_rng(9).standard_normal((10, 3))
    out, x_hat, inv_std, mean, var = reference.batchnorm_train_forward(x, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-12)
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-12)


# -- in-place update rules: every rule's op, lone parameters and stacked blocks --
# 3-D shapes are stacked blocks (A, K, B) with per-member learning rates (and
# weight decays); the others are lone parameters with the rule's defaults (4-D: conv filters,
# which muon steps with its own formula).
UPDATE_SHAPES = [(1, 5), (4, 6), (11,), (97, 130), (1, 1, 1), (1, 3, 5), (7, 4, 9), (40, 2, 33),
                 (6, 4, 3, 3)]


def _update_problem(xp, rule, shape, dtype, seed=10):
    """(config, w, dw, state) for one step of `rule` on random values."""
    rng = np.random.default_rng(seed)
    spec = optim.SPECS[rule]
    config = {**spec.defaults, "t": 3}
    members = shape[1] if len(shape) == 3 else None
    if members:
        config["learning_rate"] = xp.asarray(rng.uniform(1e-3, 1e-1, members))
        if "weight_decay" in config:
            config["weight_decay"] = xp.asarray(rng.uniform(0, 0.5, members))
    w = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    dw = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    state = [xp.asarray(np.abs(rng.standard_normal(shape)), dtype=dtype) for _ in spec.state]
    return config, w, dw, state


@pytest.mark.parametrize("rule", sorted(optim.SPECS))
@pytest.mark.parametrize("shape", UPDATE_SHAPES)
def test_update_op_matches_reference(ops, dtype, rule, shape):
    """The table's op = reference.py's, bit for bit (the same operations in the same order).

    For blocks, member k's slice is the lone step with member k's scalars.
    """
    xp, table = ops
    config, w, dw, state = _update_problem(xp, rule, shape, dtype)
    op = optim.SPECS[rule].op
    h = optim.SPECS[rule].scalars(config)
    fast = [a.copy() for a in (w, *state)]
    ref = [a.copy() for a in (w, *state)]
    dw_before = dw.copy()
    host = host_copies(w, *state)  # and the reference run by numpy
    assert getattr(table, op)(fast[0], dw, tuple(fast[1:]), h) is None
    getattr(reference, op)(ref[0], dw, tuple(ref[1:]), h)
    getattr(reference, op)(host[0], _host(dw), tuple(host[1:]), tuple(host_copies(*h)))
    for name, f, r, on_host in zip(["w", *optim.SPECS[rule].state], fast, ref, host):
        assert f.dtype == dtype and f.shape == shape, name
        # a fused update gives the functional rule's parameters on its own backend, bit for bit
        np.testing.assert_array_equal(_host(f), _host(r), err_msg=name)
        _close(f, on_host, dtype)
    assert not np.array_equal(_host(fast[0]), _host(w))  # it did update, in place
    np.testing.assert_array_equal(_host(dw), _host(dw_before))
    if len(shape) != 3:
        return
    for k in range(shape[1]):  # member k alone, through the lone (numpy) reference op
        alone = [_host(a)[:, k, :].copy() for a in (w, *state)]
        member_config = {key: (float(_host(v)[k]) if hasattr(v, "shape") else v)
                         for key, v in config.items()}
        getattr(reference, op)(alone[0], _host(dw)[:, k, :], tuple(alone[1:]),
                               optim.SPECS[rule].scalars(member_config))
        for name, f, a in zip(["w", *optim.SPECS[rule].state], fast, alone):
            np.testing.assert_array_equal(_host(f)[:, k, :], a, err_msg=f"{name}, member {k}")


@pytest.mark.parametrize("rule", sorted(optim.SPECS))
def test_update_op_takes_its_scalars_from_device_arrays(ops, dtype, rule):
    """A step's scalars as 0-d arrays (e.g. on the GPU, for a CUDA graph) = as Python floats."""
    xp, table = ops
    config, w, dw, state = _update_problem(xp, rule, (6, 7), dtype)
    spec = optim.SPECS[rule]
    h = spec.scalars(config)
    on_device = tuple(xp.asarray(np.float64(v)) for v in h)
    by_value = [a.copy() for a in (w, *state)]
    by_array = [a.copy() for a in (w, *state)]
    getattr(table, spec.op)(by_value[0], dw, tuple(by_value[1:]), h)
    getattr(table, spec.op)(by_array[0], dw, tuple(by_array[1:]), on_device)
    for a, b in zip(by_value, by_array):
        np.testing.assert_array_equal(_host(a), _host(b))


@pytest.mark.parametrize("rule", sorted(optim.SPECS))
@pytest.mark.parametrize("shape", [(6, 7), (5, 3, 4)], ids=["lone", "blocks"])
def test_update_op_takes_scalar_rows(ops, dtype, rule, shape):
    """h as optim.begin_step's scalar rows ((K, H) in w.dtype, or (H,) float64) = as a tuple."""
    xp, table = ops
    config, w, dw, state = _update_problem(xp, rule, shape, dtype)
    spec = optim.SPECS[rule]
    h = spec.scalars(config)
    members = shape[1] if len(shape) == 3 else 1
    rows = xp.empty((members, len(h)), dtype=dtype)
    for j, value in enumerate(h):
        rows[:, j] = value
    candidates = [rows]
    if members == 1:
        candidates.append(xp.asarray(np.array(h, dtype=np.float64)))  # (H,), cast by the op
    by_tuple = [a.copy() for a in (w, *state)]
    getattr(table, spec.op)(by_tuple[0], dw, tuple(by_tuple[1:]), h)
    for h_array in candidates:
        by_rows = [a.copy() for a in (w, *state)]
        getattr(table, spec.op)(by_rows[0], dw, tuple(by_rows[1:]), h_array)
        for a, b in zip(by_tuple, by_rows):
            np.testing.assert_array_equal(_host(a), _host(b))


def test_step_as_a_0d_array_gives_the_int_steps_masks(ops, dtype):
    """dropout, stacked dropout and flip_crop: step as a 0-d integer array (the Solver's
    counter) = step as an int, on every backend; the array is read when the op runs."""
    xp, table = ops
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((9, 13)) + 3, dtype=dtype)
    images = xp.asarray(rng.standard_normal((5, 2, 6, 6)), dtype=dtype)
    members = (xp.asarray(reference.dropout_seed_keys([3, 8])),
               xp.asarray(np.array([reference.keep_threshold(p) for p in (0.3, 0.6)], np.uint64)),
               xp.asarray(np.array([1 / 0.7, 1 / 0.4], dtype)))
    counter = xp.zeros((), dtype=np.int64)
    masks = []
    for step in (0, 1, 2**33 + 5):
        counter[...] = step
        for op, args in ((table.dropout_forward, (x, 0.4, 17)),
                         (reference.dropout_forward, (x, 0.4, 17)),
                         (table.dropout_stacked_forward, (x.reshape(9, 1, 13)
                                                          .repeat(2, axis=1), *members)),
                         (table.flip_crop, (images, 21)),
                         (reference.flip_crop, (images, 21))):
            tail = (True, 2) if op in (table.flip_crop, reference.flip_crop) else ()
            by_int = op(*args, step, *tail)
            np.testing.assert_array_equal(_host(op(*args, counter, *tail)), _host(by_int))
        masks.append(_host(table.dropout_forward(x, 0.4, 17, counter)))
    assert not np.array_equal(masks[0], masks[1])  # the value in the array counts


# -- ops with a member axis (fastnn.stacked): fast vs reference ---------------------
@pytest.mark.parametrize("n,k,h", [(1, 1, 1), (1, 3, 7), (6, 4, 5), (33, 2, 17)])
def test_dropout_stacked(ops, dtype, n, k, h):
    """Fast = reference, bit for bit; member k's mask is dropout_forward's for its seed."""
    xp, table = ops
    rng = np.random.default_rng(0)
    ps = [0.0, 0.5, 0.3, 0.9][:k]
    seeds = [3, 11, 4, 2**40][:k]
    # a (K, H, N) array seen as (N, K, H), as the stack keeps its activations
    x = xp.asarray(rng.standard_normal((k, h, n)), dtype=dtype).transpose(2, 0, 1)
    args = (xp.asarray(reference.dropout_seed_keys(seeds)),
            xp.asarray(np.array([reference.keep_threshold(p) for p in ps], np.uint64)),
            xp.asarray(np.array([1 / (1 - p) for p in ps], dtype)), 7)
    out = table.dropout_stacked_forward(x, *args)
    expected = _reference("dropout_stacked_forward", x, *args)
    assert out.shape == (n, k, h) and out.dtype == dtype
    np.testing.assert_array_equal(_host(out), _host(expected))
    np.testing.assert_array_equal(_host(table.dropout_stacked_backward(x, *args)), _host(expected))
    for member, (p, seed) in enumerate(zip(ps, seeds)):
        alone = xp.ascontiguousarray(x[:, member, :])
        single = _host(alone) if p == 0 else _reference("dropout_forward", alone, p, seed, 7)
        np.testing.assert_array_equal(_host(out[:, member, :]), _host(single))


@pytest.mark.parametrize("k,n,c", [(1, 1, 10), (3, 1, 2), (4, 16, 10), (2, 300, 7)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_with_a_member_axis(ops, dtype, k, n, c, smoothing):
    """Scores (K, N, C) on shared labels: member k's loss and dx are softmax_loss of x[k]."""
    xp, table = ops
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal((k, n, c)) * 3, dtype=dtype)
    y = xp.asarray(rng.integers(0, c, n))
    losses, dx = table.softmax_loss(x, y, smoothing)
    ref_losses, ref_dx = _reference("softmax_loss", x, y, smoothing)
    assert losses.shape == (k,) and losses.dtype == dtype and dx.dtype == dtype
    rtol, atol = backend_tolerances(xp, dtype)
    np.testing.assert_allclose(_host(losses), _host(ref_losses), rtol=rtol, atol=atol)
    np.testing.assert_allclose(_host(dx), _host(ref_dx), rtol=rtol, atol=atol)
    for member in range(k):
        loss, single_dx = _reference("softmax_loss", x[member], y, smoothing)
        np.testing.assert_allclose(_host(losses)[member], float(loss), rtol=rtol, atol=atol)
        np.testing.assert_allclose(_host(dx[member]), _host(single_dx), rtol=rtol, atol=atol)


@pytest.mark.parametrize("d,n", [(1, 1), (1, 6), (5, 2), (48, 130)])
def test_batchnorm_rows(ops, dtype, d, n):
    """Features as rows: fast = reference = the column batchnorm of the transpose."""
    xp, table = ops
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((d, n)) * 3 + 1, dtype=dtype)
    gamma = xp.asarray(rng.standard_normal(d), dtype=dtype)
    beta = xp.asarray(rng.standard_normal(d), dtype=dtype)
    dout = xp.asarray(rng.standard_normal((d, n)), dtype=dtype)
    rtol, atol = backend_tolerances(xp, dtype)
    fast = table.batchnorm_rows_train_forward(x, gamma, beta, 1e-5)
    ref = _reference("batchnorm_rows_train_forward", x, gamma, beta, 1e-5)
    columns = _reference("batchnorm_train_forward", x.T, gamma, beta, 1e-5)
    for name, a, b, c in zip(["out", "x_hat", "inv_std", "mean", "var"], fast, ref, columns):
        assert a.shape == b.shape and a.dtype == dtype, name
        np.testing.assert_allclose(_host(a), _host(b), rtol=rtol, atol=atol, err_msg=name)
        c = c.T if c.ndim == 2 else c
        np.testing.assert_allclose(_host(a), _host(c), rtol=rtol, atol=atol, err_msg=name)
    x_hat, inv_std = fast[1], fast[2]
    grads = table.batchnorm_rows_backward(dout, x_hat, gamma, inv_std)
    ref_grads = _reference("batchnorm_rows_backward", dout, x_hat, gamma, inv_std)
    for name, a, b in zip(["dx", "dgamma", "dbeta"], grads, ref_grads):
        assert a.shape == b.shape and a.dtype == dtype, name
        np.testing.assert_allclose(_host(a), _host(b), rtol=rtol * 10, atol=atol * 10,
                                   err_msg=name)


BLOCKS = [(1, 1, 1), (1, 3, 5), (7, 4, 9), (40, 2, 33)]


@pytest.mark.parametrize("shape", BLOCKS)
def test_l2_stacked(ops, dtype, shape):
    """dw += reg_k * w (as FullyConnectedNet adds it) and the per-member sum of w**2."""
    xp, table = ops
    rng = np.random.default_rng(2)
    w = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    dw = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    reg = rng.uniform(0, 1, shape[1])
    reg[0] = 0.0
    fast, ref = dw.copy(), _host(dw).copy()
    out = table.l2_stacked_(fast, w, xp.asarray(reg))
    ref_out = reference.l2_stacked_(ref, _host(w), reg)  # numpy's, on host copies
    assert out.shape == (shape[1],) and out.dtype == dtype
    rtol, atol = backend_tolerances(xp, dtype)
    np.testing.assert_allclose(_host(out), _host(ref_out), rtol=rtol * 10, atol=atol)
    np.testing.assert_allclose(_host(fast), ref, rtol=rtol, atol=atol)
    for k in range(shape[1]):
        alone = _host(w)[:, k, :]
        expected = _host(dw)[:, k, :] + dtype.type(reg[k]) * alone
        np.testing.assert_array_equal(_host(fast)[:, k, :], expected)
        np.testing.assert_allclose(_host(out)[k], np.sum(alone.astype(np.float64) ** 2),
                                   rtol=rtol * 10, atol=atol)


# -- augmentation ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (6, 3, 8, 8), (40, 2, 5, 7)])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("padding", [0, 1, 3])
@pytest.mark.parametrize("reflect", [False, True])
def test_flip_crop_bit_identical_to_reference(ops, dtype, shape, flip, padding, reflect):
    xp, table = ops
    x_host = np.random.default_rng(11).standard_normal(shape).astype(dtype)
    x = xp.asarray(x_host)
    for seed, step in ((0, 0), (17, 3)):
        out = table.flip_crop(x, seed, step, flip, padding, reflect)
        assert out.dtype == dtype and out.shape == shape
        np.testing.assert_array_equal(_host(out), reference.flip_crop(x_host, seed, step, flip,
                                                                      padding, reflect))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_flip_crop_moves_pixels_only(ops, mode):
    """Each output image is its input shifted (zeros or, with reflect, its reflection
    shifted in, as numpy pads) and maybe mirrored."""
    xp, table = ops
    x_host = np.random.default_rng(12).uniform(1, 2, (30, 2, 6, 6))
    out = _host(table.flip_crop(xp.asarray(x_host), 5, 0, True, 2, mode == "reflect"))
    for image, result in zip(x_host, out):
        candidates = []
        for mirrored in (image, image[:, :, ::-1]):
            padded = np.pad(mirrored, ((0, 0), (2, 2), (2, 2)), mode=mode)
            candidates += [padded[:, 2 + dy:8 + dy, 2 + dx:8 + dx]
                           for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(np.array_equal(result, c) for c in candidates)
    moved = [not (np.array_equal(r, i) or np.array_equal(r, i[..., ::-1]))
             for i, r in zip(x_host, out)]
    assert sum(moved) > 15  # most of the 25 shifts move the image
    identity = _host(table.flip_crop(xp.asarray(x_host), 5, 0, False, 0))
    np.testing.assert_array_equal(identity, x_host)



def test_flip_crop_mirrors_the_images_a_flip_array_names(ops, dtype):
    """flip as a boolean array (N,): exactly those images are mirrored; the crop offsets
    are the step's, as with flip=False; the fast path is the reference bit for bit."""
    xp, table = ops
    x_host = np.random.default_rng(13).standard_normal((9, 2, 5, 6)).astype(dtype)
    x = xp.asarray(x_host)
    flips_host = np.array([True, False, False, True, True, False, True, False, False])
    flips = xp.asarray(flips_host)
    np.testing.assert_array_equal(_host(table.flip_crop(x, 3, 4, flips, 0)),
                                  np.where(flips_host[:, None, None, None],
                                           x_host[..., ::-1], x_host))
    shifted = _host(table.flip_crop(x, 3, 4, flips, 2))
    np.testing.assert_array_equal(shifted, reference.flip_crop(x_host, 3, 4, flips_host, 2))
    unflipped = _host(table.flip_crop(x, 3, 4, False, 2))
    np.testing.assert_array_equal(shifted[~flips_host], unflipped[~flips_host])
    with pytest.raises(ValueError, match=r"needs shape \(9,\), got \(4,\)"):
        table.flip_crop(x, 3, 4, flips[:4], 0)


def test_alternating_flips_match_a_hand_computation(backend):
    """Epoch 0: image i's coin (SplitMix64 of i under the seed's flip key, by hand); each
    later epoch the opposite of the one before; the epoch an int or a 0-d array."""
    indices = np.array([*range(40), 12345, 2**40 + 7])
    seed_key = keyed.mix64(keyed.mix64(9 * keyed.GOLDEN + keyed.FLIP_STREAM))
    coins = [keyed.mix64(seed_key + int(i) * keyed.GOLDEN) >> 63 == 1 for i in indices]
    assert 0 < sum(coins) < len(coins)
    for epoch in range(4):
        expected = [coin != (epoch % 2 == 1) for coin in coins]
        for given in (epoch, backend.asarray(epoch)):
            flips = keyed.alternating_flips(backend.asarray(indices), 9, given)
            assert isinstance(flips, backend.ndarray) and flips.dtype == bool
            assert _host(flips).tolist() == expected
    other_seed = _host(keyed.alternating_flips(backend.asarray(indices), 10, 0))
    assert other_seed.tolist() != [bool(c) for c in coins]

# -- norms: layernorm and groupnorm -------------------------------------------
def _norm_case(xp, shape, dtype, seed, channels_last=False):
    """Random (x, gamma, beta, dout) on xp; x offset and scaled, as activations are."""
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal(shape) + 2.0
    if channels_last:  # an NHWC array seen as NCHW
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma, beta = rng.standard_normal(shape[1]) + 1.0, rng.standard_normal(shape[1])
    dout = rng.standard_normal(shape)
    x = xp.asarray(x, dtype=dtype)
    return x, xp.asarray(gamma, dtype=dtype), xp.asarray(beta, dtype=dtype), \
        xp.asarray(dout, dtype=dtype)


def _compare_with_numpy_reference(got, op, args, dtype, scale=1.0):
    """`got` (the backend's table) against reference `op` run on host copies of `args`."""
    expected = getattr(reference, op)(*(_host(a) if hasattr(a, "shape") else a for a in args))
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape, op
        _close(g, e, dtype, scale)


@pytest.mark.parametrize("shape", [(1, 7), (5, 3), (64, 10), (33, 300)])
def test_layernorm(ops, dtype, shape):
    xp, table = ops
    x, gamma, beta, dout = _norm_case(xp, shape, dtype, 40)
    out, x_hat, inv_std = table.layernorm_forward(x, gamma, beta, 1e-5)
    _compare_with_numpy_reference((out, x_hat, inv_std), "layernorm_forward",
                                  (x, gamma, beta, 1e-5), dtype)
    got = table.layernorm_backward(dout, x_hat, gamma, inv_std)
    # sums over N rows: tolerances grow with N
    _compare_with_numpy_reference(got, "layernorm_backward", (dout, x_hat, gamma, inv_std), dtype,
                                  scale=shape[0])


@pytest.mark.parametrize("shape,groups", [((1, 4, 1, 1), 2), ((2, 6, 3, 5), 3), ((3, 8, 7, 7), 1),
                                          ((4, 16, 6, 6), 16), ((2, 12, 9, 11), 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc_view"])
def test_groupnorm(ops, dtype, shape, groups, channels_last):
    xp, table = ops
    x, gamma, beta, dout = _norm_case(xp, shape, dtype, 41, channels_last)
    out, x_hat, inv_std = table.groupnorm_forward(x, gamma, beta, groups, 1e-5)
    assert inv_std.shape == (shape[0], groups)
    _compare_with_numpy_reference((out, x_hat, inv_std), "groupnorm_forward",
                                  (x, gamma, beta, groups, 1e-5), dtype)
    got = table.groupnorm_backward(dout, x_hat, gamma, inv_std, groups)
    _compare_with_numpy_reference(got, "groupnorm_backward",
                                  (dout, x_hat, gamma, inv_std, groups), dtype,
                                  scale=shape[0] * shape[2] * shape[3])


# -- CUDA sources compile (nvcc, no GPU needed; skipped without nvcc) ----------
def _nvcc_compiles(tmp_path, name, source):
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    path = tmp_path / f"{name}.cu"
    path.write_text(source)
    result = subprocess.run([nvcc, "--ptx", "-ftz=true", "-Werror", "all-warnings", "-o",
                             str(tmp_path / f"{name}.ptx"), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{name}:\n{result.stderr}"


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_norm_cuda_source_compiles(tmp_path, dtype_name):
    _nvcc_compiles(tmp_path, f"norms_{dtype_name}", norms.norm_source(dtype_name))


# CuPy's view of a `raw` argument, enough for the sources to compile: x[j], x.size()
_RAW = """template <typename U> struct Raw {
    const U* data; long long n;
    __device__ U operator[](long long j) const { return data[j]; }
    __device__ long long size() const { return n; }
};
typedef unsigned long long uint64;
typedef long long int64;
"""


def _elementwise_as_cuda(name, in_params, out_params, operation):
    """One of the ElementwiseKernel sources as a plain CUDA kernel: inputs by value
    (`raw` ones as Raw<T>), outputs as references to element i, as CuPy's generated code
    sees them."""
    def params(text):
        return [p.split() for p in text.split(",")]

    args = [f"const Raw<{p[1]}> {p[2]}" if p[0] == "raw" else f"const {p[0]} {p[1]}"
            for p in params(in_params)]
    args += [f"{t}* {n}_out" for t, n in params(out_params)]
    outputs = "".join(f"{t}& {n} = {n}_out[i];" for t, n in params(out_params))
    return (f'extern "C" __global__ void fastnn_{name}({", ".join(args)}) {{\n'
            f"const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
            f"{outputs}\n{operation};\n}}\n")


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_elementwise_cuda_sources_compile(tmp_path, dtype_name):
    """Every ElementwiseKernel body (relu, gelu, dropout, each update rule) and the
    softmax loss's RawKernel compile (with CuPy's -ftz=true)."""
    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    kernels_ = [_elementwise_as_cuda(name, *parts) for name, parts in _cupy._SOURCES.items()]
    for rule, (_, scalars, _) in updates._RULES.items():  # each scalar by value and on the device
        for on_device in {(False,) * len(scalars), (True,) * len(scalars)}:
            mask = "".join("d" if d else "s" for d in on_device)
            kernels_.append(_elementwise_as_cuda(f"{rule}_{mask}",
                                                 *updates.rule_source(rule, on_device)))
    source = f"#define T {ctype}\n{_RAW}" + "".join(kernels_)
    _nvcc_compiles(tmp_path, f"elementwise_{dtype_name}", source)
    _nvcc_compiles(tmp_path, f"softmax_loss_{dtype_name}",
                   losses.SOFTMAX_LOSS_SOURCE.replace("{T}", ctype))


# == convolution ===============================================================
# (x shape, w shape, stride, pad): non-square images and filters, stride 1 and 2, pad 0-2
CONV_CASES = [((2, 3, 8, 8), (4, 3, 3, 3), 1, 1), ((3, 2, 7, 5), (3, 2, 3, 1), 2, 1),
              ((1, 4, 6, 9), (5, 4, 2, 4), 2, 2), ((2, 5, 5, 5), (2, 5, 1, 1), 1, 0),
              ((2, 3, 9, 6), (6, 3, 5, 2), 1, 2), ((2, 2, 6, 7), (3, 2, 3, 3), 1, 0),
              ((1, 3, 5, 6), (2, 3, 5, 5), 1, 2)]
POOL_CASES = [((2, 3, 8, 8), 2, 2, 2), ((2, 4, 7, 9), 2, 3, 2), ((1, 2, 6, 5), 3, 3, 1),
              ((3, 5, 4, 4), 4, 4, 1), ((2, 3, 7, 5), 2, 2, 2), ((1, 2, 8, 7), 3, 3, 3)]


def _channels_last_view(xp, a):
    """The (N, C, H, W) view of a channels-last copy of a: the fast layers' own layout."""
    return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv(ops, dtype, case, layout):
    xp, table = ops
    x_shape, w_shape, stride, pad = case
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.standard_normal(x_shape), dtype=dtype)
    if layout == "channels_last":
        x = _channels_last_view(xp, x)
    w = xp.asarray(rng.standard_normal(w_shape), dtype=dtype)
    b = xp.asarray(rng.standard_normal(w_shape[0]), dtype=dtype)
    out, saved = table.conv_forward(x, w, b, stride, pad)
    out_ref, saved_ref = reference.conv_forward(x, w, b, stride, pad)
    assert out.dtype == dtype and out.shape == out_ref.shape
    scale = float(np.abs(_host(out_ref)).max())
    _close(out, out_ref, dtype, scale)
    dout = xp.asarray(rng.standard_normal(out_ref.shape), dtype=dtype)
    if layout == "channels_last":
        dout = _channels_last_view(xp, dout)
    for got, expected in zip(table.conv_backward(dout, saved),
                             reference.conv_backward(dout, saved_ref)):
        assert got.dtype == dtype and got.shape == expected.shape
        _close(got, expected, dtype, float(np.abs(_host(expected)).max()))
    dx, dw, db = table.conv_backward(dout, saved, False)
    assert dx is None
    _close(dw, reference.conv_backward(dout, saved_ref)[1], dtype, scale)


def test_conv_without_bias(ops, dtype):
    xp, table = ops
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((2, 3, 6, 6)), dtype=dtype)
    w = xp.asarray(rng.standard_normal((4, 3, 3, 3)), dtype=dtype)
    out, saved = table.conv_forward(x, w, None, 1, 1)
    zero = xp.zeros(4, dtype=dtype)
    _close(out, reference.conv_forward(x, w, zero, 1, 1)[0], dtype, 10.0)
    dx, dw, db = table.conv_backward(xp.ones(out.shape, dtype=dtype), saved)
    assert db is None and dx.shape == x.shape and dw.shape == w.shape


def test_conv_many_chunks_match_the_reference(ops, monkeypatch):
    """Batches that span several of the numpy kernels' column chunks (a small chunk size here)."""
    xp, table = ops
    monkeypatch.setattr(_numba, "CONV_CHUNK_BYTES", 3000)
    rng = np.random.default_rng(5)
    x = xp.asarray(rng.standard_normal((7, 3, 6, 5)))
    w = xp.asarray(rng.standard_normal((4, 3, 3, 3)))
    b = xp.asarray(rng.standard_normal(4))
    out, saved = table.conv_forward(x, w, b, 1, 1)
    out_ref, saved_ref = reference.conv_forward(x, w, b, 1, 1)
    _close(out, out_ref, np.float64, 10.0)
    dout = xp.asarray(rng.standard_normal(out.shape))
    for got, expected in zip(table.conv_backward(dout, saved),
                             reference.conv_backward(dout, saved_ref)):
        _close(got, expected, np.float64, 10.0)



def _check_conv_backward(backward, reference_backward, dout, saved, saved_ref, dtype, has_bias):
    """A numpy kernel's conv backward (dx, dw, db; and with need_dx False) against the
    reference's on the same dout."""
    dx, dw, db = backward(dout, saved)
    dx_ref, dw_ref, db_ref = reference_backward(dout, saved_ref)
    for got, expected in ((dx, dx_ref), (dw, dw_ref)) + (((db, db_ref),) if has_bias else ()):
        assert got.dtype == dtype and got.shape == expected.shape
        _close(got, expected, dtype, float(np.abs(expected).max()))
    assert (db is None) == (not has_bias)
    no_dx = backward(dout, saved, False)
    assert no_dx[0] is None
    _close(no_dx[1], dw_ref, dtype, float(np.abs(dw_ref).max()))


# (N, C, H, W, F): even and odd sizes, one-pixel images, more filters than channels and fewer
WINOGRAD_CASES = [(2, 3, 8, 8, 4), (3, 5, 7, 5, 6), (2, 8, 1, 1, 3), (2, 4, 2, 3, 5),
                  (3, 9, 5, 6, 2), (2, 16, 6, 4, 16)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_winograd_conv_matches_the_reference(dtype, case, layout, has_bias, monkeypatch):
    """The numpy kernels' Winograd F(2x2, 3x3) path (every channel count let through it here),
    forward and both backwards, against the direct reference, across several chunks."""
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_SIZE", 1)  # and every size
    monkeypatch.setattr(_numba, "CONV_CHUNK_BYTES", 4000)  # several chunks of images per call
    n, c, h, w_, f = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    if layout == "channels_last":
        x = _channels_last_view(np, x)
    w = rng.standard_normal((f, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if has_bias else None
    assert winograd._winograd_fits(w.shape, 1, 1)
    out, saved = conv.conv_forward_numba(x, w, b, 1, 1)
    out_ref, saved_ref = reference.conv_forward(x, w, np.zeros(f, dtype) if b is None else b, 1, 1)
    assert out.dtype == dtype and out.shape == out_ref.shape
    _close(out, out_ref, dtype, float(np.abs(out_ref).max()))
    dout = rng.standard_normal(out.shape).astype(dtype)
    if layout == "channels_last":
        dout = _channels_last_view(np, dout)
    _check_conv_backward(conv.conv_backward_numba, reference.conv_backward, dout, saved, saved_ref,
                         dtype, has_bias)


# (N, C, H, W, F): the pool fuses into the conv on even and odd sizes (an odd one's last
# row or column dropped)
CONV_POOL_CASES = [(2, 8, 6, 4, 8), (3, 9, 4, 8, 12), (2, 16, 2, 2, 8), (2, 8, 5, 6, 8),
                   (3, 8, 7, 7, 9), (2, 10, 3, 5, 8), (2, 8, 2, 3, 8)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CONV_POOL_CASES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_conv_pool_matches_the_two_reference_ops(dtype, case, layout, has_bias, monkeypatch):
    monkeypatch.setattr(_numba, "CONV_CHUNK_BYTES", 4000)  # several chunks of images per call
    n, c, h, w_, f = case
    rng = np.random.default_rng(sum(case) + 1)
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    if layout == "channels_last":
        x = _channels_last_view(np, x)
    w = rng.standard_normal((f, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if has_bias else None
    assert pool._pool_fuses(h, w_, w.shape, 1, 1, 2, 2, 2) == (min(h, w_) >= 2)
    out, saved = pool.conv_pool_forward_numba(x, w, b, 1, 1, 2, 2, 2)
    out_ref, saved_ref = reference.conv_pool_forward(
        x, w, np.zeros(f, dtype) if b is None else b, 1, 1, 2, 2, 2)
    assert out.dtype == dtype and out.shape == out_ref.shape
    _close(out, out_ref, dtype, float(np.abs(out_ref).max()))
    # the same windows' maxima (the numpy kernels keep argmax channels-last)
    np.testing.assert_array_equal(saved[1][1].transpose(0, 3, 1, 2), saved_ref[1][1])
    dout = rng.standard_normal(out.shape).astype(dtype)
    if layout == "channels_last":
        dout = _channels_last_view(np, dout)
    _check_conv_backward(pool.conv_pool_backward_numba, reference.conv_pool_backward, dout, saved,
                         saved_ref, dtype, has_bias)


def test_conv_pool_ties_go_to_the_first_tap():
    """Zero filters: every conv output is its bias, each window a four-way tie; the fused
    pool's gradient goes to each window's top-left value, as max_pool_backward's does."""
    x = np.random.default_rng(0).standard_normal((1, 8, 4, 4))
    w = np.zeros((8, 8, 3, 3))
    b = np.arange(8.0)
    out, saved = pool.conv_pool_forward_numba(x, w, b, 1, 1, 2, 2, 2)
    np.testing.assert_array_equal(out, np.broadcast_to(b[None, :, None, None], (1, 8, 2, 2)))
    np.testing.assert_array_equal(saved[1][1], 0)
    # the conv's input gradient from a pooled gradient of ones: the window's first tap only
    dout = np.ones(out.shape)
    _, dw, db = pool.conv_pool_backward_numba(dout, saved)
    conv_out, conv_saved = reference.conv_forward(x, w, b, 1, 1)
    unpooled = np.zeros(conv_out.shape)
    unpooled[:, :, ::2, ::2] = 1
    _, dw_ref, db_ref = reference.conv_backward(unpooled, conv_saved)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-12)
    np.testing.assert_allclose(db, db_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_pool_takes_the_first_nan(dtype):
    """The fused pool of the Winograd output tiles against the reference pool of the same
    tiles unpooled: a window holding NaN pools to its first NaN (row-major), as np.argmax."""
    rng = np.random.default_rng(3)
    filters, tiles = 6, 4  # one 4x4 image: 2x2 tiles of 2x2 outputs
    m = rng.standard_normal((tiles, 16, filters)).astype(dtype)
    m[rng.random(m.shape) < 0.05] = np.nan  # each lands in some of a tile's four outputs
    bias = rng.standard_normal(filters).astype(dtype)
    out = np.empty((1, 4, 4, filters), dtype)
    winograd._winograd_output(m.copy(), 0, 1, bias, out)  # it transforms m in place
    pooled, argmax = np.empty((1, 2, 2, filters), dtype), np.empty((1, 2, 2, filters), np.uint8)
    winograd._winograd_output_pool(m.copy(), 0, 1, bias, pooled, argmax)
    expected, (_, expected_argmax, *_) = reference.max_pool_forward(
        out.transpose(0, 3, 1, 2), 2, 2, 2)
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_array_equal(pooled.transpose(0, 3, 1, 2), expected)
    np.testing.assert_array_equal(argmax.transpose(0, 3, 1, 2), expected_argmax)


def test_winograd_takes_the_3x3_same_convs_of_enough_channels():
    assert winograd._winograd_fits((32, 24, 3, 3), 1, 1)  # ConvNet's convs after the stem
    assert not winograd._winograd_fits((24, 3, 3, 3), 1, 1)  # the stem: im2col
    assert not winograd._winograd_fits((32, 32, 3, 3), 2, 1)  # strided
    assert not winograd._winograd_fits((32, 32, 3, 3), 1, 0)  # another padding
    assert not winograd._winograd_fits((32, 32, 5, 5), 1, 2)  # another filter size
    assert winograd._winograd_fits((32, 32, 3, 3), 1, 1, (4, 7))
    assert not winograd._winograd_fits((32, 32, 3, 3), 1, 1, (3, 8))  # a 3-pixel output


def test_winograd_conv_at_the_reference_nets_widths_in_float32():
    """A wide layer (K = 9 * 64 products per output) stays within the contract's float32 bound."""
    rng = np.random.default_rng(7)
    x = _channels_last_view(np, rng.standard_normal((3, 64, 6, 6)).astype(np.float32))
    w = (rng.standard_normal((128, 64, 3, 3)) / 24).astype(np.float32)
    out, saved = conv.conv_forward_numba(x, w, None, 1, 1)
    out_ref, saved_ref = reference.conv_forward(x.astype(np.float64), w.astype(np.float64),
                                                np.zeros(128), 1, 1)
    assert np.abs(out - out_ref).max() <= 1e-5 * np.abs(out_ref).max()
    dout = rng.standard_normal(out.shape).astype(np.float32)
    for got, expected in zip(conv.conv_backward_numba(dout, saved)[:2],
                             reference.conv_backward(dout.astype(np.float64), saved_ref)[:2]):
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool(ops, dtype, case, layout):
    xp, table = ops
    x_shape, pool_height, pool_width, stride = case
    rng = np.random.default_rng(6)
    x = xp.asarray(rng.standard_normal(x_shape), dtype=dtype)
    if layout == "channels_last":
        x = _channels_last_view(xp, x)
    out, saved = table.max_pool_forward(x, pool_height, pool_width, stride)
    out_ref, saved_ref = reference.max_pool_forward(x, pool_height, pool_width, stride)
    assert out.dtype == dtype
    np.testing.assert_array_equal(_host(out), _host(out_ref))
    dout = xp.asarray(rng.standard_normal(out.shape), dtype=dtype)
    dx = table.max_pool_backward(dout, saved)
    assert dx.dtype == dtype and dx.shape == x.shape
    # overlapping windows add up their gradients in another order: equal to rounding
    _close(dx, reference.max_pool_backward(dout, saved_ref), dtype, 10.0)


def test_max_pool_ties_go_to_the_first_maximum(ops, dtype):
    """Equal values in a window (relu zeros, say): the gradient goes to the first, row-major."""
    xp, table = ops
    x = np.zeros((1, 2, 4, 4))
    x[0, 1, 0, 1] = x[0, 1, 1, 0] = 3.0   # window (0, 0) of channel 1: two maxima
    x_dev = xp.asarray(x, dtype=dtype)
    out, saved = table.max_pool_forward(x_dev, 2, 2, 2)
    dx = _host(table.max_pool_backward(xp.ones(out.shape, dtype=dtype), saved))
    expected = np.zeros_like(x)
    expected[0, 0, ::2, ::2] = 1  # all-zero windows: their first position
    expected[0, 1, ::2, ::2] = 1
    expected[0, 1, 0, 0] = 0
    expected[0, 1, 0, 1] = 1
    np.testing.assert_array_equal(dx, expected)


# (rows, channels): the last ones span the numpy kernels' thread blocks
BN_RELU_SHAPES = [(1, 3), (7, 5), (64, 24), (3000, 24), (4097, 33)]


@pytest.mark.parametrize("shape", BN_RELU_SHAPES)
def test_batchnorm_relu(ops, dtype, shape):
    xp, table = ops
    rng = np.random.default_rng(7)
    x = xp.asarray(rng.standard_normal(shape) * 3 + 10, dtype=dtype)  # offset: the shifted sums
    gamma = xp.asarray(rng.standard_normal(shape[1]), dtype=dtype)
    beta = xp.asarray(rng.standard_normal(shape[1]), dtype=dtype)
    got = table.batchnorm_relu_train_forward(x, gamma, beta, 1e-5)
    expected = reference.batchnorm_relu_train_forward(x, gamma, beta, 1e-5)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        _close(g, e, dtype, 10.0)
    out, mean, inv_std, _ = expected
    dout = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    got = table.batchnorm_relu_backward(dout, x, out, gamma, mean, inv_std)
    expected = reference.batchnorm_relu_backward(dout, x, out, gamma, mean, inv_std)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        _close(g, e, dtype, float(np.abs(_host(e)).max()) + 1)
    running_mean, running_var = mean * 0.9, xp.abs(xp.asarray(_host(inv_std), dtype=dtype)) + 0.5
    got = table.batchnorm_relu_test_forward(x, gamma, beta, running_mean, running_var, 1e-5)
    expected = reference.batchnorm_relu_test_forward(x, gamma, beta, running_mean, running_var,
                                                     1e-5)
    assert got.dtype == dtype and got.shape == shape and float(_host(got).min()) == 0.0
    _close(got, expected, dtype, 10.0)


@pytest.mark.parametrize("shape", BN_RELU_SHAPES)
def test_batchnorm_gelu(ops, dtype, shape):
    """The fused batchnorm + gelu trio against the reference, on strided rows too."""
    xp, table = ops
    rng = np.random.default_rng(7)
    x = xp.asarray(rng.standard_normal(shape) * 3 + 10, dtype=dtype)  # offset: the shifted sums
    x = xp.concatenate([x, x], axis=1)[:, shape[1]:]  # strided rows
    gamma = xp.asarray(rng.standard_normal(shape[1]), dtype=dtype)
    beta = xp.asarray(rng.standard_normal(shape[1]), dtype=dtype)
    got = table.batchnorm_gelu_train_forward(x, gamma, beta, 1e-5)
    expected = reference.batchnorm_gelu_train_forward(*host_copies(x, gamma, beta), 1e-5)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        _close(g, e, dtype, 10.0)
    _, mean, inv_std, _ = expected
    dout = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    got = table.batchnorm_gelu_backward(dout, x, gamma, beta, xp.asarray(mean),
                                        xp.asarray(inv_std))
    expected = reference.batchnorm_gelu_backward(*host_copies(dout, x, gamma, beta), mean, inv_std)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        _close(g, e, dtype, float(np.abs(_host(e)).max()) + 1)
    running_mean = xp.asarray(mean * 0.9)
    running_var = xp.asarray(np.abs(inv_std) + 0.5)
    got = table.batchnorm_gelu_test_forward(x, gamma, beta, running_mean, running_var, 1e-5)
    expected = reference.batchnorm_gelu_test_forward(
        *host_copies(x, gamma, beta, running_mean, running_var), 1e-5)
    assert got.dtype == dtype and got.shape == shape
    _close(got, expected, dtype, 10.0)


def test_cuda_convolution_sources_compile(tmp_path):
    """The CuPy RawKernels' CUDA source, for float and double, through nvcc (when installed)."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    source = tmp_path / "conv.cu"
    source.write_text(_conv_sources("float") + _conv_sources("double"))
    result = subprocess.run([nvcc, "--ptx", "-o", str(tmp_path / "conv.ptx"), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "conv.ptx").read_text()
    for name in ("im2col", "col2im", "max_pool_forward", "max_pool_backward"):
        for ctype in ("float", "double"):
            assert f"fastnn_{name}_{ctype}" in ptx


def _conv_sources(ctype):
    """The CUDA source of the convolution and pool RawKernels for `ctype`."""
    return conv.CONV_SOURCE.format(T=ctype) + pool.POOL_SOURCE.format(T=ctype)


def _host_cuda_kernels(tmp_path, ctype):
    """The convolution RawKernels compiled for the host (g++): each call runs one CUDA thread.

    threadIdx.x becomes a global the test sets before each call, so the
    kernels' index arithmetic runs on small numpy arrays without a GPU.
    """
    import ctypes
    import shutil
    import subprocess

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    prelude = ("struct Dim { long long x; };\nstatic Dim blockIdx = {0}, blockDim = {1};\n"
               "static long long thread_index = 0;\n"
               'extern "C" void set_thread(long long i) { thread_index = i; }\n'
               "#define threadIdx (Dim{thread_index})\n#define __global__\n")
    source = tmp_path / f"conv_{ctype}.cpp"
    source.write_text(prelude + _conv_sources(ctype))
    library = tmp_path / f"conv_{ctype}.so"
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))

    def launch(name, total, *args):
        kernel = getattr(lib, f"fastnn_{name}_{ctype}")
        converted = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray)
                     else ctypes.c_longlong(int(a)) if isinstance(a, np.int64)
                     else ctypes.c_int(int(a)) for a in args] + [ctypes.c_longlong(total)]
        for i in range(total):
            lib.set_thread(ctypes.c_longlong(i))
            kernel(*converted)

    return launch


@pytest.mark.parametrize("ctype", ["float", "double"])
def test_cuda_convolution_kernels_on_the_host(tmp_path, ctype):
    """The CuPy im2col, col2im and pool kernels against the reference ops."""
    launch = _host_cuda_kernels(tmp_path, ctype)
    dtype = np.float32 if ctype == "float" else np.float64
    rng = np.random.default_rng(8)
    n, c, h, w, hh, ww, stride, pad = 2, 3, 5, 7, 3, 2, 2, 1
    ho, wo = 1 + (h + 2 * pad - hh) // stride, 1 + (w + 2 * pad - ww) // stride
    x = _channels_last_view(np, rng.standard_normal((n, c, h, w)).astype(dtype))  # strided
    geometry = [np.int32(v) for v in (c, h, w, hh, ww, stride, pad, ho, wo)]
    strides = [np.int64(s // x.itemsize) for s in x.strides]
    cols = np.zeros((n * ho * wo, c * hh * ww), dtype=dtype)
    launch("im2col", cols.size, x, *strides, *geometry, np.int32(0), cols)
    expected = conv._im2col_xp(np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))), hh, ww, stride, ho, wo)
    np.testing.assert_array_equal(cols, expected.transpose(0, 2, 1).reshape(cols.shape))

    # col2im is the adjoint of im2col: <im2col(x), d> == <x, col2im(d)>
    dcols = rng.standard_normal(cols.shape).astype(dtype)
    dx = np.zeros((n, c, h, w), dtype=dtype)
    launch("col2im", dx.size, dcols, *geometry, dx)
    assert float((cols * dcols).sum()) == pytest.approx(float((x * dx).sum()), rel=1e-5)
    wmat = rng.standard_normal((4, c * hh * ww)).astype(dtype)
    dout = rng.standard_normal((n, 4, ho, wo)).astype(dtype)
    _, saved = reference.conv_forward(x, wmat.reshape(4, c, hh, ww), None, stride, pad)
    dx_ref = reference.conv_backward(dout, saved)[0]
    dx = np.zeros((n, c, h, w), dtype=dtype)
    launch("col2im", dx.size, dout.transpose(0, 2, 3, 1).reshape(-1, 4) @ wmat, *geometry, dx)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)

    for ph, pw, s in ((2, 2, 2), (3, 2, 1)):
        po_h, po_w = 1 + (h - ph) // s, 1 + (w - pw) // s
        out = np.zeros((n, c, po_h, po_w), dtype=dtype)
        argmax = np.zeros(out.shape, dtype=np.int32)
        launch("max_pool_forward", out.size, x, *strides, np.int32(c), np.int32(ph),
               np.int32(pw), np.int32(s), np.int32(po_h), np.int32(po_w), out, argmax)
        out_ref, saved = reference.max_pool_forward(x, ph, pw, s)
        np.testing.assert_array_equal(out, out_ref)
        np.testing.assert_array_equal(argmax, saved[1])
        dpool = rng.standard_normal(out.shape).astype(dtype)
        dx = np.zeros((n, c, h, w), dtype=dtype)
        launch("max_pool_backward", dx.size, dpool, argmax, np.int32(c), np.int32(h), np.int32(w),
               np.int32(ph), np.int32(pw), np.int32(s), np.int32(po_h), np.int32(po_w), dx)
        np.testing.assert_allclose(dx, reference.max_pool_backward(dpool, saved), rtol=1e-6)


def test_conv_threads_work_in_a_forked_child():
    """The conv ops' thread pool, made before a fork, is not reused (dead) in the child."""
    import multiprocessing

    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 8, 16, 16)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    table = kernels.for_module(np)
    expected = table.conv_forward(x, w, None, 1, 1)[0]  # starts the pool here
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(_conv_in_child, (x, w)).get(timeout=120)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def _conv_in_child(x, w):
    return np.ascontiguousarray(kernels.for_module(np).conv_forward(x, w, None, 1, 1)[0])


def test_conv_output_size_is_written_once():
    """1 + (H + 2*pad - HH) // stride lives in kernels/conv.py alone: the layers' checks, the
    models and every backend's conv use conv_output_size."""
    import pathlib
    import re

    assert conv.conv_output_size(32, 3, 1, 1) == 32 and conv.conv_output_size(7, 3, 2, 1) == 4
    x, w = np.zeros((1, 2, 9, 7)), np.zeros((3, 2, 3, 5))
    assert layers.conv_geometry(x, w, None, {"stride": 2, "pad": 2})[2:] == (
        conv.conv_output_size(9, 3, 2, 2), conv.conv_output_size(7, 5, 2, 2))
    formula = re.compile(r"2 \* pad - \w+\) // ")
    package = pathlib.Path(fastnn.__file__).parent
    written = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               for _ in formula.finditer(path.read_text())]
    assert written == ["kernels/conv.py"]
