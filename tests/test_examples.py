"""The scripts in examples/ run from start to end (tiny data, short runs) and save their plots."""
import os
import re
import subprocess
import sys

import pytest

from helpers import PNG_MAGIC

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SMALL = ["--num-training", "120", "--num-validation", "40", "--num-test", "50", "--epochs", "1"]


@pytest.mark.parametrize("script, flags, plots", [
    ("convolutional_networks.py", ["--widths", "4", "8", "--stem-width", "4"],
     ["convolutional_networks_overfit.png", "convolutional_networks.png"]),
    ("fully_connected_net.py", [], ["fully_connected_net.png"]),
    ("two_layer_net.py", [], ["two_layer_weights.png"]),
])
def test_example_runs_on_tiny_data(cifar_root, tmp_path, script, flags, plots):
    if not os.path.exists(os.path.join(EXAMPLES, script)):
        pytest.skip(f"no examples/ folder beside the tests ({EXAMPLES})")
    env = {**os.environ, "FASTNN_DATA": cifar_root, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *SMALL, *flags],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    if script == "convolutional_networks.py":  # the sanity check: 100 images are learnt by heart
        overfit = re.search(r"overfit: train accuracy ([\d.]+)", result.stdout)
        assert overfit and float(overfit.group(1)) >= 0.9, result.stdout
