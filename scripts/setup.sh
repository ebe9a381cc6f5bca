#!/usr/bin/env bash
# Fresh-machine set-up (CPU): a virtual environment in .venv with a version set known to work together.
# torch==2.13.0 is installed first, on its own: on our machines it resolves to a local CPU wheel,
# while any other torch requirement would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c scripts/constraints-cpu.txt setuptools wheel pybind11 cmake ninja
# No build isolation: the build uses the tools above and never resolves torch again.
python -m pip install --quiet --no-build-isolation -c scripts/constraints-cpu.txt -e ".[dev]"
python -c "import arrag_kernels, torch, triton, transformers; print('arrag_kernels', arrag_kernels.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
