"""Shared helpers of the Triton backend: availability checks and launch constants."""

from __future__ import annotations

import os

import torch

from .._dispatch import current_backend
from ..knn_plan import next_pow2  # noqa: F401  launch geometry lives in knn_plan (importable without triton)

# triton.jit picks the interpreter at decoration time, so what counts is the value at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def device_reason(*tensors: torch.Tensor) -> str | None:
    """None if Triton can run on these tensors' device, else why not."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and not INTERPRETED:
            return (
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing arrag_kernels "
                "(or move the tensors to CUDA)"
            )
        if t.device.type == "cpu" and current_backend() != "triton":
            # The interpreter is orders of magnitude slower than the reference: a test vehicle that
            # runs only when "triton" is forced, never an "auto" choice.
            return "the Triton interpreter runs CPU tensors only when the 'triton' backend is forced"
        if t.device.type == "cpu":
            continue
        return f"tensors on {t.device} are not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    return None


def dtype_reason(name: str, t: torch.Tensor, allowed: tuple) -> str | None:
    if t.dtype not in allowed:
        return f"{name} dtype {t.dtype} is not supported (expected one of {', '.join(str(d) for d in allowed)})"
    return None
