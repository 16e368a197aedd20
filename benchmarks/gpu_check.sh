#!/usr/bin/env bash
# The GPU check in one call: a preflight, the test suite on cupy, then the benchmark table.
# For a GPU machine that already has CuPy, Numba, PyTorch and pytest-benchmark
# and installs nothing (fastnn runs from this checkout). Aim: under 5 minutes.
#   bash benchmarks/gpu_check.sh [report.py options]
# It cannot pass without a GPU: the preflight is fatal, and FASTNN_REQUIRE_CUPY=1
# makes every cupy test case fail (not skip) when CuPy or the GPU is missing.
# All failures are collected (up to 30), skips are listed with their reasons, and
# the benchmark table runs even when tests fail; the exit status is the tests'
# (else the report's).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTNN_REQUIRE_CUPY=1
python=${PYTHON:-python3}  # the interpreter that has CuPy

"$python" - <<'PY'
import cupy, fastnn
props = cupy.cuda.runtime.getDeviceProperties(0)
print("GPU:", props["name"].decode(), "| driver", cupy.cuda.runtime.driverGetVersion(),
      "| runtime", cupy.cuda.runtime.runtimeGetVersion(), "| cupy", cupy.__version__)
fastnn.set_backend("cupy")
x = fastnn.xp().arange(4, dtype="float32")
assert float(x.sum()) == 6.0, "a CuPy reduction gave a wrong result"
PY

status=0
"$python" -m pytest -q tests -k "cupy" -p no:cacheprovider --maxfail=30 -rfEs --durations=15 \
    || status=$?
"$python" benchmarks/report.py --backends numpy cupy --contenders fastnn naive torch "$@" \
    || { report=$?; [ "$status" -ne 0 ] || status=$report; }
exit "$status"
