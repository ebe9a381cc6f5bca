"""Exact k-nearest-neighbour search under squared L2 distance (FAISS ``IndexFlatL2`` semantics).

``dist[q, j] = ||x_q||^2 + ||y_i||^2 - 2 <x_q, y_i>`` (clamped at 0) for the j-th nearest key i,
computed in fp32 whatever the key dtype, ascending. Ties are broken by the smaller key id, so the
result is deterministic; the same expansion FAISS uses gives the same ranking.
"""

from __future__ import annotations

import torch

from ._dispatch import OpDispatcher, TensorCache

MAX_K = 2048
# The reference scans keys in blocks of max(_REF_BLOCK, _REF_CANDIDATES // Q): about 2^20 distances
# (12 MiB of temporaries) per block. Few large blocks matter at batch 1-4: each block is ~10 small
# ops, and with passive OpenMP threads (OMP_WAIT_POLICY=PASSIVE) every op pays a thread wake-up;
# 1M keys at batch 1 took 1.9x matmul + topk in blocks of 2^16 keys, 0.9x in one block.
_REF_BLOCK = 1 << 16
_REF_CANDIDATES = 1 << 20
_MAX_KEYS = 1 << 32


def _check_knn(queries, keys, k, values=None):
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"knn: queries and keys must be 2-D (Q, D) and (N, D), got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"knn: query dimension {queries.shape[1]} does not match key dimension {keys.shape[1]} "
            "(was the database built with another key layout or model?)"
        )
    if not (queries.is_floating_point() and keys.is_floating_point()):
        raise TypeError(f"knn: queries and keys must be floating point, got {queries.dtype} and {keys.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"knn: queries on {queries.device} but keys on {keys.device}; move them to one device")
    if keys.shape[0] > _MAX_KEYS:
        raise ValueError(f"knn: at most 2^32 keys are supported (ids are packed into 32 bits), got {keys.shape[0]}")
    if not 1 <= k <= min(MAX_K, keys.shape[0]):
        raise ValueError(f"knn: k must be in [1, min({MAX_K}, number of keys = {keys.shape[0]})], got {k}")
    if values is not None:
        check_values("knn", values, keys.device)
        if values.shape[0] != keys.shape[0]:
            raise ValueError(f"knn: values must hold one entry per key ({keys.shape[0]}), got {values.shape[0]}")


def check_values(op: str, values, device: torch.device) -> None:
    """``values`` of a search that gathers them: a 1-D integer tensor on the index's device."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: values must be a 1-D integer tensor (a token id per entry), got {type(values).__name__}")
    if values.dim() != 1 or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"{op}: values must be a 1-D integer tensor (a token id per entry), got {values.dtype} "
                        f"{tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"{op}: values on {values.device} but the index on {device}; move them to one device")


def with_values(dist: torch.Tensor, ids: torch.Tensor, values: torch.Tensor | None):
    """``(dist, ids)``, and ``values[ids]`` as int64 (-1 where ``ids`` is -1, padding) when ``values`` is
    given: the gather of the searches that do not fuse it into their kernels."""
    if values is None:
        return dist, ids
    return dist, ids, torch.where(ids >= 0, values[ids.clamp_min(0)].long(), -1)


# Squared norms of each keys tensor in fp32, kept while it lives: a database's keys are searched at
# every decode step, and summing their squares again cost more than the matmul.
_key_norms = TensorCache(lambda keys: torch.cat([(y * y).sum(1) for y in keys.float().split(_REF_BLOCK)]))


def knn_ref(queries: torch.Tensor, keys: torch.Tensor, k: int, values: torch.Tensor | None = None):
    """Pure PyTorch reference of :func:`knn`: blocked distances, then ``torch.topk`` of (distance, id)
    packed into one int64 per candidate, which orders ties by id exactly (no full sort); ``values``
    gathered after the search."""
    q = queries.float()
    q_norm = (q * q).sum(1, keepdim=True)
    key_norms = _key_norms(keys)
    block = max(_REF_BLOCK, _REF_CANDIDATES // max(q.shape[0], 1))
    best = None  # (Q, <= k) packed candidates of the blocks so far, ascending
    for start in range(0, keys.shape[0], block):
        y = keys[start : start + block].float()
        # ||y||^2 - 2 q.y + ||q||^2
        d = torch.addmm(key_norms[start : start + block], q, y.T, alpha=-2.0).add_(q_norm).clamp_min_(0.0)
        # d >= 0: its bits order like the floats (the sign bit cleared: -0 as +0, NaN after +inf)
        bits = d.view(torch.int32) & 0x7FFFFFFF
        cand = (bits.long() << 32) | torch.arange(start, start + y.shape[0], device=q.device)
        if best is not None:
            cand = torch.cat([best, cand], 1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    dist, ids = (best >> 32).int().view(torch.float32), best & 0xFFFFFFFF
    return with_values(dist, ids, values)


knn_dispatcher = OpDispatcher("knn")
knn_dispatcher.register("reference")(knn_ref)


def knn(queries: torch.Tensor, keys: torch.Tensor, k: int, values: torch.Tensor | None = None):
    """Exact k-NN.

    Args:
        queries: (Q, D) float.
        keys: (N, D) float (fp32, fp16 or bf16); distances are accumulated in fp32.
        k: neighbours per query, 1 <= k <= min(2048, N).
        values: optional (N,) integer tensor on the keys' device (a database's token ids): also return
            ``values[ids]``, gathered inside the search's last kernel on the Triton backend.

    Returns:
        dist: (Q, k) float32 squared L2 distances, ascending.
        ids: (Q, k) int64 row indices into ``keys``; equal distances are ordered by id.
        With ``values``, a third tensor: (Q, k) int64 ``values[ids]``.

    On CUDA the Triton search runs four launches fixed by the shapes (the value gather included),
    without host synchronisation (CUDA-graph capturable); :func:`arrag_kernels.ops.knn_plan` gives
    their grids, bytes and scratch.
    """
    _check_knn(queries, keys, k, values)
    return knn_dispatcher(queries, keys, k, values)
