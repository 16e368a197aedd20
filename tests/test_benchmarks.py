"""benchmarks/: workloads, trainers and machine probes apart; a workload is its entry.

The benchmarks themselves never run here (too slow); these check their layout and
that each workload's declared parts (net, rule, FLOPs) are what gets trained.
"""
import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import workloads  # noqa: E402
from workloads import WORKLOADS, Rule  # noqa: E402


def test_machine_probes_and_workloads_import_without_the_trainers():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import machine; "
            "assert not {'workloads', 'trainers', 'naive'} & set(sys.modules), 'machine'; "
            "import workloads; assert 'trainers' not in sys.modules, 'workloads'; "
            "import trainers")
    subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], check=True)


def test_a_workloads_model_follows_its_entry_not_its_name():
    from fastnn.classifiers import TwoLayerNet

    renamed = dataclasses.replace(WORKLOADS["two_layer"], name="renamed")
    assert isinstance(renamed.fastnn_model(), TwoLayerNet)
    assert renamed.net.weight_scale == 1e-3  # TwoLayerNet's default, which naive.py copies
    adam = dataclasses.replace(WORKLOADS["convnet"], rule=Rule("adam", 1e-3))
    assert adam.solver_options() == {"update_rule": "adam",
                                     "optim_config": {"learning_rate": 1e-3}}


def test_a_rule_without_a_pytorch_twin_fails_when_declared():
    with pytest.raises(ValueError, match="'lion' has no PyTorch twin"):
        Rule("lion", 1e-4)


def test_two_layer_net_refuses_a_second_hidden_layer():
    with pytest.raises(ValueError, match="one hidden layer"):
        workloads.TwoLayer((100, 100))


@pytest.mark.parametrize("name", ["two_layer", "deep_bn", "three_layer_conv", "convnet_wide"])
def test_declared_products_match_the_model_built(name):
    """Each weight of the fastnn model is a product of layers() (fan_in, fan_out), in order."""
    workload = WORKLOADS[name]
    model = workload.fastnn_model()
    weights = [np.shape(w) for k, w in model.params.items() if k.startswith("W")]
    fans = [(int(np.prod(s[1:])), s[0]) if len(s) == 4 else s for s in weights]
    assert fans == [(fan_in, fan_out) for _, fan_in, fan_out, _ in workload.layers()]


def test_arrays_take_the_nets_input_shape_and_epoch_size():
    rng = np.random.default_rng(0)
    flat = {"X_train": rng.standard_normal((600, 3072), dtype=np.float32),
            "y_train": rng.integers(0, 10, 600),
            "X_val": rng.standard_normal((20, 3072), dtype=np.float32),
            "y_val": rng.integers(0, 10, 20)}
    conv = dataclasses.replace(WORKLOADS["convnet"], num_train=512)
    images = conv.arrays(flat)
    assert images["X_train"].shape == (512, 3, 32, 32) and images["y_train"].shape == (512,)
    assert np.array_equal(images["X_val"].reshape(20, -1), flat["X_val"])
    assert WORKLOADS["deep_bn"].arrays(flat)["X_train"].shape == (600, 3072)
    assert conv.iterations_per_epoch(600) == 2 and conv.warmup_images == 4 * 256


def test_conv_step_times_a_recipe_with_its_stem_frozen():
    """conv_step.py --recipe (a whitening-stem recipe, tiny) runs one timed step, with the
    stem's backward skipped under --frozen-stem (no gelu_backward among the ops)."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "conv_step.py"), "--recipe", "airbench_small",
         "--widths", "4", "4", "4", "--batch", "8", "--steps", "1", "--rounds", "1",
         "--frozen-stem", "--no-torch"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fastnn numpy" in result.stdout and "conv_pool_backward_fast" in result.stdout
    ops = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert "spatial_batchnorm_gelu_backward" in ops and "gelu_backward" not in ops


def test_the_airbench_port_trains_and_times_steps(cifar_root):
    """benchmarks/airbench_torch.py (PyTorch's airbench94 on the CPU): a tiny run to the test
    accuracies (airbench94's recipe and airbench94_muon's), and the step-rate mode."""
    pytest.importorskip("torch")
    import airbench_torch

    common = ["--widths", "4", "4", "4", "--batch-size", "16", "--num-training", "64",
              "--threads", "1", "--data", cifar_root]
    airbench_torch.main([*common, "--epochs", "2"])
    airbench_torch.main([*common, "--epochs", "2", "--muon"])
    airbench_torch.main([*common, "--steps", "2", "--layout", "nchw"])
