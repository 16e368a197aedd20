"""Compiled kernels are cached in a user folder, never inside the installed package.

A cache file left in site-packages/fastnn/ survives `pip uninstall` and turns
the leftover folder into a namespace package that hides a later install
(test_install.py runs that sequence).
"""
import os
import subprocess
import sys

import numba.core.config

import fastnn
from fastnn.kernels import compile_cache

PACKAGE = os.path.dirname(fastnn.__file__)
# A kernel whose first call compiles (or loads) one cached function.
COMPILE = "import numpy as np, fastnn.layers as L; L.relu_forward(np.ones(3, np.float32))"


def _cache_files(folder):
    """Numba's cache files under folder: their relative paths."""
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files if f.endswith((".nbi", ".nbc")))


def _package_cache_state():
    """The cache files in the package with their modification times (a rewrite shows)."""
    return [(name, os.stat(os.path.join(PACKAGE, name)).st_mtime_ns)
            for name in _cache_files(PACKAGE)]


def _compile_in_subprocess(tmp_path, **env):
    """Run COMPILE with HOME in tmp_path and the given variables (None: unset)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    environ["HOME"] = str(tmp_path / "home")
    environ.update({k: v for k, v in env.items() if v is not None})
    result = subprocess.run([sys.executable, "-c", COMPILE], env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_cache_root_is_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compile_cache.cache_root() == str(tmp_path / ".cache" / "fastnn" / "numba")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_root() == str(tmp_path / "xdg" / "fastnn" / "numba")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # invalid by the XDG spec: ignored
    assert compile_cache.cache_root() == str(tmp_path / ".cache" / "fastnn" / "numba")


def test_cache_root_honours_numba_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_root() == str(tmp_path / "numba")


def test_kernels_are_cached_in_the_user_folder_not_the_package(tmp_path):
    before = _package_cache_state()
    _compile_in_subprocess(tmp_path)
    cached = _cache_files(tmp_path / "home" / ".cache" / "fastnn" / "numba")
    assert any("_relu_forward" in name for name in cached), cached
    assert _package_cache_state() == before  # nothing written into the package


def test_kernels_are_cached_in_numba_cache_dir_when_set(tmp_path):
    _compile_in_subprocess(tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    assert any("_relu_forward" in name for name in _cache_files(tmp_path / "numba"))
    assert _cache_files(tmp_path / "home") == []


def test_an_unwritable_cache_folder_means_no_cache_and_no_error(tmp_path):
    # A regular file where the folder would go: no folder can be made there, even as root.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    before = _package_cache_state()
    result = _compile_in_subprocess(tmp_path, XDG_CACHE_HOME=str(blocker))
    assert result.stderr == ""
    assert _package_cache_state() == before
    assert _cache_files(tmp_path) == []


def test_no_home_means_no_cache_folder(monkeypatch):
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it does without a home
    assert compile_cache.cache_root() is None


def test_the_cache_folder_changes_with_any_kernel_source(tmp_path):
    """Kernels inline helpers from other files (GELU's erf into batchnorm's loops), which Numba's
    per-file check does not see: editing any kernel file must start a fresh cache folder."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\n")
    (folder / "b.py").write_text("y = 2\n")
    first = compile_cache.sources_digest(str(folder))
    compile_cache.sources_digest.cache_clear()
    (folder / "b.py").write_text("y = 3\n")
    assert compile_cache.sources_digest(str(folder)) != first
    compile_cache.sources_digest.cache_clear()
    (folder / "b.py").write_text("y = 2\n")
    (folder / "notes.txt").write_text("not a source")
    assert compile_cache.sources_digest(str(folder)) == first


def test_kernels_are_cached_under_the_digest_of_their_sources(tmp_path):
    _compile_in_subprocess(tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    digest = compile_cache.sources_digest(os.path.join(PACKAGE, "kernels"))
    cached = [name for name in _cache_files(tmp_path / "numba") if "_relu_forward" in name]
    assert cached and all(digest in name.split(os.sep) for name in cached), cached
