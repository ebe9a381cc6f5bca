#!/usr/bin/env bash
# The whole GPU check as ONE call of the device tool, inside ~8 minutes (the H200 is lent for 15
# minutes of device time in all, start-up included; one command runs at most 10 minutes and at most
# 8 files come back from $OUT):
#
#   bash scripts/gpu_check.sh            # on the CUDA machine (device tool: timeout_s=540)
#   bash scripts/gpu_check.sh --dry      # or GPU_CHECK_DRY=1: the same plumbing on a CPU machine,
#                                        # skipping what needs CUDA (tests/test_gpu_check.py runs it)
#
# Stages, in order of importance, each under its own time limit (seconds; GPU_CHECK_STAGES="..."
# runs a subset):
#   build          C++/CUDA extension in place (ARRAG_KERNELS_BUILD_CUDA=1)                     60
#   tests          the compiled test suite: CUDA-graph decode replay and its no-host-sync checks,
#                  Triton kernels vs references incl. bf16, CUDA k-selection, device IVF-PQ      200
#   bench-decode   DAiD and FAiD decode overhead at the Janus-Pro-1B shape (CUDA-graph loop,
#                  the same loop without retrieval interleaved), batch 16 then 1                 130
#   bench-search   exact search vs the H200 bandwidth floor (x_h200_floor), 10M and 1M keys       40
#   bench-ivfpq    device IVF-PQ (Triton) at nprobe 8-128, 1M and 10M entries                     30
# Every stage writes its log (and junit XML / benchmark JSONL, row by row) to a work folder; after
# each stage the folder is packed again into $OUT/gpu_check.tar.gz and $OUT/summary.json (stage
# rc, seconds, limit; test counts; every benchmark row's median and ratios) is rewritten, both
# by atomic rename: if the call is cut off, $OUT still holds the two files of the stages done.
# Without $OUT the two files go to benchmarks/results/.
#
# The GPU machine has no pytest: bash scripts/fetch_gpu_wheels.sh on a networked machine puts the
# wheels in .gpu_wheels/ (git-ignored; pass it to the device tool with carry=[".gpu_wheels"]) and
# this script installs them into .gpu_site/ on first use.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
[ "${1:-}" = "--dry" ] && DRY=1
unset TRITON_INTERPRET  # compiled kernels are what this checks (the interpreter breaks on numpy 2.5)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
STAGES="${GPU_CHECK_STAGES:-build tests bench-decode bench-search bench-ivfpq}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$DEST"
T_START=$SECONDS

if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
    if [ -d .gpu_wheels ]; then
        "$PY" -m pip install --quiet --no-index --find-links .gpu_wheels --target .gpu_site pytest pytest-benchmark || exit 1
        export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
    else
        echo "gpu_check: pytest / pytest-benchmark missing and no .gpu_wheels/ (see scripts/fetch_gpu_wheels.sh)" >&2
        exit 1
    fi
fi

GPU_CHECK_DRY="$DRY" "$PY" - > "$WORK/env.json" <<'PYEOF' || exit 1
import json, os, sys
sys.path.insert(0, "benchmarks")
from conftest import environment
import torch
if not torch.cuda.is_available() and os.environ["GPU_CHECK_DRY"] != "1":
    sys.exit("gpu_check: no CUDA device (use --dry to run the plumbing on a CPU machine)")
json.dump({**environment(), "dry": os.environ["GPU_CHECK_DRY"] == "1"}, sys.stdout, indent=2)
PYEOF
cat "$WORK/env.json"

# pack: the work folder -> $DEST/gpu_check.tar.gz, the stage table + results -> $DEST/summary.json
pack() {
    tar -czf "$WORK.tar.gz" -C "$WORK" . && mv -f "$WORK.tar.gz" "$DEST/gpu_check.tar.gz"
    "$PY" scripts/gpu_check_summary.py "$WORK" "$((SECONDS - T_START))" > "$WORK.summary" \
        && mv -f "$WORK.summary" "$DEST/summary.json"
}

stage() {  # stage NAME SECONDS NEEDS_CUDA COMMAND...
    local name=$1 limit=$2 needs_cuda=$3
    shift 3
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    if [ "$DRY" = 1 ] && [ "$needs_cuda" = 1 ]; then
        echo "{\"stage\": \"$name\", \"limit_s\": $limit, \"skipped\": \"dry run: needs CUDA\"}" >> "$WORK/stages.jsonl"
        pack
        return
    fi
    echo "=== gpu_check: $name (limit ${limit}s)"
    local t0=$SECONDS rc
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    tail -n 15 "$WORK/$name.log"
    echo "{\"stage\": \"$name\", \"limit_s\": $limit, \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)}" >> "$WORK/stages.jsonl"
    echo "=== gpu_check: $name rc=$rc in $((SECONDS - t0))s"
    pack
}
bench() {  # bench NAME SECONDS NODE_IDS_OR_ARGS...
    local name=$1 limit=$2
    shift 2
    # The .jsonl gets each row as it finishes: it survives a stage cut off by its time limit.
    stage "$name" "$limit" 0 env ARRAG_BENCH_JSONL="$WORK/$name.jsonl" "$PY" -m pytest "$@" --benchmark-only -q \
        -p no:cacheprovider --benchmark-max-time=1.0 --benchmark-json="$WORK/$name.json"
}

stage build 60 1 env ARRAG_KERNELS_BUILD_EXT=1 ARRAG_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
if [ "$DRY" = 1 ]; then  # the plumbing of the tests stage, on one quick CPU test
    TESTS=(tests/test_knn.py::test_knn_bad_inputs)
else  # most important first: a cut-off stage keeps the log of what ran
    TESTS=(tests/test_static_loop.py tests/test_knn.py tests/test_daid.py tests/test_neighbor_keys.py
           tests/test_faid_decode.py tests/test_faid_blend.py tests/test_ivfpq.py)
fi
# -v: a stage cut off by its limit still names each test that ran (first run: Triton compiles every kernel)
stage tests 200 0 "$PY" -m pytest "${TESTS[@]}" -v -p no:cacheprovider -rfEs --durations=10 --junitxml="$WORK/tests.xml"
D=benchmarks/bench_decode.py::test_decode
bench bench-decode 130 "$D[janus-pro-1b-shape-b16-cuda-graph-daid-db1000k]" "$D[janus-pro-1b-shape-b16-cuda-graph-faid-db1000k]" \
    "$D[janus-pro-1b-shape-b1-cuda-graph-daid-db1000k]" "$D[janus-pro-1b-shape-b16-cuda-graph-daid-db10000k]" \
    "$D[janus-pro-1b-shape-b16-cuda-graph-daid-overlap-db1000k]"
K=benchmarks/bench_retrieval_ops.py::test_knn
bench bench-search 40 "$K[janus1b-b16-db10M-triton-graph]" "$K[janus1b-b1-db10M-triton-graph]" \
    "$K[janus1b-b16-db10M-triton]" "$K[janus1b-b16-db1M-triton-graph]"
bench bench-ivfpq 30 benchmarks/bench_ivfpq.py -k "test_gpu_ivfpq and triton and (N1M or N10M) and not nprobe1]"

status=$("$PY" -c "import json,sys; print(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$DEST/summary.json" 2>/dev/null || echo 1)
echo "gpu_check: $((SECONDS - T_START))s; $DEST/summary.json and $DEST/gpu_check.tar.gz"
cat "$DEST/summary.json" 2>/dev/null | head -c 3000
rm -rf "$WORK"
exit "$status"
