"""Tests for fastnn.stacked: a stack of K nets is K FullyConnectedNets, trained as K Solvers.

Member k of a stack must start from, compute, and (under StackedSolver)
train to what FullyConnectedNet(seed=seed_k) under Solver(seed=...) gives;
its layers are tested in test_stacked_layers.py, its ops in test_kernels.py.
"""
import numpy as np
import pytest

import fastnn
from fastnn import optim
from fastnn.classifiers import FullyConnectedNet
from fastnn.classifiers.base import member_blocks
from fastnn.gradient_check import eval_numerical_gradient, rel_error
from fastnn.solver import Solver
from fastnn.solver_parts import Tracker
from fastnn.stacked import StackedFullyConnectedNet, StackedSolver
from helpers import backend_tolerances, host_copies

MEMBERS = [dict(seed=1, weight_scale=0.1, reg=0.1, dropout=0.3),
           dict(seed=2, weight_scale=0.05, reg=0.0, dropout=0.0),
           dict(seed=3, weight_scale=0.2, reg=0.05, dropout=0.5)]


def _host(a):
    return fastnn.to_numpy(a)


def _member_slice(a, name, k):
    return _host(a)[k]


def _data(shape=(48,), n_train=300, n_val=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"X_train": rng.standard_normal((n_train, *shape)).astype(np.float32),
            "y_train": rng.integers(0, 10, n_train),
            "X_val": rng.standard_normal((n_val, *shape)).astype(np.float32),
            "y_val": rng.integers(0, 10, n_val)}


def _pre_bn_biases(stack):
    """Biases that feed a batchnorm layer: their true gradient is 0 (batchnorm subtracts them)."""
    return {f"b{i}" for i in range(1, stack.num_layers)} if stack.use_batchnorm else set()


# -- the stack is K FullyConnectedNets ----------------------------------------------
@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_initial_params_are_those_of_fully_connected_net(backend, use_batchnorm):
    stack = StackedFullyConnectedNet([7, 5], MEMBERS, input_dim=12, num_classes=4,
                                     use_batchnorm=use_batchnorm)
    shapes = {"W1": (3, 12, 7), "b1": (3, 7), "W2": (3, 7, 5), "b2": (3, 5), "W3": (3, 5, 4),
              "b3": (3, 4)}
    if use_batchnorm:
        shapes.update({"gamma1": (3, 7), "beta1": (3, 7), "gamma2": (3, 5), "beta2": (3, 5)})
    assert {k: v.shape for k, v in stack.params.items()} == shapes
    for k, m in enumerate(MEMBERS):
        net = FullyConnectedNet([7, 5], input_dim=12, num_classes=4,
                                use_batchnorm=use_batchnorm, **m)
        assert list(net.params) == list(stack.params)
        for name, value in net.params.items():
            assert isinstance(stack.params[name], backend.ndarray)
            assert stack.params[name].dtype == np.float32
            np.testing.assert_array_equal(_member_slice(stack.params[name], name, k),
                                          _host(value), err_msg=name)


@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_member_computes_what_fully_connected_net_computes(backend, use_batchnorm):
    """Scores, losses, grads and batchnorm statistics of member k = the separate net's (float64)."""
    stack = StackedFullyConnectedNet([7, 5], MEMBERS, input_dim=12, num_classes=4,
                                     use_batchnorm=use_batchnorm, dtype=np.float64)
    nets = [FullyConnectedNet([7, 5], input_dim=12, num_classes=4, use_batchnorm=use_batchnorm,
                              dtype=np.float64, **m) for m in MEMBERS]
    rng = np.random.default_rng(0)
    for step in (0, 5):  # dropout masks change with the step
        X = backend.asarray(rng.standard_normal((9, 3, 2, 2)))
        y = backend.asarray(rng.integers(0, 4, 9))
        losses, grads = stack.loss(X, y, step=step)
        assert losses.shape == (3,) and isinstance(losses, backend.ndarray)
        assert {k: g.shape for k, g in grads.items()} == {
            k: p.shape for k, p in stack.params.items()}
        for k, net in enumerate(nets):
            net.dropout_param["step"] = step
            loss, net_grads = net.loss(X, y)
            np.testing.assert_allclose(_host(losses)[k], float(loss), rtol=1e-12)
            for name, g in net_grads.items():
                np.testing.assert_allclose(_member_slice(grads[name], name, k), _host(g),
                                           rtol=1e-10, atol=1e-12, err_msg=name)
    scores = stack.loss(X)
    assert scores.shape == (3, 9, 4)
    for k, net in enumerate(nets):
        np.testing.assert_allclose(_host(scores[k]), _host(net.loss(X)), rtol=1e-10, atol=1e-12)
        member = stack.member(k)
        for stacked_bn, bn in zip(member.bn_params, net.bn_params):
            for key in ("running_mean", "running_var"):
                np.testing.assert_allclose(_host(stacked_bn[key]), _host(bn[key]), rtol=1e-10,
                                           atol=1e-14)


def test_gradient_check():
    """K=3 members, batchnorm, dropout with seeds, reg > 0: grads vs central differences."""
    stack = StackedFullyConnectedNet([5, 4], MEMBERS, input_dim=6, num_classes=3,
                                     use_batchnorm=True, dtype=np.float64)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((4, 6)), rng.integers(0, 3, 4)
    losses, grads = stack.loss(X, y, step=2)
    zero = _pre_bn_biases(stack)
    for name, param in stack.params.items():
        numeric = eval_numerical_gradient(lambda _: stack.loss(X, y, step=2)[0].sum(), param,
                                          verbose=False, h=1e-5)
        if name in zero:  # round-off on both sides: compare absolutely
            np.testing.assert_allclose(grads[name], 0, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(numeric, 0, atol=1e-8, err_msg=name)
            continue
        err = rel_error(grads[name], numeric)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_member_saves_and_loads(tmp_path):
    stack = StackedFullyConnectedNet([6], MEMBERS, input_dim=8, num_classes=3, use_batchnorm=True)
    X = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    stack.loss(X, np.array([0, 1, 2, 0, 1]))  # running statistics move
    fastnn.save(stack.member(2), tmp_path / "m.npz")
    loaded = fastnn.load(tmp_path / "m.npz")
    np.testing.assert_allclose(loaded.loss(X), _host(stack.loss(X)[2]), rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        StackedFullyConnectedNet([4], [dict(weight_scale=0.1)], input_dim=3)
    with pytest.raises(ValueError, match="unknown keys"):
        StackedFullyConnectedNet([4], [dict(seed=0, lr=1)], input_dim=3)
    with pytest.raises(ValueError, match="dropout"):
        StackedFullyConnectedNet([4], [dict(seed=0, dropout=1.0)], input_dim=3)
    stack = StackedFullyConnectedNet([4], MEMBERS, input_dim=48)
    with pytest.raises(ValueError, match="input_dim"):
        stack.loss(np.zeros((2, 5), np.float32))
    data = _data()
    with pytest.raises(ValueError, match="3 members"):
        StackedSolver(stack, data, optim_configs=[{}])
    with pytest.raises(ValueError, match="beta1"):
        StackedSolver(stack, data, optim_configs=[{}, {"beta1": 0.5}, {}])
    with pytest.raises(ValueError, match="unknown keys"):
        StackedSolver(stack, data, update_rule="sgd", optim_configs=[{"beta1": 0.5}, {}, {}])
    with pytest.raises(KeyError):
        stack.member(7)


def test_sizes_and_member_hyperparameters_are_checked():
    stack = StackedFullyConnectedNet([np.int8(4)], MEMBERS, input_dim=np.int16(48),
                                     num_classes=np.uint8(10))
    assert [type(v) for v in (*stack.hidden_dims, stack.input_dim, stack.num_classes)] == [int] * 3
    with pytest.raises(TypeError, match=r"hidden_dims\[0\] must be an integer, got 4.5"):
        StackedFullyConnectedNet([4.5], MEMBERS, input_dim=48)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        StackedFullyConnectedNet([4], MEMBERS, input_dim=48, num_classes=0)
    with pytest.raises(ValueError, match=r"optim_configs\[1\]\['learning_rate'\] must be a "
                                         "positive finite number, got -0.1"):
        StackedSolver(stack, _data(), optim_configs=[{}, {"learning_rate": -0.1}, {}])
    with pytest.raises(TypeError, match="num_epochs must be an integer, got 2.5"):
        StackedSolver(stack, _data(), num_epochs=2.5)
    with pytest.raises(TypeError, match="member 0: seed must be an integer, got 1.5"):
        StackedFullyConnectedNet([4], [dict(seed=1.5)], input_dim=48)  # was floored to 1


# -- StackedSolver = K Solvers ---------------------------------------------------
class _KeepLast(Tracker):
    def restore_best(self):
        pass


class _KeepFinal(Solver):
    """A Solver that leaves model.params at the last step (Solver restores the best)."""

    def _make_tracker(self):
        return _KeepLast(self.model, self._xp)


def _separate_runs(data, members, configs, hidden_dims, use_batchnorm, **options):
    runs = []
    input_dim = int(np.prod(data["X_train"].shape[1:]))
    for member, config in zip(members, configs):
        net = FullyConnectedNet(hidden_dims, input_dim=input_dim, num_classes=10,
                                use_batchnorm=use_batchnorm, **member)
        solver = _KeepFinal(net, data, optim_config=dict(config), verbose=False,
                            print_every=10**6, **options)
        solver.train()
        runs.append(solver)
    return runs


def _assert_member_equals_solver(stacked, member_id, solver, net_params, loose=()):
    """Member `member_id` of a StackedSolver run against a separate Solver run.

    `loose`: parameters compared only to within their possible drift (see the key test).
    """
    result = stacked.results[member_id]
    np.testing.assert_allclose(result["loss_history"], solver.loss_history, rtol=2e-5, atol=1e-6)
    assert result["train_acc_history"] == solver.train_acc_history
    assert result["val_acc_history"] == solver.val_acc_history
    assert result["best_val_acc"] == solver.best_val_acc
    best = stacked.best_model(member_id)
    for name, value in net_params.items():
        for mine, theirs in ((net_params[name], solver.model.params[name]),
                             (best.params[name], solver.best_params[name])):
            if name in loose:
                np.testing.assert_allclose(_host(mine), _host(theirs), atol=loose[name],
                                           err_msg=name)
            else:  # atol: float32 sums in another order, which Adam's division by sqrt(v)
                # amplifies where v is small (1.5e-5 on one of 6144 W1 entries with AVX2 kernels)
                np.testing.assert_allclose(_host(mine), _host(theirs), rtol=1e-4, atol=2e-5,
                                           err_msg=name)


CASES = {
    "adam-batchnorm": dict(shape=(48,), use_batchnorm=True, update_rule="adam", lr_decay=0.9,
                           epsilon=1e-6),
    "adamw-cosine-augment": dict(shape=(3, 8, 8), use_batchnorm=False, update_rule="adamw",
                                 lr_schedule="cosine", augment=True, lr_decay=0.95),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_run_equals_separate_solver_runs(backend, case):
    """THE key test: K=3 members (own lr, reg, weight scale, dropout) = 3 separate Solver runs.

    Batchnorm: a bias that feeds a batchnorm layer has a true gradient of 0,
    so its computed gradient is round-off (~1e-9), which Adam with its
    default epsilon (1e-8) turns into steps of a good part of lr: its value
    then follows the order of float sums, which a stack and a lone net do
    differently, and through the running mean it moves test-mode scores
    enough to flip an argmax now and then. The test uses epsilon=1e-6 (steps
    on round-off ~1e-3 lr; no other gradient is that small) and still only
    bounds those biases.
    """
    options = dict(CASES[case])
    shape, use_batchnorm = options.pop("shape"), options.pop("use_batchnorm")
    epsilon = options.pop("epsilon", None)
    data = _data(shape)
    lrs = [1e-3, 3e-3, 5e-4]
    configs = [{"learning_rate": lr} for lr in lrs]
    if epsilon is not None:
        configs = [dict(c, epsilon=epsilon) for c in configs]
    if options["update_rule"] == "adamw":
        configs = [dict(c, weight_decay=wd) for c, wd in zip(configs, [1e-2, 0.1, 0.0])]
    options.update(batch_size=50, num_epochs=3, num_train_samples=100, seed=7)
    stack = StackedFullyConnectedNet([32, 16], MEMBERS, input_dim=int(np.prod(shape)),
                                     use_batchnorm=use_batchnorm)
    stacked = StackedSolver(stack, data, optim_configs=configs, **options)
    stacked.train()
    solvers = _separate_runs(data, MEMBERS, configs, [32, 16], use_batchnorm, **options)
    steps = 3 * 300 // 50
    for k, solver in enumerate(solvers):
        assert stacked.results[k]["status"] == "complete"
        assert len(stacked.results[k]["loss_history"]) == steps
        loose = {b: 1e-2 * lrs[k] * steps for b in _pre_bn_biases(stack)}
        _assert_member_equals_solver(stacked, k, solver, stack.member(k).params, loose)


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "rmsprop", "adam"])
def test_each_update_rule_equals_solver(rule):
    data = _data((20,), n_train=120)
    configs = [{"learning_rate": lr} for lr in (1e-2, 3e-2, 3e-3)]
    options = dict(update_rule=rule, batch_size=40, num_epochs=2, seed=3, lr_decay=0.5,
                   sampling="replacement")
    stack = StackedFullyConnectedNet([16], MEMBERS, input_dim=20)
    stacked = StackedSolver(stack, data, optim_configs=configs, **options)
    stacked.train()
    for k, solver in enumerate(_separate_runs(data, MEMBERS, configs, [16], False, **options)):
        _assert_member_equals_solver(stacked, k, solver, stack.member(k).params)


# -- pruning and failures ----------------------------------------------------------
def test_remove_members_shrinks_every_array():
    stack = StackedFullyConnectedNet([6, 5], MEMBERS, input_dim=8, num_classes=3,
                                     use_batchnorm=True)
    X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    stack.loss(X, np.array([0, 1, 2, 0]), step=1)
    before = {k: stack.member(k) for k in (0, 2)}
    assert stack.remove_members([1]) == [0, 2]
    assert stack.member_ids == [0, 2] and stack.num_members == 2
    for name, value in stack.params.items():
        assert value.shape[0] == 2, name
    for bn in stack.bn_params:
        assert bn["running_mean"].shape == (2, bn["running_mean"].shape[1])
    for k, net in before.items():
        after = stack.member(k)
        for name in net.params:
            np.testing.assert_array_equal(after.params[name], net.params[name])
        np.testing.assert_array_equal(after.bn_params[1]["running_var"],
                                      net.bn_params[1]["running_var"])
    with pytest.raises(KeyError):
        stack.remove_members([1])


def test_pruned_member_leaves_and_the_others_continue_unchanged(backend):
    data = _data()
    # epsilon=1e-6: see the key test (biases that feed batchnorm)
    configs = [{"learning_rate": lr, "epsilon": 1e-6} for lr in (1e-3, 3e-3, 5e-4)]
    options = dict(batch_size=50, num_epochs=3, num_train_samples=100, seed=5)

    def run(prune):
        stack = StackedFullyConnectedNet([32, 16], MEMBERS, input_dim=48, use_batchnorm=True)
        seen = []

        def on_epoch_end(epoch, val_accs):
            seen.append((epoch, sorted(val_accs)))
            return [1] if prune and epoch == 1 else None

        solver = StackedSolver(stack, data, optim_configs=configs, on_epoch_end=on_epoch_end,
                               **options)
        solver.train()
        return stack, solver, seen

    full_stack, full, _ = run(prune=False)
    stack, pruned, seen = run(prune=True)
    assert seen == [(1, [0, 1, 2]), (2, [0, 2]), (3, [0, 2])]
    assert stack.member_ids == [0, 2]
    for name, value in stack.params.items():
        assert value.shape[0] == 2
        for key in ("m", "v"):  # adam's state, as the update ops' blocks of the members
            assert pruned.optim_configs[name][key].shape == member_blocks(value).shape
    assert [r["status"] for r in pruned.results.values()] == ["complete", "pruned", "complete"]
    assert len(pruned.results[1]["loss_history"]) == 6
    assert len(pruned.results[1]["val_acc_history"]) == 2  # first iteration and epoch 1
    for k in (0, 2):
        ours, theirs = pruned.results[k], full.results[k]
        np.testing.assert_allclose(ours["loss_history"], theirs["loss_history"], rtol=1e-6)
        assert ours["val_acc_history"] == theirs["val_acc_history"]
        mine, full_member = stack.member(k), full_stack.member(k)
        for name in mine.params:  # pre-batchnorm biases: see the key test
            rtol, atol = (0, 1e-2 * 18 * 3e-3) if name in _pre_bn_biases(stack) else (1e-5, 1e-6)
            np.testing.assert_allclose(_host(mine.params[name]), _host(full_member.params[name]),
                                       rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_failed_member_leaves_and_the_others_go_on():
    data = _data((20,), n_train=120)
    members = [MEMBERS[0], dict(seed=9, weight_scale=1.0), MEMBERS[2]]
    configs = [{"learning_rate": 1e-2}, {"learning_rate": 1e30}, {"learning_rate": 3e-3}]
    options = dict(update_rule="sgd", batch_size=40, num_epochs=2, seed=1)
    stack = StackedFullyConnectedNet([16], members, input_dim=20)
    stacked = StackedSolver(stack, data, optim_configs=configs, **options)
    stacked.train()
    assert stacked.results[1]["status"] == "failed"
    assert not np.isfinite(stacked.results[1]["loss_history"]).all()
    assert stack.member_ids == [0, 2]
    best = stacked.best_model(1)  # the best finite parameters seen (here the initial ones)
    assert all(np.isfinite(_host(p)).all() for p in best.params.values())
    for k, solver in zip((0, 2), _separate_runs(data, [members[0], members[2]],
                                               [configs[0], configs[2]], [16], False, **options)):
        assert stacked.results[k]["status"] == "complete"
        _assert_member_equals_solver(stacked, k, solver, stack.member(k).params)


@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_stack_declares_the_roles_of_its_members(use_batchnorm):
    stack = StackedFullyConnectedNet([6, 5], MEMBERS, input_dim=8, num_classes=3,
                                     use_batchnorm=use_batchnorm)
    net = FullyConnectedNet([6, 5], input_dim=8, num_classes=3, use_batchnorm=use_batchnorm)
    assert stack.param_roles == net.param_roles
    assert list(stack.params) == list(net.params)
    assert member_blocks(stack.params["W1"]).shape == (8, 3, 6)  # one product for the layer


def test_member_blocks_are_views():
    stack = StackedFullyConnectedNet([6, 5], MEMBERS, input_dim=8, num_classes=3)
    for name, value in stack.params.items():
        blocks = member_blocks(value)
        assert blocks.ndim == 3 and blocks.shape[1] == 3
        assert np.shares_memory(blocks, value), name


def test_pruning_every_member_ends_training():
    data = _data((20,), n_train=120)
    stack = StackedFullyConnectedNet([16], MEMBERS, input_dim=20, use_batchnorm=True)
    solver = StackedSolver(stack, data, batch_size=40, num_epochs=3, seed=0,
                           on_epoch_end=lambda epoch, accs: list(accs))
    solver.train()
    assert stack.num_members == 0 and solver.epoch == 1
    for k in range(3):
        assert solver.results[k]["status"] == "pruned"
        assert len(solver.results[k]["loss_history"]) == 3
        assert solver.best_model(k).loss(data["X_val"]).shape == (50, 10)
    with pytest.raises(KeyError, match="no such members"):
        solver.remove_members([5])


# -- checkpoints, printing: Solver's, for a stack -----------------------------------
def _resumable_stack(tmp_path, num_epochs, **extra):
    data = _data((20,), n_train=120)
    stack = StackedFullyConnectedNet([16], MEMBERS, input_dim=20, use_batchnorm=True)
    configs = [{"learning_rate": lr} for lr in (1e-2, 3e-3, 5e-3)]
    prune_at_1 = lambda epoch, accs: [1] if epoch == 1 else None  # noqa: E731
    solver = StackedSolver(stack, data, optim_configs=configs, batch_size=40, seed=2,
                           num_epochs=num_epochs, on_epoch_end=prune_at_1, lr_decay=0.9, **extra)
    return stack, solver


def test_stacked_checkpoint_resume_is_bit_identical(tmp_path):
    """2 epochs (a member pruned after the first), checkpoint, 2 more == 4 in one go."""
    path = tmp_path / "stack.npz"
    _, first = _resumable_stack(tmp_path, 2, checkpoint_path=str(path))
    first.train()
    stack, resumed = _resumable_stack(tmp_path, 4)
    resumed.load_checkpoint(str(path))
    assert stack.member_ids == [0, 2] and resumed.epoch == 2
    resumed.train()
    full_stack, full = _resumable_stack(tmp_path, 4)
    full.train()
    for mid in (0, 1, 2):
        ours, theirs = resumed.results[mid], full.results[mid]
        assert ours == theirs, mid
    for name, value in full_stack.params.items():
        np.testing.assert_array_equal(stack.params[name], value, err_msg=name)
    for a, b in zip(stack.bn_params, full_stack.bn_params):
        np.testing.assert_array_equal(a["running_var"], b["running_var"])
    for mid in (0, 2):
        for name, value in full.best_model(mid).params.items():
            np.testing.assert_array_equal(resumed.best_model(mid).params[name], value)


def test_a_solver_checkpoint_is_not_a_stack_checkpoint(tmp_path):
    data = _data((20,), n_train=120)
    net = FullyConnectedNet([16], input_dim=20, seed=1)
    Solver(net, data, num_epochs=1, batch_size=40, verbose=False,
           checkpoint_path=str(tmp_path / "c.npz")).train()
    _, solver = _resumable_stack(tmp_path, 1)
    with pytest.raises(ValueError, match="incompatible"):
        solver.load_checkpoint(str(tmp_path / "c.npz"))


def test_stacked_solver_prints_like_solver(capsys):
    _, solver = _resumable_stack(None, 1, verbose=True, print_every=1)
    solver.train()
    out = capsys.readouterr().out
    assert "(Iteration 1 / 3) loss:" in out and "(Iteration 3 / 3) loss:" in out
    assert "(Epoch 1 / 1) 3 members; best val_acc" in out


def test_step_scalars_are_member_rows_rewritten_in_place(backend):
    """StackedSolver's update ops read (K, H) scalar rows that stay the same arrays from step
    to step (row k: member k's learning rate), and training never rebinds a parameter."""
    stack = StackedFullyConnectedNet([8], MEMBERS, input_dim=48)
    before = dict(stack.params)
    configs = [{"learning_rate": lr} for lr in (1e-3, 3e-3, 5e-4)]
    solver = StackedSolver(stack, _data(n_train=100), optim_configs=configs, batch_size=50,
                           num_epochs=1, seed=1, lr_schedule="cosine")
    solver.train()
    rows = dict(solver.updater.scalar_rows)
    first = {name: _host(r).copy() for name, r in rows.items()}
    solver.num_epochs = 2
    solver.train()
    assert all(stack.params[name] is array for name, array in before.items())
    for name, r in rows.items():
        assert solver.updater.scalar_rows[name] is r and isinstance(r, backend.ndarray)
        assert r.shape == (3, len(optim.SPECS["adam"].scalars({**optim.DEFAULTS["adam"],
                                                               "t": 1})))
        lr = _host(r)[:, 0]
        assert len(set(lr.tolist())) == 3  # one learning rate per member
        assert not np.array_equal(_host(r), first[name])


def test_stack_is_built_by_fully_connected_nets_constructor(monkeypatch):
    """StackedFullyConnectedNet runs FullyConnectedNet.__init__ (its checks, layer plan and
    attributes) with the stacked layers, instead of setting the attributes loss reads by hand."""
    from fastnn.stacked_layers import STACKED_LAYERS

    calls = []
    init = FullyConnectedNet.__init__

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(FullyConnectedNet, "__init__", spy)
    stack = StackedFullyConnectedNet([6, 5], MEMBERS, input_dim=8, num_classes=3,
                                     use_batchnorm=True)
    assert calls == ["StackedFullyConnectedNet"]
    assert stack.layer_set is STACKED_LAYERS and stack.dims == [8, 6, 5, 3]
    assert stack._hidden_forward is STACKED_LAYERS.affine_bn_relu_forward


def test_stacked_solver_adds_l2_through_the_stacks_loss_only(monkeypatch):
    """One L2 path: the stack's loss adds reg_k * W (l2_stacked_); the update ops never get l2.
    The losses are those of stack.loss with its L2 term."""
    calls = []
    apply_step = optim.apply_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("l2"))
        return apply_step(*args, **kwargs)

    monkeypatch.setattr(optim, "apply_step", spy)
    stack = StackedFullyConnectedNet([8], MEMBERS, input_dim=48)
    data = _data(n_train=50)
    start = {name: a.copy() for name, a in stack.params.items()}
    solver = StackedSolver(stack, data, batch_size=50, num_epochs=1, seed=0,
                           optim_configs=[{"learning_rate": 1e-3}] * 3)
    first_batch = solver._next_batch(0)
    fresh = StackedFullyConnectedNet([8], MEMBERS, input_dim=48)
    for name, a in start.items():
        fresh.params[name][...] = a
    expected, _ = fresh.loss(*first_batch, step=0)
    solver = StackedSolver(stack, data, batch_size=50, num_epochs=1, seed=0,
                           optim_configs=[{"learning_rate": 1e-3}] * 3)
    solver.train()
    assert calls and all(l2 is None for l2 in calls)
    assert [solver.results[k]["loss_history"][0] for k in range(3)] == _host(expected).tolist()


def test_a_stacked_checkpoint_written_before_the_parts_resumes():
    """A StackedSolver checkpoint from before its parts (issue 21: member 1 pruned after
    epoch 1, reg on two members) loads into them and continues as the uninterrupted run."""
    import os

    from test_solver import _pre21_run

    def make(data, num_epochs):
        members = [dict(seed=1, reg=0.01, dropout=0.2), dict(seed=2),
                   dict(seed=3, reg=0.05, dropout=0.5)]
        stack = StackedFullyConnectedNet([8], members, input_dim=12, num_classes=4,
                                         use_batchnorm=True, dtype=np.float64)
        return StackedSolver(stack, data, update_rule="adamw",
                             optim_configs=[{"learning_rate": lr} for lr in (1e-2, 3e-3, 5e-3)],
                             batch_size=10, num_epochs=num_epochs, seed=5,
                             on_epoch_end=lambda epoch, accs: [1])

    path = os.path.join(os.path.dirname(__file__), "data",
                        "stacked_checkpoint_before_issue21.npz")
    resumed, straight = _pre21_run(make, path), _pre21_run(make)
    assert resumed.stack.member_ids == [0, 2] and resumed.results[1]["status"] == "pruned"
    for mid in (0, 1, 2):
        ours, theirs = resumed.results[mid], straight.results[mid]
        assert ours["status"] == theirs["status"]
        np.testing.assert_allclose(ours["loss_history"], theirs["loss_history"], rtol=1e-9)
    for name, value in straight.stack.params.items():
        np.testing.assert_allclose(resumed.stack.params[name], value, rtol=1e-9, atol=1e-12)
