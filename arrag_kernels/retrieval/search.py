"""Search backends behind one interface: ``search(queries, k) -> (dist, ids)``.

All backends return float32 squared L2 distances (ascending) and int64 ids on the queries' device.
IVF-PQ search pads missing neighbours (fewer than k entries in the probed lists) with distance
FLT_MAX and id -1, like FAISS.
"""

from __future__ import annotations

import torch

from ..ops import current_backend, knn
from ..ops.ivfpq import ivfpq_search

INDEX_TYPES = ("flat", "faiss-flat", "ivfpq")


class ExactSearch:
    """Brute-force exact search with :func:`arrag_kernels.ops.knn` over device-resident keys."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

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

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.index.d}")
        if not 1 <= k <= self.index.ntotal:
            raise ValueError(f"k must be in [1, {self.index.ntotal}], got {k}")
        d, i = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device)


class FaissIVFPQSearch:
    """A FAISS (OPQ +) IVF-PQ index searched by FAISS: faiss-cpu, or faiss-gpu for CUDA queries when installed."""

    def __init__(self, index, nprobe: int):
        from .faiss_index import import_faiss

        self.faiss = import_faiss()
        self.index = index
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        from .faiss_index import set_nprobe

        set_nprobe(self.index, nprobe)
        self._gpu_index = None  # copied again, with the new nprobe, at the next CUDA search

    def _index_for(self, device: torch.device):
        if device.type != "cuda" or not hasattr(self.faiss, "StandardGpuResources"):
            return self.index
        if self._gpu_index is None:
            self._res = self.faiss.StandardGpuResources()
            self._gpu_index = self.faiss.index_cpu_to_gpu(self._res, device.index or 0, self.index)
        return self._gpu_index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index_for(queries.device)
        d, i = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device)


class DeviceIVFPQSearch:
    """The arrays of a FAISS-trained IVF-PQ index on one device, searched by :func:`arrag_kernels.ops.ivfpq_search`.

    The arrays are uploaded once; ``search`` runs without host synchronisation (the candidate
    buffer size for an nprobe is computed once, on the host, from the list sizes).
    """

    def __init__(self, arrays: dict, nprobe: int, device):
        self.arrays = {n: (t.to(device) if t is not None else None) for n, t in arrays.items()}
        self.nprobe = nprobe
        sizes = (arrays["offsets"][1:] - arrays["offsets"][:-1]).sort(descending=True).values
        self._largest_cumsum = torch.cumsum(sizes, 0).tolist()

    def set_nprobe(self, nprobe: int) -> None:
        nlist = self.arrays["centroids"].shape[0]
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe must be in [1, nlist = {nlist}], got {nprobe}")
        self.nprobe = nprobe

    def max_candidates(self, nprobe: int) -> int:
        return max(1, self._largest_cumsum[nprobe - 1])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.arrays
        return ivfpq_search(queries, a["rotation"], a["centroids"], a["codebooks"], a["term1"], a["codes"], a["ids"],
                            a["offsets"], self.nprobe, k, self.max_candidates(self.nprobe))


class IVFPQSearch:
    """IVF-PQ search that follows the queries: FAISS for CPU queries under the ``auto`` backend, the
    device search (:class:`DeviceIVFPQSearch`, Triton or reference) otherwise, its arrays uploaded
    once per device."""

    def __init__(self, index, nprobe: int):
        self.index = index
        self.nprobe = nprobe
        self._faiss = None
        self._device: dict[torch.device, DeviceIVFPQSearch] = {}

    def set_nprobe(self, nprobe: int) -> None:
        """Change nprobe without uploading the device arrays again."""
        for backend in [self._faiss, *self._device.values()]:
            if backend is not None:
                backend.set_nprobe(nprobe)
        self.nprobe = nprobe

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if queries.device.type == "cpu" and current_backend() == "auto":
            if self._faiss is None:
                self._faiss = FaissIVFPQSearch(self.index, self.nprobe)
            return self._faiss.search(queries, k)
        if queries.device not in self._device:
            from .faiss_index import ivfpq_arrays

            self._device[queries.device] = DeviceIVFPQSearch(ivfpq_arrays(self.index), self.nprobe, queries.device)
        return self._device[queries.device].search(queries, k)


def make_search(index: str, keys: torch.Tensor | None, faiss_index=None, nprobe: int = 1):
    """The search backend of a database: exact over ``keys``, or IVF-PQ over ``faiss_index`` with ``nprobe``."""
    if index == "ivfpq":
        if faiss_index is None:
            raise ValueError("index='ivfpq' needs a trained FAISS IVF-PQ index")
        return IVFPQSearch(faiss_index, nprobe)
    if keys is None:
        raise ValueError(f"index={index!r} searches the exact keys, but this database holds none (index-only)")
    if index == "flat":
        return ExactSearch(keys)
    if index == "faiss-flat":
        return FaissFlatSearch(keys)
    raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
