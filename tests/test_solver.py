"""Tests for fastnn.solver.Solver: training, histories, the best model, errors, checkpoints."""
import numpy as np
import pytest

import fastnn
from fastnn import optim
from fastnn.classifiers import FullyConnectedNet, TwoLayerNet
from fastnn.solver import Solver


def _data(n_train=50, n_val=20, shape=(3, 8, 8), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return dict(X_train=rng.standard_normal((n_train, *shape)).astype(np.float32),
                y_train=rng.integers(0, classes, n_train),
                X_val=rng.standard_normal((n_val, *shape)).astype(np.float32),
                y_val=rng.integers(0, classes, n_val))


def _small(seed=0, **kwargs):
    """A small net over 12 features and 4 classes (fast)."""
    options = dict(input_dim=12, num_classes=4, weight_scale=0.1, seed=seed)
    options.update(kwargs)
    return FullyConnectedNet([16, 8], **options)


def _small_data(n_train=40, n_val=15, seed=1):
    return _data(n_train, n_val, shape=(12,), classes=4, seed=seed)


def _host_params(model):
    """Host copies (to_numpy of a numpy array is the array itself, updated in place later)."""
    return {k: fastnn.to_numpy(v).copy() for k, v in model.params.items()}


def _assert_finite(params):
    bad = [name for name, value in params.items() if not np.isfinite(fastnn.to_numpy(value)).all()]
    assert not bad, f"non-finite parameters: {bad}"


def _assert_params_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(fastnn.to_numpy(a[name]), fastnn.to_numpy(b[name]), err_msg=name)


# -- training ----------------------------------------------------------------------------
@pytest.mark.parametrize("rule, lr", [("sgd_momentum", 2e-2), ("adam", 5e-3)])
def test_overfits_small_data(backend, rule, lr):
    data = _data()
    model = FullyConnectedNet([100, 100], input_dim=3 * 8 * 8, weight_scale=0.1, seed=0)
    solver = Solver(model, data, update_rule=rule, optim_config={"learning_rate": lr},
                    num_epochs=20, batch_size=25, verbose=False, seed=0)
    assert isinstance(solver.X_train, backend.ndarray)  # the data live on the active backend
    assert isinstance(solver.y_val, backend.ndarray)
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.loss_history[-1] < 0.2 * solver.loss_history[0]


def test_overfits_a_small_conv_batch(backend):
    from fastnn.classifiers import ConvNet

    data = _data(n_train=20, n_val=10)
    model = ConvNet(widths=(8, 16), stem_width=8, input_dim=(3, 8, 8), seed=0)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 5e-3},
                    num_epochs=20, batch_size=10, verbose=False, seed=0)
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.loss_history[-1] < 0.2 * solver.loss_history[0]


def test_histories_are_python_floats_with_contract_lengths(backend):
    data = _small_data(n_train=53)  # 53 // 10 = 5 iterations per epoch
    solver = Solver(_small(), data, num_epochs=3, batch_size=10, print_every=7, verbose=False,
                    seed=0)
    solver.train()
    assert len(solver.loss_history) == 3 * 5
    # one entry at the first iteration, then one per epoch end (the last iteration is one)
    assert len(solver.train_acc_history) == len(solver.val_acc_history) == 1 + 3
    for history in (solver.loss_history, solver.train_acc_history, solver.val_acc_history):
        assert all(type(v) is float for v in history)
    assert type(solver.best_val_acc) is float
    assert all(0.0 <= v <= 1.0 for v in solver.train_acc_history + solver.val_acc_history)
    assert solver.best_val_acc == max(solver.val_acc_history)


def test_verbose_prints_progress(capsys):
    Solver(_small(), _small_data(), num_epochs=1, batch_size=10, print_every=2, verbose=True,
           seed=0).train()
    out = capsys.readouterr().out
    assert "Iteration 1 /" in out and "Epoch 1 / 1" in out
    Solver(_small(), _small_data(), num_epochs=1, batch_size=10, verbose=False, seed=0).train()
    assert capsys.readouterr().out == ""


def test_best_params_restored_after_training(backend):
    data = _small_data()

    def run(num_epochs):
        model = _small(use_batchnorm=True, dropout=0.1)
        solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2},
                        num_epochs=num_epochs, batch_size=10, verbose=False, seed=0)
        solver.train()
        return solver, model

    solver, model = run(6)
    _assert_params_equal(model.params, solver.best_params)
    assert solver.best_val_acc == max(solver.val_acc_history)
    # the restored model scores that accuracy again
    assert solver.check_accuracy(data["X_val"], data["y_val"]) == solver.best_val_acc

    # The same run stopped at the best epoch ends in the state the restore must give back,
    # batchnorm running statistics included. (Entry k of the history is epoch k's end.)
    best_epoch = solver.val_acc_history.index(solver.best_val_acc)
    assert 1 <= best_epoch < 6, "this seed should peak mid-run, else the check is empty"
    _, model_at_best = run(best_epoch)
    _assert_params_equal(model.params, model_at_best.params)
    for restored, expected in zip(model.bn_params, model_at_best.bn_params):
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(fastnn.to_numpy(restored[key]),
                                          fastnn.to_numpy(expected[key]), err_msg=key)


def test_check_accuracy_is_a_python_float(backend):
    data = _small_data()
    model = _small()
    solver = Solver(model, data, verbose=False, seed=0)
    acc = solver.check_accuracy(data["X_val"], data["y_val"])
    assert type(acc) is float
    scores = fastnn.to_numpy(model.loss(fastnn.xp().asarray(data["X_val"])))
    assert acc == pytest.approx(np.mean(scores.argmax(1) == data["y_val"]))
    assert acc == solver.check_accuracy(data["X_val"], data["y_val"], batch_size=4)
    sub = solver.check_accuracy(data["X_train"], data["y_train"], num_samples=10)
    assert type(sub) is float and round(sub * 10) == pytest.approx(sub * 10)


# -- options ----------------------------------------------------------------------------------
def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        Solver(_small(), _small_data(), learning_rate=0.1)


def test_unknown_update_rule_is_named():
    with pytest.raises(ValueError, match="adagrad"):
        Solver(_small(), _small_data(), update_rule="adagrad")


@pytest.mark.parametrize("rule, key", [("adam", "learnin_rate"), ("adam", "weight_decay"),
                                       ("sgd", "momentum")])
def test_unknown_optim_config_key_is_named(rule, key):
    with pytest.raises(ValueError, match=f"unknown keys \\['{key}'\\] for update rule '{rule}'"):
        Solver(_small(), _small_data(), update_rule=rule, optim_config={key: 0.1})


@pytest.mark.parametrize("options, error, match", [
    (dict(num_epochs=2.5), TypeError, "num_epochs must be an integer, got 2.5"),
    (dict(batch_size="10"), TypeError, "batch_size must be an integer, got '10'"),
    (dict(print_every=True), TypeError, "print_every must be an integer, got True"),
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
    (dict(num_epochs=-1), ValueError, "num_epochs must be an integer >= 0, got -1"),
    (dict(num_train_samples=0), ValueError, "num_train_samples must be an integer >= 1, got 0"),
    (dict(num_val_samples=1.5), TypeError, "num_val_samples must be an integer, got 1.5"),
    (dict(lr_decay=0), ValueError, "lr_decay must be a positive finite number, got 0"),
    (dict(lr_decay=float("nan")), ValueError, "lr_decay must be a positive finite number"),
    (dict(optim_config={"learning_rate": -1}), ValueError,
     r"optim_config\['learning_rate'\] must be a positive finite number, got -1"),
    (dict(optim_config={"learning_rate": float("inf")}), ValueError,
     r"optim_config\['learning_rate'\] must be a positive finite number, got inf"),
    (dict(optim_config={"learning_rate": "1e-3"}), TypeError,
     r"optim_config\['learning_rate'\] must be a number, got '1e-3'"),
    (dict(update_rule="sgd_momentum", optim_config={"momentum": 1.0}), ValueError,
     r"optim_config\['momentum'\] must be a finite number in \[0, 1\), got 1.0"),
    (dict(update_rule="adam", optim_config={"beta2": -0.1}), ValueError, r"\['beta2'\]"),
    (dict(update_rule="rmsprop", optim_config={"decay_rate": 1.5}), ValueError,
     r"\['decay_rate'\]"),
    (dict(update_rule="adam", optim_config={"epsilon": 0}), ValueError, r"\['epsilon'\]"),
    (dict(update_rule="adamw", optim_config={"weight_decay": -1e-4}), ValueError,
     r"optim_config\['weight_decay'\] must be a finite number >= 0"),
    (dict(lr_schedule="step", lr_schedule_config={"step_epochs": 1.5}), TypeError,
     r"lr_schedule_config\['step_epochs'\] must be an integer, got 1.5"),
    (dict(lr_schedule="step", lr_schedule_config={"gamma": -0.5}), ValueError,
     r"lr_schedule_config\['gamma'\] must be a positive finite number, got -0.5"),
    (dict(lr_schedule="onecycle", lr_schedule_config={"pct_start": 2}), ValueError,
     r"lr_schedule_config\['pct_start'\] must be a finite number in \[0, 1\], got 2"),
])
def test_bad_option_values_are_named(options, error, match):
    with pytest.raises(error, match=match):
        Solver(_small(), _small_data(), verbose=False, **options)


def test_bad_crop_padding_is_named():
    model = FullyConnectedNet([8], input_dim=3 * 8 * 8, seed=0)
    with pytest.raises(TypeError, match="crop_padding must be an integer, got 2.5"):
        Solver(model, _data(), verbose=False, augment={"crop_padding": 2.5})
    with pytest.raises(ValueError, match=r"crop_padding must be an integer in \[0, 7\], got 8"):
        Solver(model, _data(), verbose=False, augment={"crop_padding": 8})


def test_numpy_integer_and_float_options_become_python_numbers():
    """Numpy scalars (e.g. from a grid made with np.arange) are taken exactly."""
    solver = Solver(_small(), _small_data(), verbose=False, seed=0, batch_size=np.int8(10),
                    num_epochs=np.uint64(2), print_every=np.int16(5), num_train_samples=np.int32(20),
                    lr_decay=np.float32(0.5), update_rule="sgd_momentum",
                    optim_config={"learning_rate": np.float64(0.01), "momentum": np.float32(0.5)})
    for value in (solver.batch_size, solver.num_epochs, solver.print_every,
                  solver.num_train_samples):
        assert type(value) is int
    assert type(solver.lr_decay) is float
    assert all(type(v) is float for v in solver.optim_config.values())
    solver.train()
    assert len(solver.loss_history) == 2 * 4  # 40 images in batches of 10, two epochs
    with pytest.raises(TypeError, match="num_samples must be an integer, got 2.5"):
        solver.check_accuracy(solver.X_val, solver.y_val, num_samples=2.5)


def test_lr_decay_each_epoch(backend):
    solver = Solver(_small(), _small_data(), update_rule="sgd_momentum",
                    optim_config={"learning_rate": 0.01}, lr_decay=0.5, num_epochs=3,
                    batch_size=10, verbose=False, seed=0)
    solver.train()
    for name, config in solver.optim_configs.items():
        assert config["learning_rate"] == pytest.approx(0.01 * 0.5 ** 3, rel=1e-12), name


def test_lr_decay_with_default_learning_rate():
    solver = Solver(_small(), _small_data(), update_rule="adam", lr_decay=0.9, num_epochs=2,
                    batch_size=20, verbose=False, seed=0)
    solver.train()
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(1e-3 * 0.9 ** 2, rel=1e-12)


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "rmsprop", "adam"])
def test_fused_and_functional_updates_agree(backend, rule):
    runs = []
    for fused in (True, False):
        model = _small(seed=3, use_batchnorm=True, dropout=0.2)
        solver = Solver(model, _small_data(), update_rule=rule, num_epochs=2, batch_size=10,
                        fused_updates=fused, verbose=False, seed=5)
        solver.train()
        runs.append((solver, model))
    (a, model_a), (b, model_b) = runs
    assert a.loss_history == b.loss_history
    _assert_params_equal(model_a.params, model_b.params)


@pytest.mark.parametrize("rule", ["adam", "adamw", "sgd_momentum"])
def test_step_scalars_are_arrays_rewritten_in_place(backend, monkeypatch, rule):
    """Every op of a step reads its step scalars from arrays of the backend that stay the
    same objects from step to step while their values change (what a CUDA graph of the
    step needs): the update ops' scalar rows (schedule x learning rate, Adam's bias
    corrections) and the dropout and augment step. A scalar passed as a Python number
    (baked into the call) fails here."""
    from fastnn import kernels

    table = kernels.for_module(backend)
    seen = {"update": [], "dropout": [], "augment": []}

    def spy(kind, op, position):
        def call(*args, **kwargs):
            value = args[position]
            seen[kind].append((args[0], value, fastnn.to_numpy(value).copy()))
            return op(*args, **kwargs)
        return call

    op = optim.SPECS[rule].op
    monkeypatch.setattr(table, op, spy("update", getattr(table, op), 3))
    monkeypatch.setattr(table, "dropout_forward", spy("dropout", table.dropout_forward, 3))
    monkeypatch.setattr(table, "flip_crop", spy("augment", table.flip_crop, 2))
    model = FullyConnectedNet([6, 5], input_dim=3 * 4 * 4, num_classes=3, dropout=0.3,
                              use_batchnorm=True, weight_scale=0.1, seed=2)
    before = dict(model.params)
    data = _data(n_train=12, n_val=6, shape=(3, 4, 4), classes=3)
    solver = Solver(model, data, update_rule=rule, batch_size=4, num_epochs=1, seed=0,
                    lr_schedule="cosine", augment={"crop_padding": 1}, verbose=False)
    solver.train()
    steps, names = 3, len(model.params)
    assert len(seen["update"]) == steps * names
    for j, name in enumerate(model.params):
        calls = seen["update"][j::names]
        assert all(w is model.params[name] for w, _, _ in calls)
        rows = [h for _, h, _ in calls]
        assert isinstance(rows[0], backend.ndarray) and all(h is rows[0] for h in rows)
        values = [v for _, _, v in calls]
        for a, b in zip(values, values[1:]):
            assert not np.array_equal(a, b), name  # the schedule (and t) moved them
    for kind, per_step in (("dropout", 2), ("augment", 1)):  # two dropout layers
        counters = [step for _, step, _ in seen[kind]]
        assert len(counters) == steps * per_step
        assert isinstance(counters[0], backend.ndarray) and counters[0].shape == ()
        assert all(c is counters[0] for c in counters)
        assert [int(v) for _, _, v in seen[kind]] == [t for t in range(steps)
                                                        for _ in range(per_step)]
    # the in-place path never rebinds a parameter (one flat buffer may back them later)
    assert all(model.params[name] is array for name, array in before.items())


def test_scalar_rows_match_the_functional_rules_scalars(backend):
    """The rows begin_step writes are the op's scalars of the functional path, cast to w's
    dtype (the numpy path's results stay bit for bit those of Python floats)."""
    w = backend.zeros((3, 2), dtype=np.float32)
    config = {"learning_rate": 3e-3}
    rows = None
    for t in (1, 2):
        rows_before = rows
        rows = optim.begin_step("adam", w, config, rows)
        assert rows_before is None or rows is rows_before
        assert config["t"] == t
        expected = np.array([optim.SPECS["adam"].scalars(config)], dtype=np.float32)
        np.testing.assert_array_equal(fastnn.to_numpy(rows), expected)


def test_sampling_with_replacement(backend):
    histories = []
    for sampling in ("replacement", "replacement", "epoch"):
        solver = Solver(_small(), _small_data(), sampling=sampling, num_epochs=2, batch_size=10,
                        verbose=False, seed=0)
        solver.train()
        assert len(solver.loss_history) == 2 * 4
        assert all(np.isfinite(solver.loss_history))
        histories.append(solver.loss_history)
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]
    with pytest.raises(ValueError, match="sampling"):
        Solver(_small(), _small_data(), sampling="bootstrap")


@pytest.mark.parametrize("verbose", [False, True])
def test_losses_are_read_only_when_shown_and_at_epoch_ends(verbose, capsys):
    data = _small_data(n_train=40)  # 4 iterations per epoch
    solver = Solver(_small(), data, num_epochs=2, batch_size=10, print_every=1, verbose=verbose,
                    seed=0)
    reads = []
    read = solver._read_losses

    def spy():
        if solver._pending_losses:
            reads.append(solver._t)
        read()

    solver._read_losses = spy
    solver.train()
    assert reads == ([1, 2, 3, 4, 5, 6, 7, 8] if verbose else [1, 4, 8])
    assert len(solver.loss_history) == 8


def test_replacement_sampling_copies_indices_once_per_epoch(monkeypatch):
    """The epoch's draws are made at once: one index array per epoch, sliced per step."""
    solver = Solver(_small(), _small_data(n_train=40), num_epochs=2, batch_size=10,
                    sampling="replacement", verbose=False, seed=0)
    orders = []
    step = solver._step

    def spy():
        step()
        if not orders or orders[-1] is not solver._epoch_order:
            orders.append(solver._epoch_order)

    solver._step = spy
    solver.train()
    assert len(orders) == 2 and all(o.shape == (40,) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert len(set(orders[0].tolist())) < 40  # drawn with replacement (fixed seed)


def test_same_seed_same_run(backend):
    def run(seed):
        model = _small(seed=2, dropout=0.3)
        solver = Solver(model, _small_data(), update_rule="adam", num_epochs=2, batch_size=10,
                        verbose=False, seed=seed)
        solver.train()
        return solver, model

    (a, ma), (b, mb), (c, _) = run(7), run(7), run(8)
    assert a.loss_history == b.loss_history
    assert a.train_acc_history == b.train_acc_history and a.val_acc_history == b.val_acc_history
    _assert_params_equal(ma.params, mb.params)
    assert a.loss_history != c.loss_history


def test_seed_none_follows_np_random():
    def run():
        np.random.seed(11)
        solver = Solver(_small(seed=1), _small_data(), num_epochs=1, batch_size=10, verbose=False)
        solver.train()
        return solver.loss_history

    assert run() == run()


def test_two_layer_net_trains(backend):
    data = _small_data()
    np.random.seed(0)
    model = TwoLayerNet(input_dim=12, hidden_dim=20, num_classes=4, weight_scale=0.1)
    solver = Solver(model, data, update_rule="sgd", optim_config={"learning_rate": 0.1},
                    num_epochs=5, batch_size=10, verbose=False, seed=0)
    solver.train()
    assert solver.loss_history[-1] < solver.loss_history[0]


# -- bad data -------------------------------------------------------------------------------
@pytest.mark.parametrize("split, labels", [
    ("y_train", "too_high"), ("y_train", "negative"), ("y_val", "too_high"), ("y_val", "negative")])
def test_labels_out_of_range(split, labels):
    data = _small_data()
    data[split] = data[split].copy()
    data[split][3] = 4 if labels == "too_high" else -1
    with pytest.raises(ValueError, match=split):
        Solver(_small(), data, verbose=False)


@pytest.mark.parametrize("split", ["y_train", "y_val"])
def test_non_integer_labels(split):
    data = _small_data()
    data[split] = data[split].astype(np.float64)
    with pytest.raises(ValueError):
        Solver(_small(), data, verbose=False)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_split_is_named(split):
    data = _small_data()
    data[f"X_{split}"], data[f"y_{split}"] = data[f"X_{split}"][:0], data[f"y_{split}"][:0]
    with pytest.raises(ValueError, match=f"the {split} split is empty"):
        Solver(_small(), data, verbose=False)


def test_labels_may_be_lists():
    data = _small_data()
    data["y_train"], data["y_val"] = data["y_train"].tolist(), data["y_val"].tolist()
    solver = Solver(_small(), data, num_epochs=1, batch_size=10, verbose=False, seed=0)
    solver.train()
    assert solver.y_train.dtype == np.int64


@pytest.mark.parametrize("split", ["train", "val"])
def test_mismatched_lengths(split):
    data = _small_data()
    data[f"y_{split}"] = data[f"y_{split}"][:-1]
    with pytest.raises(ValueError):
        Solver(_small(), data, verbose=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_from_huge_learning_rate(backend):
    model = _small()
    solver = Solver(model, _small_data(), update_rule="sgd", optim_config={"learning_rate": 1e10},
                    num_epochs=5, batch_size=10, verbose=False, seed=0)
    with pytest.raises(FloatingPointError, match=r"iteration \d+"):
        solver.train()
    _assert_finite(model.params)
    _assert_params_equal(model.params, solver.best_params)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("hidden", [[], [16, 8]], ids=["softmax_only", "hidden_layers"])
def test_non_finite_loss_from_inf_input_keeps_finite_params(backend, hidden):
    """An inf input makes the very first loss NaN: FloatingPointError, and model.params
    still finite (the initial ones, the only finite ones seen).

    With hidden layers the NaN passes through relu units on its way to the loss.
    """
    data = _small_data()
    model = FullyConnectedNet(hidden, input_dim=12, num_classes=4, weight_scale=0.1, seed=0)
    initial = _host_params(model)
    solver = Solver(model, data, num_epochs=2, batch_size=len(data["X_train"]), verbose=False,
                    seed=0)
    # Solver refuses non-finite data up front; put the inf in after that check
    solver.X_train[3, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"iteration \d+"):
        solver.train()
    _assert_finite(model.params)
    _assert_params_equal(model.params, initial)



@pytest.mark.parametrize("flip", ["random", "Alternate", None, 2])
def test_bad_flip_is_named(flip):
    model = FullyConnectedNet([8], input_dim=3 * 8 * 8, seed=0)
    with pytest.raises(ValueError, match=f"flip must be True .* or 'alternate' .*got {flip!r}"):
        Solver(model, _data(), verbose=False, augment={"flip": flip})


def test_bad_padding_mode_is_named():
    model = FullyConnectedNet([8], input_dim=3 * 8 * 8, seed=0)
    with pytest.raises(ValueError, match=r"padding_mode must be one of \('zeros', 'reflect'\), "
                                         "got 'edge'"):
        Solver(model, _data(), verbose=False, augment={"padding_mode": "edge"})


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_translations_shift_in_zeros_or_the_reflection(backend, mode):
    """padding_mode 'reflect' (airbench's translations): no zero is shifted in."""
    data = _indexed_images(12)
    data["X_train"] = np.abs(data["X_train"]) + 1
    model = FullyConnectedNet([6], input_dim=30, num_classes=3, weight_scale=0.1, seed=0)
    batches = _training_batches(model)
    Solver(model, data, batch_size=4, num_epochs=2, seed=3, verbose=False,
           augment={"flip": "alternate", "crop_padding": 2, "padding_mode": mode}).train()
    zeros = sum(int((batch == 0).sum()) for batch in batches)
    assert (zeros == 0) == (mode == "reflect")


def _indexed_images(n, seed=0):
    """Images (n, 2, 3, 5): channel 0 holds the image's index everywhere (mirroring keeps
    it), channel 1 random (mirroring changes it)."""
    X = np.random.default_rng(seed).standard_normal((n, 2, 3, 5)).astype(np.float32)
    X[:, 0] = np.arange(n)[:, None, None]
    return dict(X_train=X, y_train=np.arange(n) % 3, X_val=X[:4], y_val=np.arange(4) % 3)


def _training_batches(model):
    """Host copies of the batches model.loss trains on, in order (the spy wraps model.loss)."""
    batches, loss = [], model.loss

    def spy(X, y=None):
        if y is not None:
            batches.append(fastnn.to_numpy(X).copy())
        return loss(X, y)

    model.loss = spy
    return batches


def test_alternating_flips_by_image_and_epoch(backend):
    """augment flip 'alternate': in epoch 0 image i is mirrored by its coin (computed here by
    hand from the Solver's augment seed), in every later epoch the opposite of the epoch
    before; each epoch still sees every image once."""
    from fastnn.kernels import rng as keyed

    data = _indexed_images(12)
    model = FullyConnectedNet([6], input_dim=30, num_classes=3, weight_scale=0.1, seed=0)
    batches = _training_batches(model)
    solver = Solver(model, data, batch_size=4, num_epochs=4, seed=3, verbose=False,
                    augment={"flip": "alternate", "crop_padding": 0})
    solver.train()
    seed_key = keyed.mix64(keyed.mix64(solver._augment_seed * keyed.GOLDEN + keyed.FLIP_STREAM))
    coins = [keyed.mix64(seed_key + i * keyed.GOLDEN) >> 63 == 1 for i in range(12)]
    assert 0 < sum(coins) < 12
    assert len(batches) == 4 * 3
    for epoch in range(4):
        images = np.concatenate(batches[3 * epoch:3 * epoch + 3])
        index = images[:, 0, 0, 0].astype(int)
        assert sorted(index) == list(range(12))
        for i, image in zip(index, images):
            original = data["X_train"][i]
            mirrored = not np.array_equal(image, original)
            if mirrored:
                np.testing.assert_array_equal(image, original[..., ::-1])
            assert mirrored == (coins[i] != (epoch % 2 == 1)), (epoch, i)

# -- checkpoints ------------------------------------------------------------------------------
def _resumable(seed=4, kind="fc", **kwargs):
    if kind == "fc":
        model = _small(seed=seed, use_batchnorm=True, dropout=0.2)
    else:
        np.random.seed(seed)
        model = TwoLayerNet(input_dim=12, hidden_dim=10, num_classes=4, weight_scale=0.1)
    options = dict(update_rule="adam", optim_config={"learning_rate": 5e-3}, lr_decay=0.9,
                   batch_size=8, verbose=False, seed=9, num_train_samples=20)
    options.update(kwargs)
    return model, options


def _scramble(model):
    for name, value in model.params.items():
        model.params[name] = value + 1.0


@pytest.mark.parametrize("kind", ["fc", "two_layer"])
def test_checkpoint_resume_is_bit_identical(backend, tmp_path, kind):
    """2 epochs, checkpoint, 2 more == 4 epochs in one go (same seeds), bit for bit,
    on each backend."""
    data = _small_data()
    path = tmp_path / "run.npz"

    model, options = _resumable(kind=kind)
    first = Solver(model, data, num_epochs=2, checkpoint_path=str(path), **options)
    first.train()
    assert path.exists()

    model, options = _resumable(kind=kind)
    _scramble(model)  # the checkpoint must replace the weights
    resumed = Solver(model, data, num_epochs=4, **options)
    resumed.load_checkpoint(str(path))
    assert resumed.epoch == 2
    resumed.train()

    model_full, options = _resumable(kind=kind)
    full = Solver(model_full, data, num_epochs=4, **options)
    full.train()

    assert resumed.loss_history == full.loss_history
    assert resumed.train_acc_history == full.train_acc_history
    assert resumed.val_acc_history == full.val_acc_history
    assert resumed.best_val_acc == full.best_val_acc
    _assert_params_equal(model.params, model_full.params)
    for a, b in zip(getattr(model, "bn_params", []), getattr(model_full, "bn_params", [])):
        for key in ("running_mean", "running_var"):
            assert isinstance(a[key], backend.ndarray)
            np.testing.assert_array_equal(fastnn.to_numpy(a[key]), fastnn.to_numpy(b[key]))


def test_checkpoint_moves_between_backends(backend, tmp_path):
    """A checkpoint written on one backend resumes on the other with the same state."""
    data = _small_data()
    path = tmp_path / "run.npz"
    model, options = _resumable()
    solver = Solver(model, data, num_epochs=1, checkpoint_path=str(path), **options)
    solver.train()
    from fastnn.serialization import read_npz

    arrays, _ = read_npz(path, "fastnn-checkpoint")
    saved = {name: arrays[f"model/param/{name}"] for name in model.params}
    saved_bn = [arrays[f"model/norm/{key}/running_var"] for key in model.norm_params]
    for target in ("numpy", fastnn.get_backend()):
        with fastnn.use_backend(target):
            other, options = _resumable()
            _scramble(other)
            resumed = Solver(other, data, num_epochs=2, **options)
            resumed.load_checkpoint(str(path))
            assert resumed.epoch == 1
            for name, value in other.params.items():
                assert isinstance(value, fastnn.xp().ndarray), name
            _assert_params_equal(other.params, saved)
            for p, want in zip(other.bn_params, saved_bn):
                np.testing.assert_array_equal(fastnn.to_numpy(p["running_var"]), want)
            resumed.train()  # and it trains on from there
            _assert_finite(other.params)


def test_save_checkpoint_then_load_restores_state(tmp_path):
    data = _small_data()
    model, options = _resumable()
    solver = Solver(model, data, num_epochs=1, **options)
    solver.train()
    path = tmp_path / "state.npz"
    solver.save_checkpoint(str(path))
    model2, options = _resumable()
    _scramble(model2)
    other = Solver(model2, data, num_epochs=1, **options)
    other.load_checkpoint(str(path))
    _assert_params_equal(model2.params, model.params)
    assert other.loss_history == solver.loss_history
    assert other.best_val_acc == solver.best_val_acc
    assert other.epoch == solver.epoch
    for name in model.params:
        a, b = solver.optim_configs[name], other.optim_configs[name]
        assert set(a) == set(b)
        assert a["t"] == b["t"] and a["learning_rate"] == b["learning_rate"]
        np.testing.assert_array_equal(fastnn.to_numpy(a["m"]), fastnn.to_numpy(b["m"]))


def test_checkpoint_name_writes_one_file_per_epoch(tmp_path):
    prefix = tmp_path / "ck"
    Solver(_small(), _small_data(), num_epochs=2, batch_size=20, verbose=False, seed=0,
           checkpoint_name=str(prefix)).train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ck_epoch_1.npz", "ck_epoch_2.npz"]


def test_truncated_checkpoint_is_value_error(tmp_path):
    model, options = _resumable()
    solver = Solver(model, _small_data(), num_epochs=1, **options)
    path = tmp_path / "state.npz"
    solver.save_checkpoint(str(path))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        solver.load_checkpoint(str(path))


def test_checkpoint_of_another_model_is_value_error(tmp_path):
    data = _small_data()
    model, options = _resumable()
    path = tmp_path / "state.npz"
    Solver(model, data, num_epochs=1, **options).save_checkpoint(str(path))
    other = FullyConnectedNet([16, 9], input_dim=12, num_classes=4, seed=0, use_batchnorm=True,
                              dropout=0.2)
    with pytest.raises(ValueError, match="incompatible"):
        Solver(other, data, **options).load_checkpoint(str(path))
    model, options = _resumable()
    options["update_rule"] = "sgd"
    with pytest.raises(ValueError, match="incompatible"):
        Solver(model, data, **options).load_checkpoint(str(path))


def test_model_file_is_not_a_checkpoint(tmp_path):
    model, options = _resumable()
    path = tmp_path / "model.npz"
    fastnn.save(model, str(path))
    with pytest.raises(ValueError, match="incompatible"):
        Solver(model, _small_data(), **options).load_checkpoint(str(path))


def test_missing_checkpoint_is_file_not_found(tmp_path):
    model, options = _resumable()
    with pytest.raises(FileNotFoundError):
        Solver(model, _small_data(), **options).load_checkpoint(str(tmp_path / "nope.npz"))


def test_resume_without_seeds_is_bit_identical(tmp_path):
    """No model seed (dropout seed drawn), no Solver seed, augmentation on: still exact."""
    data = _data(n_train=40, n_val=15, shape=(3, 4, 4), classes=4, seed=1)
    path = tmp_path / "run.npz"

    def build():
        np.random.seed(5)  # the weights; the seeds drawn below differ between builds
        model = FullyConnectedNet([16], input_dim=48, num_classes=4, dropout=0.3,
                                  weight_scale=0.1)
        options = dict(update_rule="adam", batch_size=8, verbose=False,
                       augment={"flip": True, "crop_padding": 1},
                       num_train_samples=20)
        return model, options

    model, options = build()
    first = Solver(model, data, num_epochs=1, checkpoint_path=str(path), **options)
    first.train()
    full = Solver(model, data, num_epochs=2, **options)
    full.load_checkpoint(str(path))
    full.train()

    model2, options = build()
    np.random.seed(123)  # another Solver seed and dropout seed if they were not restored
    model2.dropout_param["seed"] = 77
    resumed = Solver(model2, data, num_epochs=2, **options)
    resumed.load_checkpoint(str(path))
    resumed.train()
    assert resumed.loss_history == full.loss_history
    _assert_params_equal(model2.params, model.params)



def test_resume_with_alternating_flips_is_bit_identical(backend, tmp_path):
    """Alternating flips and translations: 1 epoch, checkpoint, 2 more (the flips reversed
    across the boundary) == 3 epochs in one go, bit for bit; and not random flips' run."""
    data = _data(n_train=24, n_val=8, shape=(3, 4, 4), classes=4, seed=2)
    path = tmp_path / "run.npz"

    def build(flip="alternate"):
        model = FullyConnectedNet([16], input_dim=48, num_classes=4, weight_scale=0.1, seed=5)
        return model, dict(update_rule="sgd_momentum", batch_size=8, verbose=False, seed=7,
                           optim_config={"learning_rate": 0.05},
                           augment={"flip": flip, "crop_padding": 1})

    model, options = build()
    Solver(model, data, num_epochs=1, checkpoint_path=str(path), **options).train()
    model, options = build()
    resumed = Solver(model, data, num_epochs=3, **options)
    resumed.load_checkpoint(str(path))
    assert resumed.epoch == 1
    resumed.train()

    model_full, options = build()
    full = Solver(model_full, data, num_epochs=3, **options)
    full.train()
    assert resumed.loss_history == full.loss_history
    _assert_params_equal(model.params, model_full.params)

    model_random, options = build(flip=True)
    random = Solver(model_random, data, num_epochs=3, **options)
    random.train()
    assert random.loss_history[3:] != full.loss_history[3:]

def test_adamw_decays_the_declared_weights():
    model = _small()
    model.param_roles["b2"] = "weight"  # a role, not a name, decides
    solver = Solver(model, _small_data(), update_rule="adamw", verbose=False, seed=0,
                    optim_config={"weight_decay": 0.3})
    for name, role in model.param_roles.items():
        assert solver.optim_configs[name]["weight_decay"] == (0.3 if role == "weight" else 0.0), name


def test_adamw_needs_declared_roles():
    class Bare:  # a course-style model: params and loss only
        def __init__(self):
            self.inner = _small()
            self.params = self.inner.params

        def loss(self, X, y=None):
            return self.inner.loss(X, y)

    with pytest.raises(ValueError, match="declares no param_roles"):
        Solver(Bare(), _small_data(), update_rule="adamw", verbose=False)
    Solver(Bare(), _small_data(), update_rule="adam", verbose=False, num_epochs=1).train()


def test_a_version_1_checkpoint_resumes(tmp_path):
    """Checkpoints written before norm_params (bn/{i} keys, format version 1) still resume."""
    from fastnn.solver import CHECKPOINT_FORMAT
    from fastnn.serialization import read_npz, write_npz

    data = _small_data()
    model, options = _resumable()
    solver = Solver(model, data, num_epochs=1, **options)
    solver.train()
    solver.save_checkpoint(str(tmp_path / "new.npz"))
    arrays, meta = read_npz(tmp_path / "new.npz", CHECKPOINT_FORMAT, 2)

    def old_name(name):
        parts = name.split("/")
        if parts[0] == "best_norm":
            return f"best_bn/{int(parts[1]) - 1}/{parts[2]}"
        if parts[:2] == ["model", "norm"]:
            return f"model/bn/{int(parts[2]) - 1}/{parts[3]}"
        return name

    write_npz(tmp_path / "old.npz", {old_name(k): v for k, v in arrays.items()},
              {**meta, "format_version": 1})
    results = []
    for name in ("new.npz", "old.npz"):
        model2, options = _resumable()
        resumed = Solver(model2, data, num_epochs=2, **options)
        resumed.load_checkpoint(str(tmp_path / name))
        resumed.train()
        results.append((resumed.loss_history, _host_params(model2),
                        [fastnn.to_numpy(p["running_var"]) for p in model2.norm_params.values()]))
    assert results[0][0] == results[1][0]
    _assert_params_equal(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_array_equal(a, b)


def test_missing_data_key_is_a_value_error():
    with pytest.raises(ValueError, match="X_train"):
        Solver(_small(), {"y_train": np.zeros(3, dtype=int)})


def test_a_conv_batch_is_memorised_with_the_main_jobs_rule():
    """ConvNet, label smoothing and sgd_nesterov (fastnn train's recipe) on 20 random images."""
    from fastnn.classifiers import ConvNet

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    model = ConvNet(widths=(8, 16), stem_width=8, input_dim=(3, 8, 8), seed=0,
                    label_smoothing=0.1)
    solver = Solver(model, {"X_train": X, "y_train": y, "X_val": X, "y_val": y},
                    update_rule="sgd_nesterov", optim_config={"learning_rate": 0.05},
                    batch_size=20, num_epochs=40, verbose=False, seed=0)
    solver.train()
    assert solver.loss_history[-1] < 0.3 * solver.loss_history[0]
    assert solver.best_val_acc == 1.0


@pytest.mark.parametrize("split", ["train", "val"])
def test_nan_data_is_named_before_training(split):
    data = _data()
    data[f"X_{split}"] = data[f"X_{split}"].copy()
    data[f"X_{split}"][3, 0, 1, 2] = np.nan
    model = FullyConnectedNet([8], input_dim=3 * 8 * 8, seed=0)
    with pytest.raises(ValueError, match=f"X_{split} holds 1 NaN or infinite values") as info:
        Solver(model, data, num_epochs=1, verbose=False)
    assert "learning_rate" not in str(info.value)


def test_stacked_solver_differs_from_solver_in_its_parts_only():
    """Solver is built from parts (fastnn.solver_parts: an Updater and a Tracker); StackedSolver
    makes the stack's parts and adds its own API, but overrides none of Solver's loop (it
    overrode 12 hooks of a template method before)."""
    from fastnn.solver_parts import Tracker, Updater
    from fastnn.stacked import StackedSolver
    from fastnn.stacked_parts import StackedTracker, StackedUpdater

    overridden = {name for name, value in vars(StackedSolver).items()
                  if callable(value) and name in dir(Solver)}
    assert overridden == {"__init__", "_make_updater", "_make_tracker", "train"}
    assert issubclass(StackedUpdater, Updater) and issubclass(StackedTracker, Tracker)


def test_solver_attributes_are_its_parts_state(backend):
    """The contract's attributes read and write the parts: one copy of each piece of state."""
    solver = Solver(_small(), _small_data(), num_epochs=1, batch_size=10, verbose=False, seed=0)
    solver.train()
    tracker, updater = solver.tracker, solver.updater
    assert solver.loss_history is tracker.loss_history and len(solver.loss_history) == 4
    assert solver.val_acc_history is tracker.val_acc_history
    assert solver.best_params is tracker.best_params and solver.best_val_acc == tracker.best_val_acc
    assert solver.optim_configs is updater.configs
    solver.loss_history = [1.0]
    assert tracker.loss_history == [1.0]


def _pre21_run(make, path=None):
    """The run tests/data/*_before_issue21.npz was written by (at its epoch 1 of 1), made by
    `make(data, num_epochs)`: resumed from `path` for 3 epochs, or (None) straight through."""
    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((40, 12)), "y_train": rng.integers(0, 4, 40),
            "X_val": rng.standard_normal((12, 12)), "y_val": rng.integers(0, 4, 12)}
    solver = make(data, 3)
    if path is not None:
        solver.load_checkpoint(path)
    solver.train()
    return solver


def test_a_checkpoint_written_before_the_parts_resumes():
    """A checkpoint that Solver wrote before it was made of parts (issue 21) loads into them and
    continues as the uninterrupted run (float64; the file may come from another machine)."""
    import os

    def make(data, num_epochs):
        net = FullyConnectedNet([8], input_dim=12, num_classes=4, dropout=0.25,
                                use_batchnorm=True, reg=0.01, seed=3, dtype=np.float64)
        return Solver(net, data, update_rule="adam", batch_size=10, num_epochs=num_epochs,
                      verbose=False, seed=5, lr_decay=0.9)

    path = os.path.join(os.path.dirname(__file__), "data", "solver_checkpoint_before_issue21.npz")
    resumed, straight = _pre21_run(make, path), _pre21_run(make)
    assert len(resumed.loss_history) == 12 and len(resumed.val_acc_history) == 4
    np.testing.assert_allclose(resumed.loss_history, straight.loss_history, rtol=1e-9)
    for name, value in straight.model.params.items():
        np.testing.assert_allclose(resumed.model.params[name], value, rtol=1e-9, atol=1e-12)


# -- airbench's solver options (issue 22) -----------------------------------------------------
def _airbench_get_lr(step, total_train_steps):
    """airbench94's get_lr, transcribed."""
    warmup_steps = int(total_train_steps * 0.23)
    warmdown_steps = total_train_steps - warmup_steps
    if step < warmup_steps:
        frac = step / warmup_steps
        return 0.2 * (1 - frac) + 1.0 * frac
    frac = (step - warmup_steps) / warmdown_steps
    return 1.0 * (1 - frac) + 0.07 * frac


@pytest.mark.parametrize("total", [1, 3, 10, 486])
def test_triangle_schedule_is_airbenchs_get_lr(total):
    from fastnn import schedules

    for t in range(total):
        assert schedules.lr_factor("triangle", t, total, 7) == pytest.approx(
            _airbench_get_lr(t, total), rel=1e-14, abs=1e-15)
    custom = {"pct_start": 0.5, "start_factor": 0.0, "end_factor": 0.0}
    assert schedules.lr_factor("triangle", 5, 10, 5, custom) == 1.0
    assert schedules.lr_factor("triangle", 2, 10, 5, custom) == pytest.approx(0.4)


def test_linear_schedule_is_airbench94_muons():
    """airbench94_muon: lr = initial * (1 - step / total_train_steps), from the first step."""
    from fastnn import schedules

    for total in (1, 7, 200):
        assert [schedules.lr_factor("linear", t, total, 25) for t in range(total)] == \
            pytest.approx([1 - t / total for t in range(total)], rel=1e-15, abs=1e-15)
    assert schedules.lr_factor("linear", 5, 10, 5, {"end_factor": 0.5}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="min_iterations"):
        schedules.check_schedule("linear", {"min_iterations": 3})


@pytest.mark.parametrize("name", ["onecycle", "triangle"])
def test_a_short_run_scales_its_cycle_down(name):
    """min_iterations: a run of fewer iterations peaks lower, in proportion; longer runs and the
    default (0) get the plain cycle, bit for bit."""
    from fastnn import schedules

    for total in (19, 200, 2000):
        plain = [schedules.lr_factor(name, t, total, 10) for t in range(total)]
        scaled = [schedules.lr_factor(name, t, total, 10, {"min_iterations": 200})
                  for t in range(total)]
        assert scaled == pytest.approx([min(1.0, total / 200) * f for f in plain], rel=1e-15)
        if total >= 200:
            assert scaled == plain
    assert max(schedules.lr_factor(name, t, 19, 10, {"min_iterations": 200})
               for t in range(19)) <= 19 / 200
    with pytest.raises(TypeError, match="min_iterations"):
        schedules.check_schedule(name, {"min_iterations": 2.5})


def test_triangle_schedule_sets_the_solvers_learning_rate():
    model = _small()
    solver = Solver(model, _small_data(), update_rule="sgd_nesterov", lr_schedule="triangle",
                    optim_config={"learning_rate": 0.1}, batch_size=8, num_epochs=2,
                    verbose=False, seed=0)
    rates = []
    for _ in range(10):
        solver._step()
        rates.append(solver.optim_configs["W1"]["learning_rate"])
        solver._t += 1
    assert rates == pytest.approx([0.1 * _airbench_get_lr(t, 10) for t in range(10)])


def _options_on(**kwargs):
    """Every issue-22 solver option on, over a batchnorm net (roles weight, bias, scale, shift)."""
    options = dict(update_rule="sgd_nesterov", lr_schedule="triangle", lookahead={"every": 3},
                   optim_config={"learning_rate": 0.05, "momentum": 0.85, "weight_decay": 1e-3},
                   lr_multipliers={"shift": 8.0}, decayed_roles=("weight", "bias", "shift"),
                   train_epochs={"b1": 1, "gamma1": 0}, batch_size=8, verbose=False, seed=3,
                   num_train_samples=20)
    options.update(kwargs)
    return options


def test_the_model_is_told_its_frozen_parameters_while_it_trains():
    """A Classifier's `frozen` holds the parameters past their train_epochs during train()
    (its loss may skip their gradients) and is empty again afterwards."""
    model = _small(use_batchnorm=True)
    seen = []
    real_loss = model.loss

    def loss(X, y=None):
        if y is not None:
            seen.append(model.frozen)
        return real_loss(X, y)

    model.loss = loss
    solver = Solver(model, _small_data(), num_epochs=3, **_options_on(lookahead=None))
    solver.train()
    per_epoch = solver.iterations_per_epoch
    assert seen[:per_epoch] == [frozenset({"gamma1"})] * per_epoch
    assert seen[per_epoch:] == [frozenset({"gamma1", "b1"})] * (2 * per_epoch)
    assert model.frozen == frozenset()


@pytest.mark.parametrize("fused", [True, False])
def test_train_epochs_freezes_a_parameter_after_its_epochs(fused):
    model = _small(use_batchnorm=True)
    start = _host_params(model)
    options = _options_on(lookahead=None, fused_updates=fused)
    solver = Solver(model, _small_data(), num_epochs=1, **options)
    solver.tracker.restore_best = lambda: None  # the parameters training left
    solver.train()
    after_one = _host_params(model)
    np.testing.assert_array_equal(after_one["gamma1"], start["gamma1"])  # 0 epochs: never
    assert not np.array_equal(after_one["b1"], start["b1"])
    solver.num_epochs = 3
    solver.train()
    np.testing.assert_array_equal(model.params["b1"], after_one["b1"])  # frozen after epoch 1
    assert not np.array_equal(model.params["W1"], after_one["W1"])
    assert solver.optim_configs["beta1"]["learning_rate"] == pytest.approx(
        8 * solver.optim_configs["W1"]["learning_rate"])
    assert solver.optim_configs["beta1"]["weight_decay"] == pytest.approx(1e-3 / 8)
    assert solver.optim_configs["gamma1"]["weight_decay"] == 0.0


def test_lookahead_is_airbenchs_weight_and_statistics_average():
    """Solver(lookahead=...) == the plain Solver's steps with airbench's LookaheadState
    transcribed in numpy beside them (every 3 steps, decay base * (s / total) ** 3, the
    average copied back at the end); params and batchnorm running statistics."""
    data = _small_data()
    kwargs = dict(update_rule="sgd_momentum", optim_config={"learning_rate": 0.05},
                  batch_size=8, num_epochs=2, verbose=False, seed=3)
    model = _small(use_batchnorm=True)
    solver = Solver(model, data, lookahead={"every": 3, "base": 0.9, "power": 3}, **kwargs)
    solver.tracker.restore_best = lambda: None  # the parameters training left
    solver.train()

    plain_model = _small(use_batchnorm=True)
    plain = Solver(plain_model, data, **kwargs)

    def state():
        out = {f"p/{k}": v for k, v in plain_model.params.items()}
        out.update({f"bn/{i}/{k}": p[k] for i, p in enumerate(plain_model.bn_params)
                    for k in ("running_mean", "running_var")})
        return out

    ema = {k: v.copy() for k, v in state().items()}
    total = 2 * plain.iterations_per_epoch

    def update(decay):
        for key, w in state().items():
            ema[key] = ema[key] + (1 - decay) * (w - ema[key])
            w[...] = ema[key]

    for steps in range(1, total + 1):
        plain._step()
        plain._t += 1
        if plain._t % plain.iterations_per_epoch == 0:
            plain._epoch_order = None  # a new permutation each epoch, as train() draws
        if steps % 3 == 0:
            update(0.9 * (steps / total) ** 3)
    update(1.0)
    for key, w in state().items():
        mine = (model.params[key[2:]] if key.startswith("p/") else
                model.bn_params[int(key.split("/")[1])][key.split("/")[2]])
        np.testing.assert_allclose(mine, w, rtol=1e-5, atol=1e-6, err_msg=key)


def test_resume_with_every_airbench_option_is_bit_identical(tmp_path):
    """4 epochs in one go == resumed from its epoch-2 checkpoint, with lookahead,
    train_epochs (b1 frozen from epoch 1), role multipliers, SGD weight decay and the
    triangle schedule on (which depend on the run's length, so both runs are 4 epochs)."""
    data = _small_data()
    model_full = _small(use_batchnorm=True)
    full = Solver(model_full, data, num_epochs=4, checkpoint_name=str(tmp_path / "run"),
                  **_options_on())
    full.train()
    model = _small(use_batchnorm=True)
    _scramble(model)
    resumed = Solver(model, data, num_epochs=4, **_options_on())
    resumed.load_checkpoint(str(tmp_path / "run_epoch_2.npz"))
    assert resumed.epoch == 2 and resumed.updater.frozen == {"b1", "gamma1"}
    resumed.train()
    assert resumed.loss_history == full.loss_history
    assert resumed.val_acc_history == full.val_acc_history
    _assert_params_equal(model.params, model_full.params)
    _assert_params_equal(resumed._lookahead.averages, full._lookahead.averages)
    for a, b in zip(model.bn_params, model_full.bn_params):
        np.testing.assert_array_equal(a["running_var"], b["running_var"])


def test_a_checkpoint_without_lookahead_is_refused_with_lookahead(tmp_path):
    path = tmp_path / "run.npz"
    Solver(_small(), _small_data(), num_epochs=1, checkpoint_path=str(path), verbose=False,
           seed=0).train()
    solver = Solver(_small(), _small_data(), num_epochs=2, verbose=False, seed=0, lookahead=True)
    with pytest.raises(ValueError, match="written without lookahead"):
        solver.load_checkpoint(str(path))


@pytest.mark.parametrize("options, match", [
    (dict(lr_multipliers={"beta": 64.0}), r"lr_multipliers names role 'beta'; roles are"),
    (dict(lr_multipliers={"shift": 0.0}), r"lr_multipliers\['shift'\]"),
    (dict(decayed_roles="weight"), "decayed_roles must be a list of roles"),
    (dict(decayed_roles=("weights",)), "decayed_roles must be a list of roles"),
    (dict(train_epochs={"stem_b": 3}), "train_epochs names 'stem_b', which is not a parameter"),
    (dict(train_epochs={"b1": -1}), r"train_epochs\['b1'\]"),
    (dict(lookahead={"every": 0}), r"lookahead\['every'\]"),
    (dict(lookahead={"base": 1.5}), r"lookahead\['base'\]"),
    (dict(lookahead={"period": 5}), r"unknown lookahead options \['period'\]"),
    (dict(lr_schedule="triangle", lr_schedule_config={"end_factor": -1}), "end_factor"),
])
def test_bad_airbench_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        Solver(_small(), _small_data(), verbose=False, **options)


def test_the_stack_refuses_the_solver_only_options():
    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    stack = StackedFullyConnectedNet([5], [{"seed": 0}], input_dim=12, num_classes=4)
    with pytest.raises(ValueError, match=r"StackedSolver does not take \['lookahead'\]"):
        StackedSolver(stack, _small_data(), lookahead=True)
    with pytest.raises(ValueError, match="weight_decay, which a stack does not take"):
        StackedSolver(stack, _small_data(), update_rule="sgd",
                      optim_configs=[{"weight_decay": 0.1}])
