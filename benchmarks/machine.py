"""Machine probes: what can run here, CPU load, the matrix-multiply ceiling, versions.

Nothing here knows a workload or a trainer. The matrix-multiply ceiling is
the sgemm rate of a 4096x4096x4096 float32 product (median of several, same
threads as fastnn), per library and device; a contender's share of it is

    (FLOPs per training step / seconds per step) / sgemm rate

(FLOPs per step: workloads.py; seconds per step: trainers.py).
"""
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time

import numpy as np

import fastnn

SGEMM_N = 4096


# -- what is available -------------------------------------------------------
def gpu_reason():
    """Why CuPy cannot run here, or None."""
    from fastnn.backend import cupy_available

    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'fastnn[cuda13]' or 'fastnn[cuda12]')"
    if not cupy_available():
        return "CuPy is installed but no CUDA GPU is usable"
    return None


def torch_reason(cuda=False):
    """Why PyTorch (with CUDA when `cuda`) cannot run here, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"PyTorch is not importable ({exc})"
    if cuda and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    return None


def synchronize(device):
    """Wait for queued GPU work (no-op on CPU)."""
    if device != "gpu":
        return
    if sys.modules.get("cupy") is not None:
        sys.modules["cupy"].cuda.Device().synchronize()
    if sys.modules.get("torch") is not None and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.synchronize()


# -- other processes on the CPUs ----------------------------------------------
def wait_until_quiet(timeout, threshold=0.05, window=0.5):
    """Sleep until other processes use under `threshold` of the CPUs over `window` seconds.

    Gives up after `timeout` seconds; returns the last share seen (None without /proc).
    """
    deadline = time.perf_counter() + timeout
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if load.share is None or load.share < threshold or time.perf_counter() > deadline:
            return load.share


class OtherLoad:
    """Context manager: the share of all CPUs that OTHER processes (and VM steal) used inside.

    From /proc/stat (all busy time) minus this process's CPU time (os.times,
    all threads, spinning BLAS threads included); None where /proc is missing.
    A timed run with a large share measured a busy machine, not the code.
    """

    share = None

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10]) if len(fields) > 9 else 0       # already in user/nice
        return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds():
        t = os.times()
        return t.user + t.system

    def __enter__(self):
        self._start = (time.perf_counter(), self._busy_seconds(), self._own_seconds())
        return self

    def __exit__(self, *exc):
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, self._busy_seconds(), self._own_seconds()
        if busy0 is not None and busy is not None and wall > 0:
            others = (busy - busy0) - (own - own0)
            self.share = min(max(others / (wall * (os.cpu_count() or 1)), 0.0), 1.0)
        return False


# -- the matrix-multiply ceiling ---------------------------------------------
def _median_rate(run, n=SGEMM_N, repeats=5, sync=lambda: None):
    run()  # warm-up: thread pools, allocation, library init
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def sgemm_rates(repeats=5, include_torch=True, include_gpu=True):
    """GFLOP/s of an n x n x n float32 product per library: {'cpu': {...}, 'gpu': {...}}."""
    n = SGEMM_N
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), dtype=np.float32)
    rates = {"cpu": {"numpy": _median_rate(lambda: np.matmul(a, b, out=c), n, repeats)}, "gpu": {}}
    torch = None
    if include_torch and torch_reason() is None:
        import torch

        torch.set_num_threads(fastnn.get_num_threads())
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        rates["cpu"]["torch"] = _median_rate(lambda: torch.mm(ta, tb, out=tc), n, repeats)
    if include_gpu and gpu_reason() is None:
        import cupy

        ga, gb = cupy.asarray(a), cupy.asarray(b)
        gc = cupy.empty_like(ga)
        rates["gpu"]["cupy"] = _median_rate(lambda: cupy.matmul(ga, gb, out=gc), n, repeats,
                                            cupy.cuda.Device().synchronize)
    if include_gpu and torch is not None and torch.cuda.is_available():
        ga, gb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        gc = torch.empty_like(ga)
        rates["gpu"]["torch"] = _median_rate(lambda: torch.mm(ga, gb, out=gc), n, repeats,
                                             torch.cuda.synchronize)
    return rates


def ceiling(rates, device):
    """The fastest sgemm measured on `device` (GFLOP/s), or None."""
    values = rates.get(device, {}).values()
    return max(values) if values else None


def share_of_ceiling(res, rates):
    """A result's achieved GFLOP/s over its device's ceiling, or None."""
    top = ceiling(rates, res["device"])
    return res["achieved_gflops"] / top if top else None


# -- the environment -----------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def blas_override_note(env):
    """A warning line when the environment pins OpenBLAS's kernels, else None."""
    if not env.get("blas_overrides"):
        return None
    pinned = " ".join(f"{k}={v}" for k, v in env["blas_overrides"].items())
    return (f"NOTE: {pinned} is set: OpenBLAS runs the kernels it names, not the ones it would "
            "pick for this CPU (some machines set it for old OpenBLAS builds; on an AVX-512 CPU "
            "a current numpy is about 2x faster without it). To measure a current numpy, unset "
            f"both for this command alone: env -u {' -u '.join(BLAS_OVERRIDES)} python ...")


def environment():
    """Versions, thread counts and hardware, for the report header and extra_info."""
    import numba
    from threadpoolctl import threadpool_info

    env = {"python": platform.python_version(), "fastnn": fastnn.__version__,
           "numpy": np.__version__, "numba": numba.__version__,
           "numba_threading_layer": None,
           "fastnn_threads": fastnn.get_num_threads(),
           "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "gpu": None}
    try:
        env["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run: fastnn's kernels are serial
        env["numba_threading_layer"] = "not started"
    env["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                          "threading_layer", "architecture", "filepath")}
                   for p in threadpool_info() if p.get("user_api") == "blas"]
    env["blas_overrides"] = {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}
    if torch_reason() is None:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            env["cupy"] = cupy.__version__
            if gpu_reason() is None:
                props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
                env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) \
                    else props["name"]
        except Exception as exc:  # a broken CuPy install: report it, don't fail
            env["cupy"] = f"unusable ({exc})"
    return env
