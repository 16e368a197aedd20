"""The README's two commands one after the other, as a newcomer runs them, in a fresh venv.

`pip install .`, a run (which compiles kernels), then the test command's
`pip install -e .`: the `fastnn` command must still work. It broke when Numba
cached kernels inside site-packages/fastnn/: pip's uninstall left that folder,
and Python imported it as an empty namespace package instead of the editable
install. The venv gets fastnn's dependencies from this environment (a .pth
line) and pip installs with --no-deps, so the test needs no internet.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

import fastnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
DEPENDENCIES = ("numpy", "numba", "llvmlite", "matplotlib", "tqdm", "threadpoolctl", "optuna")


def _dependency_folders():
    """The site folders this environment imports fastnn's dependencies (and its build tools) from."""
    folders = []
    for name in (*DEPENDENCIES, "setuptools", "wheel"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folder = os.path.dirname(os.path.dirname(spec.origin))
            if folder not in folders:
                folders.append(folder)
    return folders


def _can_build_offline():
    """Whether this environment's setuptools builds fastnn's wheels without build isolation.

    pyproject.toml asks for setuptools 68+; before 70.1 it needs the `wheel` package too.
    """
    if importlib.util.find_spec("setuptools") is None:
        return False
    major_minor = tuple(int(part) for part in version("setuptools").split(".")[:2])
    return major_minor >= (70, 1) or (major_minor >= (68, 0)
                                      and importlib.util.find_spec("wheel") is not None)


def _run(args, env, cwd):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No matching distribution found for setuptools" in result.stderr:
        pytest.skip("building fastnn needs setuptools>=68 (or 64+ with wheel); this environment "
                    "has none and pip could not fetch it (offline?)")
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result


def test_install_run_then_editable_install_keeps_the_fastnn_command(tmp_path):
    if not os.path.exists(os.path.join(REPO, "pyproject.toml")):
        pytest.skip(f"fastnn is not imported from a source checkout ({REPO}): nothing to install")
    repo = tmp_path / "repo"  # a copy: building writes into the source folder
    shutil.copytree(os.path.join(REPO, "fastnn"), repo / "fastnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), repo / name)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as fh:
        fh.write("\n".join(_dependency_folders()) + "\n")

    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(tmp_path / "home")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    if _can_build_offline():
        pip += ["--no-build-isolation", "--no-index"]  # this environment's setuptools, offline
    # else pip fetches setuptools from the package index (once, into its cache)

    _run([*pip, str(repo)], env, tmp_path)
    # the first command's run: compiles (and caches) kernels
    _run([python, "-c", "import numpy as np, fastnn.layers as L; "
          "L.relu_forward(np.ones(3, np.float32))"], env, tmp_path)
    _run([*pip, "-e", str(repo)], env, tmp_path)  # the second command

    _run([venv / "bin" / "fastnn", "--help"], env, tmp_path)
    where = _run([python, "-c", "import fastnn; fastnn.set_backend('numpy'); print(fastnn.__file__)"],
                 env, tmp_path).stdout.strip()
    assert where == str(repo / "fastnn" / "__init__.py")
    leftover = os.path.join(purelib, "fastnn")  # what pip's uninstall left behind
    assert not os.path.exists(leftover), sorted(os.listdir(leftover))
