#!/usr/bin/env bash
# The GPU check in one call: the test suite on cupy, then the benchmark table.
# For a GPU machine that already has CuPy, Numba, PyTorch and pytest-benchmark
# and installs nothing (fastnn runs from this checkout). Aim: under 5 minutes.
#   bash benchmarks/gpu_check.sh [report.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python - <<'PY'
import cupy, fastnn
print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "| cupy", cupy.__version__)
fastnn.set_backend("cupy")
PY
python -m pytest -q -x tests -k "cupy" -p no:cacheprovider
status=$?
python benchmarks/report.py --backends numpy cupy --contenders fastnn naive torch "$@"
exit $status
