"""Search backends behind one interface: ``search(queries, k, values=None) -> (dist, ids[, tokens])``.

All backends return float32 squared L2 distances (ascending) and int64 ids on the queries' device;
given ``values`` (a database's token ids, indexed by entry id), also ``values[ids]`` as int64 (-1
for padding), gathered inside the search's last kernel by the device searches (exact and IVF-PQ
on one device) and after it by the others.
IVF-PQ search pads missing neighbours (fewer than k entries in the probed lists) with distance
FLT_MAX and id -1, like FAISS; the device IVF-PQ search can shard its inverted lists over several
devices (:class:`DeviceIVFPQSearch`).
"""

from __future__ import annotations

import contextlib

import torch

from ..ops import current_backend, knn
from ..ops.ivfpq import ivfpq_probe, ivfpq_scan, pack
from ..ops.knn import with_values
from .ondisk import lists_on_disk, refuse_device

INDEX_TYPES = ("flat", "faiss-flat", "ivfpq")


class ExactSearch:
    """Brute-force exact search with :func:`arrag_kernels.ops.knn` over device-resident keys."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    def search(self, queries: torch.Tensor, k: int, values: torch.Tensor | None = None):
        return knn(queries.to(self.keys.dtype), self.keys, k, values)


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

    def search(self, queries: torch.Tensor, k: int, values: torch.Tensor | None = None):
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.index.d}")
        if not 1 <= k <= self.index.ntotal:
            raise ValueError(f"k must be in [1, {self.index.ntotal}], got {k}")
        d, i = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return with_values(torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device), values)


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

    def search(self, queries: torch.Tensor, k: int, values: torch.Tensor | None = None):
        index = self._index_for(queries.device)
        d, i = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return with_values(torch.from_numpy(d).to(queries.device), torch.from_numpy(i).to(queries.device), values)


def check_shard_devices(devices, queries_device: torch.device | None = None) -> list[torch.device]:
    """Check a list of devices to shard IVF-PQ lists over: non-empty, one device type (that of
    ``queries_device`` if given), repeats allowed, and each CUDA device present on this machine."""
    if isinstance(devices, (str, torch.device)):
        raise ValueError(f"shards: expected a list of devices, e.g. ['cuda:0', 'cuda:1'], got {devices!r}")
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise ValueError("shards: expected a non-empty list of devices, e.g. ['cuda:0', 'cuda:1'], got []")
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"shards: expected devices of one type, got {[str(d) for d in devices]}; the shards' "
                         "results are merged on the queries' device, which must be of that type too")
    if queries_device is not None and devices[0].type != queries_device.type:
        raise ValueError(f"shards: queries on {queries_device} but shards on {[str(d) for d in devices]}; shard over "
                         f"{queries_device.type} devices (results are merged on the queries' device without a host "
                         "synchronisation)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = sorted({str(d) for d in devices if d.type == "cuda" and (d.index or 0) >= count})
    if missing:
        raise ValueError(f"shards: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on this machine, "
                         f"which has {count} CUDA device(s); shard over devices it has (repeats are allowed), or "
                         "over ['cpu', 'cpu'] to try sharding without a GPU")
    return devices


def split_lists(offsets: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges [lo, hi) of list ids with about equal entry counts (``offsets`` on the host)."""
    total, nlist = int(offsets[-1]), offsets.numel() - 1
    cuts = [int(torch.searchsorted(offsets, round(total * i / parts))) for i in range(1, parts)]
    bounds = [0, *(min(c, nlist) for c in cuts), nlist]
    return list(zip(bounds[:-1], bounds[1:]))


class _ListShard:
    """Inverted lists [lo, hi) of an index on one device: their codes and ids, ``offsets`` over all
    nlist lists (the others empty, so probing them scans nothing) and the list-side table ``term1``."""

    def __init__(self, arrays: dict, lo: int, hi: int, device: torch.device):
        offsets = arrays["offsets"].cpu()
        first, last = int(offsets[lo]), int(offsets[hi])
        local = (offsets - first).clamp(0, last - first)
        self.term1 = arrays["term1"].to(device)
        self.device = self.term1.device  # with its index ("cuda:0" for "cuda"): compared with the values' device
        self.codes = arrays["codes"][first:last].to(device)
        self.ids = arrays["ids"][first:last].to(device)
        self.offsets = local.to(device)
        sizes = (local[1:] - local[:-1]).sort(descending=True).values
        self._largest_cumsum = torch.cumsum(sizes, 0).tolist()

    def max_candidates(self, nprobe: int) -> int:
        """Candidate slots per query: the sum of the nprobe largest lists this shard holds."""
        return max(1, self._largest_cumsum[nprobe - 1])

    def search(self, lists, dis0, term2, k: int, nprobe: int, out_device: torch.device, values=None):
        """The shard's top k (and ``values[ids]`` with ``values``, on this shard's device) on ``out_device``."""
        # Triton launches on the current CUDA device, not on the tensors' device.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            probes = [t.to(self.device, non_blocking=True) for t in (lists, dis0, term2)]
            found = ivfpq_scan(*probes, self.term1, self.codes, self.ids, self.offsets, k,
                               self.max_candidates(nprobe), values)
        return tuple(t.to(out_device, non_blocking=True) for t in found)


class DeviceIVFPQSearch:
    """The arrays of a FAISS-trained IVF-PQ index on the queries' ``device``, searched by
    :func:`arrag_kernels.ops.ivfpq.ivfpq_probe` then :func:`arrag_kernels.ops.ivfpq.ivfpq_scan`.

    ``shards`` (devices of ``device``'s type, repeats allowed, e.g. ``["cuda:0", "cuda:1"]``) spreads
    the inverted lists over several devices: contiguous ranges of list ids with about equal entry
    counts, one per device, each holding its lists' codes, ids and offsets plus ``term1``
    (nlist x M x ksub floats); rotation, centroids and codebooks stay on ``device``. A query is probed
    once on ``device``, every shard scans the probed lists it holds (the others are empty in its
    offsets: same shapes, nothing scanned), and the shards' top-k come back to ``device``, where
    ordering them by (distance, shard) reproduces the unsharded order exactly: same ids, same
    distances. None (default): all lists on ``device``.

    The arrays are uploaded once; copies between devices are non-blocking and ``search`` never
    waits on the host (each shard's candidate slots per nprobe are computed once, on the host).
    """

    def __init__(self, arrays: dict, nprobe: int, device, shards=None):
        self.device = torch.device(device)
        devices = [self.device] if shards is None else check_shard_devices(shards, self.device)
        offsets = arrays["offsets"].cpu()
        if int(offsets[-1]) == 0:
            raise ValueError("the IVF-PQ index holds no entries")
        self.rotation, self.centroids, self.codebooks = (
            None if arrays[n] is None else arrays[n].to(self.device) for n in ("rotation", "centroids", "codebooks"))
        # Shards whose lists hold no entry could only return padding: they are left out.
        self.shards = [_ListShard(arrays, lo, hi, d) for (lo, hi), d in zip(split_lists(offsets, len(devices)), devices)
                       if offsets[hi] > offsets[lo]]
        self.nprobe = nprobe

    def set_nprobe(self, nprobe: int) -> None:
        nlist = self.centroids.shape[0]
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe must be in [1, nlist = {nlist}], got {nprobe}")
        self.nprobe = nprobe

    def search(self, queries: torch.Tensor, k: int, values: torch.Tensor | None = None):
        lists, dis0, term2 = ivfpq_probe(queries, self.rotation, self.centroids, self.codebooks, self.nprobe)
        if len(self.shards) == 1 and self.shards[0].device == getattr(values, "device", None):
            return self.shards[0].search(lists, dis0, term2, k, self.nprobe, queries.device, values)  # fused gather
        parts = [shard.search(lists, dis0, term2, k, self.nprobe, queries.device) for shard in self.shards]
        if len(parts) == 1:
            return with_values(*parts[0], values)
        dist, ids = (torch.cat(t, 1) for t in zip(*parts))
        # Shards hold ascending list ranges and each returns (distance, slot) order, so (distance,
        # column) is the unsharded (distance, slot) order.
        column = torch.arange(dist.shape[1], device=dist.device)
        order = torch.topk(pack(dist, column), k, dim=1, largest=False, sorted=True).indices
        return with_values(torch.gather(dist, 1, order), torch.gather(ids, 1, order), values)


class IVFPQSearch:
    """IVF-PQ search that follows the queries: faiss-cpu for CPU queries (sharded or not, under the
    ``auto`` and ``reference`` backends: the PyTorch scan is 3-50x slower than faiss on a CPU and
    stays the test oracle, :func:`arrag_kernels.ops.ivfpq_search_ref`), the device search
    (:class:`DeviceIVFPQSearch`, its lists on ``shards`` if given) for CUDA queries and for a forced
    ``triton`` backend (the interpreter on CPU), its arrays uploaded once per device. An on-disk index
    (:mod:`.ondisk`) is searched by faiss-cpu only: device searches and ``shards`` are a ValueError."""

    def __init__(self, index, nprobe: int, shards=None):
        self.index = index
        self.nprobe = nprobe
        self.on_disk = lists_on_disk(index)  # searched by faiss-cpu only (see :mod:`.ondisk`)
        if self.on_disk and shards is not None:
            raise refuse_device(f"sharding over {list(shards)}")
        self.shard_devices = None if shards is None else check_shard_devices(shards)
        self._faiss = None
        self._device: dict[torch.device, DeviceIVFPQSearch] = {}

    def set_nprobe(self, nprobe: int) -> None:
        """Change nprobe without uploading the device arrays again."""
        for backend in [self._faiss, *self._device.values()]:
            if backend is not None:
                backend.set_nprobe(nprobe)
        self.nprobe = nprobe

    def search(self, queries: torch.Tensor, k: int, values: torch.Tensor | None = None):
        if queries.device.type == "cpu" and current_backend() in ("auto", "reference"):
            if self._faiss is None:
                self._faiss = FaissIVFPQSearch(self.index, self.nprobe)
            return self._faiss.search(queries, k, values)
        if self.on_disk:
            raise refuse_device(f"a search with queries on {queries.device} under the {current_backend()!r} backend")
        if queries.device not in self._device:
            from .faiss_index import ivfpq_arrays

            self._device[queries.device] = DeviceIVFPQSearch(ivfpq_arrays(self.index), self.nprobe, queries.device,
                                                             self.shard_devices)
        return self._device[queries.device].search(queries, k, values)


def make_search(index: str, keys: torch.Tensor | None, faiss_index=None, nprobe: int = 1, shards=None):
    """The search backend of a database: exact over ``keys``, or IVF-PQ over ``faiss_index`` with ``nprobe``,
    its inverted lists sharded over the devices ``shards`` if given (see :class:`DeviceIVFPQSearch`)."""
    if shards is not None and index != "ivfpq":
        raise ValueError(f"shards: only index='ivfpq' databases spread their lists over devices, got {index!r}")
    if index == "ivfpq":
        if faiss_index is None:
            raise ValueError("index='ivfpq' needs a trained FAISS IVF-PQ index")
        return IVFPQSearch(faiss_index, nprobe, shards)
    if keys is None:
        raise ValueError(f"index={index!r} searches the exact keys, but this database holds none (index-only)")
    if index == "flat":
        return ExactSearch(keys)
    if index == "faiss-flat":
        return FaissFlatSearch(keys)
    raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
