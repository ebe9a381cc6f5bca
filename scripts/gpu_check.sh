#!/usr/bin/env bash
# Everything GPU-side in one call, on a CUDA machine (the H200 lent to some sessions):
#
#   bash scripts/gpu_check.sh            # all stages (longer than one device call allows)
#   bash scripts/gpu_check.sh tests      # or any of: build tests bench-ops bench-decode bench-rest
#
# Stages (each under its own time limit, so one slow stage cannot starve the others). The device
# tool allows 10 minutes per call and 30 per session, so run them as three calls:
#   bash scripts/gpu_check.sh build tests          (<= 9.5 min)
#   bash scripts/gpu_check.sh bench-decode         (<= 9 min)
#   bash scripts/gpu_check.sh bench-ops bench-rest (<= 9.5 min)
#   build         C++/CUDA extension in place (ARRAG_KERNELS_BUILD_CUDA=1)
#   tests         the whole test suite compiled (no Triton interpreter): kernels vs references incl.
#                 bf16, CUDA k-selection, CUDA-graph decode replay and its no-host-sync check
#   bench-ops     retrieval ops per provider (reference / triton / official per-step pattern)
#   bench-decode  end-to-end decoding, Janus-Pro-1B shape: HF generate vs our loops, plain vs DAiD
#   bench-rest    FAiD blend step, FAiD training step memory, IVF-PQ search
# Results go to $OUT (the device tool's folder) or else benchmarks/results/: env JSON, logs,
# junit XML and pytest-benchmark JSON, stamped with the UTC time; commit them under
# benchmarks/results/.
#
# The GPU machine has no pytest: bash scripts/fetch_gpu_wheels.sh on a networked machine puts the
# wheels in .gpu_wheels/ (git-ignored; pass it to the device tool with carry=[".gpu_wheels"]) and
# this script installs them into .gpu_site/ on first use.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels are what this checks (the interpreter breaks on numpy 2.5)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
STAGES="${*:-build tests bench-ops bench-decode bench-rest}"
mkdir -p "$DEST"

if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
    if [ -d .gpu_wheels ]; then
        "$PY" -m pip install --quiet --no-index --find-links .gpu_wheels --target .gpu_site pytest pytest-benchmark || exit 1
        export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
    else
        echo "gpu_check: pytest / pytest-benchmark missing and no .gpu_wheels/ (see scripts/fetch_gpu_wheels.sh)" >&2
        exit 1
    fi
fi

"$PY" - > "$DEST/env_$STAMP.json" <<'PYEOF' || exit 1
import json, sys
sys.path.insert(0, "benchmarks")
from conftest import environment
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device")
json.dump(environment(), sys.stdout, indent=2)
PYEOF
cat "$DEST/env_$STAMP.json"

declare -A RC
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    echo "=== gpu_check: $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$DEST/${name}_$STAMP.log" 2>&1
    RC[$name]=$?
    tail -n 25 "$DEST/${name}_$STAMP.log"
    echo "=== gpu_check: $name rc=${RC[$name]} in $((SECONDS - t0))s"
}
bench() {  # bench NAME SECONDS FILES...
    local name=$1 limit=$2
    shift 2
    # The .jsonl gets each row as it finishes: it survives a stage cut off by its time limit.
    stage "$name" "$limit" env ARRAG_BENCH_JSONL="$DEST/${name}_$STAMP.jsonl" "$PY" -m pytest "$@" --benchmark-only \
        -q -p no:cacheprovider --benchmark-json="$DEST/${name}_$STAMP.json"
}

stage build 150 env ARRAG_KERNELS_BUILD_EXT=1 ARRAG_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
stage tests 420 "$PY" -m pytest tests/ -q -p no:cacheprovider --durations=15 --junitxml="$DEST/tests_$STAMP.xml"
bench bench-ops 270 benchmarks/bench_retrieval_ops.py
bench bench-decode 540 benchmarks/bench_decode.py
bench bench-rest 290 benchmarks/bench_faid.py benchmarks/bench_faid_train.py benchmarks/bench_ivfpq.py

status=0
for name in "${!RC[@]}"; do
    echo "gpu_check: $name rc=${RC[$name]}"
    [ "${RC[$name]}" -eq 0 ] || status=1
done
echo "gpu_check: results in $DEST"
exit $status
