#!/usr/bin/env bash
# The full miniature run behind the README's Evaluation section (a benchmark, not a test): train the
# miniature Janus and its FAiD blenders on the emoji train split (seed 0; ~45 min on 2 shared cores), then evaluate it
# (~13 min). Writes the weights to ${2:-miniature_weights}/ (training never overwrites the shipped ones in
# arrag_kernels/miniature/weights/, which are this command's output copied there) and the tables/figures to
# ${1:-eval_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WEIGHTS=${2:-miniature_weights}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
"$PY" -m arrag_kernels.miniature.train --out "$WEIGHTS" --seed 0
"$PY" -m arrag_kernels eval --weights "$WEIGHTS" --out "${1:-eval_out}"
