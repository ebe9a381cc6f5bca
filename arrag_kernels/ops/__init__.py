"""Stateless operations of the AR-RAG decode step, each with a pure PyTorch reference (``*_ref``).

The public functions validate their inputs and dispatch to the best available backend (see
:mod:`arrag_kernels.ops._dispatch`).
"""

import os

import torch

from . import _dispatch
from ._dispatch import BACKENDS, BackendUnavailable, current_backend, register_lazy_backend, use_backend
from .daid import daid_mix, daid_mix_ref, daid_sample, daid_sample_ref, retrieval_distribution_ref
from .faid import faid_blend, faid_blend_ref
from .ivfpq import ivfpq_search, ivfpq_search_ref
from .ivfpq_plan import ivfpq_plan
from .knn import MAX_K, knn, knn_ref
from .faid_plan import faid_blend_plan
from .knn_plan import knn_plan
from .neighborhood import (
    feature_neighbor_keys,
    neighbor_keys,
    neighbor_keys_ref,
    retrieval_positions,
)

from . import _cpp  # noqa: E402,F401  registers the C++ backend (works without the extension)


def _import_triton() -> str | None:
    """Imports the Triton backend, which registers its implementations; returns why it cannot, if so."""
    _dispatch._lazy.pop("triton", None)
    try:
        from . import _triton  # noqa: F401
    except ImportError as exc:
        reason = f"triton is not importable ({exc})"
        register_lazy_backend("triton", lambda args, kwargs: reason)  # every op's "triton" then gives this reason
        return reason
    return None


def _load_triton(args, kwargs) -> str | None:
    """The Triton backend is imported at the first dispatch that can use it (CUDA tensors, or any
    tensors under TRITON_INTERPRET=1): ``import arrag_kernels`` does not pay for triton_op's import
    of torch._inductor / torch._dynamo (seconds on a CPU machine)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if os.environ.get("TRITON_INTERPRET") != "1" and not any(t.device.type == "cuda" for t in tensors):
        return ("Triton runs on CUDA tensors; CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                "(or move the tensors to CUDA)")
    return _import_triton()


register_lazy_backend("triton", _load_triton)
if torch.cuda.is_available():
    # Where CUDA runs, register now: torch.compile and CUDA-graph capture must not meet an import.
    _import_triton()

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "MAX_K",
    "current_backend",
    "daid_mix",
    "daid_mix_ref",
    "daid_sample",
    "daid_sample_ref",
    "faid_blend",
    "faid_blend_plan",
    "faid_blend_ref",
    "feature_neighbor_keys",
    "ivfpq_plan",
    "ivfpq_search",
    "ivfpq_search_ref",
    "knn",
    "knn_plan",
    "knn_ref",
    "neighbor_keys",
    "neighbor_keys_ref",
    "retrieval_distribution_ref",
    "retrieval_positions",
    "use_backend",
]
