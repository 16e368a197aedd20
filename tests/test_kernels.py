"""Tests for fastnn.kernels: every op of each backend's table against the reference ops.

The numpy table holds the Numba kernels (fastnn/kernels/cpu.py), the cupy
table the CuPy kernels (fastnn/kernels/gpu.py) where they exist; both must
give what fastnn.kernels.reference gives on the same inputs. Dropout masks
must match bit for bit, on every backend and thread count.
"""
import numpy as np
import pytest

import fastnn
from fastnn import kernels, layers
from fastnn.kernels import reference
from helpers import tolerances

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
    rtol, atol = tolerances(dtype)
    np.testing.assert_allclose(_host(actual), _host(expected), rtol=rtol, atol=atol * scale)


# Ops compared with the reference somewhere in this file; a new op in OPS needs a test here.
COVERED = {"relu_forward", "relu_backward", "dropout_forward", "dropout_backward",
           "softmax_loss", "svm_loss", "batchnorm_train_forward", "batchnorm_backward",
           "sgd_", "sgd_momentum_", "rmsprop_", "adam_", "adamw_", "flip_crop",
           "conv_forward", "conv_backward", "max_pool_forward", "max_pool_backward"}
# The stacked-model ops are compared with their references in test_stacked.py.
STACKED_OPS = {"dropout_stacked_forward", "dropout_stacked_backward", "softmax_loss_stacked",
               "batchnorm_rows_train_forward", "batchnorm_rows_backward", "l2_stacked_",
               "sgd_stacked_", "sgd_momentum_stacked_", "rmsprop_stacked_", "adam_stacked_",
               "adamw_stacked_"}


def test_every_op_is_compared_here():
    missing = sorted(set(kernels.OPS) - COVERED - STACKED_OPS)
    assert not missing, f"ops without a fast-vs-reference test: {missing}"


def test_stacked_ops_are_compared_in_test_stacked():
    source = open(__file__.replace("test_kernels.py", "test_stacked.py")).read()
    assert STACKED_OPS <= set(kernels.OPS)
    assert [op for op in STACKED_OPS if op not in source] == []


def test_table_has_every_op(ops):
    xp, table = ops
    for op in kernels.OPS:
        assert callable(getattr(table, op)), op


def test_numpy_table_uses_the_numba_kernels():
    from fastnn.kernels import cpu

    table = kernels.for_module(np)
    assert table.name == "numpy"
    for op in kernels.OPS:
        if hasattr(cpu, op):  # behind the dtype guard (see test_other_dtypes_run_the_reference)
            assert getattr(table, op).__wrapped__ is getattr(cpu, op), op
    # the ops this module promises to speed up are there
    for op in ("relu_forward", "relu_backward", "dropout_forward", "dropout_backward",
               "softmax_loss", "svm_loss", "sgd_", "sgd_momentum_", "rmsprop_", "adam_"):
        assert hasattr(cpu, op), op


def test_other_dtypes_run_the_reference():
    """float16 (which the Numba kernels do not take) gets the reference ops, dtype kept."""
    table = kernels.for_module(np)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float16)
    y = rng.integers(0, 5, 6)
    gamma, beta = np.ones(5, np.float16), np.zeros(5, np.float16)
    calls = {
        "relu_forward": (x,),
        "relu_backward": (x, np.maximum(x, 0)),
        "dropout_forward": (x, 0.3, 7, 2),
        "softmax_loss": (x, y),
        "svm_loss": (x, y),
        "batchnorm_train_forward": (x, gamma, beta, 1e-3),
    }
    for op, args in calls.items():
        got, expected = getattr(table, op)(*args), getattr(reference, op)(*args)
        for g, e in zip(got if isinstance(got, tuple) else [got],
                        expected if isinstance(expected, tuple) else [expected]):
            assert np.asarray(g).dtype == np.asarray(e).dtype, op
            np.testing.assert_array_equal(g, e, err_msg=op)
    w, dw = x.copy(), x[::-1].copy()
    w_ref = w.copy()
    table.sgd_(w, dw, 0.1)
    reference.sgd_(w_ref, dw, 0.1)
    np.testing.assert_array_equal(w, w_ref)
    assert layers.relu_forward(x)[0].dtype == np.float16


# -- relu ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", X_SHAPES)
def test_relu(ops, dtype, shape):
    xp, table = ops
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    dout = xp.asarray(rng.standard_normal(shape), dtype=dtype)
    out, out_ref = table.relu_forward(x), reference.relu_forward(x)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(_host(out), _host(out_ref))
    dx, dx_ref = table.relu_backward(dout, out), reference.relu_backward(dout, out_ref)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(_host(dx), _host(dx_ref))


def test_relu_non_finite_like_reference(ops, dtype):
    """NaN and inf go through relu as in the reference (np.maximum propagates NaN), so
    a diverged activation reaches the loss and the Solver's non-finite check."""
    xp, table = ops
    x = xp.asarray(np.array([[np.nan, -np.inf, np.inf, -1.0, 0.0, 2.0]]), dtype=dtype)
    np.testing.assert_array_equal(_host(table.relu_forward(x)), _host(reference.relu_forward(x)))
    assert np.isnan(_host(table.relu_forward(x))[0, 0])


def test_relu_non_contiguous_input(ops, dtype):
    xp, table = ops
    x = xp.asarray(np.random.default_rng(1).standard_normal((6, 9)), dtype=dtype).T
    out = table.relu_forward(x)
    np.testing.assert_array_equal(_host(out), _host(reference.relu_forward(x)))
    dout = xp.asarray(np.random.default_rng(2).standard_normal((9, 6)), dtype=dtype)
    np.testing.assert_array_equal(_host(table.relu_backward(dout, out)),
                                  _host(reference.relu_backward(dout, out)))


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


def test_numba_ops_same_on_every_thread_count():
    """Row-parallel and chunk-parallel kernels give the same bits with 1 or more threads."""
    numba = pytest.importorskip("numba")
    table = kernels.for_module(np)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((300, 70))  # several rows per thread, several chunks
    y = rng.integers(0, 70, 300)
    w, dw = rng.standard_normal((97, 130)), rng.standard_normal((97, 130))

    def run_all():
        results = [table.relu_forward(x), *table.softmax_loss(x, y), *table.svm_loss(x, y)]
        for op, (n_state, hyper) in UPDATES.items():
            if op in kernels.OPS:
                arrays = [w.copy()] + [np.abs(w) for _ in range(n_state)]
                getattr(table, op)(arrays[0], dw, *arrays[1:], **hyper())
                results += arrays
        return results

    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run_all()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        multi = run_all()
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(single, multi):
        np.testing.assert_array_equal(a, b)


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
    ref_value, ref_dx = getattr(reference, loss)(x, y)
    assert np.isfinite(float(value))
    assert dx.dtype == dtype and dx.shape == shape
    assert _host(xp.asarray(value)).dtype == dtype
    rtol, _ = tolerances(dtype)
    # the loss is a mean of N rows: compare on the scale of the rows' size
    np.testing.assert_allclose(float(value), float(ref_value), rtol=rtol,
                               atol=rtol * max(1.0, float(np.abs(x_host).max())))
    _close(dx, ref_dx, dtype)


@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8])
def test_loss_label_dtypes_and_layout(ops, dtype, loss, label_dtype):
    xp, table = ops
    x_host, y_host = _loss_inputs((12, 6), dtype, 1.0, label_dtype, seed=6)
    x_t = xp.asarray(np.ascontiguousarray(x_host.T)).T  # non-contiguous scores
    value, dx = getattr(table, loss)(x_t, xp.asarray(y_host))
    ref_value, ref_dx = getattr(reference, loss)(xp.asarray(x_host), xp.asarray(y_host.astype(np.int64)))
    rtol, atol = tolerances(dtype)
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
    want, ref_dx = getattr(reference, loss)(x, y)
    np.testing.assert_array_equal(float(got), float(want))  # NaN equals NaN here
    np.testing.assert_array_equal(_host(dx), _host(ref_dx))


@pytest.mark.parametrize("loss", ["softmax_loss", "svm_loss"])
@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_unchecked_fast_loss_gives_nan_for_bad_labels(ops, loss, bad):
    xp, table = ops
    if getattr(table, loss) is getattr(reference, loss):
        pytest.skip(f"{table.name} has no fast {loss} yet; the reference op does not check labels")
    x = xp.asarray(np.random.default_rng(7).standard_normal((4, 5)))
    y = xp.asarray(np.array([0, bad, 2, 4]))
    value, dx = getattr(table, loss)(x, y)
    assert np.isnan(float(value))


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
    want = reference.batchnorm_train_forward(x, gamma, beta, 1e-5)
    assert len(got) == 5
    for g, w, name in zip(got, want, ("out", "x_hat", "inv_std", "mean", "var")):
        assert g.dtype == dtype and g.shape == w.shape, name
        _close(g, w, dtype, scale=10)
    out, x_hat, inv_std, mean, var = want
    got = table.batchnorm_backward(dout, x_hat, gamma, inv_std)
    want = reference.batchnorm_backward(dout, x_hat, gamma, inv_std)
    for g, w, name in zip(got, want, ("dx", "dgamma", "dbeta")):
        assert g.dtype == dtype and g.shape == w.shape, name
        _close(g, w, dtype, scale=10 * shape[0])


def test_reference_batchnorm_against_numpy():
    x = np.random.default_rng(9).standard_normal((10, 3))
    out, x_hat, inv_std, mean, var = reference.batchnorm_train_forward(x, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-12)
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-12)


# -- in-place update rules -------------------------------------------------------
UPDATES = {
    "sgd_": (0, lambda: dict(lr=0.05)),
    "sgd_momentum_": (1, lambda: dict(lr=0.05, momentum=0.9)),
    "rmsprop_": (1, lambda: dict(lr=0.01, decay_rate=0.99, eps=1e-8)),
    "adam_": (2, lambda: dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, t=3)),
    "adamw_": (2, lambda: dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, t=3, weight_decay=0.1)),
}


@pytest.mark.parametrize("op", [op for op in UPDATES if op in kernels.OPS])
@pytest.mark.parametrize("shape", [(1, 5), (4, 6), (11,), (97, 130)])
def test_update_in_place_matches_reference(ops, dtype, op, shape):
    xp, table = ops
    rng = np.random.default_rng(10)
    n_state, hyper = UPDATES[op]
    w = rng.standard_normal(shape).astype(dtype)
    dw = rng.standard_normal(shape).astype(dtype)
    state = [np.abs(rng.standard_normal(shape)).astype(dtype) for _ in range(n_state)]
    fast = [xp.array(a, copy=True) for a in (w, *state)]
    ref = [xp.array(a, copy=True) for a in (w, *state)]
    for _ in range(2):
        assert getattr(table, op)(fast[0], xp.asarray(dw), *fast[1:], **hyper()) is None
        getattr(reference, op)(ref[0], xp.asarray(dw), *ref[1:], **hyper())
    for f, r in zip(fast, ref):
        assert f.dtype == dtype and f.shape == shape
        np.testing.assert_array_equal(_host(f), _host(r))
    assert not np.array_equal(_host(fast[0]), w)  # it did update in place


# -- augmentation ------------------------------------------------------------------
flip_crop_only = pytest.mark.skipif("flip_crop" not in kernels.OPS, reason="no flip_crop op")


@flip_crop_only
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (6, 3, 8, 8), (40, 2, 5, 7)])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("padding", [0, 1, 3])
def test_flip_crop_bit_identical_to_reference(ops, dtype, shape, flip, padding):
    xp, table = ops
    x_host = np.random.default_rng(11).standard_normal(shape).astype(dtype)
    x = xp.asarray(x_host)
    for seed, step in ((0, 0), (17, 3)):
        out = table.flip_crop(x, seed, step, flip, padding)
        assert out.dtype == dtype and out.shape == shape
        np.testing.assert_array_equal(_host(out), reference.flip_crop(x_host, seed, step, flip, padding))


@flip_crop_only
def test_flip_crop_moves_pixels_only(ops):
    """Each output image is its input shifted (zeros shifted in) and maybe mirrored."""
    xp, table = ops
    x_host = np.random.default_rng(12).uniform(1, 2, (30, 2, 6, 6))
    out = _host(table.flip_crop(xp.asarray(x_host), 5, 0, True, 2))
    for image, result in zip(x_host, out):
        candidates = []
        for mirrored in (image, image[:, :, ::-1]):
            padded = np.pad(mirrored, ((0, 0), (2, 2), (2, 2)))
            candidates += [padded[:, 2 + dy:8 + dy, 2 + dx:8 + dx]
                           for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(np.array_equal(result, c) for c in candidates)
    identity = _host(table.flip_crop(xp.asarray(x_host), 5, 0, False, 0))
    np.testing.assert_array_equal(identity, x_host)


# == convolution ===============================================================
# (x shape, w shape, stride, pad): non-square images and filters, stride 1 and 2, pad 0-2
CONV_CASES = [((2, 3, 8, 8), (4, 3, 3, 3), 1, 1), ((3, 2, 7, 5), (3, 2, 3, 1), 2, 1),
              ((1, 4, 6, 9), (5, 4, 2, 4), 2, 2), ((2, 5, 5, 5), (2, 5, 1, 1), 1, 0),
              ((2, 3, 9, 6), (6, 3, 5, 2), 1, 2)]
POOL_CASES = [((2, 3, 8, 8), 2, 2, 2), ((2, 4, 7, 9), 2, 3, 2), ((1, 2, 6, 5), 3, 3, 1),
              ((3, 5, 4, 4), 4, 4, 1)]


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
    from fastnn.kernels import cpu

    monkeypatch.setattr(cpu, "CONV_CHUNK_BYTES", 3000)
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
