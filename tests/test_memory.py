"""fastnn.memory: freed large blocks are reused, not page-faulted anew (glibc only).

Each case runs in a fresh interpreter: the allocator's settings are the process's.
"""
import os
import platform
import subprocess
import sys

import pytest

from fastnn.memory import OPT_OUT, USER_SETTINGS

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory changes glibc's malloc only")

# Page faults of the second round of allocating, filling and freeing two large arrays
# (184 MB), after importing fastnn's kernels: none when freed blocks stay in the heap; when
# glibc gives them back to the kernel, one per page touched anew: about 2,400 in 2 MB pages
# (numpy asks for transparent huge pages), 94,000 in 4 KB ones.
PROBE = """
import resource
import numpy as np
import fastnn.kernels
from fastnn import memory

def faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        a = np.empty(1024 * 32 * 31 * 31, np.float32); a.fill(1.0)
        b = np.empty(1024 * 64 * 15 * 15, np.float32); b.fill(2.0)
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_round()
print(memory.kept, faults_of_a_round())
"""


def probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, OPT_OUT)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-W", "error", "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_freed_large_blocks_are_reused_without_page_faults():
    pytest.importorskip("numba")
    kept, faults = probe()
    assert kept
    assert faults < 500, faults


@glibc_only
@pytest.mark.parametrize("setting", [{OPT_OUT: "0"},
                                     {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_users_settings_are_left_alone(setting):
    kept, faults = probe(**setting)
    assert not kept
    assert faults > 1_000, faults  # glibc's default: the blocks went back to the kernel
