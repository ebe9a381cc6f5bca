"""Stateless operations of the AR-RAG decode step, each with a pure PyTorch reference (``*_ref``).

The public functions validate their inputs and dispatch to the best available backend (see
:mod:`arrag_kernels.ops._dispatch`).
"""

from ._dispatch import BACKENDS, BackendUnavailable, current_backend, use_backend
from .daid import daid_mix, daid_mix_ref, daid_sample, daid_sample_ref, retrieval_distribution_ref
from .faid import faid_blend, faid_blend_ref
from .ivfpq import ivfpq_search, ivfpq_search_ref
from .knn import MAX_K, knn, knn_ref
from .neighborhood import feature_neighbor_keys, neighbor_keys, neighbor_keys_ref, retrieval_positions

from . import _cpp  # noqa: E402,F401  registers the C++ backend (works without the extension)

try:
    from . import _triton  # noqa: E402,F401  registers the Triton backend
except ImportError as _exc:  # a forced "triton" backend then says why it cannot run
    from .daid import daid_sample_dispatcher as _d1
    from .faid import faid_blend_dispatcher as _d2
    from .ivfpq import ivfpq_dispatcher as _d3
    from .knn import knn_dispatcher as _d4
    from .neighborhood import neighbor_keys_dispatcher as _d5

    for _d in (_d1, _d2, _d3, _d4, _d5):
        _d.register("triton", check=lambda *a, _r=f"triton is not importable ({_exc})", **k: _r)(None)

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
    "faid_blend_ref",
    "feature_neighbor_keys",
    "ivfpq_search",
    "ivfpq_search_ref",
    "knn",
    "knn_ref",
    "neighbor_keys",
    "neighbor_keys_ref",
    "retrieval_distribution_ref",
    "retrieval_positions",
    "use_backend",
]
