"""Search backends behind one interface: ``search(queries, k) -> (dist, ids)``.

All backends return float32 squared L2 distances (ascending) and int64 ids on the queries' device.
"""

from __future__ import annotations

import torch

from ..ops import knn

INDEX_TYPES = ("flat", "faiss-flat")


class ExactSearch:
    """Brute-force exact search with :func:`arrag_kernels.ops.knn` over device-resident keys."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    def to(self, device, dtype=None) -> "ExactSearch":
        return ExactSearch(self.keys.to(device=device, dtype=dtype or self.keys.dtype))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return knn(queries.to(self.keys.dtype), self.keys, k)


class FaissFlatSearch:
    """faiss ``IndexFlatL2`` on the CPU (requires ``faiss-cpu``); results come back to the queries' device."""

    def __init__(self, keys: torch.Tensor):
        try:
            import faiss
        except ImportError as e:
            raise ImportError("index='faiss-flat' needs faiss: pip install faiss-cpu") from e
        self.keys = keys
        self.index = faiss.IndexFlatL2(keys.shape[1])
        self.index.add(keys.detach().float().cpu().contiguous().numpy())

    def to(self, device, dtype=None) -> "FaissFlatSearch":
        return self  # the index lives on the host

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.index.d}")
        if not 1 <= k <= self.index.ntotal:
            raise ValueError(f"k must be in [1, {self.index.ntotal}], got {k}")
        d, i = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device)


def make_search(index: str, keys: torch.Tensor):
    if index == "flat":
        return ExactSearch(keys)
    if index == "faiss-flat":
        return FaissFlatSearch(keys)
    raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
