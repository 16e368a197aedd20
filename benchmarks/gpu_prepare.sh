#!/usr/bin/env bash
# Run HERE, on a machine with pip access, before a device run: stages what the GPU
# machine lacks into folders of the checkout that .gitignore ignores and `carry` sends:
#   .data/  the bundled CIFAR-10 archive (18 MB) and its build script, from ../shared/data
#   .whl/   Optuna and the dependencies the device image lacks, as wheels for its Python 3.12
# benchmarks/README.md ("On the project's GPU test machine") gives the run command that uses them.
#   bash benchmarks/gpu_prepare.sh [SHARED_DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
mkdir -p .data .whl
cp "$shared/cifar10-jpeg.tar.xz" "$shared/build_cifar10.py" .data/
# the versions the development venv holds; the device image has numpy, tqdm, PyYAML,
# packaging, typing-extensions and MarkupSafe already
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 sqlalchemy==2.1.9 mako==1.4.3 greenlet==3.5.6
du -sh .data .whl
