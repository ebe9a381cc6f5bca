"""Shared helpers of the Triton backend: availability checks, launch constants, the one launcher and the
scratch of the two sample-bound-filter-select top-k searches."""

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


def launch(kernel, grid, *args, **meta):
    """Every Triton launch of the ops goes through here (the launch-plan tests record it, the sm_90 compile
    test replaces it)."""
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def select_scratch(shape, device, sample: tuple[str, str], survivors: tuple[str, str]) -> dict[str, torch.Tensor]:
    """The buffers of a sample / bound / filter / select top-k (the exact search, the IVF-PQ scan; their
    plans' ``scratch``; none needs initialising), for ``shape``'s batch Q, sample S and capacity C: the
    (Q, S) int32 pair named ``sample``, the (Q,) int64 bound, one counter per query 128 B apart (see the
    filters' atomics) and the (Q, C) int32 pair named ``survivors``."""
    Q, S, C = shape.batch, shape.sample, shape.capacity
    i32 = dict(dtype=torch.int32, device=device)
    return {sample[0]: torch.empty(Q, S, **i32), sample[1]: torch.empty(Q, S, **i32),
            "bound": torch.empty(Q, dtype=torch.int64, device=device), "counts": torch.empty(Q, 32, **i32),
            survivors[0]: torch.empty(Q, C, **i32), survivors[1]: torch.empty(Q, C, **i32)}
