#!/usr/bin/env bash
# GPU check of the Triton backend, one command on a CUDA machine:
#   bash scripts/gpu_check.sh
# 1. tests/test_triton_kernels.py compiled (TRITON_INTERPRET unset; bf16 and full opcheck included);
# 2. benchmarks/bench_retrieval_ops.py (reference vs triton vs official pattern, Janus-Pro-1B shapes).
# Writes env.json, the junit XML, logs and the pytest-benchmark JSON to $OUT if set, else to
# benchmarks/results/. pytest and pytest-benchmark must be importable; if they are not, wheels in
# $WHEELS are installed (make them on a networked machine with:
#   pip download --only-binary=:all: --python-version 3.12 -d wheels pytest pytest-benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter is broken with the GPU machine's numpy, and not what we test
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"

if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" pytest pytest-benchmark || exit 1
    else
        echo "gpu_check: pytest / pytest-benchmark missing; set WHEELS=<dir with their wheels>" >&2
        exit 1
    fi
fi

"$PY" - > "$DEST/env_$STAMP.json" <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
from conftest import environment
import torch
env = environment()
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device")
json.dump(env, sys.stdout, indent=2)
PYEOF
[ $? -eq 0 ] || exit 1
cat "$DEST/env_$STAMP.json"

"$PY" -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider --durations=10 \
    --junitxml="$DEST/triton_tests_$STAMP.xml" 2>&1 | tee "$DEST/triton_tests_$STAMP.log"
tests_rc=${PIPESTATUS[0]}

"$PY" -m pytest benchmarks/bench_retrieval_ops.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$DEST/bench_retrieval_ops_$STAMP.json" 2>&1 | tee "$DEST/bench_retrieval_ops_$STAMP.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, benchmarks rc=$bench_rc, results in $DEST"
exit $(( tests_rc != 0 || bench_rc != 0 ))
