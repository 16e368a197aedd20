"""fastnn.inference: batched prediction and flip test-time averaging."""
import numpy as np
import pytest

import fastnn
from fastnn import inference
from fastnn.classifiers import FullyConnectedNet
from fastnn.solver import Solver
from helpers import is_0d_array


class Recording:
    """Wraps a model; records the row count of every scoring call."""

    def __init__(self, model):
        self.model = model
        self.params = model.params
        self.dtype = model.dtype
        self.rows = []

    def loss(self, X, y=None):
        self.rows.append(X.shape[0])
        return self.model.loss(X, y)


def small_model_and_images(n=23, seed=0):
    rng = np.random.default_rng(seed)
    model = FullyConnectedNet([16], input_dim=3 * 4 * 5, use_batchnorm=True, weight_scale=0.5,
                              seed=seed)
    X = rng.standard_normal((n, 3, 4, 5)).astype(np.float32)
    return model, X, rng.integers(0, 10, n)


@pytest.mark.parametrize("batch_size", [1, 5, 23, 100])
def test_predict_in_batches_equals_one_pass(backend, batch_size):
    model, X, _ = small_model_and_images()
    recording = Recording(model)
    labels = inference.predict(recording, X, batch_size=batch_size)
    assert isinstance(labels, backend.ndarray) and labels.dtype == np.int64
    want = np.argmax(fastnn.to_numpy(model.loss(backend.asarray(X))), axis=1)
    np.testing.assert_array_equal(fastnn.to_numpy(labels), want)
    assert max(recording.rows) <= batch_size and sum(recording.rows) == X.shape[0]


def test_flip_averages_the_scores_of_an_image_and_its_mirror(backend):
    model, X, _ = small_model_and_images()
    got = fastnn.to_numpy(inference.predict_scores(model, X, batch_size=6, flip=True))
    plain = fastnn.to_numpy(model.loss(backend.asarray(X)))
    mirrored = fastnn.to_numpy(model.loss(backend.asarray(X[..., ::-1].copy())))
    # scores in the thousands (weight_scale 0.5): a float32 sum's error scales with them, and
    # batches of 6 and of 23 take different BLAS blockings
    scale = np.abs(np.concatenate([plain, mirrored])).max()
    np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=1e-5, atol=1e-5 * scale)
    assert not np.allclose(plain, mirrored)  # the mirror really changes the scores


def test_count_correct_stays_on_the_device_and_accuracy_is_a_float(backend):
    model, X, y = small_model_and_images()
    correct = inference.count_correct(model, X, y, batch_size=4)
    assert is_0d_array(correct, backend)
    want = int((fastnn.to_numpy(inference.predict(model, X)) == y).sum())
    assert int(correct) == want
    acc = inference.accuracy(model, X, y, batch_size=4, flip=True)
    assert type(acc) is float and 0 <= acc <= 1


def test_plain_and_flip_accuracy_in_one_pass(backend):
    model, X, y = small_model_and_images()
    plain, flipped = inference.plain_and_flip_accuracy(model, X, y, batch_size=4)
    assert type(plain) is float and type(flipped) is float
    assert plain == inference.accuracy(model, X, y)
    assert flipped == inference.accuracy(model, X, y, flip=True)


def test_empty_input_and_bad_arguments():
    model, X, y = small_model_and_images()
    assert inference.predict(model, X[:0]).shape == (0,)
    assert inference.accuracy(model, X[:0], y[:0]) == 0.0
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        inference.predict(model, X, batch_size=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(23, 60\)"):
        inference.predict(model, X.reshape(23, -1), flip=True)
    with pytest.raises(ValueError, match="one label per row"):
        inference.count_correct(model, X, y[:5])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN through the matmuls
def test_predict_refuses_nan_scores(backend):
    """All-NaN images got class 0 without a word: the images with NaN scores are named."""
    model, X, _ = small_model_and_images(n=12)
    X[[3, 7]] = np.nan
    X[9, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"the scores of 3 of 12 images are NaN \(rows 3, 7, 9\)"
                                         r".*X holds \d+ NaN or infinite values"):
        inference.predict(model, X, batch_size=5)
    for name in model.params:  # finite images, NaN parameters
        model.params[name][...] = np.nan
        break
    with pytest.raises(ValueError, match="12 of 12 images.*the model's parameters hold NaN"):
        inference.predict(model, np.zeros_like(X), flip=True)


def test_batch_sizes_are_integers():
    model, X, _ = small_model_and_images()
    labels = inference.predict(model, X)
    np.testing.assert_array_equal(inference.predict(model, X, batch_size=np.int8(5)), labels)
    for bad in (2.5, "5", True):
        with pytest.raises(TypeError, match=f"batch_size must be an integer, got {bad!r}"):
            inference.predict(model, X, batch_size=bad)


def test_solver_check_accuracy_runs_in_batches_with_optional_flip():
    model, X, y = small_model_and_images(n=40)
    data = {"X_train": X, "y_train": y, "X_val": X, "y_val": y}
    solver = Solver(model, data, verbose=False, seed=0)
    recording = Recording(model)
    solver.model = recording
    acc = solver.check_accuracy(X, y, batch_size=8)
    assert max(recording.rows) <= 8
    assert acc == inference.accuracy(model, X, y)
    assert solver.check_accuracy(X, y, tta=2) == inference.accuracy(model, X, y, tta=2)
    flipped = solver.check_accuracy(X, y, batch_size=8, flip=True)
    assert flipped == inference.accuracy(model, X, y, flip=True)



def _reference_tta2(model, X, xp):
    """airbench's tta_level=2, the views cut in plain numpy: 1/2 the image-and-mirror mean,
    1/2 the mean of that mean over X reflect-padded by 1 and cut at (0, 0) and at (2, 2)."""
    def scores(images):
        return fastnn.to_numpy(model.loss(xp.asarray(np.ascontiguousarray(images))))

    def mirror_mean(images):
        return (scores(images) + scores(images[..., ::-1])) / 2

    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    height, width = X.shape[2:]
    assert np.array_equal(padded[:, :, 0, 1:-1], X[:, :, 1])  # reflection, not the edge
    translated = mirror_mean(padded[:, :, :height, :width]) + mirror_mean(padded[:, :, 2:, 2:])
    return 0.5 * mirror_mean(X) + 0.5 * translated / 2


def test_tta2_is_the_mean_of_the_mirrors_and_one_pixel_translations(backend):
    """tta=2: airbench's six views, weighted 1/4 (image, mirror) and 1/8 (each translated
    view and its mirror); one model pass per view and batch."""
    model, X, _ = small_model_and_images()
    recording = Recording(model)
    got = fastnn.to_numpy(inference.predict_scores(recording, X, batch_size=10, tta=2))
    assert recording.rows == [10] * 6 + [10] * 6 + [3] * 6
    want = _reference_tta2(model, X, backend)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    flipped = fastnn.to_numpy(inference.predict_scores(model, X, batch_size=10, flip=True))
    assert not np.allclose(got, flipped, rtol=1e-3, atol=1e-3 * scale)  # translations count


def test_tta1_is_flip_exactly_everywhere(backend):
    """tta=1 is flip=True bit for bit, in every function; tta=0 the plain scores."""
    model, X, y = small_model_and_images()
    for tta, flip in ((1, True), (0, False)):
        np.testing.assert_array_equal(
            fastnn.to_numpy(inference.predict_scores(model, X, batch_size=7, tta=tta)),
            fastnn.to_numpy(inference.predict_scores(model, X, batch_size=7, flip=flip)))
        np.testing.assert_array_equal(fastnn.to_numpy(inference.predict(model, X, tta=tta)),
                                      fastnn.to_numpy(inference.predict(model, X, flip=flip)))
        assert (inference.accuracy(model, X, y, 5, tta=tta)
                == inference.accuracy(model, X, y, 5, flip=flip))
    assert (inference.plain_and_flip_accuracy(model, X, y, 4, tta=1)
            == inference.plain_and_flip_accuracy(model, X, y, 4))
    assert inference.accuracy(model, X, y, tta=1, flip=True) == inference.accuracy(
        model, X, y, flip=True)


def test_plain_and_tta2_accuracy_in_one_pass(backend):
    model, X, y = small_model_and_images()
    recording = Recording(model)
    plain, tta2 = inference.plain_and_flip_accuracy(recording, X, y, batch_size=23, tta=2)
    assert recording.rows == [23] * 6  # the plain pass is the first view
    assert plain == inference.accuracy(model, X, y)
    assert tta2 == inference.accuracy(model, X, y, tta=2)


@pytest.mark.parametrize("tta, flip, match", [
    (3, False, r"tta must be one of \(0, 1, 2\).*got 3"),
    (True, False, "tta must be one of .*got True"),
    (1.0, False, "tta must be one of .*got 1.0"),
    ("2", False, "tta must be one of .*got '2'"),
    (2, True, "flip=True is tta=1; got both flip=True and tta=2"),
    (0, True, "got both flip=True and tta=0")])
def test_bad_tta_is_named(tta, flip, match):
    model, X, y = small_model_and_images()
    with pytest.raises(ValueError, match=match):
        inference.predict(model, X, tta=tta, flip=flip)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(23, 60\).*tta=0"):
        inference.accuracy(model, X.reshape(23, -1), y, tta=2)
    with pytest.raises(ValueError, match="got tta=0: use accuracy"):
        inference.plain_and_flip_accuracy(model, X, y, tta=0)
