"""Tests for fastnn.save / fastnn.load: round trips, atomic writes, and clear errors."""
import os

import numpy as np
import pytest

import fastnn
from fastnn.classifiers import FullyConnectedNet, TwoLayerNet

D, C = 6, 3


def _models():
    np.random.seed(0)
    yield "two_layer", TwoLayerNet(input_dim=D, hidden_dim=5, num_classes=C, weight_scale=0.1,
                                   reg=0.1)
    yield "fc", FullyConnectedNet([5, 4], input_dim=D, num_classes=C, weight_scale=0.1, seed=3)
    yield "fc_bn_dropout", FullyConnectedNet([5, 4], input_dim=D, num_classes=C, dropout=0.3,
                                             use_batchnorm=True, reg=0.5, dtype=np.float64, seed=4)
    yield "fc_seedless", FullyConnectedNet([7], input_dim=D, num_classes=C, use_batchnorm=True)


MODELS = dict(_models())


def _trained(name, xp):
    """A fresh copy of MODELS[name] on the active backend, after some training forward passes."""
    np.random.seed(1)
    model = dict(_models())[name]
    rng = np.random.default_rng(5)
    for name_, value in model.params.items():  # move away from the initial values
        host = fastnn.to_numpy(value) + 0.1 * rng.standard_normal(value.shape)
        model.params[name_] = xp.asarray(host, dtype=value.dtype)
    for _ in range(3):  # batchnorm running statistics move
        X = xp.asarray(2 * rng.standard_normal((8, D)) + 1, dtype=model.dtype)
        model.loss(X, xp.asarray(rng.integers(0, C, 8)))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_gives_identical_scores(backend, tmp_path, name):
    xp = backend
    model = _trained(name, xp)
    path = tmp_path / "model.npz"
    fastnn.save(model, str(path))
    loaded = fastnn.load(str(path))
    assert type(loaded) is type(model)
    assert loaded.dtype == model.dtype
    assert loaded.reg == model.reg
    assert set(loaded.params) == set(model.params)
    for key, value in model.params.items():
        assert isinstance(loaded.params[key], xp.ndarray) and loaded.params[key].dtype == value.dtype
        np.testing.assert_array_equal(fastnn.to_numpy(loaded.params[key]), fastnn.to_numpy(value))
    for mine, theirs in zip(getattr(model, "bn_params", []), getattr(loaded, "bn_params", [])):
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(fastnn.to_numpy(theirs[key]), fastnn.to_numpy(mine[key]))
    X = xp.asarray(np.random.default_rng(6).standard_normal((5, D)), dtype=model.dtype)
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.loss(X)), fastnn.to_numpy(model.loss(X)))
    if getattr(model, "use_batchnorm", False):
        # the running statistics really matter to these scores
        fresh = dict(_models())[name]
        fresh.params = model.params
        assert not np.allclose(fastnn.to_numpy(fresh.loss(X)), fastnn.to_numpy(model.loss(X)))


def test_load_uses_the_active_backend(backend, tmp_path):
    path = tmp_path / "model.npz"
    with fastnn.use_backend("numpy"):
        fastnn.save(_trained("fc", np), str(path))
    loaded = fastnn.load(str(path))
    assert all(isinstance(v, backend.ndarray) for v in loaded.params.values())


def test_save_accepts_pathlike_and_overwrites(tmp_path):
    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc", np), path)
    model = _trained("two_layer", np)
    fastnn.save(model, path)  # replaces the first file
    loaded = fastnn.load(path)
    assert type(loaded) is TwoLayerNet
    np.testing.assert_array_equal(loaded.params["W1"], model.params["W1"])


def test_save_is_atomic_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc_bn_dropout", np), str(path))
    fastnn.save(_trained("fc_bn_dropout", np), str(path))
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    """A save that fails half-way neither leaves a temporary file nor touches the old file."""
    import fastnn.serialization as serialization

    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc", np), str(path))
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(serialization.np, "savez", broken_savez)
    with pytest.raises(OSError):
        fastnn.save(_trained("two_layer", np), str(path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]
    assert path.read_bytes() == before


def _saved(tmp_path):
    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc_bn_dropout", np), str(path))
    return path


def test_truncated_file_is_corrupt(tmp_path):
    path = _saved(tmp_path)
    blob = path.read_bytes()
    for size in (0, 10, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:size])
        with pytest.raises(ValueError, match="corrupt"):
            fastnn.load(str(path))


def test_random_bytes_are_corrupt(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt") as info:
        fastnn.load(str(path))
    assert "allow_pickle" not in str(info.value)  # numpy's advice does not apply to model files


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a fastnn file") as info:
        fastnn.load(str(tmp_path))
    assert "corrupt" not in str(info.value)


def test_damaged_array_data_is_corrupt(tmp_path):
    path = _saved(tmp_path)
    blob = bytearray(path.read_bytes())
    start = blob.index(b"\x93NUMPY")  # the first array's header; damage its data after it
    for i in range(start + 200, start + 260):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt"):
        fastnn.load(str(path))


def test_foreign_npz_is_rejected(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, W1=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a fastnn file"):
        fastnn.load(str(path))


def test_checkpoint_is_not_a_model(tmp_path):
    from fastnn.solver import Solver

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, D)), rng.integers(0, C, 10)
    solver = Solver(_trained("fc", np), dict(X_train=X, y_train=y, X_val=X, y_val=y), verbose=False)
    path = tmp_path / "ck.npz"
    solver.save_checkpoint(str(path))
    with pytest.raises(ValueError, match="incompatible"):
        fastnn.load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastnn.load(str(tmp_path / "absent.npz"))


@pytest.mark.parametrize("name", ["fc_seedless", "two_layer"])
def test_load_leaves_global_random_state_alone(tmp_path, name):
    path = tmp_path / "model.npz"
    fastnn.save(_trained(name, np), str(path))
    np.random.seed(123)
    expected = np.random.rand(5)
    np.random.seed(123)
    fastnn.load(str(path))
    np.testing.assert_array_equal(np.random.rand(5), expected)


def test_save_rejects_non_models(tmp_path):
    with pytest.raises(TypeError):
        fastnn.save(object(), str(tmp_path / "x.npz"))


def test_a_bare_npy_array_is_a_clear_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="not a fastnn file") as info:
        fastnn.load(tmp_path / "x.npz")
    assert "corrupt" not in str(info.value)


def _tampered(tmp_path, change):
    """A saved fc_bn_dropout model whose arrays went through change(arrays) -> its path."""
    from fastnn.serialization import MODEL_FORMAT, read_npz, write_npz

    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc_bn_dropout", np), path)
    arrays, meta = read_npz(path, MODEL_FORMAT)
    change(arrays)
    write_npz(path, arrays, meta)
    return path


@pytest.mark.parametrize("key", ["norm/1/running_mean", "norm/2/running_var"])
def test_batchnorm_statistics_of_the_wrong_shape_are_incompatible(tmp_path, key):
    path = _tampered(tmp_path, lambda arrays: arrays.update({key: np.zeros(99)}))
    with pytest.raises(ValueError, match=f"incompatible: running statistic {key} has shape"):
        fastnn.load(path)


@pytest.mark.parametrize("key", ["norm/7/running_mean", "bn/0/running_mean"])
def test_unexpected_batchnorm_statistics_are_incompatible(tmp_path, key):
    path = _tampered(tmp_path, lambda arrays: arrays.update({key: np.zeros(5)}))
    with pytest.raises(ValueError, match="unexpected running statistics"):
        fastnn.load(path)


def test_statistics_are_stored_by_norm_layer_key(tmp_path):
    """The file keys running statistics by the model's declared norm_params, not by position."""
    from fastnn.serialization import MODEL_FORMAT, read_npz

    model = _trained("fc_bn_dropout", np)
    fastnn.save(model, tmp_path / "m.npz")
    arrays, meta = read_npz(tmp_path / "m.npz", MODEL_FORMAT)
    assert meta["format_version"] == 2
    assert sorted(k for k in arrays if not k.startswith("param/")) == [
        f"norm/{key}/{stat}" for key in sorted(model.norm_params)
        for stat in ("running_mean", "running_var")]
    np.testing.assert_array_equal(arrays["norm/2/running_var"],
                                  model.norm_params["2"]["running_var"])


def test_a_version_1_file_still_loads(tmp_path):
    """Files written before norm_params (bn/{i}/..., format version 1) load with their statistics."""
    from fastnn.serialization import MODEL_FORMAT, read_npz, write_npz

    model = _trained("fc_bn_dropout", np)
    fastnn.save(model, tmp_path / "m.npz")
    arrays, meta = read_npz(tmp_path / "m.npz", MODEL_FORMAT)
    old = {(f"bn/{int(k.split('/')[1]) - 1}/{k.split('/')[2]}" if k.startswith("norm/") else k): v
           for k, v in arrays.items()}
    write_npz(tmp_path / "old.npz", old, {**meta, "format_version": 1})
    loaded = fastnn.load(tmp_path / "old.npz")
    for key, bn_param in model.norm_params.items():
        for stat in ("running_mean", "running_var"):
            np.testing.assert_array_equal(loaded.norm_params[key][stat], bn_param[stat])
    X = np.random.default_rng(6).standard_normal((5, D))
    np.testing.assert_array_equal(loaded.loss(X), model.loss(X))


@pytest.mark.parametrize("version", [3, 0, "2"])
def test_unknown_format_versions_are_refused_in_one_line(tmp_path, version):
    from fastnn.serialization import MODEL_FORMAT, read_npz, write_npz

    fastnn.save(_trained("fc", np), tmp_path / "m.npz")
    arrays, meta = read_npz(tmp_path / "m.npz", MODEL_FORMAT)
    write_npz(tmp_path / "m.npz", arrays, {**meta, "format_version": version})
    with pytest.raises(ValueError, match=f"fastnn-model format version {version!r}") as info:
        fastnn.load(tmp_path / "m.npz")
    assert "\n" not in str(info.value) and "reads versions 1 to 2" in str(info.value)


def test_non_numeric_parameters_are_incompatible(tmp_path):
    def to_text(arrays):
        arrays["param/b1"] = np.array(["x"] * arrays["param/b1"].size)

    with pytest.raises(ValueError, match="parameter 'b1' holds <U1 values, not numbers"):
        fastnn.load(_tampered(tmp_path, to_text))


def test_numpy_scalar_constructor_arguments_save(tmp_path):
    model = FullyConnectedNet([np.int64(5)], input_dim=np.prod((3, 2, 2)), num_classes=np.int64(3),
                              reg=np.float32(0.5), seed=np.int64(1))
    fastnn.save(model, tmp_path / "m.npz")
    loaded = fastnn.load(tmp_path / "m.npz")
    assert loaded.init_args == model.init_args


def test_saved_files_are_readable_by_others_as_umask_allows(tmp_path):
    model = FullyConnectedNet([4], input_dim=6, num_classes=3, seed=0)
    old = os.umask(0o022)
    try:
        fastnn.save(model, tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o644


def test_conv_net_round_trip(backend, tmp_path):
    """Parameters, init arguments and every batchnorm's running statistics come back."""
    from fastnn.classifiers import ConvNet

    xp = backend
    model = ConvNet(widths=(3, 4), stem_width=2, input_dim=(2, 8, 6), num_classes=3, reg=0.2,
                    dtype=np.float64, seed=5, label_smoothing=0.1)
    rng = np.random.default_rng(7)
    for _ in range(2):
        X = xp.asarray(rng.standard_normal((4, 2, 8, 6)) * 2 + 1)
        model.loss(X, xp.asarray(rng.integers(0, 3, 4)))
    fastnn.save(model, tmp_path / "conv.npz")
    loaded = fastnn.load(tmp_path / "conv.npz")
    assert isinstance(loaded, ConvNet) and loaded.init_args == model.init_args
    for name, value in model.params.items():
        np.testing.assert_array_equal(fastnn.to_numpy(loaded.params[name]), fastnn.to_numpy(value))
    for key, bn_param in model.norm_params.items():
        for stat in ("running_mean", "running_var"):
            np.testing.assert_array_equal(fastnn.to_numpy(loaded.norm_params[key][stat]),
                                          fastnn.to_numpy(bn_param[stat]))
    X = xp.asarray(rng.standard_normal((3, 2, 8, 6)))
    np.testing.assert_array_equal(fastnn.to_numpy(loaded.loss(X)), fastnn.to_numpy(model.loss(X)))


def test_round_trip_keeps_a_drawn_dropout_seed_and_a_later_reg(tmp_path):
    """An unseeded net's dropout seed is drawn at construction, and classic code sets
    model.reg after it: a loaded model trains with the same masks and the same L2."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 6)).astype(np.float32), rng.integers(0, 3, 5)
    model = FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0.5)
    model.reg = 0.5
    fastnn.save(model, tmp_path / "m.npz")
    loaded = fastnn.load(tmp_path / "m.npz")
    assert loaded.dropout_param["seed"] == model.dropout_param["seed"]
    assert loaded.reg == 0.5
    assert float(loaded.loss(X, y)[0]) == float(model.loss(X, y)[0])


def _with_header(tmp_path, **changes):
    """A saved fc_bn_dropout model whose metadata got `changes` (init_args merged) -> its path."""
    from fastnn.serialization import MODEL_FORMAT, read_npz, write_npz

    path = tmp_path / "model.npz"
    fastnn.save(_trained("fc_bn_dropout", np), path)
    arrays, meta = read_npz(path, MODEL_FORMAT)
    meta["init_args"].update(changes.pop("init_args", {}))
    write_npz(path, arrays, {**meta, **changes})
    return path


@pytest.mark.parametrize("init_args", [{"hidden_dims": [1e7, 1e7]}, {"input_dim": 10**9},
                                       {"num_classes": float("inf")}])
def test_a_header_declaring_huge_sizes_is_refused_before_allocating(tmp_path, init_args):
    import tracemalloc

    path = _with_header(tmp_path, init_args=init_args)
    key = next(iter(init_args))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"model.npz is incompatible: its init_args {key} "
                                             ".* exceed the .* numbers its arrays hold") as info:
            fastnn.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and "\n" not in str(info.value)


@pytest.mark.parametrize("seed", ["x", -1, 1.5, True])
def test_a_bad_dropout_seed_names_the_file_and_the_field(tmp_path, seed):
    path = _with_header(tmp_path, dropout_seed=seed)
    with pytest.raises(ValueError, match=f"model.npz is incompatible: its dropout_seed must be a "
                                         f"non-negative integer, got {seed!r}"):
        fastnn.load(path)


def test_a_header_asking_for_more_memory_than_there_is_is_one_line(tmp_path, monkeypatch):
    from fastnn import classifiers

    path = _with_header(tmp_path)

    class Huge(FullyConnectedNet):  # what sizes within the bound may still multiply to
        def __init__(self, *args, **kwargs):
            raise MemoryError

    monkeypatch.setattr(classifiers, "FullyConnectedNet", Huge)
    with pytest.raises(ValueError, match="model.npz is incompatible: its init_args .* ask for "
                                         "more memory than there is"):
        fastnn.load(path)
