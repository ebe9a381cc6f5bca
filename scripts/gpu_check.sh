#!/usr/bin/env bash
# The whole GPU check as ONE call of the device tool, in <= 5 minutes of command time on a cold
# machine, so that a 15-minute lease (start-up included, H100 or H200) leaves room to fix and rerun:
#
#   bash scripts/gpu_check.sh            # on the CUDA machine (device tool: timeout_s=330,
#                                        #   carry=[".triton_cache"] once a run has brought one back)
#   bash scripts/gpu_check.sh --dry      # or GPU_CHECK_DRY=1: the same plumbing on a CPU machine, the
#                                        #   benchmarks on their CPU cases (tests/test_gpu_check.py runs it)
#
# Stages, the answers to issue 22's targets first, each under its own time limit (seconds, 280 in
# all, leaving 20 s for start-up and packing; GPU_CHECK_STAGES="..." runs a subset):
#   decode-step    per-step DAiD / FAiD overhead, Janus-Pro-1B, CUDA-graphed steps replayed
#                  interleaved with the plain step, batch 16 + CFG then 1 (bench_decode_step.py)  90
#   search         exact search in a CUDA graph vs the card's bandwidth floor, 10M keys at batch
#                  1 and 16, 1M at 16; plan, peak memory, a kernel profile (bench_search_floor.py) 30
#   ivfpq          device IVF-PQ, official layout (nlist 800, M 8), 100M entries, nprobe 32,
#                  batch 16, k 2048 (bench_ivfpq.py)                                              25
#   generate       one whole generation each: plain HF generate (one call, ~15 s) and the
#                  library's plain CUDA-graph loop, batch 16 then 1 (bench_decode.py)             60
#   build          C++/CUDA extension in place (ARRAG_KERNELS_BUILD_CUDA=1)                        20
#   tests          the compiled tests, fp16/bf16 cases (fp32 deselected): stream priorities,
#                  CUDA-graph decode replay, kNN (CUDA k-selection too), DAiD, neighbour keys,
#                  FAiD blend and decode, device IVF-PQ                                            55
# Beside the stages, from the first one on: `python -m tests.sm90 --warm` compiles the kernels the stages
# launch into the Triton cache on the idle cores (background, at most 240 s, killed at the end).
# Every stage writes its log (and benchmark JSONL, row by row; junit XML) to a work folder; after
# each stage the folder is packed again into $OUT/gpu_check.tar.gz, $OUT/summary.json (stage rc,
# seconds, limit; test counts; every row's numbers) and the issue's results summary
# $OUT/gpu-summary-<card>-<date>.json are rewritten, all by atomic rename, and the Triton cache, if
# a kernel was compiled since, is packed into $OUT/triton_cache.tgz.00 (.01, ...: 15 MiB parts, at
# most 4): at most 7 files, kept if the call is cut off. Without $OUT they go to benchmarks/results/.
#
# Triton cache: TRITON_CACHE_DIR=.triton_cache (git-ignored). To start warm, unpack a run's parts
# here (cat triton_cache.tgz.* | tar -xzf - -C .triton_cache) and carry ".triton_cache".
# Commit: the device's copy of the tree carries a stale .git: put ARRAG_GIT_COMMIT=<commit> in the command.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
[ "${1:-}" = "--dry" ] && DRY=1
unset TRITON_INTERPRET  # compiled kernels are what this checks (the interpreter breaks on numpy 2.5)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"
mkdir -p "$TRITON_CACHE_DIR"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
STAGES="${GPU_CHECK_STAGES:-decode-step search ivfpq generate build tests}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$DEST"
T_START=$SECONDS
RESULTS=""  # the results summary's path, once pack() has written it

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

# pack: the work folder, both summaries and the Triton cache into $DEST (each by atomic rename)
pack() {
    tar -czf "$WORK.tar.gz" -C "$WORK" . && mv -f "$WORK.tar.gz" "$DEST/gpu_check.tar.gz"
    RESULTS=$("$PY" scripts/gpu_check_summary.py "$WORK" "$((SECONDS - T_START))" "$DEST")
    # the Triton cache, when a kernel was compiled since its last packing
    [ -e "$WORK.stamp" ] && [ -z "$(find "$TRITON_CACHE_DIR" -newer "$WORK.stamp" -print -quit)" ] && return
    touch "$WORK.stamp"
    rm -f "$WORK".cache.*
    tar -cf - -C "$TRITON_CACHE_DIR" . | gzip -1 | split -b 15M -d - "$WORK.cache."
    local parts=("$WORK".cache.*)
    if [ "${#parts[@]}" -le 4 ]; then
        rm -f "$DEST"/triton_cache.tgz.*
        for p in "${parts[@]}"; do mv -f "$p" "$DEST/triton_cache.tgz.${p##*.}"; done
    else
        echo "gpu_check: Triton cache over 60 MiB packed: not returned" >&2
        rm -f "$WORK".cache.*
    fi
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

bench() {  # bench NAME SECONDS PYTEST_ARGS...: benchmark rows, each appended to NAME.jsonl as it finishes
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" 0 env ARRAG_BENCH_JSONL="$WORK/$name.jsonl" ARRAG_BENCH_PROFILE="$WORK/search-profile.txt" \
        "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider -rs --benchmark-max-time="$MAX_TIME"
}
D=benchmarks/bench_decode.py::test_decode
if [ "$DRY" = 1 ]; then  # the same modules on their CPU cases; one quick test
    MAX_TIME=0.05
    GENERATE=("$D[tiny-cpu-b1-hf-generate]")
    TESTS=(tests/test_overlap_streams.py::test_side_stream_below_the_forward_priority)
else
    MAX_TIME=1.0
    GENERATE=("$D[janus-pro-1b-b16-hf-generate]" "$D[janus-pro-1b-b16-cuda-graph-plain]"
              "$D[janus-pro-1b-b1-hf-generate]" "$D[janus-pro-1b-b1-cuda-graph-plain]")
    # most important first: a cut-off stage keeps the log of what ran; fp32 variants deselected
    TESTS=(tests/test_overlap_streams.py tests/test_static_loop.py tests/test_knn.py tests/test_daid.py
           tests/test_neighbor_keys.py tests/test_faid_blend.py tests/test_faid_decode.py tests/test_ivfpq.py
           -k "not float32")
fi
# Cold compilation is most of a first run's time (tests/sm90.py: ~2 min of it on one core, the top-k
# selects 6-17 s each): compile the stages' kernels on the idle cores into the Triton cache while the
# first stage sets up its model and database; it only adds cache entries (log: warm.log)
WARM_PID=""
if [ "$DRY" != 1 ]; then
    timeout -k 5 240 "$PY" -m tests.sm90 --warm > "$WORK/warm.log" 2>&1 &
    WARM_PID=$!
fi
bench decode-step 90 benchmarks/bench_decode_step.py
bench search 30 benchmarks/bench_search_floor.py
bench ivfpq 25 benchmarks/bench_ivfpq.py -k "test_gpu_ivfpq and N100M and triton and nprobe32"  # skips without CUDA
bench generate 60 "${GENERATE[@]}"
stage build 20 1 env ARRAG_KERNELS_BUILD_EXT=1 ARRAG_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
# -v: a stage cut off by its limit still names each test that ran
stage tests 55 0 "$PY" -m pytest "${TESTS[@]}" -v -p no:cacheprovider -rfEs --durations=10 --junitxml="$WORK/tests.xml"

[ -n "$WARM_PID" ] && kill "$WARM_PID" 2>/dev/null
status=$("$PY" -c "import json,sys; print(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$DEST/summary.json" 2>/dev/null || echo 1)
echo "gpu_check: $((SECONDS - T_START))s; in $DEST: summary.json, gpu_check.tar.gz, triton_cache.tgz.*, ${RESULTS:-no results summary}"
cat "${RESULTS:-/dev/null}"
rm -rf "$WORK" "$WORK".*
exit "$status"
