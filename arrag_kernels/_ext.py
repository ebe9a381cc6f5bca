"""The optional compiled extension (``arrag_kernels._C`` over ``libarrag_kernels``; see csrc/).

Importing this module never fails. ``HAS_EXT`` says whether the extension is usable and
``EXT_ERROR`` why not (not built, build failed, disabled, import error); likewise ``HAS_CUDA_EXT``
and ``CUDA_EXT_ERROR`` for its CUDA kernels. Set ``ARRAG_KERNELS_DISABLE_EXT=1`` to run without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DISABLE_ENV = "ARRAG_KERNELS_DISABLE_EXT"
_HERE = Path(__file__).resolve().parent
# The C library (stable C ABI, csrc/include/arrag_kernels/arrag.h), next to _C when built.
LIB_PATH = _HERE / "libarrag_kernels.so"


def _build_info() -> dict:
    try:
        return json.loads((_HERE / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _load():
    if os.environ.get(DISABLE_ENV, "0") == "1":
        return None, f"disabled by {DISABLE_ENV}=1"
    info = _build_info()
    try:
        from . import _C
    except ImportError as e:
        if info and not info.get("ext"):
            return None, f"the extension was not built ({info.get('reason', 'unknown reason')})"
        return None, f"arrag_kernels._C could not be imported ({e}); reinstall with ARRAG_KERNELS_BUILD_EXT=1 to see why"
    return _C, None


_C, EXT_ERROR = _load()
HAS_EXT = _C is not None

if not HAS_EXT:
    HAS_CUDA_EXT, CUDA_EXT_ERROR = False, f"C++ extension unavailable: {EXT_ERROR}"
elif not _C.has_cuda():
    HAS_CUDA_EXT = False
    CUDA_EXT_ERROR = "the extension was built without CUDA (" + (_build_info().get("cuda_reason") or "nvcc not used") + ")"
else:
    HAS_CUDA_EXT, CUDA_EXT_ERROR = True, None
