#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks (pytest, pytest-benchmark and their
# dependencies, ~2 MB) into .gpu_wheels/, for scripts/gpu_check.sh. Run on a machine with PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .gpu_wheels pytest pytest-benchmark
ls .gpu_wheels
