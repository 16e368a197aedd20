"""Tests for fastnn.optim: each rule against the contract's formulas, and the fused in-place path."""
import numpy as np
import pytest

import fastnn
from fastnn import optim, schedules

DEFAULTS = {
    "sgd": {"learning_rate": 1e-2},
    "sgd_momentum": {"learning_rate": 1e-2, "momentum": 0.9},
    "sgd_nesterov": {"learning_rate": 1e-2, "momentum": 0.9},  # fastnn's addition
    "rmsprop": {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8},
    "adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "adamw": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8,
              "weight_decay": 1e-2},
    # airbench94_muon's; on a parameter that is not a conv filter, sgd_nesterov's step
    "muon": {"learning_rate": 1e-2, "momentum": 0.85, "muon_learning_rate": 0.24,
             "muon_momentum": 0.6},
}
STATE = {"sgd": (), "sgd_momentum": ("velocity",), "sgd_nesterov": ("velocity",),
         "rmsprop": ("cache",), "adam": ("m", "v"), "adamw": ("m", "v"), "muon": ("velocity",)}
RULES = list(DEFAULTS)


def test_every_rule_is_tested_against_a_formula_here():
    """A rule added to fastnn.optim needs its formula in _contract_steps."""
    assert set(optim.RULES) == set(DEFAULTS)
    assert {name: spec.defaults for name, spec in optim.SPECS.items() if name in DEFAULTS} == DEFAULTS
STEPS = 3


def _contract_steps(rule, w, grads, hp):
    """The contract's formulas in float64, written out; returns (w, state)."""
    w = w.astype(np.float64)
    state = {"velocity": np.zeros_like(w), "cache": np.zeros_like(w),
             "m": np.zeros_like(w), "v": np.zeros_like(w), "t": 0}
    for dw in grads:
        dw = dw.astype(np.float64)
        lr = hp["learning_rate"]
        if rule == "sgd":
            w = w - lr * dw
        elif rule == "sgd_momentum":
            state["velocity"] = hp["momentum"] * state["velocity"] - lr * dw
            w = w + state["velocity"]
        elif rule in ("sgd_nesterov", "muon"):  # the course's Nesterov form
            state["velocity"] = hp["momentum"] * state["velocity"] - lr * dw
            w = w + hp["momentum"] * state["velocity"] - lr * dw
        elif rule == "rmsprop":
            d = hp["decay_rate"]
            state["cache"] = d * state["cache"] + (1 - d) * dw ** 2
            w = w - lr * dw / (np.sqrt(state["cache"]) + hp["epsilon"])
        elif rule in ("adam", "adamw"):
            if rule == "adamw":  # decoupled weight decay, then the Adam step
                w = w * (1 - lr * hp["weight_decay"])
            b1, b2 = hp["beta1"], hp["beta2"]
            state["t"] += 1
            t = state["t"]
            state["m"] = b1 * state["m"] + (1 - b1) * dw
            state["v"] = b2 * state["v"] + (1 - b2) * dw ** 2
            w = w - lr * (state["m"] / (1 - b1 ** t)) / (np.sqrt(state["v"] / (1 - b2 ** t))
                                                          + hp["epsilon"])
    return w, state


def _problem(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(STEPS)]
    return w, grads


HYPER = {  # non-default values, so a rule that ignores its config fails
    "sgd": {"learning_rate": 0.05},
    "sgd_momentum": {"learning_rate": 0.05, "momentum": 0.8},
    "sgd_nesterov": {"learning_rate": 0.05, "momentum": 0.7},
    "rmsprop": {"learning_rate": 0.02, "decay_rate": 0.9, "epsilon": 1e-6},
    "adam": {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6},
    "adamw": {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6,
              "weight_decay": 0.1},  # a later addition to the contract's four
    "muon": {"learning_rate": 0.05, "momentum": 0.7, "muon_learning_rate": 0.1,
             "muon_momentum": 0.5},
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("given", ["defaults", "custom"])
def test_rule_matches_contract_formula(backend, rule, dtype, given):
    xp = backend
    w_host, grads = _problem((4, 5), dtype)
    hp = DEFAULTS[rule] if given == "defaults" else HYPER[rule]
    config = None if given == "defaults" else dict(HYPER[rule])
    w = xp.asarray(w_host)
    for dw in grads:
        w, config = getattr(optim, rule)(w, xp.asarray(dw), config)
        assert isinstance(w, xp.ndarray) and w.dtype == dtype and w.shape == (4, 5)
    expected_w, expected_state = _contract_steps(rule, w_host, grads, hp)
    rtol, atol = (2e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-14)
    np.testing.assert_allclose(fastnn.to_numpy(w), expected_w, rtol=rtol, atol=atol)
    for key in STATE[rule]:
        assert isinstance(config[key], xp.ndarray) and config[key].dtype == dtype, key
        np.testing.assert_allclose(fastnn.to_numpy(config[key]), expected_state[key], rtol=rtol,
                                   atol=atol, err_msg=key)
    if rule in ("adam", "adamw"):
        assert type(config["t"]) is int and config["t"] == STEPS
    for key, value in hp.items():
        assert config[key] == value and type(config[key]) is float, key


@pytest.mark.parametrize("rule", RULES)
def test_rule_fills_missing_defaults(rule):
    w, grads = _problem((3,), np.float64)
    _, config = getattr(optim, rule)(w, grads[0], None)
    assert {k: config[k] for k in DEFAULTS[rule]} == DEFAULTS[rule]
    # a partial config keeps what it has and gets the rest
    _, config = getattr(optim, rule)(w, grads[0], {"learning_rate": 0.123})
    assert config["learning_rate"] == 0.123
    for key, value in DEFAULTS[rule].items():
        if key != "learning_rate":
            assert config[key] == value


def _fused_vs_functional(xp, rule, shape, dtype, hp):
    w_host, grads = _problem(shape, dtype, seed=3)
    w_fun, config_fun = xp.asarray(w_host), None if hp is None else dict(hp)
    w_fused, config_fused = xp.asarray(w_host), None if hp is None else dict(hp)
    for dw in grads:
        w_fun, config_fun = getattr(optim, rule)(w_fun, xp.asarray(dw), config_fun)
        before = w_fused
        config_fused = optim.fused_update(rule, w_fused, xp.asarray(dw), config_fused)
        assert w_fused is before  # in place
    return w_fun, config_fun, w_fused, config_fused


@pytest.mark.parametrize("rule", sorted(optim.RULES))  # every rule, those added later too
@pytest.mark.parametrize("shape", [(3, 4), (7,), (70, 100)])  # 7000 > one parallel chunk
@pytest.mark.parametrize("given", ["defaults", "custom"])
def test_fused_update_is_bit_identical_to_rule(backend, rule, dtype, shape, given):
    xp = backend
    if given == "custom" and rule not in HYPER:
        pytest.skip(f"no custom hyperparameters for {rule!r} here")
    hp = None if given == "defaults" else HYPER[rule]
    w_fun, config_fun, w_fused, config_fused = _fused_vs_functional(xp, rule, shape, dtype, hp)
    assert w_fused.dtype == dtype
    np.testing.assert_array_equal(fastnn.to_numpy(w_fused), fastnn.to_numpy(w_fun))
    assert set(config_fused) == set(config_fun)
    for key, value in config_fun.items():
        if isinstance(value, xp.ndarray):
            assert config_fused[key].dtype == value.dtype, key
            np.testing.assert_array_equal(fastnn.to_numpy(config_fused[key]), fastnn.to_numpy(value),
                                          err_msg=key)
        else:
            assert config_fused[key] == value and type(config_fused[key]) is type(value), key


@pytest.mark.parametrize("rule", sorted(optim.RULES))
def test_fused_update_of_a_transposed_parameter(rule):
    """A parameter that is a strided view (W = A.T) updates in place like the rule."""
    w_host, grads = _problem((5, 4), np.float32, seed=4)
    w_fun, config_fun = w_host.T.copy(), None
    base = np.ascontiguousarray(w_host)
    w_fused, config_fused = base.T, None
    assert not w_fused.flags.c_contiguous
    for dw in grads:
        w_fun, config_fun = optim.RULES[rule](w_fun, dw.T, config_fun)
        config_fused = optim.fused_update(rule, w_fused, dw.T, config_fused)
    np.testing.assert_array_equal(w_fused, w_fun)
    np.testing.assert_array_equal(base.T, w_fun)  # in place, through the view


def test_fused_update_unknown_rule():
    w = np.zeros(3)
    with pytest.raises(ValueError, match="adagrad"):
        optim.fused_update("adagrad", w, np.ones(3), {})


@pytest.mark.parametrize("rule", sorted(optim.RULES))
def test_step_scalars_may_be_device_arrays(backend, rule):
    """learning_rate and Adam's t as 0-d arrays (a CUDA graph reads them from the device,
    updated between steps): the same parameters as with Python numbers, w never rebound."""
    xp = backend
    w_host, grads = _problem((6, 5), np.float32, seed=7)
    w_num, w_dev = xp.asarray(w_host), xp.asarray(w_host)
    config_num = {"learning_rate": 0.02}
    config_dev = {"learning_rate": xp.asarray(0.02)}
    if optim.SPECS[rule].counts_steps:
        config_dev["t"] = xp.asarray(0)
    for dw in grads:
        optim.fused_update(rule, w_num, xp.asarray(dw), config_num)
        before = w_dev
        optim.fused_update(rule, w_dev, xp.asarray(dw), config_dev)
        assert w_dev is before
    np.testing.assert_array_equal(fastnn.to_numpy(w_dev), fastnn.to_numpy(w_num))


@pytest.mark.parametrize("stacked", [False, True])
def test_decay_by_role_is_a_property_of_the_rule_not_its_name(monkeypatch, stacked):
    """A rule declared with decoupled_decay (as a Lion would be) decays only the weights,
    whatever its name: the Solvers ask the rule, not for "adamw"."""
    from fastnn.classifiers import FullyConnectedNet
    from fastnn.solver import Solver
    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    monkeypatch.setitem(optim.SPECS, "decoupled", optim.SPECS["adamw"])
    monkeypatch.setitem(optim.DEFAULTS, "decoupled", optim.DEFAULTS["adamw"])
    monkeypatch.setitem(optim.RULES, "decoupled", optim.adamw)
    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((8, 6)).astype(np.float32),
            "y_train": rng.integers(0, 3, 8), "X_val": rng.standard_normal((4, 6)).astype(
                np.float32), "y_val": rng.integers(0, 3, 4)}
    config = {"learning_rate": 1e-3, "weight_decay": 0.5}
    if stacked:
        stack = StackedFullyConnectedNet([5], [{"seed": 0}], input_dim=6, num_classes=3,
                                         use_batchnorm=True)
        solver = StackedSolver(stack, data, update_rule="decoupled", optim_configs=[config])
    else:
        model = FullyConnectedNet([5], input_dim=6, num_classes=3, use_batchnorm=True, seed=0)
        solver = Solver(model, data, update_rule="decoupled", optim_config=config, verbose=False)
    decay = {name: float(np.max(fastnn.to_numpy(c["weight_decay"])))
             for name, c in solver.optim_configs.items()}
    assert decay == {"W1": 0.5, "b1": 0.0, "gamma1": 0.0, "beta1": 0.0, "W2": 0.5, "b2": 0.0}


def test_role_config_decays_the_weights_only_and_fills_the_default():
    assert optim.role_config("adamw", {}, "weight") == {"weight_decay": 1e-2}
    assert optim.role_config("adamw", {"weight_decay": 0.3}, "bias") == {"weight_decay": 0.0}
    assert optim.role_config("adam", {"beta1": 0.8}, "bias") == {"beta1": 0.8}
    assert [rule for rule in optim.SPECS if optim.by_role(rule)] == ["adamw"]


# -- weight decay and learning rates by role (issue 22: airbench's optimizer) ---------------
def test_sgd_weight_decay_is_torchs_coupled_decay_and_off_by_default():
    w, (dw, *_) = _problem((3, 4), np.float64)
    decayed, config = optim.sgd_nesterov(w, dw, {"learning_rate": 0.1, "weight_decay": 0.3})
    plain, _ = optim.sgd_nesterov(w, dw + 0.3 * w, {"learning_rate": 0.1})
    np.testing.assert_allclose(decayed, plain, rtol=1e-15)
    assert config["weight_decay"] == 0.3
    # not given: not filled in (configs and checkpoints stay as they were)
    assert "weight_decay" not in optim.sgd_nesterov(w, dw)[1]
    assert "weight_decay" not in optim.sgd(w, dw)[1]
    with pytest.raises(ValueError, match="weight_decay"):
        optim.check_config("sgd", {"weight_decay": -1.0}, "optim_config")
    with pytest.raises(ValueError, match=r"unknown keys \['weight_decay'\] for update rule 'adam'"):
        optim.check_config("adam", {"weight_decay": 0.1}, "optim_config")


def test_role_multiplier_scales_the_learning_rate_not_the_decay_step():
    config = {"learning_rate": 0.5, "momentum": 0.85, "weight_decay": 0.01}
    shift = optim.role_config("sgd_nesterov", config, "shift", 64.0, ("weight", "shift"))
    assert shift == {"learning_rate": 32.0, "momentum": 0.85, "weight_decay": 0.01 / 64}
    assert optim.role_config("sgd_nesterov", config, "bias", 1.0, ("weight",))["weight_decay"] == 0
    # adamw: the same decay step lr * weight_decay, whatever the multiplier
    adamw = optim.role_config("adamw", {"learning_rate": 1e-3}, "weight", 4.0)
    assert adamw["learning_rate"] * adamw["weight_decay"] == pytest.approx(1e-3 * 1e-2)
    assert optim.by_role("sgd", {"weight_decay": 0.1}) and not optim.by_role("sgd", {})


def _torch_nesterov_sgd(groups, momentum, steps):
    """torch.optim.SGD(groups, momentum=momentum, nesterov=True).step(), transcribed (torch
    isn't a dependency): per group lr, weight_decay; per parameter w and its grads, one a
    step. Returns the parameters after the steps."""
    out = {}
    for group in groups:
        for name, w, grads in group["params"]:
            w, buf = w.copy(), None
            for grad in grads[:steps]:
                g = grad + group["weight_decay"] * w
                buf = g.copy() if buf is None else momentum * buf + g
                w = w - group["lr"] * (g + momentum * buf)
            out[name] = w
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_airbench_hyperparameters_map_to_sgd_nesterov_exactly(fused):
    """airbench94's optimizer (summed loss, lr and wd per 1024 examples through
    kilostep_scale, BN biases' lr x64 with wd / lr per group) equals fastnn's sgd_nesterov
    with the mapping in fastnn.optim's docstring, at a constant learning rate."""
    from fastnn.classifiers import FullyConnectedNet
    from fastnn.solver_parts import Updater

    n, hyp_lr, hyp_wd, momentum, bias_scaler = 64, 11.5, 0.0153, 0.85, 64.0
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = hyp_lr / kilostep_scale, hyp_wd * n / kilostep_scale
    model = FullyConnectedNet([5], input_dim=6, num_classes=3, use_batchnorm=True, seed=0,
                              dtype=np.float64)
    model.param_roles["gamma1"] = "scale"   # airbench's frozen BN scale: not in its optimizer
    start = {k: np.array(v) for k, v in model.params.items()}
    rng = np.random.default_rng(1)
    steps = 4
    grads = {k: [rng.standard_normal(v.shape) for _ in range(steps)] for k, v in start.items()}
    trained = [k for k in start if model.param_roles[k] != "scale"]
    shifts = [k for k in trained if model.param_roles[k] == "shift"]
    groups = [dict(params=[(k, start[k], [g * n for g in grads[k]]) for k in shifts],
                   lr=lr * bias_scaler, weight_decay=wd / (lr * bias_scaler)),
              dict(params=[(k, start[k], [g * n for g in grads[k]]) for k in trained
                           if k not in shifts], lr=lr, weight_decay=wd / lr)]
    expected = _torch_nesterov_sgd(groups, momentum, steps)

    config = {"learning_rate": hyp_lr * n / 1024 / (1 + 1 / (1 - momentum)),
              "momentum": momentum, "weight_decay": hyp_wd / hyp_lr}
    updater = Updater("sgd_nesterov", model, config, fused, {"shift": bias_scaler},
                      ("weight", "bias", "shift"))
    updater.frozen = frozenset({"gamma1"})
    for i in range(steps):
        updater.begin_step(model.params)
        updater.step(model.params, {k: g[i] for k, g in grads.items()})
    for name in trained:
        np.testing.assert_allclose(model.params[name], expected[name], rtol=1e-12, atol=1e-14,
                                   err_msg=name)
    np.testing.assert_array_equal(model.params["gamma1"], start["gamma1"])


def test_nesterov_differs_from_torchs_when_the_learning_rate_changes():
    """fastnn's velocity carries each step's own learning rate, torch's buffer takes the
    current one: equal at a constant rate, a few percent apart under airbench's warm-up."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(50) for _ in range(12)]
    mu = 0.85

    def run(rates):
        w, config = np.zeros(50), {"momentum": mu}
        w_torch, buf = np.zeros(50), np.zeros(50)
        for lr, g in zip(rates, grads):
            config["learning_rate"] = lr
            w, config = optim.sgd_nesterov(w, g, config)
            buf = mu * buf + g
            w_torch = w_torch - lr * (g + mu * buf)
        return np.abs(w - w_torch).max() / np.abs(w_torch).max()

    assert run([0.3] * 12) < 1e-14
    # airbench94's first steps: ceil(9.9 * 49) = 486 steps at batch 1024
    warmup = [schedules.lr_factor("triangle", t, 486, 49) for t in range(12)]
    assert 1e-3 < run(warmup) < 0.2


# -- muon (issue 22: airbench94_muon's optimizer) -------------------------------------------
def _newton_schulz(g, steps=3):
    """airbench94_muon's zeropower_via_newtonschulz5, written out in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (np.linalg.norm(g) + 1e-7)
    if g.shape[0] > g.shape[1]:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def _airbench_muon_steps(w, grads, lr, momentum):
    """airbench94_muon's Muon.step (nesterov) on filters w, transcribed in float64."""
    w, buf = w.astype(np.float64), np.zeros(w.shape)
    for g in grads:
        g = g.astype(np.float64)
        buf = momentum * buf + g
        g = g + momentum * buf
        w = w * (np.sqrt(len(w)) / np.linalg.norm(w))
        w = w - lr * _newton_schulz(g.reshape(len(g), -1)).reshape(g.shape)
    return w, buf


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (30, 2, 2, 2)], ids=["wide", "tall"])
@pytest.mark.parametrize("fused", [False, True])
def test_muon_steps_conv_filters_as_airbench94_muon(backend, dtype, shape, fused):
    xp = backend
    w_host, grads = _problem(shape, dtype, seed=5)
    config = dict(HYPER["muon"])
    w = xp.array(w_host)  # a copy: the fused step is in place
    for dw in grads:
        if fused:
            config = optim.fused_update("muon", w, xp.asarray(dw), config)
        else:
            w, config = optim.muon(w, xp.asarray(dw), config)
    expected_w, expected_v = _airbench_muon_steps(w_host, grads, 0.1, 0.5)
    rtol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(fastnn.to_numpy(w), expected_w, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(fastnn.to_numpy(config["velocity"]), expected_v, rtol=rtol,
                               atol=rtol)
    # the norm is reset before each step, so it stays near sqrt(F) (not at it)
    assert abs(float(np.linalg.norm(fastnn.to_numpy(w))) / np.sqrt(shape[0]) - 1) < 0.2


def test_orthogonalize_keeps_the_singular_vectors_and_brings_the_values_near_one():
    """airbench94_muon's 3 steps: singular values spread over a decade end in [0.5, 1.5]
    (its docstring's band), the singular vectors unchanged."""
    from fastnn.kernels.updates import orthogonalize

    rng = np.random.default_rng(0)
    for shape in [(16, 144), (144, 16), (96, 864)]:
        u, _, vt = np.linalg.svd(rng.standard_normal(shape), full_matrices=False)
        g = (u * np.geomspace(0.1, 1, min(shape))) @ vt
        out = orthogonalize(g.astype(np.float32))
        s = np.linalg.svd(out, compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.5, (shape, s.min(), s.max())
        in_basis = u.T @ out @ vt.T  # diagonal: the same singular vectors
        np.testing.assert_allclose(in_basis - np.diag(np.diag(in_basis)), 0, atol=1e-5)


def test_muon_filters_take_no_weight_decay_the_rest_do():
    w, (dw, *_) = _problem((6, 2, 3, 3), np.float64, seed=6)
    hp = {"learning_rate": 0.1, "momentum": 0.8}
    decayed, _ = optim.muon(w, dw, {**hp, "weight_decay": 0.5})
    plain, _ = optim.muon(w, dw, dict(hp))
    np.testing.assert_array_equal(decayed, plain)
    matrix, (dm, *_) = _problem((4, 5), np.float64, seed=6)
    decayed, _ = optim.muon(matrix, dm, {**hp, "weight_decay": 0.5})
    nesterov, _ = optim.sgd_nesterov(matrix, dm, {**hp, "weight_decay": 0.5})
    np.testing.assert_array_equal(decayed, nesterov)
    with pytest.raises(ValueError, match="muon_momentum"):
        optim.check_config("muon", {"muon_momentum": 1.0}, "optim_config")


def test_muon_matches_torch_airbench94_muon():
    """One of airbench94_muon's Muon steps in PyTorch (float32, its Newton-Schulz in float32
    rather than bfloat16) and fastnn's muon give the same filters."""
    torch = pytest.importorskip("torch")
    w_host, grads = _problem((12, 4, 3, 3), np.float32, seed=8)
    p = torch.tensor(w_host)
    buf = torch.zeros_like(p)
    w, config = w_host.copy(), {"muon_learning_rate": 0.24, "muon_momentum": 0.6}
    for g in grads:
        g_t = torch.tensor(g)
        buf.mul_(0.6).add_(g_t)
        g_t = g_t.add(buf, alpha=0.6)
        p.mul_(len(p) ** 0.5 / p.norm())
        x = g_t.reshape(len(g_t), -1)
        x = x / (x.norm() + 1e-7)
        for _ in range(3):
            a = x @ x.T
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        p.add_(x.view(g_t.shape), alpha=-0.24)
        config = optim.fused_update("muon", w, g, config)
    np.testing.assert_allclose(w, p.numpy(), rtol=1e-4, atol=1e-5)


def test_the_schedule_scales_muons_learning_rate_too():
    from fastnn.classifiers import ConvNet
    from fastnn.solver_parts import Updater

    model = ConvNet((4,), 6, (3, 8, 8), 3, seed=0)
    updater = Updater("muon", model, {"learning_rate": 0.5, "muon_learning_rate": 0.2}, True)
    updater.set_learning_rates(0.25)
    assert updater.configs["W2"]["muon_learning_rate"] == pytest.approx(0.05)
    assert updater.configs["W2"]["learning_rate"] == pytest.approx(0.125)
    updater.decay_learning_rates(0.5)
    assert updater.configs["b4"]["muon_learning_rate"] == pytest.approx(0.025)


def test_a_stack_refuses_muon():
    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((8, 6)).astype(np.float32),
            "y_train": rng.integers(0, 3, 8), "X_val": rng.standard_normal((4, 6)).astype(
                np.float32), "y_val": rng.integers(0, 3, 4)}
    stack = StackedFullyConnectedNet([5], [{"seed": 0}], input_dim=6, num_classes=3)
    with pytest.raises(ValueError, match="'muon' steps each conv filter as a whole"):
        StackedSolver(stack, data, update_rule="muon")
