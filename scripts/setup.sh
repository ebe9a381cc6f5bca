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
python -m pip install --quiet --no-build-isolation -c scripts/constraints-cpu.txt -e ".[dev,eval,distributed]"
# FWD: the authors' pytorchfwd pins scipy==1.11.1 (numpy < 2) and wants torchvision for its folder CLI;
# only its packet transform and distance are used, so it goes in without its dependencies (they are in [eval]).
python -m pip install --quiet --no-deps -c scripts/constraints-cpu.txt pytorchfwd
# The miniature demo's real images: Noto colour emoji + Unicode's emoji list (Debian). Not fatal: without
# them the demo falls back to the random-weight model and the emoji tests skip.
if ! [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || ! [ -f /usr/share/unicode/emoji/emoji-test.txt ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    emoji_packages="fonts-noto-color-emoji unicode-data"
    { $SUDO apt-get install -y --no-install-recommends $emoji_packages \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y --no-install-recommends $emoji_packages; }; } >/dev/null 2>&1 \
        || echo "setup: could not install fonts-noto-color-emoji unicode-data (apt-get); the demo will use random weights"
fi
python -c "import arrag_kernels, torch, triton, transformers; print('arrag_kernels', arrag_kernels.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
